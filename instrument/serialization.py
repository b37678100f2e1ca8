"""Saving and loading attributions: one `.safetensors` file (default) or a portable `.json` file.

    >>> out.save("attributions.safetensors")                      # refuses to overwrite unless overwrite=True
    >>> out.save("attributions.json", scores_precision="float16")
    >>> FeatureAttributionOutput.load("attributions.safetensors").equals(out)

Both formats hold the same JSON document: `format`, `version`, `scores_precision`, `info`,
`step_attributions` and one entry per sequence with its tokens (`[token, id]` pairs), `attr_pos_start`,
`attr_pos_end`, an optional `default_aggregator` (what `aggregate()` runs; `[]` after
`weight_attributions`) and its tensors (`source_attributions`, `target_attributions`, `step_scores`,
`sequence_scores`; a missing one is `null`). Each tensor is described as `{"dtype", "shape", ...}`:

- `.safetensors`: the tensors are safetensors tensors under keys such as `seq0.source_attributions`,
  `seq0.step_scores.probability`; a tensor entry names its key (`"key"`). The document is one JSON
  string in the safetensors metadata under `"seq_instrument"`, next to `"format"` and `"version"`.
- `.json`: a tensor entry holds its values as nested lists in `"data"`; NaN is `null`, infinities are
  the strings `"Infinity"` / `"-Infinity"`, so the file is standard JSON.

`scores_precision="float16"` stores floating-point tensors as float16 (values beyond ±65504 become
infinite; a warning says so); `load` returns them upcast to float32, so they equal the float16-rounded
originals. With "float32" (the default) a float32 output round-trips exactly; float64 / bfloat16
tensors are stored as float32. `info` values that JSON cannot hold are stored as short strings (their
repr; tensors as `tensor(shape=..., dtype=...)`, with their values when small); tuples become lists.

Inseq's files: `save(..., format="inseq")` writes Inseq's JSON (gzipped for `.gz` paths or
`compress=True`), which `inseq.FeatureAttributionOutput.load` reads; `load` reads files saved by
Inseq, gzipped or not. The format of a file is found from its content. Inseq keeps only the target
rows up to `attr_pos_end`; the missing rows are read as NaN (no step sees them).

Loading checks everything against the file and raises `ValueError` naming the file and the problem
for truncated, tampered or foreign files. Nothing in a file is evaluated: no pickle, no eval.
"""
from __future__ import annotations

import base64
import binascii
import gzip
import json
import math
import os
import struct
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

from instrument.outputs import RUNTIME_INFO, FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId

FORMAT = "seq-instrument.attributions"
VERSION = 1
METADATA_KEY = "seq_instrument"
PRECISIONS = {"float32": torch.float32, "float16": torch.float16}
DTYPES = {
    name: getattr(torch, name)
    for name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool")
}
TENSOR_FIELDS = ("source_attributions", "target_attributions")
DICT_FIELDS = ("step_scores", "sequence_scores")


class _Invalid(Exception):
    """A problem found in a file; reported as `ValueError(f"{path}: {problem}")`."""


# -- info ----------------------------------------------------------------------------------------


def short_repr(value: Any, limit: int = 200) -> str:
    """`short_repr(torch.zeros(2))`: "tensor([0.0, 0.0], dtype=torch.float32)"; long values are cut."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= 16:
            text = f"tensor({value.detach().cpu().tolist()}, dtype={value.dtype})"
        else:
            text = f"tensor(shape={list(value.shape)}, dtype={value.dtype})"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def jsonable(value: Any) -> Any:
    """`jsonable({"baselines": torch.zeros(2), "n": (1, 2)})`: what JSON can hold, other values as short strings."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, torch.Tensor) and getattr(value, "shape", None) == ():
        try:  # numpy scalars
            scalar = item()
        except Exception:
            scalar = None
        if isinstance(scalar, (bool, int, float)):
            return jsonable(scalar)
    return short_repr(value)


# -- tensors ----------------------------------------------------------------------------------------


def _stored(tensor: torch.Tensor, precision: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(precision)
    return tensor.contiguous().clone()


def _encode_values(tensor: torch.Tensor) -> Any:
    def number(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
        return x

    def nest(flat, shape):
        if not shape:
            return flat[0]
        step = len(flat) // shape[0] if shape[0] else 0
        return [nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]

    values = tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
    return nest([number(x) for x in values.flatten().tolist()], list(tensor.shape))


def _decode_values(data: Any, shape: list[int], dtype: torch.dtype, where: str) -> torch.Tensor:
    flat: list = []

    def walk(node, dims):
        if not dims:
            if node is None:
                flat.append(math.nan)
            elif node in ("Infinity", "-Infinity"):
                flat.append(math.inf if node == "Infinity" else -math.inf)
            elif dtype == torch.bool and isinstance(node, bool):
                flat.append(node)
            elif dtype.is_floating_point and isinstance(node, (int, float)) and not isinstance(node, bool):
                flat.append(node)
            elif dtype not in (torch.bool,) and not dtype.is_floating_point and isinstance(node, int) and not isinstance(node, bool):
                flat.append(node)
            else:
                raise _Invalid(f"{where}: {node!r} is not a valid {str(dtype).removeprefix('torch.')} value")
            return
        if not isinstance(node, list) or len(node) != dims[0]:
            raise _Invalid(f"{where}: the values do not have the recorded shape {shape}")
        for child in node:
            walk(child, dims[1:])

    walk(data, shape)
    try:
        return torch.tensor(flat, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise _Invalid(f"{where}: cannot build a {dtype} tensor ({error})") from None


# -- document ---------------------------------------------------------------------------------------


def _to_document(out: FeatureAttributionOutput, put: Callable[[str, torch.Tensor], dict], precision: str) -> dict:
    def tensor(key, value):
        if value is None:
            return None
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key} must be a tensor or None, got {type(value).__name__}")
        stored = _stored(value, PRECISIONS[precision])
        if stored.is_floating_point() and bool((stored.isinf() & value.detach().cpu().isfinite()).any()):
            warnings.warn(f"{key} has values beyond the {precision} range; they are saved as infinite", stacklevel=4)
        return put(key, stored)

    sequences = []
    for i, seq in enumerate(out.sequence_attributions):
        entry = {
            "source": [[t.token, int(t.id)] for t in seq.source],
            "target": [[t.token, int(t.id)] for t in seq.target],
            "attr_pos_start": int(seq.attr_pos_start),
            "attr_pos_end": int(seq.attr_pos_end),
        }
        if seq._aggregator is not None:  # e.g. [] after weight_attributions: aggregate() does nothing more
            entry["default_aggregator"] = jsonable(seq._aggregator)
        for name in TENSOR_FIELDS:
            entry[name] = tensor(f"seq{i}.{name}", getattr(seq, name))
        for name in DICT_FIELDS:
            entry[name] = {str(k): tensor(f"seq{i}.{name}.{k}", v) for k, v in getattr(seq, name).items()}
        sequences.append(entry)
    return {
        "format": FORMAT, "version": VERSION, "scores_precision": precision,
        "info": jsonable(out.info), "step_attributions": jsonable(out.step_attributions), "sequences": sequences,
    }


def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise _Invalid(problem)


def _from_document(doc: Any, get: Callable[[dict, str], torch.Tensor]) -> FeatureAttributionOutput:
    _expect(isinstance(doc, dict) and doc.get("format") == FORMAT,
            f"not a seq-instrument attribution file (expected format {FORMAT!r})")
    _expect(doc.get("version") == VERSION, f"unsupported version {doc.get('version')!r} (this library reads version {VERSION})")
    _expect(doc.get("scores_precision") in PRECISIONS, f"unknown scores_precision {doc.get('scores_precision')!r}")
    _expect(isinstance(doc.get("info"), dict), "'info' must be an object")
    _expect(isinstance(doc.get("sequences"), list), "'sequences' must be a list")
    return FeatureAttributionOutput(
        [_sequence(entry, i, get) for i, entry in enumerate(doc["sequences"])],
        step_attributions=doc.get("step_attributions"), info=doc["info"],
    )


def _tokens(entry: dict, name: str, where: str) -> list[TokenWithId]:
    tokens = entry.get(name)
    _expect(isinstance(tokens, list), f"{where}.{name} must be a list of [token, id] pairs")
    for t in tokens:
        _expect(isinstance(t, list) and len(t) == 2 and isinstance(t[0], str) and isinstance(t[1], int)
                and not isinstance(t[1], bool), f"{where}.{name}: {t!r} is not a [token, id] pair")
    return [TokenWithId(token, token_id) for token, token_id in tokens]


def _sequence(entry: Any, i: int, get) -> FeatureAttributionSequenceOutput:
    where = f"sequence {i}"
    _expect(isinstance(entry, dict), f"{where} must be an object")
    source, target = _tokens(entry, "source", where), _tokens(entry, "target", where)
    start, end = entry.get("attr_pos_start"), entry.get("attr_pos_end")
    _expect(all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)) and 0 <= start <= end <= len(target),
            f"{where}: attr_pos_start={start!r}, attr_pos_end={end!r} do not fit a target of {len(target)} tokens")
    n_steps = end - start

    def tensor(spec, name):
        if spec is None:
            return None
        _expect(isinstance(spec, dict), f"{where}.{name} must be an object or null")
        shape, dtype = spec.get("shape"), spec.get("dtype")
        _expect(isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
                f"{where}.{name}: bad shape {shape!r}")
        _expect(dtype in DTYPES, f"{where}.{name}: unsupported dtype {dtype!r}")
        value = get(spec, f"{where}.{name}")
        _expect(list(value.shape) == shape and value.dtype == DTYPES[dtype],
                f"{where}.{name}: the stored tensor is {value.dtype} {list(value.shape)}, the metadata says {dtype} {shape}")
        return value.float() if value.dtype == torch.float16 else value

    fields: dict[str, Any] = {name: tensor(entry.get(name), name) for name in TENSOR_FIELDS}
    for name, rows in (("source_attributions", len(source)), ("target_attributions", len(target))):
        value = fields[name]
        _expect(value is None or (value.dim() >= 2 and value.shape[0] == rows and value.shape[1] == n_steps),
                f"{where}.{name} has shape {None if value is None else list(value.shape)}, expected [{rows}, {n_steps}, ...] "
                f"({rows} tokens, {n_steps} attributed steps)")
    for name in DICT_FIELDS:
        specs = entry.get(name)
        _expect(isinstance(specs, dict), f"{where}.{name} must be an object")
        fields[name] = {k: tensor(v, f"{name}.{k}") for k, v in specs.items()}
        _expect(all(v is not None for v in fields[name].values()), f"{where}.{name}: null entries")
    for k, v in fields["step_scores"].items():
        _expect(list(v.shape) == [n_steps], f"{where}.step_scores.{k} has shape {list(v.shape)}, expected [{n_steps}]")
    default = entry.get("default_aggregator")

    def step(x):
        return isinstance(x, str) or (isinstance(x, list) and len(x) == 2 and all(isinstance(v, str) for v in x))

    _expect(default is None or isinstance(default, str) or (isinstance(default, list) and all(map(step, default))),
            f"{where}.default_aggregator must be an aggregator name or a list of names or (aggregator, function) pairs")
    if isinstance(default, list):
        default = [x if isinstance(x, str) else tuple(x) for x in default]
    return FeatureAttributionSequenceOutput(source, target, attr_pos_start=start, attr_pos_end=end, _aggregator=default, **fields)


# -- files ------------------------------------------------------------------------------------------


def _is_json(path: Path) -> bool:
    suffixes = [x.lower() for x in path.suffixes]
    return suffixes[-1:] == [".json"] or suffixes[-2:] == [".json", ".gz"]


def _write_atomic(path: Path, write: Callable[[str], None], overwrite: bool) -> None:
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


FORMATS = ("safetensors", "json", "inseq")


def save(out: FeatureAttributionOutput | FeatureAttributionSequenceOutput, path: str | os.PathLike,
         scores_precision: str = "float32", overwrite: bool = False, format: str | None = None,
         compress: bool | None = None) -> Path:
    """`save(out, "attr.safetensors")`; returns the path.

    `format`: "safetensors", "json" (ours, portable) or "inseq" (Inseq's JSON, which `inseq.FeatureAttributionOutput.load`
    reads); by default "json" for `.json` / `.json.gz` paths, else "safetensors". JSON formats are gzipped when
    `compress=True` or the path ends in `.gz` (Inseq reads those with `load(path, decompress=True)`).
    """
    if isinstance(out, FeatureAttributionSequenceOutput):
        out = FeatureAttributionOutput([out])
    if not isinstance(out, FeatureAttributionOutput):
        raise TypeError(f"save takes a FeatureAttributionOutput, got {type(out).__name__}")
    if scores_precision not in PRECISIONS:
        raise ValueError(f"scores_precision must be one of {list(PRECISIONS)}, got {scores_precision!r}")
    path = Path(path)
    if format is None:
        format = "json" if _is_json(path) else "safetensors"
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if compress is None:
        compress = path.suffix.lower() == ".gz"
    if compress and format == "safetensors":
        raise ValueError("compress=True is for the JSON formats; safetensors files are written uncompressed")
    tensors: dict[str, torch.Tensor] = {}

    def put(key, value):
        tensors[key] = value
        spec = {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
        return {**spec, "data": _encode_values(value)} if format == "json" else {**spec, "key": key}

    if format == "inseq":
        document = _to_inseq_document(out, scores_precision)
    else:
        document = _to_document(out, put, scores_precision)
    if format == "safetensors":
        from safetensors.torch import save_file

        metadata = {"format": FORMAT, "version": str(VERSION),
                    METADATA_KEY: json.dumps(document, ensure_ascii=False, allow_nan=False)}
        _write_atomic(path, lambda p: save_file(tensors, p, metadata=metadata), overwrite)
        return path
    data = json.dumps(document, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if compress:
        data = gzip.compress(data, mtime=0)
    _write_atomic(path, lambda p: Path(p).write_bytes(data), overwrite)
    return path


def load(path: str | os.PathLike) -> FeatureAttributionOutput:
    """`load("attr.safetensors")`: the saved FeatureAttributionOutput; `ValueError` for a bad file.

    The format is found from the content: safetensors, our JSON or Inseq's JSON, each JSON gzipped or not.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No attribution file at {path}")
    try:
        data = path.read_bytes()
        if data[:2] == GZIP_MAGIC:
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as error:
                raise _Invalid(f"not a readable gzip file ({error})") from None
        elif _looks_like_safetensors(data) or not (_is_json(path) or data.lstrip()[:1] in (b"{", b"[")):
            return _load_safetensors(path)
        return _load_json_text(data)
    except _Invalid as problem:
        raise ValueError(f"{path}: {problem}") from None


GZIP_MAGIC = b"\x1f\x8b"


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 9:
        return False
    header = struct.unpack("<Q", data[:8])[0]
    return header <= len(data) - 8 and data[8:9] == b"{"


def _load_json_text(data: bytes) -> FeatureAttributionOutput:
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Invalid(f"not valid JSON ({error})") from None
    if isinstance(document, dict) and "__instance_type__" in document:
        return _from_inseq_document(document)

    def get(spec, where):
        _expect("data" in spec, f"{where}: no 'data'")
        return _decode_values(spec["data"], spec["shape"], DTYPES[spec["dtype"]], where)

    return _from_document(document, get)


# -- Inseq's files ----------------------------------------------------------------------------------
# Inseq writes its objects as {"__instance_type__": [module, class], "attributes": {...}}; each tensor
# is the base64 text of a one-tensor safetensors file (key "attribution"), read back as float32.
# Older files hold numpy arrays as {"__ndarray__": list or "b64:..." / "b64.gz:...", "dtype", "shape"}.
# Nothing is imported or evaluated from the class names: they are only checked.

INSEQ_MODULE = "inseq.data.attribution"


def _inseq_object(cls: str, attributes: dict, module: str = INSEQ_MODULE) -> dict:
    return {"__instance_type__": [module, cls], "attributes": attributes}


def _inseq_class(seq: FeatureAttributionSequenceOutput) -> str:
    """The Inseq class whose default aggregation suits the tensors: by their number of dimensions."""
    dims = max((t.dim() for t in (seq.source_attributions, seq.target_attributions) if t is not None), default=0)
    prefix = {0: "", 2: "Coarse", 3: "Granular"}.get(dims, "MultiDimensional")
    return f"{prefix}FeatureAttributionSequenceOutput"


def _to_inseq_document(out: FeatureAttributionOutput, precision: str) -> dict:
    from safetensors.torch import save as safetensors_bytes

    def tensor(key, value):
        if value is None:
            return None
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key} must be a tensor or None, got {type(value).__name__}")
        stored = _stored(value, PRECISIONS[precision])
        if stored.is_floating_point() and bool((stored.isinf() & value.detach().cpu().isfinite()).any()):
            warnings.warn(f"{key} has values beyond the {precision} range; they are saved as infinite", stacklevel=4)
        return base64.b64encode(safetensors_bytes({"attribution": stored})).decode("ascii")

    def tokens(items):
        return [_inseq_object("TokenWithId", {"id": int(t.id), "token": t.token}, "inseq.utils.typing") for t in items]

    sequences = []
    for i, seq in enumerate(out.sequence_attributions):
        attributes = {
            "attr_pos_end": int(seq.attr_pos_end), "attr_pos_start": int(seq.attr_pos_start),
            "source": tokens(seq.source), "target": tokens(seq.target),
            **{name: tensor(f"seq{i}.{name}", getattr(seq, name)) for name in TENSOR_FIELDS},
            **{name: {str(k): tensor(f"seq{i}.{name}.{k}", v) for k, v in getattr(seq, name).items()} for name in DICT_FIELDS},
        }
        sequences.append(_inseq_object(_inseq_class(seq), attributes))
    if out.step_attributions is not None:
        warnings.warn("step_attributions are not saved in Inseq's format", stacklevel=3)
    return _inseq_object("FeatureAttributionOutput", {
        "info": jsonable(out.info), "sequence_attributions": sequences, "step_attributions": None,
    })


def _inseq_attributes(obj: Any, cls_suffix: str, where: str) -> dict:
    _expect(isinstance(obj, dict) and isinstance(obj.get("__instance_type__"), list)
            and len(obj["__instance_type__"]) == 2 and all(isinstance(x, str) for x in obj["__instance_type__"]),
            f"{where}: not an Inseq object (no [module, class] '__instance_type__')")
    module, cls = obj["__instance_type__"]
    _expect(module.split(".")[0] == "inseq" and cls.endswith(cls_suffix),
            f"{where}: expected an Inseq {cls_suffix}, found {module}.{cls}")
    _expect(isinstance(obj.get("attributes"), dict), f"{where}: no 'attributes' object")
    return obj["attributes"]


def _inseq_tensor(value: Any, where: str) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, dict) and "__ndarray__" in value:
        return _inseq_ndarray(value, where)
    _expect(isinstance(value, str), f"{where}: expected base64 text of a safetensors tensor, got {type(value).__name__}")
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    try:
        stored = safetensors_load(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError, SafetensorError, RuntimeError) as error:
        raise _Invalid(f"{where}: not a base64-encoded safetensors tensor ({error})") from None
    _expect(list(stored) == ["attribution"], f"{where}: expected one tensor named 'attribution', found {sorted(stored)}")
    tensor = stored["attribution"]
    return tensor.float() if tensor.is_floating_point() else tensor


def _inseq_ndarray(spec: dict, where: str) -> torch.Tensor:
    import numpy as np

    shape, dtype, data = spec.get("shape"), spec.get("dtype"), spec["__ndarray__"]
    _expect(isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape), f"{where}: bad shape {shape!r}")
    _expect(isinstance(dtype, str) and dtype in INSEQ_NUMPY_DTYPES, f"{where}: unsupported dtype {dtype!r}")
    try:
        if isinstance(data, str):
            _expect(data.startswith(("b64:", "b64.gz:")), f"{where}: unknown array encoding {data[:10]!r}")
            raw = base64.b64decode(data.split(":", 1)[1], validate=True)
            if data.startswith("b64.gz:"):
                raw = gzip.decompress(raw)
            array = np.frombuffer(raw, dtype=dtype)
        else:
            array = np.array(data, dtype=dtype)
        array = array.reshape(shape, order="F" if spec.get("Corder") is False else "C")
    except (binascii.Error, ValueError, TypeError, OSError, EOFError, zlib.error) as error:
        raise _Invalid(f"{where}: cannot read the array ({error})") from None
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.float() if tensor.is_floating_point() else tensor


INSEQ_NUMPY_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


def _from_inseq_document(doc: dict) -> FeatureAttributionOutput:
    attributes = _inseq_attributes(doc, "FeatureAttributionOutput", "the file")
    sequences, info = attributes.get("sequence_attributions"), attributes.get("info", {})
    _expect(isinstance(sequences, list), "'sequence_attributions' must be a list")
    _expect(isinstance(info, dict), "'info' must be an object")
    if attributes.get("step_attributions") is not None:
        warnings.warn("This Inseq file holds step_attributions; they are not loaded", stacklevel=4)
    tensors: dict[int, torch.Tensor] = {}
    entries = []
    for i, item in enumerate(sequences):
        where = f"sequence {i}"
        seq = _inseq_attributes(item, "FeatureAttributionSequenceOutput", where)
        entry: dict[str, Any] = {}
        for side in ("source", "target"):
            items = seq.get(side) or []
            _expect(isinstance(items, list), f"{where}.{side} must be a list of tokens")
            pairs = []
            for token in items:
                fields = _inseq_attributes(token, "TokenWithId", f"{where}.{side}")
                pairs.append([fields.get("token"), fields.get("id")])
            entry[side] = pairs
        n_target = len(entry["target"])
        start = seq.get("attr_pos_start", 0)
        end = seq.get("attr_pos_end")
        end = n_target if end is None or (isinstance(end, int) and end > n_target) else end
        entry["attr_pos_start"], entry["attr_pos_end"] = start, end

        def spec(value, name):
            tensor = _inseq_tensor(value, f"{where}.{name}")
            if tensor is None:
                return None
            if name == "target_attributions" and tensor.dim() >= 2 and tensor.shape[0] < n_target:
                # Inseq keeps target rows only up to attr_pos_end: later tokens are seen by no step
                missing = torch.full((n_target - tensor.shape[0], *tensor.shape[1:]), float("nan"), dtype=tensor.dtype)
                tensor = torch.cat([tensor, missing]) if tensor.is_floating_point() else tensor
            tensors[id(tensor)] = tensor
            return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "id": id(tensor)}

        for name in TENSOR_FIELDS:
            entry[name] = spec(seq.get(name), name)
        for name in DICT_FIELDS:
            values = seq.get(name) or {}
            _expect(isinstance(values, dict), f"{where}.{name} must be an object")
            entry[name] = {k: spec(v, f"{name}.{k}") for k, v in values.items()}
        entries.append(entry)
    document = {"format": FORMAT, "version": VERSION, "scores_precision": "float32", "info": info,
                "step_attributions": None, "sequences": entries}
    return _from_document(document, lambda spec, where: tensors[spec["id"]])


def _load_safetensors(path: Path) -> FeatureAttributionOutput:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata, keys = handle.metadata() or {}, list(handle.keys())
            _expect(metadata.get("format") == FORMAT and METADATA_KEY in metadata,
                    f"not a seq-instrument attribution file (no {METADATA_KEY!r} metadata of format {FORMAT!r}; "
                    f"tensors: {sorted(keys)[:5]})")
            stored = {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise _Invalid(f"not a readable safetensors file ({error})") from None
    _expect(metadata.get("version") == str(VERSION), f"unsupported version {metadata.get('version')!r}")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise _Invalid(f"the {METADATA_KEY!r} metadata is not valid JSON ({error})") from None
    used: set[str] = set()

    def get(spec, where):
        key = spec.get("key")
        _expect(isinstance(key, str), f"{where}: no tensor key")
        _expect(key in stored, f"{where}: tensor {key!r} is missing from the file")
        _expect(key not in used, f"{where}: tensor {key!r} is used twice")
        used.add(key)
        return stored[key]

    out = _from_document(document, get)
    _expect(used == set(stored), f"tensors not described by the metadata: {sorted(set(stored) - used)}")
    return out


# -- equality -------------------------------------------------------------------------------------------


def tensors_equal(a: torch.Tensor | None, b: torch.Tensor | None, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """Same shape and values (NaN equals NaN); dtypes must match when exact (rtol = atol = 0)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or (rtol == 0 and atol == 0 and a.dtype != b.dtype):
        return False
    if rtol == 0 and atol == 0:
        return bool(torch.equal(a, b) or (a.is_floating_point() and ((a == b) | (a.isnan() & b.isnan())).all()))
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True))


def sequences_equal(a: FeatureAttributionSequenceOutput, b: FeatureAttributionSequenceOutput,
                    rtol: float = 0.0, atol: float = 0.0) -> bool:
    """Tokens, positions and every tensor equal (see `tensors_equal`)."""
    if not isinstance(b, FeatureAttributionSequenceOutput):
        return False
    if (a.source, a.target, a.attr_pos_start, a.attr_pos_end) != (b.source, b.target, b.attr_pos_start, b.attr_pos_end):
        return False
    if any(not tensors_equal(getattr(a, n), getattr(b, n), rtol, atol) for n in TENSOR_FIELDS):
        return False
    for name in DICT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if set(x) != set(y) or any(not tensors_equal(x[k], y[k], rtol, atol) for k in x):
            return False
    return True


def outputs_equal(a: FeatureAttributionOutput, b: FeatureAttributionOutput, rtol: float = 0.0, atol: float = 0.0,
                  check_info: bool = True, ignore_info: tuple[str, ...] = RUNTIME_INFO) -> bool:
    """Sequences equal, and `info` equal as saved (`jsonable`: tuples equal lists, tensors their repr)
    except for the keys in `ignore_info` (run-time measurements such as `exec_time`)."""
    if not isinstance(b, FeatureAttributionOutput) or len(a) != len(b):
        return False

    def info(out):
        return jsonable({k: v for k, v in out.info.items() if k not in ignore_info})

    if check_info and (info(a) != info(b) or jsonable(a.step_attributions) != jsonable(b.step_attributions)):
        return False
    return all(sequences_equal(x, y, rtol, atol) for x, y in zip(a.sequence_attributions, b.sequence_attributions))
