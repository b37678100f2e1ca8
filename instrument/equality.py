"""Equality of attribution outputs: same tokens, positions and tensors, NaN equal to NaN, exact or within tolerances.

outputs_equal(out, FeatureAttributionOutput.load("attr.safetensors"))   # what `out.equals(...)` runs
sequences_equal(seq_a, seq_b, rtol=1e-5)
tensors_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))   # True
"""

from __future__ import annotations

import torch

from instrument.files.json_values import jsonable
from instrument.outputs import RUNTIME_INFO, FeatureAttributionOutput, FeatureAttributionSequenceOutput
from instrument.sequence_fields import DICT_FIELDS, POSITION_FIELDS, TENSOR_FIELDS, TOKEN_FIELDS


def tensors_equal(a: torch.Tensor | None, b: torch.Tensor | None, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """Same shape and values (NaN equals NaN); dtypes must match when exact (rtol = atol = 0)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or (rtol == 0 and atol == 0 and a.dtype != b.dtype):
        return False
    if rtol == 0 and atol == 0:
        return bool(torch.equal(a, b) or (a.is_floating_point() and ((a == b) | (a.isnan() & b.isnan())).all()))
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True))


def sequences_equal(
    a: FeatureAttributionSequenceOutput, b: FeatureAttributionSequenceOutput, rtol: float = 0.0, atol: float = 0.0
) -> bool:
    """Tokens, positions and every tensor equal (see `tensors_equal`)."""
    if not isinstance(b, FeatureAttributionSequenceOutput):
        return False
    if any(getattr(a, name) != getattr(b, name) for name in TOKEN_FIELDS + POSITION_FIELDS):
        return False
    if any(not tensors_equal(getattr(a, name), getattr(b, name), rtol, atol) for name in TENSOR_FIELDS):
        return False
    for name in DICT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if set(x) != set(y) or any(not tensors_equal(x[k], y[k], rtol, atol) for k in x):
            return False
    return True


def outputs_equal(
    a: FeatureAttributionOutput,
    b: FeatureAttributionOutput,
    rtol: float = 0.0,
    atol: float = 0.0,
    check_info: bool = True,
    ignore_info: tuple[str, ...] = RUNTIME_INFO,
) -> bool:
    """Sequences equal, and `info` equal as saved (`jsonable`: tuples equal lists, tensors their repr)
    except for the keys in `ignore_info` (run-time measurements such as `exec_time`)."""
    if not isinstance(b, FeatureAttributionOutput) or len(a) != len(b):
        return False

    def info(out):
        return jsonable({k: v for k, v in out.info.items() if k not in ignore_info})

    if check_info and (info(a) != info(b) or jsonable(a.step_attributions) != jsonable(b.step_attributions)):
        return False
    return all(sequences_equal(x, y, rtol, atol) for x, y in zip(a.sequence_attributions, b.sequence_attributions))
