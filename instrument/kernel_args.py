"""Checks of the native ops' arguments, shared by the kernels and their PyTorch fallbacks: one clear
error naming the op and the argument, before anything runs.

    check_pair(inputs, baselines)                 # interpolate: same shape [B, L, D], dtype and device
    alphas = alphas_tensor([0.25, 0.5], inputs)   # a contiguous 1-D tensor in the math dtype
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
Alphas = Union[torch.Tensor, Sequence[float]]


def check_tensor(op: str, name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")


def check_dtype(op: str, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {tensor.dtype}")
    if tensor.dtype not in DTYPES:
        raise TypeError(f"{op}: unsupported dtype {tensor.dtype} for {name}; use one of {', '.join(map(str, DTYPES))}")


def check_pair(
    inputs: torch.Tensor, baselines: torch.Tensor, op: str = "interpolate", shape=None, shape_name: str = ""
) -> None:
    for name, tensor in (("inputs", inputs), ("baselines", baselines)):
        check_tensor(op, name, tensor)
    if shape is None and inputs.dim() != 3:
        raise ValueError(f"{op}: inputs must be [B, L, D], got shape {tuple(inputs.shape)}")
    if shape is not None and inputs.shape != shape:
        raise ValueError(f"{op}: inputs shape {tuple(inputs.shape)} != {shape_name} shape {tuple(shape)}")
    if baselines.shape != inputs.shape:
        raise ValueError(f"{op}: baselines shape {tuple(baselines.shape)} != inputs shape {tuple(inputs.shape)}")
    check_dtype(op, "inputs", inputs)
    if baselines.dtype != inputs.dtype:
        raise TypeError(f"{op}: baselines dtype {baselines.dtype} != inputs dtype {inputs.dtype}")
    if baselines.device != inputs.device:
        raise ValueError(f"{op}: baselines on {baselines.device} but inputs on {inputs.device}")


def weights_tensor(op: str, name: str, values: Alphas, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a contiguous 1-D tensor of `dtype` on `device`."""
    if isinstance(values, torch.Tensor):
        if not values.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {values.dtype}")
    else:
        try:
            values = torch.tensor(values, dtype=dtype)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{op}: {name} must be a 1-D tensor or a sequence of numbers ({error})") from None
    if values.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D [K], got shape {tuple(values.shape)}")
    return values.detach().to(device=device, dtype=dtype).contiguous()


def alphas_tensor(alphas: Alphas, inputs: torch.Tensor) -> torch.Tensor:
    """`alphas` as a contiguous 1-D tensor of the math dtype on the inputs' device."""
    math = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    return weights_tensor("interpolate", "alphas", alphas, inputs.device, math)


def mask_tensor(mask: Optional[torch.Tensor], inputs: torch.Tensor) -> Optional[torch.Tensor]:
    """`mask` as a contiguous bool [B, L] tensor on the inputs' device, or None."""
    if mask is None:
        return None
    check_tensor("interpolate", "mask", mask)
    if tuple(mask.shape) != tuple(inputs.shape[:2]):
        raise ValueError(f"interpolate: mask must be [B, L] = {tuple(inputs.shape[:2])}, got shape {tuple(mask.shape)}")
    if mask.device != inputs.device:
        raise ValueError(f"interpolate: mask on {mask.device} but inputs on {inputs.device}")
    if mask.is_complex():
        raise TypeError(f"interpolate: mask must be bool or real 0/1 numbers, got {mask.dtype}")
    return (mask.detach() if mask.dtype == torch.bool else mask.detach() != 0).contiguous()


def attention_layers(attn) -> list:
    """The per-layer [B, H, T, S] tensors of `attn`, checked (views of a 5-D tensor, not copies)."""
    if isinstance(attn, torch.Tensor):
        if attn.dim() != 5:
            raise ValueError(
                f"reduce_heads: attn must be [layers, B, H, T, S] or a sequence of [B, H, T, S] "
                f"tensors, got a tensor of shape {tuple(attn.shape)}"
            )
        planes = list(attn.unbind(0))
        if not planes:
            raise ValueError("reduce_heads: attn has no layers")
        check_dtype("reduce_heads", "attn", attn)
        return planes
    if isinstance(attn, (str, bytes)) or not isinstance(attn, Sequence):
        raise TypeError(f"reduce_heads: attn must be a tensor or a sequence of tensors, got {type(attn).__name__}")
    if len(attn) == 0:
        raise ValueError("reduce_heads: attn has no layers")
    for i, layer in enumerate(attn):
        check_tensor("reduce_heads", f"attn[{i}]", layer)
        if layer.dim() != 4:
            raise ValueError(f"reduce_heads: attn[{i}] must be [B, H, T, S], got shape {tuple(layer.shape)}")
        if layer.shape != attn[0].shape:
            raise ValueError(
                f"reduce_heads: attn[{i}] shape {tuple(layer.shape)} != attn[0] shape {tuple(attn[0].shape)}"
            )
        if layer.dtype != attn[0].dtype:
            raise TypeError(f"reduce_heads: attn[{i}] dtype {layer.dtype} != attn[0] dtype {attn[0].dtype}")
        if layer.device != attn[0].device:
            raise ValueError(f"reduce_heads: attn[{i}] on {layer.device} but attn[0] on {attn[0].device}")
    check_dtype("reduce_heads", "attn", attn[0])
    return list(attn)
