"""Python values and tensor values as standard JSON (no NaN or infinity literals), and back.

    jsonable({"baselines": torch.zeros(2), "n": (1, 2)})   # {"baselines": "tensor([0.0, 0.0], ...)", "n": [1, 2]}
    encode_values(torch.tensor([1.0, float("nan"), float("inf")]))   # [1.0, None, "Infinity"]
    decode_values([1.0, None, "Infinity"], [3], torch.float32, "sequence 0.step_scores.p")

`jsonable` is for `info` values: what JSON cannot hold becomes a short string (its repr; tensors as
`tensor(shape=..., dtype=...)`, with their values when small); tuples become lists. Tensor values
are nested lists: NaN is `null`, infinities the strings `"Infinity"` / `"-Infinity"`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from instrument.files.problems import InvalidFile


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


def encode_values(tensor: torch.Tensor) -> Any:
    """The values of `tensor` as nested lists (a number for a 0-d tensor); NaN is None, infinities strings."""

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


def _is_plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_value_of(node: Any, dtype: torch.dtype) -> bool:
    """Whether a JSON number or boolean may be an element of a `dtype` tensor (booleans only for bool)."""
    if dtype == torch.bool:
        return isinstance(node, bool)
    if dtype.is_floating_point:
        return isinstance(node, float) or _is_plain_int(node)
    return _is_plain_int(node)


def decode_values(data: Any, shape: list[int], dtype: torch.dtype, where: str) -> torch.Tensor:
    """The tensor `encode_values` wrote; `InvalidFile` naming `where` for values of the wrong shape or kind."""
    flat: list = []

    def walk(node, dims):
        if not dims:
            if node is None:
                flat.append(math.nan)
            elif node in ("Infinity", "-Infinity"):
                flat.append(math.inf if node == "Infinity" else -math.inf)
            elif _is_value_of(node, dtype):
                flat.append(node)
            else:
                raise InvalidFile(f"{where}: {node!r} is not a valid {str(dtype).removeprefix('torch.')} value")
            return
        if not isinstance(node, list) or len(node) != dims[0]:
            raise InvalidFile(f"{where}: the values do not have the recorded shape {shape}")
        for child in node:
            walk(child, dims[1:])

    walk(data, shape)
    try:
        return torch.tensor(flat, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise InvalidFile(f"{where}: cannot build a {dtype} tensor ({error})") from None
