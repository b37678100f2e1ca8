"""Elementwise modules whose backward is one multiplication by a slope computed in the forward.

    with activation_slopes(model):           # GELU & co.: their own derivative, computed once
        grads = torch.autograd.grad(score, embeds, seeds, is_grads_batched=True)
    with rescale_rule(model):                # DeepLIFT on a batch [inputs; baselines]
        grads = torch.autograd.grad(score, both)

Both are `replaced_slopes`: a forward hook on each module gives its output (unchanged) a backward
of `grad * slope(inputs, output, derivative)`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn

from instrument.hooks import HookHandles

Slope = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _Slope(torch.autograd.Function):
    """`value` forward; `grad * slope` back to `x` (the gradient of an elementwise function)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, value, slope):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def replaced_slopes(modules: Iterable[nn.Module], slope: Slope):
    """Inside the block, each of `modules` (elementwise, one tensor in and out) passes gradients back
    multiplied by `slope(inputs, output, derivative)`, all detached, `derivative` being the module's
    own at its inputs. Forward values are unchanged; outside autograd the hooks do nothing."""

    def hook(module, args, output):
        inputs = args[0]
        if (
            not torch.is_grad_enabled()
            or not inputs.requires_grad
            or not isinstance(output, torch.Tensor)
            or output.shape != inputs.shape
        ):
            return None
        probe = inputs.detach().requires_grad_()
        # Its own saved tensors, out of any enclosing saved-tensor hooks (a checkpointed layer's).
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            value = module.forward(probe)  # .forward: no hook recursion
            derivative = torch.autograd.grad(value, probe, torch.ones_like(value))[0]
        return _Slope.apply(inputs, output.detach(), slope(inputs.detach(), output.detach(), derivative))

    with HookHandles() as hooks:
        for module in modules:
            hooks.forward(module, hook)
        yield


def activation_slopes(model: nn.Module):
    """Inside the block, the elementwise activations of `transformers.activations` (Python compositions
    of a dozen ops, such as GPT-2's tanh GELU) pass gradients back in one multiplication by their
    slope, computed once in the forward, instead of replaying their ops on every slot of a batched
    backward. Forward values are unchanged."""
    modules = [
        m
        for m in model.modules()
        if type(m).__module__ == "transformers.activations" and not any(True for _ in m.parameters())
    ]
    return replaced_slopes(modules, lambda inputs, output, derivative: derivative)


# Elementwise nonlinearities whose gradient DeepLIFT's rescale rule replaces (Captum's set, minus pooling/softmax).
RESCALED = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)


def rescale_rule(model: nn.Module, eps: float = 1e-10):
    """DeepLIFT's rescale rule on a batch `[inputs; baselines]`: every supported nonlinearity passes
    gradients with slope `(f(x) - f(b)) / (x - b)` instead of `f'(x)` (its own slope where x == b)."""

    def secant(inputs, output, derivative):
        half = inputs.shape[0] // 2
        delta_in, delta_out = inputs[:half] - inputs[half:], output[:half] - output[half:]
        small = delta_in.abs() < eps
        ratio = delta_out / torch.where(small, torch.ones_like(delta_in), delta_in)
        both = (2, *([1] * (inputs.dim() - 1)))
        return torch.where(small.repeat(both), derivative, ratio.repeat(both))

    return replaced_slopes([m for m in model.modules() if isinstance(m, RESCALED)], secant)
