"""The one rule for picking layers and heads by index: None (all), an index, or a sequence of them.

pick_indices([0, -1, 0], 4, "heads")                  # [0, 3, 0]: kernels.reduce_heads counts repeats
pick_indices([0, -1, 0], 4, "heads", distinct=True)   # [0, 3]: the attention / value zeroing options
"""

from __future__ import annotations

import operator
from typing import Sequence, Union

import torch

Indices = Union[None, int, Sequence[int], torch.Tensor]


class IndexChoiceError(TypeError, ValueError):
    """An index selection of the wrong type: a TypeError, and a ValueError for the methods whose
    options raise ValueError for any bad value."""


def pick_indices(value: Indices, count: int, name: str, *, distinct: bool = False, op: str = "") -> list:
    """`value` (None: all, an index, a sequence or 1-D integer tensor of indices, negative from the end)
    as indices in [0, count): in the order given, repeats kept (`reduce_heads` counts them again), or
    with `distinct=True` sorted without repeats (the `layers` / `heads` options of the attention and
    value zeroing methods, whose kept dimensions follow model order).

        pick_indices([0, -1, 0], 4, "heads"), pick_indices([0, -1, 0], 4, "heads", distinct=True)
        ([0, 3, 0], [0, 3])
    """
    prefix = f"{op}: " if op else ""
    if value is None:
        items = list(range(count))
    elif isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex() or value.dim() > 1:
            raise IndexChoiceError(
                f"{prefix}{name} as a tensor must be 0-D or 1-D integers, got {value.dtype} {tuple(value.shape)}"
            )
        items = value.reshape(-1).tolist()
    elif hasattr(value, "__index__") and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
    else:
        raise IndexChoiceError(f"{prefix}{name} must be None, an index or a sequence of indices, got {value!r}")
    if not items:
        raise ValueError(f"{prefix}{name} selects nothing (there are {count}); pass None for all")
    picked = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise TypeError
            item = operator.index(item)  # ints, numpy integers, 0-D integer tensors
        except TypeError:
            raise IndexChoiceError(f"{prefix}{name} must be integers, got {item!r}") from None
        if not -count <= item < count:
            raise ValueError(f"{prefix}{name} index {item} is out of range for {count} {name}")
        picked.append(item % count)
    return sorted(set(picked)) if distinct else picked
