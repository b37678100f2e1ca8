"""Native kernels, each with a pure-PyTorch fallback that gives the same results bit for bit.

    >>> from instrument import kernels
    >>> path = kernels.interpolate(embeds, torch.zeros_like(embeds), torch.linspace(0, 1, 20))
    >>> kernels.has_extension(), kernels.extension_error()
    (True, None)

The extension `instrument._C` is compiled at install time (see setup.py) and loaded on first use. When it
cannot be loaded, or INSTRUMENT_NO_EXT=1, every op runs its fallback and a single one-line
`ExtensionNotice` warning says so, once per process.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import Optional, Sequence, Union

import torch

__all__ = ["ExtensionNotice", "extension_error", "has_extension", "interpolate"]

Alphas = Union[torch.Tensor, Sequence[float]]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class ExtensionNotice(UserWarning):
    """Warned once per process when `instrument._C` is unavailable and the PyTorch fallbacks run instead."""


NOT_BUILT = "instrument._C is not built; reinstall with `pip install --no-build-isolation -e .`"
_lock = threading.Lock()
_loaded: dict = {}  # "module": instrument._C or None, "error": why it is None


def _extension():
    """`instrument._C`, or None after the one ExtensionNotice."""
    with _lock:
        if not _loaded:
            module, error = None, None
            if os.environ.get("INSTRUMENT_NO_EXT") == "1":
                error = "disabled by INSTRUMENT_NO_EXT=1"
            else:
                try:
                    module = importlib.import_module("instrument._C")
                except Exception as e:  # not built, or built against another torch (undefined symbols)
                    not_built = isinstance(e, ModuleNotFoundError) and e.name == "instrument._C"
                    error = NOT_BUILT if not_built else f"{type(e).__name__}: {e}"
            _loaded.update(module=module, error=error)
            if error:
                message = f"seq-instrument: native kernels unavailable ({error}); using PyTorch fallbacks"
                message = " ".join(message.split())
                # Line 0 has no source text to echo under the message, so the notice stays on one line.
                warnings.warn_explicit(message, ExtensionNotice, __file__, 0, module=__name__)
    return _loaded["module"]


def has_extension(device: Union[str, torch.device, None] = None) -> bool:
    """Whether `instrument._C` is loaded and, given a device, has kernels for it.

        >>> kernels.has_extension(), kernels.has_extension("cuda")
        (True, False)
    """
    module = _extension()
    if module is None or device is None:
        return module is not None
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and module.with_cuda)


def extension_error() -> Optional[str]:
    """Why `instrument._C` is not used, or None when it is.

        >>> kernels.extension_error()
        'disabled by INSTRUMENT_NO_EXT=1'
    """
    _extension()
    return _loaded["error"]


def _native(device: torch.device, use_extension: Optional[bool]):
    """`instrument._C` when it should run an op on `device`, else None (the fallback runs)."""
    if use_extension is False:
        return None
    if has_extension(device):
        return _extension()
    if use_extension:
        raise RuntimeError(f"use_extension=True, but instrument._C cannot run on {device}: "
                           f"{extension_error() or f'it has no {device.type} kernels'}")
    return None


def interpolate(inputs: torch.Tensor, baselines: torch.Tensor, alphas: Alphas, *,
                use_extension: Optional[bool] = None) -> torch.Tensor:
    """Integrated-gradients path points of a batch, alpha-major, without autograd history.

        >>> x = torch.randn(2, 5, 8)  # [B, L, D] embeddings
        >>> path = kernels.interpolate(x, torch.zeros_like(x), [0.0, 0.5, 1.0])
        >>> path.shape, torch.equal(path[2:4], 0.5 * x)  # row k * B + b
        (torch.Size([6, 5, 8]), True)

    Row k * B + b is baselines[b] + alphas[k] * (inputs[b] - baselines[b]), computed in float32 (float64
    for float64 inputs) and rounded once to the inputs' dtype. `alphas` is a 1-D floating tensor or a
    sequence of numbers, moved to the inputs' device; empty alphas give an empty result. The result never
    requires grad: integrated gradients differentiates with respect to the path itself
    (`path.requires_grad_()`), not the inputs.

    use_extension: None runs `instrument._C` when it can run on the inputs' device, False forces the
    PyTorch fallback, True raises RuntimeError when the extension cannot run.
    """
    _check_pair(inputs, baselines)
    alphas = _alphas(alphas, inputs)
    inputs, baselines = inputs.detach().contiguous(), baselines.detach().contiguous()
    native = _native(inputs.device, use_extension)
    if native is not None:
        return native.interpolate(inputs, baselines, alphas)
    return _interpolate_torch(inputs, baselines, alphas)


@torch.no_grad()
def _interpolate_torch(inputs: torch.Tensor, baselines: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    low = baselines.to(alphas.dtype)
    diff = inputs.to(alphas.dtype) - low
    # A separate multiply and add, rounded each, like the kernels (torch.lerp or addcmul may use an FMA).
    path = low + alphas.view(-1, 1, 1, 1) * diff
    return path.to(inputs.dtype).flatten(0, 1)


def _check_pair(inputs: torch.Tensor, baselines: torch.Tensor) -> None:
    for name, tensor in (("inputs", inputs), ("baselines", baselines)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"interpolate: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if inputs.dim() != 3:
        raise ValueError(f"interpolate: inputs must be [B, L, D], got shape {tuple(inputs.shape)}")
    if baselines.shape != inputs.shape:
        raise ValueError(f"interpolate: baselines shape {tuple(baselines.shape)} != inputs shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"interpolate: inputs must be floating point, got {inputs.dtype}")
    if baselines.dtype != inputs.dtype:
        raise TypeError(f"interpolate: baselines dtype {baselines.dtype} != inputs dtype {inputs.dtype}")
    if inputs.dtype not in DTYPES:
        raise TypeError(f"interpolate: unsupported dtype {inputs.dtype}; use one of {', '.join(map(str, DTYPES))}")
    if baselines.device != inputs.device:
        raise ValueError(f"interpolate: baselines on {baselines.device} but inputs on {inputs.device}")


def _alphas(alphas: Alphas, inputs: torch.Tensor) -> torch.Tensor:
    """`alphas` as a contiguous 1-D tensor of the math dtype on the inputs' device."""
    math = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    if isinstance(alphas, torch.Tensor):
        if not alphas.is_floating_point():
            raise TypeError(f"interpolate: alphas must be floating point, got {alphas.dtype}")
    else:
        try:
            alphas = torch.tensor(alphas, dtype=math)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"interpolate: alphas must be a 1-D tensor or a sequence of numbers ({error})") from None
    if alphas.dim() != 1:
        raise ValueError(f"interpolate: alphas must be 1-D [K], got shape {tuple(alphas.shape)}")
    return alphas.detach().to(device=inputs.device, dtype=math).contiguous()
