"""Hooks registered together and removed together, errors included; `eval_mode`, undone the same way.

with HookHandles() as hooks:
    hooks.forward(model.lm_head, lambda module, args, output: output * 2)
    logits = model(**batch).logits          # hooked
# every hook is removed here, also when the forward raised

hooks = HookHandles()                       # or by hand, for hooks that outlive a block
hooks.add(tensor.register_hook(on_gradient))
hooks.remove()
"""

from __future__ import annotations

import contextlib
from typing import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle


class HookHandles:
    """A list of hook handles removed all at once (`remove()`, or on leaving a `with` block)."""

    def __init__(self):
        self.handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        self.handles.append(handle)
        return handle

    def forward(self, module: nn.Module, hook: Callable, **options) -> RemovableHandle:
        """`module.register_forward_hook(hook, **options)`, kept for removal."""
        return self.add(module.register_forward_hook(hook, **options))

    def forward_pre(self, module: nn.Module, hook: Callable, **options) -> RemovableHandle:
        """`module.register_forward_pre_hook(hook, **options)`, kept for removal."""
        return self.add(module.register_forward_pre_hook(hook, **options))

    def remove(self) -> None:
        """Removes every hook (the latest first); removing twice is harmless."""
        while self.handles:
            self.handles.pop().remove()

    def __len__(self) -> int:
        return len(self.handles)

    def __enter__(self) -> "HookHandles":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Dropout off for the block; each module's own `training` flag restored after, errors included."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
