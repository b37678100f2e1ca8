"""Reductions: NaN-aware aggregation functions `fn(tensor, dim)`, by name, as `aggregate_fn` takes them.

    get_aggregation_function("vnorm")(torch.tensor([3.0, float("nan"), 4.0]), 0)   # tensor(5.)
    register_aggregation_function(lambda x, dim: x.nan_to_num().abs().sum(dim), "abssum")

Every function ignores NaN: a result is NaN only where every input is NaN, so positions a step cannot
see stay NaN after merging.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

AggregationFunction = Callable[[torch.Tensor, int], torch.Tensor]


def _masked(x: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, fill), x) if x.is_floating_point() else x


def _nan_where_all_nan(result: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    if not x.is_floating_point():
        return result
    return result.masked_fill(torch.isnan(x).all(dim), float("nan"))


def nan_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_sum(torch.tensor([1., nan, 2.]), 0) == 3.`: sum of the non-NaN values."""
    return _nan_where_all_nan(_masked(x, 0.0).sum(dim), x, dim)


def nan_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_mean(torch.tensor([1., nan, 2.]), 0) == 1.5`: mean of the non-NaN values."""
    return torch.nanmean(x, dim) if x.is_floating_point() else x.float().mean(dim)


def vnorm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`vnorm(torch.tensor([3., nan, 4.]), 0) == 5.`: L2 norm of the non-NaN values."""
    work = torch.promote_types(x.dtype, torch.float32)  # half precision and integers are computed in float32
    return _nan_where_all_nan(torch.linalg.vector_norm(_masked(x, 0.0).to(work), 2, dim), x, dim)


def absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`absmax(torch.tensor([0.3, -0.7, nan]), 0) == -0.7`: the value of largest magnitude, sign kept."""
    filled = _masked(x, 0.0)
    index = filled.abs().argmax(dim, keepdim=True)
    return _nan_where_all_nan(filled.gather(dim, index).squeeze(dim), x, dim)


def nan_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_max(torch.tensor([1., nan, -2.]), 0) == 1.`"""
    return _nan_where_all_nan(_masked(x, -math.inf).amax(dim), x, dim)


def nan_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_min(torch.tensor([1., nan, -2.]), 0) == -2.`"""
    return _nan_where_all_nan(_masked(x, math.inf).amin(dim), x, dim)


def nan_prod(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_prod(torch.tensor([2., nan, 3.]), 0) == 6.`"""
    return _nan_where_all_nan(_masked(x, 1.0).prod(dim), x, dim)


_FUNCTIONS: dict[str, AggregationFunction] = {
    "sum": nan_sum,
    "mean": nan_mean,
    "vnorm": vnorm,
    "absmax": absmax,
    "max": nan_max,
    "min": nan_min,
    "prod": nan_prod,
}


def list_aggregation_functions() -> list[str]:
    """Names accepted as `aggregate_fn`: `["sum", "mean", "vnorm", "absmax", "max", "min", "prod"]` and registered
    ones."""
    return list(_FUNCTIONS)


def register_aggregation_function(fn: AggregationFunction, name: str, overwrite: bool = False) -> None:
    """Make `fn(tensor, dim) -> tensor` usable as `aggregate_fn=name`.

    register_aggregation_function(lambda x, dim: x.nan_to_num().abs().sum(dim), "abssum")
    """
    if not callable(fn):
        raise TypeError(f"An aggregation function must be callable, got {type(fn).__name__}")
    if name in _FUNCTIONS and not overwrite:
        raise ValueError(f"Aggregation function {name!r} exists already; pass overwrite=True to replace it")
    _FUNCTIONS[name] = fn


def get_aggregation_function(fn: str | AggregationFunction) -> AggregationFunction:
    """`get_aggregation_function("vnorm")(x, dim)`; callables are returned as they are."""
    if callable(fn):
        return fn
    if fn not in _FUNCTIONS:
        raise ValueError(f"Unknown aggregation function {fn!r}. Available: {', '.join(_FUNCTIONS)}")
    return _FUNCTIONS[fn]
