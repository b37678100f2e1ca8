"""How a module's output is read and replaced: its first tensor, or the element a trace selects, in a
tensor, a tuple, a list, a dict or a `ModelOutput`.

    tensor = pick_output(output, 0)                      # the first tensor of a block's tuple output
    output = replace_output(output, 0, patched_value(patch, tensor, "transformer.h.0"))
"""

from __future__ import annotations

from typing import Mapping, Union

import torch

OutputSelector = Union[int, str]


def first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    return None


def pick_output(output, selector: OutputSelector) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(selector, str):
        found = output.get(selector) if isinstance(output, Mapping) else getattr(output, selector, None)
        return found if isinstance(found, torch.Tensor) else None
    items = (
        list(output.values())
        if isinstance(output, Mapping)
        else list(output)
        if isinstance(output, (tuple, list))
        else []
    )
    tensors = [item for item in items if isinstance(item, torch.Tensor)] if isinstance(output, Mapping) else items
    if -len(tensors) <= selector < len(tensors) and isinstance(tensors[selector], torch.Tensor):
        return tensors[selector]
    return None


def replace_output(output, selector: OutputSelector, new: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, Mapping):
        keys = [key for key, item in output.items() if isinstance(item, torch.Tensor)]
        output[selector if isinstance(selector, str) else keys[selector]] = new
        return output
    items = list(output)
    items[selector] = new
    return type(output)(items) if isinstance(output, list) or type(output) is tuple else type(output)(*items)


def patched_value(value, tensor: torch.Tensor, name: str) -> torch.Tensor:
    if callable(value):
        result = value(tensor)
        if not isinstance(result, torch.Tensor):
            raise TypeError(f"patch[{name!r}]: the function must return a tensor, got {type(result).__name__}")
        return result
    value = torch.as_tensor(value, device=tensor.device, dtype=tensor.dtype)
    if value.shape == tensor.shape:
        return value
    try:
        return value.expand_as(tensor)
    except RuntimeError:
        raise ValueError(
            f"patch[{name!r}]: a tensor of shape {tuple(value.shape)} cannot replace an output of shape "
            f"{tuple(tensor.shape)}"
        ) from None
