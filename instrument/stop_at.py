"""`stop_at`: a trace ends each forward of the model after a chosen module, and the caller's block goes on.

with instrument.trace(model, "layers", stop_at="transformer.h.3") as t:
    for batch in batches:
        assert model(**batch) is None                # cut short after block 3; activations kept
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn


class StopForward(Exception):
    """Raised inside the forward by `stop_at`; the traced model's call catches it and returns None."""

    def __init__(self, trace: Any, name: str):
        super().__init__(f"forward stopped after {name!r} by instrument.trace(stop_at=...)")
        self.trace, self.name = trace, name


class RootGuard:
    """Wraps `model.forward` while `stop_at` traces are active: the outermost call of the model ends
    with None when one of them stops it, instead of raising through the user's `with` block."""

    _MISSING = object()

    def __init__(self, model: nn.Module):
        self.model, self.traces, self.depth = model, [], 0
        self.previous = model.__dict__.get("forward", self._MISSING)
        original = model.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            self.depth += 1
            try:
                return original(*args, **kwargs)
            except StopForward as stop:
                if self.depth == 1 and any(stop.trace is active for active in self.traces):
                    return None
                raise
            finally:
                self.depth -= 1

        forward._instrument_guard = self
        self.forward = forward

    @classmethod
    def install(cls, model: nn.Module, trace: Any) -> "RootGuard":
        guard = getattr(model.__dict__.get("forward"), "_instrument_guard", None)
        if guard is None:
            guard = cls(model)
            model.__dict__["forward"] = guard.forward
        guard.traces.append(trace)
        return guard

    def release(self, trace: Any) -> None:
        self.traces = [active for active in self.traces if active is not trace]
        # Restore only if nobody wrapped the forward over ours meanwhile; otherwise stay as a pass-through.
        if not self.traces and self.model.__dict__.get("forward") is self.forward:
            if self.previous is self._MISSING:
                del self.model.__dict__["forward"]
            else:
                self.model.__dict__["forward"] = self.previous
