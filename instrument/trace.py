"""Capture, reduce and patch module outputs and their gradients in one ordinary forward/backward.

with instrument.trace(model, ["transformer.h.*.mlp", "lm_head"], grads=True) as t:
    out = model(**batch)
    out.logits[0, -1].max().backward()
t.activations["transformer.h.1.mlp"].shape, t.gradients["lm_head"].shape
"""

from __future__ import annotations

import difflib
import inspect
import warnings
import weakref
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

from instrument.module_outputs import OutputSelector, first_tensor, patched_value, pick_output, replace_output
from instrument.selection import Selector, UnknownModuleError, select_modules
from instrument.stop_at import RootGuard, StopForward

Reduction = Union[str, Callable[[torch.Tensor, Union[torch.Tensor, None]], torch.Tensor]]


def _norm(activation, gradient):
    return activation.float().norm(dim=-1).mean()


def _mean(activation, gradient):
    return activation.float().mean()


def _grad_x_act_norm(activation, gradient):
    return (gradient.float() * activation.float()).norm(dim=-1).mean()


# name -> (function, needs the gradient)
REDUCTIONS = {"norm": (_norm, False), "mean": (_mean, False), "grad_x_act_norm": (_grad_x_act_norm, True)}


class Trace:
    """Hooks on the selected modules of `model`, active inside a `with` block, removed on exit.

        with Trace(model, "layers", reduce="grad_x_act_norm") as t:
            for batch in loader:
                model(**batch).loss.backward()
        t.stats  # {layer name: mean over calls of the per-token norm of grad x activation}

    Arguments (all keyword-only but `model` and `modules`):
        modules: exact names, globs (`*` one dotted component, `**` any number), module types,
            modules or aliases (see `instrument.selection`).
        grads: also keep d(backward root)/d(module output), through tensor hooks. Warns on exit when
            no gradient arrived (forward under `torch.no_grad()`, or no backward inside the block).
        inputs: also keep each module's first tensor input.
        detach / clone / device / dtype: how captured tensors are kept. `clone=True` protects them
            from in-place operations done later in the forward.
        output: which element of a tuple/dict output is "the" output (index or key).
        reduce: "norm", "mean" (computed in the forward, no backward needed), "grad_x_act_norm" or
            `fn(activation, gradient_or_None) -> Tensor` (given the gradient when `grads=True`),
            averaged over calls in `stats`; nothing else is kept unless `store=True`.
        patch: {selector: tensor or fn(output) -> tensor} replaces module outputs.
        stop_at: one module after which the forward is cut short: its output is still captured, the
            call of `model` returns None and the `with` block goes on.

    What is captured is a module's output as the rest of the model receives it: after every forward
    hook on it (registered before or during the trace; reordered at each call of `model`), so after
    the patches of this and of any other trace, and after changes made by user hooks. Patches apply
    in the order their traces were entered (an inner trace patches what the outer one's patch
    returned). Gradients are taken at that same tensor.

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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        flags = {"grads": grads, "inputs": inputs, "detach": detach, "clone": clone}
        for name, value in {**flags, "store": True if store is None else store}.items():
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if isinstance(output, bool) or not isinstance(output, (int, str)):
            raise TypeError(f"output must be an index or a key of the module's output, got {output!r}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"device: {device!r} is not a device ({error})") from None
        if patch is not None and not isinstance(patch, Mapping):
            raise TypeError(f"patch must be a dict {{selector: tensor or function}}, got {type(patch).__name__}")
        for key, value in (patch or {}).items():
            if not (callable(value) or isinstance(value, (torch.Tensor, int, float))) or isinstance(value, bool):
                raise TypeError(
                    f"patch[{key!r}] must be a tensor, a number or fn(output) -> tensor, got {type(value).__name__}"
                )
        self.model = model
        self._reduce, reduce_needs_grads = _reduction(reduce)
        self.grads = grads or reduce_needs_grads
        # Built-in reductions that need no gradient, and functions without grads=True, run in the forward.
        self._reduce_in_backward = reduce_needs_grads or (callable(reduce) and grads)
        self.capture_inputs = inputs
        self.detach, self.clone, self.device, self.dtype, self.output = detach, clone, device, dtype, output
        self.store = (reduce is None) if store is None else store
        # Resolve everything before any hook exists, so a bad name leaves the model untouched.
        self._selected = _select(model, modules, "modules")
        self._patch = {
            name: value for selector, value in (patch or {}).items() for name in _select(model, selector, "patch")
        }
        self._stop_at = None
        if stop_at is not None:
            found = _select(model, stop_at, "stop_at")
            if found == [""]:
                raise ValueError("stop_at: the model itself cannot be stopped after; name one of its modules")
            if len(found) != 1:
                shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
                raise ValueError(f"stop_at must select one module; {stop_at!r} selects {len(found)}: {shown}")
            self._stop_at = found[0]
        self.activations: dict[str, torch.Tensor] = {}
        self.gradients: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self._stat_sum: dict[str, torch.Tensor] = {}
        self._stat_calls: dict[str, int] = {}
        self._fired: list[str] = []
        self._calls: dict[str, int] = {}
        self._awaiting_recompute: dict[str, str] = {}
        self._module_handles: list = []
        self._capture_handles: list[tuple[nn.Module, Any]] = []
        self._tensor_handles: dict[str, Any] = {}
        self._guard: RootGuard | None = None
        self._watched = self._received = 0
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
        self._watched = self._received = 0
        owner = weakref.ref(self)
        try:
            self._module_handles.append(self.model.register_forward_pre_hook(_root_pre_hook(owner)))
            for name in self._patch:
                handle = self.model.get_submodule(name).register_forward_hook(_patch_hook(owner, name))
                self._module_handles.append(handle)
            for name in dict.fromkeys(self._selected + ([self._stop_at] if self._stop_at else [])):
                module = self.model.get_submodule(name)
                handle = module.register_forward_hook(_capture_hook(owner, name), with_kwargs=True)
                self._module_handles.append(handle)
                self._capture_handles.append((module, handle))
            if self._stop_at is not None:
                self._guard = RootGuard.install(self.model, self)
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove_hooks()
        if exc is None and self.grads and self._fired and not self._received:
            why = (
                "no traced output required grad: the forward ran under torch.no_grad() or inference_mode, "
                "or nothing before these modules requires grad"
                if not self._watched
                else "no backward through them ran inside the `with` block"
            )
            message = f"instrument.trace received no gradient (grads=True, or a reduce that needs them): {why}."
            warnings.warn(message, UserWarning, stacklevel=2)

    def _remove_hooks(self) -> None:
        self._active = False
        if self._guard is not None:
            self._guard.release(self)
            self._guard = None
        for handle in self._module_handles + list(self._tensor_handles.values()):
            handle.remove()
        self._module_handles.clear()
        self._capture_handles.clear()
        self._tensor_handles.clear()

    # -- called from the hooks ------------------------------------------------------------------

    def _new_forward(self) -> None:
        self._calls.clear()

    def _capture_last(self) -> None:
        """Move this trace's capture hooks behind any hook registered since, so they see final outputs."""
        for module, handle in self._capture_handles:
            hooks = module._forward_hooks
            if handle.id in hooks and next(reversed(hooks)) != handle.id:
                hooks[handle.id] = hooks.pop(handle.id)

    def _on_patch(self, name: str, output):
        tensor = pick_output(output, self.output)
        if tensor is None:
            return None
        return replace_output(output, self.output, patched_value(self._patch[name], tensor, name))

    def _on_forward(self, module, name: str, args, kwargs, output) -> None:
        tensor = pick_output(output, self.output)
        recomputing = torch._C._current_graph_task_id() != -1
        if tensor is not None and name in self._selected:
            if recomputing:
                # A checkpointed module recomputed during backward: capture its gradient only, once.
                key = self._awaiting_recompute.pop(name, None)
                if key is not None and self.grads and tensor.requires_grad:
                    self._watch_gradient(name, key, tensor, self._pending_activation(tensor))
            else:
                self._capture(name, tensor, args, kwargs)
        if name == self._stop_at and not recomputing:
            raise StopForward(self, name)

    def _capture(self, name: str, tensor: torch.Tensor, args, kwargs) -> None:
        key = self._next_key(name)
        if name not in self._fired:
            self._fired.append(name)
        if self.store:
            self.activations[key] = self._keep(tensor)
            if self.capture_inputs:
                first_input = first_tensor(args) if first_tensor(args) is not None else first_tensor(kwargs)
                if first_input is not None:
                    self.inputs[key] = self._keep(first_input.detach())
        if self.grads and tensor.requires_grad:
            self._watch_gradient(name, key, tensor, self._pending_activation(tensor))
        elif self.grads and not torch.is_grad_enabled():
            self._awaiting_recompute[name] = key
        if self._reduce is not None and not self._reduce_in_backward:
            self._accumulate(name, self._reduce(tensor.detach(), None))

    def _next_key(self, name: str) -> str:
        count = self._calls.get(name, 0)
        self._calls[name] = count + 1
        return name if count == 0 else f"{name}:{count}"

    def _pending_activation(self, tensor: torch.Tensor) -> torch.Tensor | None:
        return tensor.detach().clone() if self._reduce_in_backward else None

    def _watch_gradient(self, name: str, key: str, tensor: torch.Tensor, activation) -> None:
        owner = weakref.ref(self)

        def on_gradient(grad: torch.Tensor) -> None:
            trace = owner()
            if trace is not None and trace._active:
                trace._on_gradient(name, key, grad, activation)

        self._watched += 1
        self._tensor_handles[key] = tensor.register_hook(on_gradient)

    def _on_gradient(self, name: str, key: str, grad: torch.Tensor, activation) -> None:
        self._received += 1
        if self.store:
            self.gradients[key] = self._keep(grad, clone=False)
        if self._reduce_in_backward:
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


_OPTIONS = [name for name, p in inspect.signature(Trace.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY]


def trace(model: nn.Module, modules: Selector | Sequence[Selector] | None = None, **options) -> Trace:
    """Context manager capturing the selected modules' outputs (and gradients); see `Trace`.

    with trace(model, "layers", grads=True) as t:
        model(**batch).logits[0, -1].max().backward()
    """
    for name in options:
        if name not in _OPTIONS:
            close = difflib.get_close_matches(name, _OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"trace() got an unknown option {name!r}{hint}; the options are {', '.join(_OPTIONS)}")
    return Trace(model, modules, **options)


def _select(model: nn.Module, selectors, argument: str) -> list[str]:
    try:
        return select_modules(model, selectors)
    except UnknownModuleError as error:
        raise UnknownModuleError(f"{argument}: {error}") from None
    except TypeError as error:
        raise TypeError(f"{argument}: {error}") from None


def _reduction(reduce: Reduction | None):
    if reduce is None:
        return None, False
    if callable(reduce):
        return reduce, False
    if not isinstance(reduce, str):
        raise TypeError(f"reduce must be one of {', '.join(REDUCTIONS)} or a function, got {type(reduce).__name__}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduce!r}; use one of {', '.join(REDUCTIONS)} or a function")
    return REDUCTIONS[reduce]


def _root_pre_hook(owner: weakref.ref):
    def hook(module, args):
        trace = owner()
        if trace is not None and trace._active:
            trace._capture_last()
            if torch._C._current_graph_task_id() == -1:
                trace._new_forward()

    return hook


def _patch_hook(owner: weakref.ref, name: str):
    def hook(module, args, output):
        trace = owner()
        if trace is None or not trace._active:
            return None
        return trace._on_patch(name, output)

    return hook


def _capture_hook(owner: weakref.ref, name: str):
    def hook(module, args, kwargs, output):
        trace = owner()
        if trace is not None and trace._active:
            trace._on_forward(module, name, args, kwargs, output)

    return hook
