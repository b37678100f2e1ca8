"""The JSON document both of our formats hold, built from an output and checked back into one.

    document = to_document(out, put=lambda key, tensor: {**tensor_spec(tensor), "key": key}, precision="float32")
    document["sequences"][0]["source"]                  # [["▁Hello", 1017], ...]
    out = from_document(document, get=lambda spec, where: tensors[spec["key"]])

The document: `format`, `version`, `scores_precision`, `info`, `step_attributions` and one entry per
sequence with its tokens (`[token, id]` pairs), `attr_pos_start`, `attr_pos_end`, an optional
`default_aggregator` (what `aggregate()` runs; `[]` after `weight_attributions`) and its tensors
(`source_attributions`, `target_attributions`, `step_scores`, `sequence_scores`; a missing one is
`null`). Each tensor is described as `{"dtype", "shape", ...}`; the format adds where its values are
(`put` when saving, `get` when loading). Loading checks every entry against the others and raises
`InvalidFile` naming the problem.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from instrument.files.json_values import jsonable
from instrument.files.problems import expect
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId
from instrument.sequence_fields import DICT_FIELDS, POSITION_FIELDS, TENSOR_FIELDS, TOKEN_FIELDS

FORMAT = "seq-instrument.attributions"
VERSION = 1
PRECISIONS = {"float32": torch.float32, "float16": torch.float16}
DTYPES = {
    name: getattr(torch, name)
    for name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool")
}


def stored_for_saving(key: str, value: Any, precision: str, stacklevel: int) -> torch.Tensor:
    """`value` as it is saved: a contiguous CPU copy, floating point in `precision`. Warns (at `stacklevel`
    from here) when values turn infinite; TypeError when `value` is not a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{key} must be a tensor or None, got {type(value).__name__}")
    stored = value.detach().cpu()
    if stored.is_floating_point():
        stored = stored.to(PRECISIONS[precision])
    stored = stored.contiguous().clone()
    if stored.is_floating_point() and bool((stored.isinf() & value.detach().cpu().isfinite()).any()):
        warnings.warn(
            f"{key} has values beyond the {precision} range; they are saved as infinite", stacklevel=stacklevel
        )
    return stored


def tensor_spec(tensor: torch.Tensor) -> dict:
    """`{"dtype": "float32", "shape": [3, 2]}`: how the document describes a stored tensor."""
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}


def to_document(out: FeatureAttributionOutput, put: Callable[[str, torch.Tensor], dict], precision: str) -> dict:
    """The document of `out`; `put(key, stored_tensor)` stores each tensor and returns its entry."""

    def tensor(key, value):
        # the warning points at the caller of `save` (stored_for_saving, tensor, to_document, the format, save)
        return None if value is None else put(key, stored_for_saving(key, value, precision, stacklevel=6))

    sequences = []
    for i, seq in enumerate(out.sequence_attributions):
        entry: dict[str, Any] = {name: [[t.token, int(t.id)] for t in getattr(seq, name)] for name in TOKEN_FIELDS}
        entry.update({name: int(getattr(seq, name)) for name in POSITION_FIELDS})
        if seq._aggregator is not None:  # e.g. [] after weight_attributions: aggregate() does nothing more
            entry["default_aggregator"] = jsonable(seq._aggregator)
        for name in TENSOR_FIELDS:
            entry[name] = tensor(f"seq{i}.{name}", getattr(seq, name))
        for name in DICT_FIELDS:
            entry[name] = {}
            # a loop: a comprehension (a frame in Python 3.11) would shift the warning's stacklevel
            for key, value in getattr(seq, name).items():
                entry[name][str(key)] = tensor(f"seq{i}.{name}.{key}", value)
        sequences.append(entry)
    return {
        "format": FORMAT,
        "version": VERSION,
        "scores_precision": precision,
        "info": jsonable(out.info),
        "step_attributions": jsonable(out.step_attributions),
        "sequences": sequences,
    }


def from_document(doc: Any, get: Callable[[dict, str], torch.Tensor]) -> FeatureAttributionOutput:
    """The output `doc` describes; `get(entry, where)` returns a tensor entry's values. InvalidFile if anything is
    off."""
    expect(
        isinstance(doc, dict) and doc.get("format") == FORMAT,
        f"not a seq-instrument attribution file (expected format {FORMAT!r})",
    )
    expect(
        doc.get("version") == VERSION,
        f"unsupported version {doc.get('version')!r} (this library reads version {VERSION})",
    )
    expect(doc.get("scores_precision") in PRECISIONS, f"unknown scores_precision {doc.get('scores_precision')!r}")
    expect(isinstance(doc.get("info"), dict), "'info' must be an object")
    expect(isinstance(doc.get("sequences"), list), "'sequences' must be a list")
    return FeatureAttributionOutput(
        [_sequence(entry, i, get) for i, entry in enumerate(doc["sequences"])],
        step_attributions=doc.get("step_attributions"),
        info=doc["info"],
    )


def _tokens(entry: dict, name: str, where: str) -> list[TokenWithId]:
    tokens = entry.get(name)
    expect(isinstance(tokens, list), f"{where}.{name} must be a list of [token, id] pairs")
    for pair in tokens:
        expect(
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], int)
            and not isinstance(pair[1], bool),
            f"{where}.{name}: {pair!r} is not a [token, id] pair",
        )
    return [TokenWithId(token, token_id) for token, token_id in tokens]


def _is_aggregator_step(step: Any) -> bool:
    return isinstance(step, str) or (
        isinstance(step, list) and len(step) == 2 and all(isinstance(v, str) for v in step)
    )


def _sequence(entry: Any, i: int, get) -> FeatureAttributionSequenceOutput:
    where = f"sequence {i}"
    expect(isinstance(entry, dict), f"{where} must be an object")
    tokens = {name: _tokens(entry, name, where) for name in TOKEN_FIELDS}
    source, target = tokens["source"], tokens["target"]
    start, end = entry.get("attr_pos_start"), entry.get("attr_pos_end")
    expect(
        all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)) and 0 <= start <= end <= len(target),
        f"{where}: attr_pos_start={start!r}, attr_pos_end={end!r} do not fit a target of {len(target)} tokens",
    )
    n_steps = end - start

    def tensor(spec, name):
        if spec is None:
            return None
        expect(isinstance(spec, dict), f"{where}.{name} must be an object or null")
        shape, dtype = spec.get("shape"), spec.get("dtype")
        expect(
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
            f"{where}.{name}: bad shape {shape!r}",
        )
        expect(dtype in DTYPES, f"{where}.{name}: unsupported dtype {dtype!r}")
        value = get(spec, f"{where}.{name}")
        expect(
            list(value.shape) == shape and value.dtype == DTYPES[dtype],
            f"{where}.{name}: the stored tensor is {value.dtype} {list(value.shape)}, "
            f"the metadata says {dtype} {shape}",
        )
        return value.float() if value.dtype == torch.float16 else value

    fields: dict[str, Any] = {name: tensor(entry.get(name), name) for name in TENSOR_FIELDS}
    for name, rows in (("source_attributions", len(source)), ("target_attributions", len(target))):
        value = fields[name]
        expect(
            value is None or (value.dim() >= 2 and value.shape[0] == rows and value.shape[1] == n_steps),
            f"{where}.{name} has shape {None if value is None else list(value.shape)}, "
            f"expected [{rows}, {n_steps}, ...] "
            f"({rows} tokens, {n_steps} attributed steps)",
        )
    for name in DICT_FIELDS:
        specs = entry.get(name)
        expect(isinstance(specs, dict), f"{where}.{name} must be an object")
        fields[name] = {k: tensor(v, f"{name}.{k}") for k, v in specs.items()}
        expect(all(v is not None for v in fields[name].values()), f"{where}.{name}: null entries")
    for k, v in fields["step_scores"].items():
        expect(list(v.shape) == [n_steps], f"{where}.step_scores.{k} has shape {list(v.shape)}, expected [{n_steps}]")
    default = entry.get("default_aggregator")
    expect(
        default is None
        or isinstance(default, str)
        or (isinstance(default, list) and all(map(_is_aggregator_step, default))),
        f"{where}.default_aggregator must be an aggregator name or a list of names or (aggregator, function) pairs",
    )
    if isinstance(default, list):
        default = [x if isinstance(x, str) else tuple(x) for x in default]
    return FeatureAttributionSequenceOutput(
        **tokens, attr_pos_start=start, attr_pos_end=end, _aggregator=default, **fields
    )
