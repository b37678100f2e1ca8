"""`save` and `load`: choosing the format of a file, and writing it whole or not at all.

    save(out, "attributions.safetensors")                      # refuses to overwrite unless overwrite=True
    save(out, "attributions.json", scores_precision="float16")
    save(out, "attributions.json.gz", format="inseq")          # for Inseq's load(..., decompress=True)
    load("attributions.safetensors").equals(out)

`load` finds the format from the content: safetensors, our JSON or Inseq's JSON, each JSON gzipped or
not, and raises `ValueError` naming the file and the problem for truncated, tampered or foreign files.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Callable

from instrument.files.document import PRECISIONS
from instrument.files.inseq_format import from_inseq_document, to_inseq_document
from instrument.files.json_format import from_json_document, json_document
from instrument.files.problems import InvalidFile
from instrument.files.safetensors_format import load_safetensors, looks_like_safetensors, safetensors_writer
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput

FORMATS = ("safetensors", "json", "inseq")
GZIP_MAGIC = b"\x1f\x8b"


def is_json_path(path: Path) -> bool:
    """`.json` and `.json.gz` paths (any case) hold JSON by default."""
    suffixes = [x.lower() for x in path.suffixes]
    return suffixes[-1:] == [".json"] or suffixes[-2:] == [".json", ".gz"]


def write_atomic(path: Path, write: Callable[[str], None], overwrite: bool) -> None:
    """`write(temporary_path)` next to `path`, then one rename: `path` is never left half written."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists already; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save(
    out: FeatureAttributionOutput | FeatureAttributionSequenceOutput,
    path: str | os.PathLike,
    scores_precision: str = "float32",
    overwrite: bool = False,
    format: str | None = None,
    compress: bool | None = None,
) -> Path:
    """`save(out, "attr.safetensors")`; returns the path.

    `format`: "safetensors", "json" (ours, portable) or "inseq" (Inseq's JSON, which
    `inseq.FeatureAttributionOutput.load`
    reads); by default "json" for `.json` / `.json.gz` paths, else "safetensors". JSON formats are gzipped when
    `compress=True` or the path ends in `.gz` (Inseq reads those with `load(path, decompress=True)`).
    `scores_precision="float16"` stores floating-point tensors as float16 (values beyond ±65504 become
    infinite; a warning says so); `load` returns them upcast to float32. With "float32" (the default) a
    float32 output round-trips exactly; float64 / bfloat16 tensors are stored as float32.
    """
    if isinstance(out, FeatureAttributionSequenceOutput):
        out = FeatureAttributionOutput([out])
    if not isinstance(out, FeatureAttributionOutput):
        raise TypeError(f"save takes a FeatureAttributionOutput, got {type(out).__name__}")
    if scores_precision not in PRECISIONS:
        raise ValueError(f"scores_precision must be one of {list(PRECISIONS)}, got {scores_precision!r}")
    path = Path(path)
    if format is None:
        format = "json" if is_json_path(path) else "safetensors"
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if compress is None:
        compress = path.suffix.lower() == ".gz"
    if compress and format == "safetensors":
        raise ValueError("compress=True is for the JSON formats; safetensors files are written uncompressed")
    if format == "safetensors":
        write_atomic(path, safetensors_writer(out, scores_precision), overwrite)
        return path
    document = to_inseq_document(out, scores_precision) if format == "inseq" else json_document(out, scores_precision)
    data = json.dumps(document, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if compress:
        data = gzip.compress(data, mtime=0)

    def write(temporary: str) -> None:
        Path(temporary).write_bytes(data)

    write_atomic(path, write, overwrite)
    return path


def load(path: str | os.PathLike) -> FeatureAttributionOutput:
    """`load("attr.safetensors")`: the saved FeatureAttributionOutput; `ValueError` for a bad file. A
    directory written by `attribute_dataset` is read whole (see `instrument.files.shards`).

    The format is found from the content: safetensors, our JSON or Inseq's JSON, each JSON gzipped or not.
    Nothing in a file is evaluated: no pickle, no eval.
    """
    path = Path(path)
    if path.is_dir():  # a data set's shards and manifest (instrument.files.shards)
        from instrument.files.shards import load_directory

        return load_directory(path)
    if not path.is_file():
        raise FileNotFoundError(f"No attribution file at {path}")
    try:
        data = path.read_bytes()
        if data[:2] == GZIP_MAGIC:
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as error:
                raise InvalidFile(f"not a readable gzip file ({error})") from None
        elif looks_like_safetensors(data) or not (is_json_path(path) or data.lstrip()[:1] in (b"{", b"[")):
            return load_safetensors(path)
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InvalidFile(f"not valid JSON ({error})") from None
        if isinstance(document, dict) and "__instance_type__" in document:
            return from_inseq_document(document)
        return from_json_document(document)
    except InvalidFile as problem:
        raise ValueError(f"{path}: {problem}") from None
