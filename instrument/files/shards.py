"""A data set's attributions on disk: one directory of shards and a manifest, read lazily.

    ds = open_attributions("out/")          # reads manifest.json only
    len(ds), ds.ids[:3], ds.texts[0]        # (input text, generated text) of the first example
    seq = ds[12]                            # reads the one shard holding example 12
    out = FeatureAttributionOutput.load("out/")   # everything, in one output

The directory:
- `shard-00000.safetensors`, `shard-00001.safetensors`, ...: each one `FeatureAttributionOutput` in our
  safetensors format (`FeatureAttributionOutput.load(path)` reads it), written under a temporary name and
  renamed, so a killed job never leaves half a shard.
- `manifest.json`: `{"format": "seq-instrument-dataset", "version": 1, "model", "method", "arguments",
  "versions", "complete", "shards": [{"file", "sha256", "ids", "texts"}], "skipped": [...]}`; `ids` are
  the data set's row ids of a shard's examples in output order, `texts` their (input, generated) texts.
- while a job runs, `.progress-<rank>.json` files: the shards each worker finished (the manifest is
  rebuilt from them; see `instrument.models.dataset`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from instrument.files.problems import InvalidFile, expect
from instrument.files.saving import load as load_file
from instrument.files.saving import save, write_atomic
from instrument.merging import merge_attributions
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput

FORMAT = "seq-instrument-dataset"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_ENTRY_KEYS = ("file", "sha256", "ids", "texts")


def shard_name(index: int) -> str:
    """`shard_name(3)`: "shard-00003.safetensors"."""
    return f"shard-{index:05d}.safetensors"


def shard_index(name: str) -> int:
    """`shard_index("shard-00003.safetensors")`: 3."""
    return int(name.removeprefix("shard-").removesuffix(".safetensors"))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """`value` as JSON at `path`, whole or not at all."""
    data = json.dumps(value, ensure_ascii=False, allow_nan=False, indent=1)
    write_atomic(Path(path), lambda temporary: Path(temporary).write_text(data, encoding="utf-8"), overwrite=True)


def write_shard(
    directory: str | os.PathLike, index: int, out: FeatureAttributionOutput, ids: list, texts: list
) -> dict:
    """Saves `out` (one sequence per id) as shard `index` of `directory`; returns its manifest entry
    `{"file", "sha256", "ids", "texts"}`. An existing shard of that index is replaced."""
    if len(out) != len(ids) or len(texts) != len(ids):
        raise ValueError(f"shard {index}: {len(out)} sequences, {len(ids)} ids and {len(texts)} texts")
    path = Path(directory) / shard_name(index)
    save(out, path, overwrite=True)
    return {"file": path.name, "sha256": file_sha256(path), "ids": list(ids), "texts": [list(t) for t in texts]}


def make_manifest(
    model: str,
    method: str,
    arguments: dict,
    versions: dict,
    shards: list[dict],
    skipped: list | None = None,
    complete: bool = False,
) -> dict:
    """The manifest of a directory (shard entries as `write_shard` returns them)."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "method": method,
        "arguments": arguments,
        "versions": versions,
        "complete": complete,
        "shards": [{key: entry[key] for key in SHARD_ENTRY_KEYS} for entry in shards],
        "skipped": list(skipped or []),
    }
    check_manifest(manifest)
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    write_json_atomic(manifest_path(directory), manifest)


def shard_verified(directory: str | os.PathLike, entry: dict) -> bool:
    """Whether the file of a manifest entry exists and has the recorded checksum."""
    path = Path(directory) / entry["file"]
    return path.is_file() and file_sha256(path) == entry["sha256"]


def manifest_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / MANIFEST


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checked manifest of `directory`; FileNotFoundError without one, ValueError for a bad one."""
    path = manifest_path(directory)
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"No attributions directory at {directory}")
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a data set's attributions (or not started)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        check_manifest(manifest)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except InvalidFile as problem:
        raise ValueError(f"{path}: {problem}") from None
    return manifest


def check_manifest(manifest: Any) -> None:
    """InvalidFile naming the problem unless `manifest` is a well-formed version-1 manifest."""
    expect(isinstance(manifest, dict) and manifest.get("format") == FORMAT, f"not a manifest of format {FORMAT!r}")
    expect(manifest.get("version") == VERSION, f"unsupported manifest version {manifest.get('version')!r}")
    expect(isinstance(manifest.get("complete"), bool), "'complete' must be true or false")
    expect(isinstance(manifest.get("arguments"), dict), "'arguments' must be an object")
    shards = manifest.get("shards")
    expect(isinstance(shards, list), "'shards' must be a list")
    expect(isinstance(manifest.get("skipped", []), list), "'skipped' must be a list")
    names = set()
    for k, entry in enumerate(shards):
        expect(
            isinstance(entry, dict) and all(key in entry for key in SHARD_ENTRY_KEYS),
            f"shard entry {k} must have {list(SHARD_ENTRY_KEYS)}",
        )
        name = entry["file"]
        expect(
            isinstance(name, str) and name.startswith("shard-") and name.endswith(".safetensors") and "/" not in name,
            f"shard entry {k}: bad file name {name!r}",
        )
        expect(name not in names, f"shard {name} is listed twice")
        names.add(name)
        expect(isinstance(entry["ids"], list) and isinstance(entry["texts"], list), f"{name}: bad ids or texts")
        expect(
            len(entry["ids"]) == len(entry["texts"]), f"{name}: {len(entry['ids'])} ids but {len(entry['texts'])} texts"
        )
        expect(
            all(isinstance(t, list) and len(t) == 2 for t in entry["texts"]),
            f"{name}: texts must be [input, generated] pairs",
        )


class ShardedAttributions:
    """The attributions of a data set in a directory, read a shard at a time (`open_attributions`).

        ds = open_attributions("out/")
        for seq in ds: ...               # shard after shard
        ds[5], ds.shard_of(5), ds.ids[5], ds.texts[5]

    Indexing reads (and checks the checksum of) the shard holding the example, and keeps the last
    shard read. `complete` is False while the job that writes the directory has not finished; the
    shards listed are then the ones done so far.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self._where: list[tuple[int, int]] = []  # example -> (shard position, offset in the shard)
        for k, entry in enumerate(self.manifest["shards"]):
            self._where += [(k, offset) for offset in range(len(entry["ids"]))]
        self.ids = [i for entry in self.manifest["shards"] for i in entry["ids"]]
        self.texts = [tuple(t) for entry in self.manifest["shards"] for t in entry["texts"]]
        self._cached: tuple[int, FeatureAttributionOutput] | None = None

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    @property
    def skipped(self) -> list:
        return self.manifest.get("skipped", [])

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        shards = len(self.manifest["shards"])
        return f"ShardedAttributions({str(self.directory)!r}: {len(self)} examples, {shards} shards, {state})"

    def _position(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"Index examples with an int, got {type(i).__name__}")
        position = i + len(self) if i < 0 else i
        if not 0 <= position < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        return position

    def shard_of(self, i: int) -> str:
        """The file name of the shard holding example `i`."""
        return self.manifest["shards"][self._where[self._position(i)][0]]["file"]

    def shard(self, k: int) -> FeatureAttributionOutput:
        """The whole output of the `k`-th shard of the manifest (checked against its checksum)."""
        if self._cached is not None and self._cached[0] == k:
            return self._cached[1]
        entry = self.manifest["shards"][k]
        path = self.directory / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the manifest but missing")
        if file_sha256(path) != entry["sha256"]:
            raise ValueError(f"{path}: the checksum does not match the manifest's (changed or damaged file)")
        out = load_file(path)
        if len(out) != len(entry["ids"]):
            raise ValueError(f"{path} holds {len(out)} examples, the manifest lists {len(entry['ids'])}")
        self._cached = (k, out)
        return out

    def __getitem__(self, i: int) -> FeatureAttributionSequenceOutput:
        k, offset = self._where[self._position(i)]
        return self.shard(k)[offset]

    def __iter__(self) -> Iterator[FeatureAttributionSequenceOutput]:
        for k in range(len(self.manifest["shards"])):
            yield from self.shard(k)

    def load(self) -> FeatureAttributionOutput:
        """Every shard in one output (as `FeatureAttributionOutput.load(directory)`)."""
        shards = [self.shard(k) for k in range(len(self.manifest["shards"]))]
        if not shards:
            return FeatureAttributionOutput([], info={})
        return merge_attributions(shards)


def open_attributions(directory: str | os.PathLike) -> ShardedAttributions:
    """`open_attributions("out/")`: the examples of a data set's attributions directory, read lazily.

    ds = open_attributions("out/")
    len(ds), ds.ids, ds.texts, ds[0].show()
    """
    return ShardedAttributions(directory)


def load_directory(directory: str | os.PathLike) -> FeatureAttributionOutput:
    """All examples of a complete attributions directory in one output; ValueError for an unfinished one."""
    ds = open_attributions(directory)
    if not ds.complete:
        raise ValueError(
            f"{directory}: the job writing it has not finished ({len(ds)} examples in {len(ds.manifest['shards'])} "
            "shards so far); rerun it to finish, or read the shards done with open_attributions()"
        )
    return ds.load()
