"""Comparisons for the data-set tests: sequences equal to 1e-6 relative (to each tensor's largest value)."""

import torch

from instrument.sequence_fields import DICT_FIELDS, TENSOR_FIELDS, TOKEN_FIELDS


def relative_error(a, b) -> float:
    """max |a - b| / max |b| over the finite entries; NaNs must sit at the same places (else inf)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    a, b = a.double().nan_to_num(), b.double().nan_to_num()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def assert_close(a, b, rel: float = 1e-6) -> None:
    """Same tokens and positions, tensors within `rel` relative error."""
    for name in TOKEN_FIELDS + ("attr_pos_start", "attr_pos_end"):
        assert getattr(a, name) == getattr(b, name), name
    for name in TENSOR_FIELDS:
        assert relative_error(getattr(a, name), getattr(b, name)) <= rel, name
    for name in DICT_FIELDS:
        assert set(getattr(a, name)) == set(getattr(b, name)), name
        for key in getattr(a, name):
            assert relative_error(getattr(a, name)[key], getattr(b, name)[key]) <= rel, (name, key)


def assert_all_close(first, second, rel: float = 1e-6) -> None:
    first, second = list(first), list(second)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert_close(a, b, rel)
