"""Capture, reduce and patch module outputs and their gradients in one ordinary forward/backward.

    >>> with instrument.trace(model, ["transformer.h.*.mlp", "lm_head"], grads=True) as t:
    ...     out = model(**batch)
    ...     out.logits[0, -1].max().backward()
    >>> t.activations["transformer.h.1.mlp"].shape, t.gradients["lm_head"].shape
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

from instrument.selection import Selector, select_modules

Reduction = Union[str, Callable[[torch.Tensor, Union[torch.Tensor, None]], torch.Tensor]]
OutputSelector = Union[int, str]


def _norm(activation, gradient):
    return activation.float().norm(dim=-1).mean()


def _mean(activation, gradient):
    return activation.float().mean()


def _grad_x_act_norm(activation, gradient):
    return (gradient.float() * activation.float()).norm(dim=-1).mean()


# name -> (function, needs the gradient)
REDUCTIONS = {"norm": (_norm, False), "mean": (_mean, False), "grad_x_act_norm": (_grad_x_act_norm, True)}


class StopForward(Exception):
    """Raised inside the forward by `stop_at`; the trace that raised it swallows it on exit."""

    def __init__(self, trace: "Trace", name: str):
        super().__init__(f"forward stopped after {name!r} by instrument.trace(stop_at=...)")
        self.trace, self.name = trace, name


class Trace:
    """Hooks on the selected modules of `model`, active inside a `with` block, removed on exit.

        >>> with Trace(model, "layers", reduce="grad_x_act_norm") as t:
        ...     for batch in loader:
        ...         model(**batch).loss.backward()
        >>> t.stats  # {layer name: mean over calls of the per-token norm of grad x activation}

    Arguments (all keyword-only but `model` and `modules`):
        modules: exact names, globs, module types, modules or aliases (see `instrument.selection`).
        grads: also keep d(backward root)/d(module output), through tensor hooks.
        inputs: also keep each module's first tensor input.
        detach / clone / device / dtype: how captured tensors are kept. `clone=True` protects them
            from in-place operations done later in the forward.
        output: which element of a tuple/dict output is "the" output (index or key).
        reduce: "norm", "mean", "grad_x_act_norm" or `fn(activation, gradient_or_None) -> Tensor`,
            applied as tensors arrive and averaged over calls in `stats`; nothing else is kept unless
            `store=True`.
        patch: {selector: tensor or fn(output) -> tensor} replaces module outputs.
        stop_at: a module after which the forward is cut short (its output is still captured).

    A module called several times in one forward of `model` is stored as `name`, `name:1`, ...
    A later forward overwrites what an earlier one stored.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Selector | Sequence[Selector] | None = None,
        *,
        grads: bool = False,
        inputs: bool = False,
        detach: bool = True,
        clone: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        output: OutputSelector = 0,
        reduce: Reduction | None = None,
        store: bool | None = None,
        patch: Mapping[Selector, Any] | None = None,
        stop_at: Selector | None = None,
    ):
        self.model = model
        self._reduce, reduce_needs_grads = _reduction(reduce)
        self.grads = grads or reduce_needs_grads
        self.capture_inputs = inputs
        self.detach, self.clone, self.device, self.dtype, self.output = detach, clone, device, dtype, output
        self.store = (reduce is None) if store is None else store
        # Resolve everything before any hook exists, so a bad name leaves the model untouched.
        self._selected = select_modules(model, modules)
        self._patch = {name: value for selector, value in (patch or {}).items() for name in select_modules(model, selector)}
        self._stop_at = select_modules(model, stop_at)[0] if stop_at is not None else None
        self.activations: dict[str, torch.Tensor] = {}
        self.gradients: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self._stat_sum: dict[str, torch.Tensor] = {}
        self._stat_calls: dict[str, int] = {}
        self._fired: list[str] = []
        self._calls: dict[str, int] = {}
        self._awaiting_recompute: dict[str, str] = {}
        self._module_handles: list = []
        self._tensor_handles: dict[str, Any] = {}
        self._active = False

    @property
    def names(self) -> list[str]:
        """Selected module names, in the order the forward reached them (unreached ones last)."""
        return self._fired + [name for name in self._selected if name not in self._fired]

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Mean over calls of the `reduce` statistic, per module."""
        return {name: total / self._stat_calls[name] for name, total in self._stat_sum.items()}

    @property
    def calls(self) -> dict[str, int]:
        """How many calls contributed to `stats`, per module."""
        return dict(self._stat_calls)

    def __enter__(self) -> "Trace":
        if self._active:
            raise RuntimeError("this trace is already active; create a new one to nest")
        self._active = True
        owner = weakref.ref(self)
        try:
            self._module_handles.append(self.model.register_forward_pre_hook(_root_pre_hook(owner)))
            hooked = dict.fromkeys(self._selected + list(self._patch) + ([self._stop_at] if self._stop_at else []))
            for name in hooked:
                module = self.model.get_submodule(name)
                handle = module.register_forward_hook(_module_hook(owner, name), with_kwargs=True)
                self._module_handles.append(handle)
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove_hooks()
        return isinstance(exc, StopForward) and exc.trace is self

    def _remove_hooks(self) -> None:
        self._active = False
        for handle in self._module_handles + list(self._tensor_handles.values()):
            handle.remove()
        self._module_handles.clear()
        self._tensor_handles.clear()

    # -- called from the hooks ------------------------------------------------------------------

    def _new_forward(self) -> None:
        self._calls.clear()

    def _on_forward(self, module, name: str, args, kwargs, output):
        tensor = _pick(output, self.output)
        patched = False
        if name in self._patch and tensor is not None:
            tensor = _patched(self._patch[name], tensor)
            output, patched = _replace(output, self.output, tensor), True
        if tensor is None or name not in self._selected:
            return self._after(name, output, patched)
        if torch._C._current_graph_task_id() != -1:
            # A checkpointed module recomputed during backward: capture its gradient only, once.
            key = self._awaiting_recompute.pop(name, None)
            if key is not None and self.grads and tensor.requires_grad:
                self._watch_gradient(name, key, tensor, self._pending_activation(tensor))
            return self._after(name, output, patched)
        key = self._next_key(name)
        if name not in self._fired:
            self._fired.append(name)
        if self.store:
            self.activations[key] = self._keep(tensor)
            if self.capture_inputs:
                first_input = _first_tensor(args) if _first_tensor(args) is not None else _first_tensor(kwargs)
                if first_input is not None:
                    self.inputs[key] = self._keep(first_input.detach())
        if self.grads and tensor.requires_grad:
            self._watch_gradient(name, key, tensor, self._pending_activation(tensor))
        elif self.grads and not torch.is_grad_enabled():
            self._awaiting_recompute[name] = key
        if self._reduce is not None and not self.grads:
            self._accumulate(name, self._reduce(tensor.detach(), None))
        return self._after(name, output, patched)

    def _after(self, name: str, output, patched: bool):
        if name == self._stop_at:
            raise StopForward(self, name)
        return output if patched else None

    def _next_key(self, name: str) -> str:
        count = self._calls.get(name, 0)
        self._calls[name] = count + 1
        return name if count == 0 else f"{name}:{count}"

    def _pending_activation(self, tensor: torch.Tensor) -> torch.Tensor | None:
        return tensor.detach().clone() if self._reduce is not None else None

    def _watch_gradient(self, name: str, key: str, tensor: torch.Tensor, activation) -> None:
        owner = weakref.ref(self)

        def on_gradient(grad: torch.Tensor) -> None:
            trace = owner()
            if trace is not None and trace._active:
                trace._on_gradient(name, key, grad, activation)

        self._tensor_handles[key] = tensor.register_hook(on_gradient)

    def _on_gradient(self, name: str, key: str, grad: torch.Tensor, activation) -> None:
        if self.store:
            self.gradients[key] = self._keep(grad, clone=False)
        if self._reduce is not None:
            self._accumulate(name, self._reduce(activation, grad.detach()))

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        if name in self._stat_sum:
            self._stat_sum[name] += value
        else:
            self._stat_sum[name] = value.clone()
        self._stat_calls[name] = self._stat_calls.get(name, 0) + 1

    def _keep(self, tensor: torch.Tensor, clone: bool | None = None) -> torch.Tensor:
        kept = tensor.detach() if self.detach else tensor
        copy = self.clone if clone is None else clone
        return kept.to(device=self.device, dtype=self.dtype, copy=copy)


def trace(model: nn.Module, modules: Selector | Sequence[Selector] | None = None, **options) -> Trace:
    """Context manager capturing the selected modules' outputs (and gradients); see `Trace`.

    >>> with trace(model, "layers", grads=True) as t:
    ...     model(**batch).logits[0, -1].max().backward()
    """
    return Trace(model, modules, **options)


def _reduction(reduce: Reduction | None):
    if reduce is None:
        return None, False
    if callable(reduce):
        return reduce, False
    if reduce not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduce!r}; use one of {', '.join(REDUCTIONS)} or a function")
    return REDUCTIONS[reduce]


def _root_pre_hook(owner: weakref.ref):
    def hook(module, args):
        trace = owner()
        if trace is not None and trace._active and torch._C._current_graph_task_id() == -1:
            trace._new_forward()

    return hook


def _module_hook(owner: weakref.ref, name: str):
    def hook(module, args, kwargs, output):
        trace = owner()
        if trace is None or not trace._active:
            return None
        return trace._on_forward(module, name, args, kwargs, output)

    return hook


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    return None


def _pick(output, selector: OutputSelector) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(selector, str):
        found = output.get(selector) if isinstance(output, Mapping) else getattr(output, selector, None)
        return found if isinstance(found, torch.Tensor) else None
    items = list(output.values()) if isinstance(output, Mapping) else list(output) if isinstance(output, (tuple, list)) else []
    tensors = [item for item in items if isinstance(item, torch.Tensor)] if isinstance(output, Mapping) else items
    if -len(tensors) <= selector < len(tensors) and isinstance(tensors[selector], torch.Tensor):
        return tensors[selector]
    return None


def _replace(output, selector: OutputSelector, new: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, Mapping):
        keys = [key for key, item in output.items() if isinstance(item, torch.Tensor)]
        output[selector if isinstance(selector, str) else keys[selector]] = new
        return output
    items = list(output)
    items[selector] = new
    return type(output)(items) if isinstance(output, list) or type(output) is tuple else type(output)(*items)


def _patched(value, tensor: torch.Tensor) -> torch.Tensor:
    if callable(value):
        result = value(tensor)
        if not isinstance(result, torch.Tensor):
            raise TypeError(f"A patch function must return a tensor, got {type(result).__name__}")
        return result
    value = torch.as_tensor(value, device=tensor.device, dtype=tensor.dtype)
    return value.expand_as(tensor) if value.shape != tensor.shape else value
