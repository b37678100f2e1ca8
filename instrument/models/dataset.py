"""`attribute_dataset`: a whole data set attributed into shards that survive the job.

    model = instrument.load_model("gpt2", "saliency")
    data = datasets.load_dataset("json", data_files="prompts.jsonl", split="train")
    ds = model.attribute_dataset(data, "out/", input_text_field="prompt", generated_text_field="answer")
    ds[0].show()                                  # instrument.open_attributions("out/") later

How it runs. Rows are numbered 0, 1, ... in the data set's order (their ids); shard k holds the rows
`k * shard_size ... (k + 1) * shard_size - 1` that are not skipped, in that order. Within a shard the
examples are sorted by length into batches (little padding), attributed, and put back in order; the
shard is then written (`instrument.files.shards`: a temporary name, then a rename) and recorded with
its checksum: in `manifest.json` in one process, in `.progress-<rank>.json` per rank under torchrun
(rank 0 folds them into the manifest at the end). A rerun of the same call skips the shards already
recorded whose checksum still matches, and does the rest. Ranks of torchrun take the shards k with
`k % world_size == rank`; the Ray backend hands shard numbers to a pool of actors that read their
rows themselves, so the data never sits in one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import inspect
import itertools
import json
import os
import platform
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from instrument import batching
from instrument.files import shards as files
from instrument.files.json_values import jsonable
from instrument.merging import merge_attributions
from instrument.outputs import FeatureAttributionOutput

SHARD_SIZE = 64
BATCH_SIZE = 8
# batch_size="auto" on the CPU: a shard's length-sorted examples go in batches padded by at most this share of
# their tokens. The CPU is compute-bound, so padding costs its FLOPs in full, and a batch of a few examples
# already runs at the matrix multiplications' peak; one batch of a whole shard of 8-64 word prompts did 1.5x
# the FLOPs of these buckets (benchmarks/README.md). Accelerators keep the whole shard: there, larger batches
# pay for their padding.
CPU_AUTO_PADDING = 0.1
MIN_FREE_BYTES = 16 * 2**20  # less free disk than this in the output directory: refused before the first batch
PROGRESS = ".progress-{rank}.json"
INPUT_FIELDS = ("text", "input")  # tried, in order, when no input_text_field is given
REFUSED = {  # attribute() options that make no sense for a whole data set
    "contrast_targets": "per-example contrast targets",
    "contrast_sources": "per-example contrast sources",
    "contrast_ids": "per-example contrast ids",
    "contrast_targets_alignments": "per-example alignments",
    "output_step_attributions": "step attributions (they are not saved)",
    "generate_from_target_prefix": "target prefixes",
}


class BadRow(ValueError):
    """A row that cannot be attributed (missing field, None or empty text); skipped with skip_bad_rows."""


@dataclasses.dataclass
class ModelSpec:
    """How a worker loads the model itself (the Ray backend from the command line): `load_model`'s arguments.

    ModelSpec("gpt2", "saliency", device="cuda").load()
    """

    name: str
    attribution_method: str | None = None
    device: str | None = None
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    method_kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def model_name(self) -> str:
        """As `AttributionModel.model_name` of the loaded model (a demo model's folder, else the name)."""
        from instrument.models import _demo_path

        return _demo_path(self.name) or self.name

    def load(self):
        from instrument.models import load_model

        return load_model(
            self.name, self.attribution_method, device=self.device, model_kwargs=self.model_kwargs, **self.method_kwargs
        )


def replica_placement(local_rank: int, gpus_per_replica: int, visible: int, total_memory=None) -> dict:
    """`load_model`'s model_kwargs that spread one replica over its own GPUs: rank r of a node takes the GPUs
    `r * k ... r * k + k - 1` (k = `gpus_per_replica`) with a `device_map`; ValueError when they do not exist.

        replica_placement(1, 2, 4)   # {"device_map": "auto", "max_memory": {2: ..., 3: ...}}

    `total_memory(gpu)`: bytes of a GPU (default: CUDA's figure); the replica may fill 90% of each.
    """
    if isinstance(gpus_per_replica, bool) or not isinstance(gpus_per_replica, int) or gpus_per_replica < 1:
        raise ValueError(f"gpus_per_replica must be a positive integer, got {gpus_per_replica!r}")
    gpus = list(range(local_rank * gpus_per_replica, (local_rank + 1) * gpus_per_replica))
    if gpus[-1] >= visible:
        raise ValueError(
            f"gpus_per_replica={gpus_per_replica}: local rank {local_rank} needs GPUs {gpus[0]}-{gpus[-1]} but "
            f"{visible} are visible; run torchrun with --nproc_per_node {max(visible // gpus_per_replica, 1)} or fewer"
        )
    if total_memory is None:

        def total_memory(gpu):
            return torch.cuda.get_device_properties(gpu).total_memory

    return {"device_map": "auto", "max_memory": {gpu: int(total_memory(gpu) * 0.9) for gpu in gpus}}


# -- rows --------------------------------------------------------------------------------------------


class Source:
    """The rows of a data set: a Hugging Face `Dataset` / `IterableDataset`, a list, or any iterable of
    strings, (input, generated) pairs or dicts. `length` is None when unknown without reading it all."""

    def __init__(self, data: Any):
        if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
            raise TypeError(
                "data must be a Hugging Face Dataset or IterableDataset, a list or an iterable of rows "
                f"(strings, (input, generated) pairs or dicts), got {type(data).__name__}"
            )
        self.data = data
        self.length = len(data) if hasattr(data, "__len__") else None
        self.columns = list(getattr(data, "column_names", None) or []) or None

    @property
    def reiterable(self) -> bool:
        return iter(self.data) is not self.data  # a generator can be read once only

    def rows(self) -> Iterator[tuple[int, Any]]:
        return enumerate(self.data)

    def slice(self, start: int, stop: int) -> list[tuple[int, Any]]:
        """The rows `start ... stop - 1` with their ids, read without reading the rows before them where the
        data allows it (`Dataset.select`, `IterableDataset.skip`)."""
        data = self.data
        if hasattr(data, "select") and self.length is not None:
            part = data.select(range(start, min(stop, self.length)))
        elif hasattr(data, "skip") and hasattr(data, "take"):
            part = data.skip(start).take(stop - start)
        elif hasattr(data, "__getitem__") and self.length is not None:
            part = data[start:stop]
        else:
            part = itertools.islice(iter(data), start, stop)
        return list(zip(itertools.count(start), part))

    def count(self) -> int:
        if self.length is None:
            self.length = sum(1 for _ in self.data)
        return self.length


@dataclasses.dataclass
class Fields:
    """Where a row's texts are: `text(record)` -> (input text, generated text or None), BadRow if unusable."""

    input: str | None
    generated: str | None

    def resolve(self, first: Any, columns: list | None) -> Fields:
        """The input field, found from the first row when not given; ValueError for a field the data lacks."""
        keys = columns if columns is not None else (list(first) if isinstance(first, Mapping) else None)
        if keys is None:
            if self.input is not None or self.generated is not None:
                raise ValueError(
                    f"input_text_field/generated_text_field name fields of dict rows; the rows are "
                    f"{type(first).__name__}s"
                )
            return self
        field = self.input
        if field is None:
            found = [name for name in INPUT_FIELDS if name in keys]
            if not found:
                raise ValueError(f"give input_text_field: the data set has no 'text' or 'input' field (fields: {keys})")
            field = found[0]
        for kind, name in (("input_text_field", field), ("generated_text_field", self.generated)):
            if name is not None and columns is not None and name not in columns:
                raise ValueError(f"{kind}={name!r}: the data set has no such field (fields: {columns})")
        return Fields(field, self.generated)

    def texts(self, record: Any) -> tuple[str, str | None]:
        if isinstance(record, str):
            input_text, target = record, None
        elif isinstance(record, (tuple, list)) and len(record) == 2:
            input_text, target = record
        elif isinstance(record, Mapping):
            missing = [f for f in (self.input, self.generated) if f is not None and f not in record]
            if missing:
                raise BadRow(f"no field {missing[0]!r} (fields: {list(record)})")
            input_text = record[self.input]
            target = record[self.generated] if self.generated is not None else None
            if self.generated is not None and target is None:
                raise BadRow(f"field {self.generated!r} is None")
        else:
            raise BadRow(f"a row must be a string, an (input, generated) pair or a dict, got {type(record).__name__}")
        for name, value in (("input", input_text), ("generated", target)):
            if value is None and name == "generated":
                continue
            label = self.input if name == "input" else self.generated
            where = f"field {label!r}" if label else f"the {name} text"
            if not isinstance(value, str):
                raise BadRow(f"{where} is {'None' if value is None else type(value).__name__}, not a string")
            if not value.strip():
                raise BadRow(f"{where} is empty")
        return input_text, target


def shards_of(rows: Iterable[tuple[int, Any]], size: int) -> Iterator[tuple[int, list]]:
    """(k, rows of shard k) for consecutive rows with ids counted from 0."""
    for k, group in itertools.groupby(rows, key=lambda row: row[0] // size):
        yield k, list(group)


# -- attributing one shard ---------------------------------------------------------------------------


def plan_batches(
    lengths: list[int], keys: list, batch_size: int | str, max_tokens: int | None, max_padding: float | None = None
) -> list[list[int]]:
    """Positions of the examples in batches: sorted by (key, length), at most `batch_size` examples (unless
    "auto": the whole group, which `attribute` splits by memory), at most `max_tokens` padded tokens, and
    padded tokens at most `1 + max_padding` times the real ones.

        plan_batches([5, 2, 9, 3], [0, 0, 0, 0], 2, None)   # [[1, 3], [0, 2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (keys[i], lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0  # tokens of the examples in `current`, unpadded
    for i in order:
        full = current and (
            keys[current[0]] != keys[i]
            or (not batching.is_auto(batch_size) and len(current) >= batch_size)
            or (max_tokens is not None and (len(current) + 1) * lengths[i] > max_tokens)
            or (max_padding is not None and (len(current) + 1) * lengths[i] > (1 + max_padding) * (real + lengths[i]))
        )
        if full:
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    return batches + ([current] if current else [])


def _on_cpu(model: Any) -> bool:
    device = getattr(model, "device", None)
    return device is not None and torch.device(device).type == "cpu"


@dataclasses.dataclass
class ShardResult:
    out: FeatureAttributionOutput
    ids: list
    texts: list
    skipped: list  # [{"id", "reason"}]


@dataclasses.dataclass
class ShardAttributor:
    """Attributes the rows of one shard: `attributor(rows, progress)` -> ShardResult (examples in row order)."""

    model: Any
    fields: Fields
    batch_size: int | str
    max_tokens: int | None
    skip_bad_rows: bool
    aggregate_output: bool
    kwargs: dict

    def __call__(self, rows: list[tuple[int, Any]], progress: Callable[[int, int], None] | None = None) -> ShardResult:
        ids, inputs, targets, skipped = [], [], [], []
        for row_id, record in rows:
            try:
                input_text, target = self.fields.texts(record)
            except BadRow as problem:
                if not self.skip_bad_rows:
                    raise ValueError(f"row {row_id}: {problem} (pass skip_bad_rows=True to skip such rows)") from None
                skipped.append({"id": row_id, "reason": str(problem)})
                continue
            ids.append(row_id)
            inputs.append(input_text)
            targets.append(target)
        tokenizer = self.model.tokenizer
        lengths = [
            len(tokenizer(text, add_special_tokens=False)["input_ids"])
            + (len(tokenizer(target, add_special_tokens=False)["input_ids"]) if target is not None else 0)
            for text, target in zip(inputs, targets)
        ]
        sequences: list = [None] * len(ids)
        generated: list = [None] * len(ids)
        outputs = []
        padding = CPU_AUTO_PADDING if batching.is_auto(self.batch_size) and _on_cpu(self.model) else None
        for batch in plan_batches(lengths, [t is None for t in targets], self.batch_size, self.max_tokens, padding):
            given = [targets[i] for i in batch]
            out = self.model.attribute(
                [inputs[i] for i in batch],
                None if given[0] is None else given,
                batch_size="auto" if batching.is_auto(self.batch_size) else len(batch),
                show_progress=False,
                **self.kwargs,
            )
            for i, seq, text in zip(batch, out.sequence_attributions, out.info["generated_texts"]):
                sequences[i], generated[i] = seq, text
            outputs.append(out)
            if progress is not None:
                progress(len(batch), sum(lengths[i] for i in batch))
        if outputs:
            info = dict(merge_attributions(outputs).info)
            info.update(input_texts=inputs, generated_texts=generated)
            out = FeatureAttributionOutput(sequences, info=info)
            if self.aggregate_output:
                out = out.aggregate()
        else:
            out = FeatureAttributionOutput([], info={})
        return ShardResult(out, ids, [[a, b] for a, b in zip(inputs, generated)], skipped)


# -- the output directory ----------------------------------------------------------------------------


class ShardDirectory:
    """The output directory of one job, as one rank (or the Ray driver) sees it."""

    def __init__(self, directory, header: dict, rank: int = 0, world: int = 1):
        self.path = Path(directory)
        self.header, self.rank, self.world = header, rank, world
        self.done: dict[int, dict] = {}  # shard index -> entry (with "skipped"), recorded before this run
        self.mine: dict[int, dict] = {}  # written by this worker in this run

    def _ours(self) -> list[Path]:
        return [
            p
            for p in self.path.iterdir()
            if p.name == files.MANIFEST
            or (p.name.startswith("shard-") and p.name.endswith(".safetensors"))
            or (p.name.startswith(".progress-") and p.name.endswith(".json"))
            or (p.name.startswith(".shard-") and p.name.endswith(".tmp"))
            or (p.name.startswith(".manifest.json.") and p.name.endswith(".tmp"))
            or (p.name.startswith(".progress-") and p.name.endswith(".tmp"))
        ]

    def prepare(self, overwrite: bool) -> None:
        """Rank 0, before any attribution: creates or checks the directory, refuses other arguments, checks
        that it can write, and folds what earlier runs recorded into a manifest (complete=False)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ValueError(f"output directory {path} is a file")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create the output directory {path}: {error}") from None
        manifest = path / files.MANIFEST
        if overwrite:
            for p in self._ours():
                p.unlink()
        elif manifest.exists():
            self._check_same(files.read_manifest(path))
        elif any(p for p in path.iterdir() if p not in self._ours()):
            raise ValueError(
                f"{path} is not empty and holds no {files.MANIFEST}: not an output directory of attribute_dataset; "
                "choose an empty or new directory"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write in the output directory {path} (permission denied)")
        free = shutil.disk_usage(path).free
        if free < MIN_FREE_BYTES:
            raise ValueError(f"the disk of {path} is full ({free / 2**20:.1f} MiB free)")
        entries = self.recorded()
        for p in path.iterdir():
            if p.name.endswith(".tmp") or p.name.startswith(".progress-"):
                p.unlink()  # left by a killed job
        try:
            self.write_manifest(entries, complete=False)
        except OSError as error:
            raise ValueError(f"cannot write in the output directory {path}: {error}") from None

    def _check_same(self, manifest: dict) -> None:
        header = self.header
        differ = [key for key in ("model", "method") if manifest.get(key) != header[key]]
        old, new = manifest["arguments"], header["arguments"]
        differ += [f"arguments.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if differ:
            shown = "; ".join(f"{k}: {_lookup(manifest, k)!r} there, {_lookup(header, k)!r} now" for k in differ[:3])
            raise ValueError(
                f"{self.path} holds attributions made with other arguments ({shown}); pass overwrite=True "
                "(--overwrite) to start over, or choose another directory"
            )

    def recorded(self) -> dict[int, dict]:
        """The shards recorded in the manifest and progress files whose files still match their checksums."""
        entries: dict[int, dict] = {}
        manifest = self.path / files.MANIFEST
        if manifest.exists():
            data = files.read_manifest(self.path)
            skipped: dict[str, list] = {}
            for item in data.get("skipped", []):
                skipped.setdefault(item.get("shard"), []).append({"id": item["id"], "reason": item["reason"]})
            for entry in data["shards"]:
                entries[files.shard_index(entry["file"])] = {**entry, "skipped": skipped.get(entry["file"], [])}
        for progress in sorted(self.path.glob(".progress-*.json")):
            try:
                for entry in json.loads(progress.read_text(encoding="utf-8")):
                    entries[files.shard_index(entry["file"])] = entry
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a progress file is only a record; its shards are redone
        return {k: e for k, e in sorted(entries.items()) if files.shard_verified(self.path, e)}

    def write_manifest(self, entries: dict[int, dict], complete: bool) -> None:
        ordered = [entries[k] for k in sorted(entries)]
        skipped = [{"id": s["id"], "shard": e["file"], "reason": s["reason"]} for e in ordered for s in e["skipped"]]
        manifest = files.make_manifest(
            self.header["model"],
            self.header["method"],
            self.header["arguments"],
            self.header["versions"],
            ordered,
            skipped,
            complete,
        )
        files.write_manifest(self.path, manifest)

    def add(self, k: int, result: ShardResult) -> None:
        entry = files.write_shard(self.path, k, result.out, result.ids, result.texts)
        entry["skipped"] = result.skipped
        self.record(k, entry)

    def record(self, k: int, entry: dict) -> None:
        self.mine[k] = entry
        if self.world == 1:
            self.write_manifest({**self.done, **self.mine}, complete=False)
        else:
            files.write_json_atomic(
                self.path / PROGRESS.format(rank=self.rank), [self.mine[i] for i in sorted(self.mine)]
            )

    def finish(self, n_shards: int) -> None:
        """Rank 0, once every worker is done: the manifest of all shards, complete=True."""
        entries = self.recorded()
        missing = [k for k in range(n_shards) if k not in entries]
        if missing:
            raise RuntimeError(
                f"shards {missing[:10]} of {self.path} are missing or damaged; run the same command again"
            )
        self.write_manifest({k: entries[k] for k in range(n_shards)}, complete=True)
        for progress in self.path.glob(".progress-*.json"):
            progress.unlink()


def _lookup(record: dict, key: str) -> Any:
    for part in key.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


# -- the arguments recorded --------------------------------------------------------------------------


def _recorded(value: Any) -> Any:
    """JSON for the manifest's arguments; a tensor by its shape, dtype and a hash of its values (so that a
    rerun with other baselines is refused)."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        return f"tensor(shape={list(data.shape)}, dtype={data.dtype}, sha256={digest[:16]})"
    if isinstance(value, dict):
        return {str(k): _recorded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_recorded(v) for v in value]
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return jsonable(value)


def _without_defaults(kwargs: dict) -> dict:
    """`attribute()`'s options less those equal to its defaults (an empty list or dict counting as None), so
    that the recorded arguments do not depend on which defaults were spelled out."""
    from instrument.models.base import AttributionModel

    defaults = {
        name: p.default
        for name, p in inspect.signature(AttributionModel.attribute).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    empty = (None, (), [], {})

    def is_default(name, value):
        if name not in defaults:
            return False
        default = defaults[name]
        return (
            (value in empty and default in empty)
            if isinstance(value, (list, tuple, dict, type(None)))
            else (type(value) is type(default) and value == default)
        )

    return {k: v for k, v in sorted(kwargs.items()) if k != "method" and not is_default(k, v)}  # method: its own key


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("seq-instrument", "torch", "transformers", "datasets", "ray"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


# -- the progress bar --------------------------------------------------------------------------------


class _Progress:
    """A rich bar on stderr: examples done, examples/s, tokens/s, time left (nothing when disabled)."""

    def __init__(self, enabled: bool, total: int | None, label: str):
        self.enabled, self.examples, self.tokens, self.started = enabled, 0, 0, time.perf_counter()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.bar.add_task(label, total=total, rates="")
        self.bar.start()

    def __call__(self, examples: int, tokens: int) -> None:
        self.examples += examples
        self.tokens += tokens
        if self.enabled:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            rates = f"{self.examples / elapsed:.1f} examples/s, {self.tokens / elapsed:.0f} tokens/s"
            self.bar.update(self.task, advance=examples, rates=rates)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


# -- the job -----------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _on_rank0(world: int, fn: Callable[[], Any]) -> None:
    """`fn()` on rank 0; its error (a ValueError...) raised on every rank, so that none waits forever."""
    rank = torch.distributed.get_rank() if world > 1 else 0
    error = None
    if rank == 0:
        try:
            fn()
        except Exception as caught:  # re-raised below, on every rank
            error = caught
    if world > 1:
        box = [None if error is None else (type(error).__name__, str(error))]
        torch.distributed.broadcast_object_list(box, src=0)
        if rank != 0 and box[0] is not None:
            kind = {"ValueError": ValueError, "TypeError": TypeError, "FileNotFoundError": FileNotFoundError}
            raise kind.get(box[0][0], RuntimeError)(f"rank 0: {box[0][1]}")
    if error is not None:
        raise error


def attribute_dataset(
    model: Any,
    data: Any,
    output_dir: str | os.PathLike | None = None,
    *,
    input_text_field: str | None = None,
    generated_text_field: str | None = None,
    shard_size: int = SHARD_SIZE,
    batch_size: int | str = BATCH_SIZE,
    max_tokens_per_batch: int | None = None,
    overwrite: bool = False,
    skip_bad_rows: bool = False,
    show_progress: bool = True,
    viz_path: str | os.PathLike | None = None,
    aggregate_output: bool = False,
    backend: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    gpus_per_actor: float = 0,
    dataset_info: dict | None = None,
    **attribute_kwargs,
):
    """`attribute_dataset(model, data, "out/", input_text_field="prompt")`: every row of `data`, attributed
    into shards in `output_dir`; returns `instrument.open_attributions(output_dir)` (without `output_dir`,
    one process only: the `FeatureAttributionOutput` of all rows, kept in memory).

    `data`: a Hugging Face `Dataset` or `IterableDataset` (streaming), a list, or any iterable of strings,
    (input, generated) pairs or dicts; the texts of a dict are in `input_text_field` (default: its "text"
    or "input" field) and `generated_text_field` (None: generated by the model). `attribute_kwargs` are
    `attribute()`'s (method, step_scores, attributed_fn, n_steps, generation_args...).

    Batches: examples sorted by length within each shard of `shard_size` rows, `batch_size` examples ("auto":
    sized from free memory; on the CPU, in length buckets padded by at most `CPU_AUTO_PADDING`) and at most
    `max_tokens_per_batch` padded tokens. A rerun with the same arguments finishes an interrupted job;
    `overwrite=True` starts over; other arguments are refused. Rows that cannot be attributed raise ValueError
    naming them, or with `skip_bad_rows=True` are skipped and listed in the manifest. Under torchrun (an
    initialized process group) each rank takes its share of the shards.
    `backend="ray"`: a pool of `ray_actors` actors with `gpus_per_actor` GPUs each, on the Ray cluster at
    `ray_address` (default: a local one); `model` may then be a `ModelSpec`, loaded by each actor.
    `dataset_info`: recorded in the manifest with the arguments (where the data came from).
    """
    _check_options(shard_size, batch_size, max_tokens_per_batch, backend, output_dir, attribute_kwargs)
    source = Source(data)
    rows_iter = iter(source.data)
    try:
        first = next(rows_iter)
    except StopIteration:
        raise ValueError("the data set is empty (no rows)") from None
    if not source.reiterable:  # a generator: the first row is read already; keep it
        source = Source(itertools.chain([first], rows_iter))
    fields = Fields(input_text_field, generated_text_field).resolve(first, source.columns)
    if source.reiterable and source.length is not None and not skip_bad_rows:
        _check_rows(source, fields)  # before any attribution
    method = attribute_kwargs.get("method") or getattr(model, "attribution_method", None)
    if method is None:
        raise ValueError("No attribution method: pass method=... here or to load_model")
    header = {
        "model": model.model_name,
        "method": method,
        "arguments": {
            **_recorded(_without_defaults(attribute_kwargs)),
            "input_text_field": fields.input,
            "generated_text_field": fields.generated,
            "shard_size": shard_size,
            "aggregate_output": aggregate_output,
            "dataset": _recorded(dataset_info or {}),
        },
        "versions": versions(),
    }
    if output_dir is None:
        return _in_memory(
            model,
            source,
            fields,
            shard_size,
            batch_size,
            max_tokens_per_batch,
            skip_bad_rows,
            aggregate_output,
            show_progress,
            viz_path,
            attribute_kwargs,
        )
    rank, world = _distributed()
    directory = ShardDirectory(output_dir, header, rank, world)
    if viz_path is not None and rank == 0:
        _check_writable_file(Path(viz_path))
    _on_rank0(world, lambda: directory.prepare(overwrite))
    directory.done = directory.recorded()
    label = f"Attributing with {method}" + (f" (rank {rank} of {world})" if world > 1 else "")
    if backend == "ray":
        if world > 1:
            raise ValueError("backend='ray' runs in one driver process, not under torchrun")
        from instrument.models.dataset_ray import run_ray

        n_shards = run_ray(
            model,
            source,
            fields,
            directory,
            shard_size,
            batch_size,
            max_tokens_per_batch,
            skip_bad_rows,
            aggregate_output,
            attribute_kwargs,
            show_progress,
            label,
            ray_address,
            ray_actors,
            gpus_per_actor,
        )
    else:
        attributor = ShardAttributor(
            model, fields, batch_size, max_tokens_per_batch, skip_bad_rows, aggregate_output, attribute_kwargs
        )
        n_shards = _run_local(attributor, source, directory, shard_size, show_progress, label)
    if world > 1:
        torch.distributed.barrier()
    _on_rank0(world, lambda: directory.finish(n_shards))
    if viz_path is not None and rank == 0:
        from instrument.views.pages import write_paged_html

        opened = files.open_attributions(output_dir)
        write_paged_html(opened, viz_path, ids=opened.ids)
    return files.open_attributions(output_dir)


def _check_options(shard_size, batch_size, max_tokens, backend, output_dir, kwargs) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if batch_size is None:
        raise ValueError("batch_size must be a positive integer or 'auto', got None")
    batching.check_size("batch_size", batch_size)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens_per_batch must be a positive integer, got {max_tokens!r}")
    if max_tokens is not None and batching.is_auto(batch_size):
        raise ValueError("give batch_size='auto' or max_tokens_per_batch, not both")
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if backend == "ray" and output_dir is None:
        raise ValueError("backend='ray' writes shards: give output_dir")
    for name, what in REFUSED.items():
        if kwargs.get(name):
            raise ValueError(f"{name}: {what} are not supported by attribute_dataset; use attribute()")
    if "batch_size" in kwargs or "show_progress" in kwargs:
        raise TypeError("batch_size and show_progress are attribute_dataset's own arguments here")


def _check_rows(source: Source, fields: Fields) -> None:
    data = source.data
    if hasattr(data, "select_columns") and source.columns is not None:
        data = data.select_columns([f for f in (fields.input, fields.generated) if f is not None])
    for row_id, record in enumerate(data):
        try:
            fields.texts(record)
        except BadRow as problem:
            raise ValueError(f"row {row_id}: {problem} (pass skip_bad_rows=True to skip such rows)") from None


def _check_writable_file(path: Path) -> None:
    folder = path.parent if path.parent != Path("") else Path(".")
    if path.is_dir() or (folder.exists() and not os.access(folder, os.W_OK)):
        raise ValueError(f"cannot write the HTML view at {path}")


def _own_total(source: Source, shard_size: int, rank: int, world: int, done: dict) -> int | None:
    if source.length is None:
        return None
    n_shards = -(-source.length // shard_size)
    return sum(
        min(shard_size, source.length - k * shard_size) for k in range(n_shards) if k % world == rank and k not in done
    )


def _run_local(attributor, source, directory, shard_size, show_progress, label) -> int:
    rank, world = directory.rank, directory.world
    progress = _Progress(show_progress, _own_total(source, shard_size, rank, world, directory.done), label)
    n_shards = 0
    try:
        for k, rows in shards_of(_read(source), shard_size):
            n_shards = k + 1
            if k % world != rank or k in directory.done:
                continue
            result = attributor(rows, progress)
            directory.add(k, result)
            if result.skipped:
                progress(len(result.skipped), 0)
    finally:
        progress.close()
    return n_shards


def _read(source: Source) -> Iterator[tuple[int, Any]]:
    """The rows with their ids; an error of the data set's reader (a damaged file) as one ValueError."""
    rows = source.rows()
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"cannot read the data set: {type(error).__name__}: {error}") from None
        except Exception as error:  # e.g. datasets' DatasetGenerationError on a malformed file
            if type(error).__module__.split(".")[0] in ("datasets", "pyarrow"):
                raise ValueError(f"cannot read the data set: {type(error).__name__}: {error}") from None
            raise
        yield row


def _in_memory(
    model,
    source,
    fields,
    shard_size,
    batch_size,
    max_tokens,
    skip_bad_rows,
    aggregate_output,
    show_progress,
    viz_path,
    kwargs,
) -> FeatureAttributionOutput:
    attributor = ShardAttributor(model, fields, batch_size, max_tokens, skip_bad_rows, aggregate_output, kwargs)
    progress = _Progress(show_progress, source.length, "Attributing")
    try:
        results = [attributor(rows, progress) for _, rows in shards_of(_read(source), shard_size)]
    finally:
        progress.close()
    outputs = [r.out for r in results if len(r.out)]
    out = merge_attributions(outputs) if outputs else FeatureAttributionOutput([], info={})
    out.info["ids"] = [i for r in results for i in r.ids]
    out.info["skipped"] = [s for r in results for s in r.skipped]
    if viz_path is not None:
        from instrument.views.pages import write_paged_html

        write_paged_html(out, viz_path, ids=out.info["ids"])
    return out
