"""Inseq's JSON format, written for `inseq.FeatureAttributionOutput.load` and read from files Inseq saved.

    document = to_inseq_document(out, precision="float32")     # json.dumps it, gzip it for `.gz`
    out = from_inseq_document(json.loads(Path("inseq.json").read_text()))

Inseq writes its objects as `{"__instance_type__": [module, class], "attributes": {...}}`; each tensor
is the base64 text of a one-tensor safetensors file (key "attribution"), read back as float32. Older
files hold numpy arrays as `{"__ndarray__": list or "b64:..." / "b64.gz:...", "dtype", "shape"}`.
Nothing is imported or evaluated from the class names: they are only checked. Inseq keeps only the
target rows up to `attr_pos_end`; the missing rows are read as NaN (no step sees them).
`step_attributions` are neither written nor read (a warning says so).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import warnings
import zlib
from typing import Any

import torch

from instrument.files.document import FORMAT, VERSION, from_document, stored_for_saving, tensor_spec
from instrument.files.json_values import jsonable
from instrument.files.problems import InvalidFile, expect
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput
from instrument.sequence_fields import DICT_FIELDS, TENSOR_FIELDS

INSEQ_MODULE = "inseq.data.attribution"
INSEQ_NUMPY_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


def _inseq_object(cls: str, attributes: dict, module: str = INSEQ_MODULE) -> dict:
    return {"__instance_type__": [module, cls], "attributes": attributes}


def _inseq_class(seq: FeatureAttributionSequenceOutput) -> str:
    """The Inseq class whose default aggregation suits the tensors: by their number of dimensions."""
    tensors = [getattr(seq, name) for name in TENSOR_FIELDS]
    dims = max((t.dim() for t in tensors if t is not None), default=0)
    prefix = {0: "", 2: "Coarse", 3: "Granular"}.get(dims, "MultiDimensional")
    return f"{prefix}FeatureAttributionSequenceOutput"


def to_inseq_document(out: FeatureAttributionOutput, precision: str) -> dict:
    """Inseq's JSON object for `out` (tensors in `precision`); `step_attributions` are left out with a warning."""
    from safetensors.torch import save as safetensors_bytes

    def tensor(key, value):
        if value is None:
            return None
        # the warning points at the caller of `save` (stored_for_saving, tensor, to_inseq_document, save)
        stored = stored_for_saving(key, value, precision, stacklevel=5)
        return base64.b64encode(safetensors_bytes({"attribution": stored})).decode("ascii")

    def tokens(items):
        return [_inseq_object("TokenWithId", {"id": int(t.id), "token": t.token}, "inseq.utils.typing") for t in items]

    sequences = []
    for i, seq in enumerate(out.sequence_attributions):
        attributes = {
            "attr_pos_end": int(seq.attr_pos_end),
            "attr_pos_start": int(seq.attr_pos_start),
            "source": tokens(seq.source),
            "target": tokens(seq.target),
        }
        for name in TENSOR_FIELDS:
            attributes[name] = tensor(f"seq{i}.{name}", getattr(seq, name))
        for name in DICT_FIELDS:
            attributes[name] = {}
            # a loop: a comprehension (a frame in Python 3.11) would shift the warning's stacklevel
            for key, value in getattr(seq, name).items():
                attributes[name][str(key)] = tensor(f"seq{i}.{name}.{key}", value)
        sequences.append(_inseq_object(_inseq_class(seq), attributes))
    if out.step_attributions is not None:
        warnings.warn("step_attributions are not saved in Inseq's format", stacklevel=3)
    return _inseq_object(
        "FeatureAttributionOutput",
        {
            "info": jsonable(out.info),
            "sequence_attributions": sequences,
            "step_attributions": None,
        },
    )


def _inseq_attributes(obj: Any, cls_suffix: str, where: str) -> dict:
    expect(
        isinstance(obj, dict)
        and isinstance(obj.get("__instance_type__"), list)
        and len(obj["__instance_type__"]) == 2
        and all(isinstance(x, str) for x in obj["__instance_type__"]),
        f"{where}: not an Inseq object (no [module, class] '__instance_type__')",
    )
    module, cls = obj["__instance_type__"]
    expect(
        module.split(".")[0] == "inseq" and cls.endswith(cls_suffix),
        f"{where}: expected an Inseq {cls_suffix}, found {module}.{cls}",
    )
    expect(isinstance(obj.get("attributes"), dict), f"{where}: no 'attributes' object")
    return obj["attributes"]


def _inseq_tensor(value: Any, where: str) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, dict) and "__ndarray__" in value:
        return _inseq_ndarray(value, where)
    expect(isinstance(value, str), f"{where}: expected base64 text of a safetensors tensor, got {type(value).__name__}")
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    try:
        stored = safetensors_load(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError, SafetensorError, RuntimeError) as error:
        raise InvalidFile(f"{where}: not a base64-encoded safetensors tensor ({error})") from None
    expect(list(stored) == ["attribution"], f"{where}: expected one tensor named 'attribution', found {sorted(stored)}")
    tensor = stored["attribution"]
    return tensor.float() if tensor.is_floating_point() else tensor


def _inseq_ndarray(spec: dict, where: str) -> torch.Tensor:
    import numpy as np

    shape, dtype, data = spec.get("shape"), spec.get("dtype"), spec["__ndarray__"]
    expect(
        isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape), f"{where}: bad shape {shape!r}"
    )
    expect(isinstance(dtype, str) and dtype in INSEQ_NUMPY_DTYPES, f"{where}: unsupported dtype {dtype!r}")
    try:
        if isinstance(data, str):
            expect(data.startswith(("b64:", "b64.gz:")), f"{where}: unknown array encoding {data[:10]!r}")
            raw = base64.b64decode(data.split(":", 1)[1], validate=True)
            if data.startswith("b64.gz:"):
                raw = gzip.decompress(raw)
            array = np.frombuffer(raw, dtype=dtype)
        else:
            array = np.array(data, dtype=dtype)
        array = array.reshape(shape, order="F" if spec.get("Corder") is False else "C")
    except (binascii.Error, ValueError, TypeError, OSError, EOFError, zlib.error) as error:
        raise InvalidFile(f"{where}: cannot read the array ({error})") from None
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.float() if tensor.is_floating_point() else tensor


def _inseq_sequence(item: Any, where: str, tensors: dict[int, torch.Tensor]) -> dict:
    """Our document's entry for one Inseq sequence; its tensors go into `tensors`, keyed by the entry's "id"."""
    seq = _inseq_attributes(item, "FeatureAttributionSequenceOutput", where)
    entry: dict[str, Any] = {}
    for side in ("source", "target"):
        items = seq.get(side) or []
        expect(isinstance(items, list), f"{where}.{side} must be a list of tokens")
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
        return {**tensor_spec(tensor), "id": id(tensor)}

    for name in TENSOR_FIELDS:
        entry[name] = spec(seq.get(name), name)
    for name in DICT_FIELDS:
        values = seq.get(name) or {}
        expect(isinstance(values, dict), f"{where}.{name} must be an object")
        entry[name] = {k: spec(v, f"{name}.{k}") for k, v in values.items()}
    return entry


def from_inseq_document(doc: dict) -> FeatureAttributionOutput:
    """The output an Inseq JSON object describes, checked as our own files are; InvalidFile if anything is off."""
    attributes = _inseq_attributes(doc, "FeatureAttributionOutput", "the file")
    sequences, info = attributes.get("sequence_attributions"), attributes.get("info", {})
    expect(isinstance(sequences, list), "'sequence_attributions' must be a list")
    expect(isinstance(info, dict), "'info' must be an object")
    if attributes.get("step_attributions") is not None:
        warnings.warn("This Inseq file holds step_attributions; they are not loaded", stacklevel=3)
    tensors: dict[int, torch.Tensor] = {}
    entries = [_inseq_sequence(item, f"sequence {i}", tensors) for i, item in enumerate(sequences)]
    document = {
        "format": FORMAT,
        "version": VERSION,
        "scores_precision": "float32",
        "info": info,
        "step_attributions": None,
        "sequences": entries,
    }
    return from_document(document, lambda spec, where: tensors[spec["id"]])
