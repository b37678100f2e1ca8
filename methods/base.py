"""What every attribution method shares: its options, the request it serves, gradients at a point.

    >>> method = get_method("saliency")(abs=True)
    >>> result = method.attribute(request)        # RowAttribution for request.rows
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from instrument import batching
from instrument.engine import Engine, RowAttribution, Rows

Score = Callable[[Rows, torch.Tensor, Any, Any], torch.Tensor]


@dataclass
class Request:
    """Rows to attribute, the attributed function, and which sides are attributed inputs.

    `score(rows, logits, source_embeds, target_embeds)` gives one differentiable value per row.
    On encoder-decoders the target prefix is an attributed input only with `attribute_target`;
    otherwise it stays at its real embedding whatever the method does to the source.
    """

    engine: Engine
    rows: Rows
    score: Score
    attribute_target: bool = True

    @property
    def attribute_source(self) -> bool:
        return self.rows.source_ids is not None


class AttributionMethod:
    """A registered method: `params` are its options and their defaults."""

    name = ""
    params: dict[str, Any] = {}
    # Input methods attribute the target prefix only on request; layer methods report whatever side
    # their layers are on.
    attributes_inputs = True

    def __init__(self, **defaults):
        unknown = set(defaults) - set(self.params)
        if unknown:
            raise TypeError(f"{self.name} takes no option(s) {sorted(unknown)}; its options: {sorted(self.params)}")
        self.defaults = {**self.params, **defaults}

    def attribute(self, request: Request, **options) -> RowAttribution:
        raise NotImplementedError


def gradients(request: Request, rows: Rows, wrt: list[torch.Tensor], source=None, target=None, layers=(), layer_patch=None):
    """Gradients of the summed score w.r.t. `wrt` (leaves fed in as embeddings or layer patches),
    plus the logits and the live layer outputs of that one forward."""
    with torch.enable_grad():
        logits, activations = request.engine.forward(rows, source, target, layers, layer_patch)
        scores = request.score(rows, logits, source, target)
        wanted = list(wrt) + [activations[name] for name in layers]
        if scores.requires_grad:
            grads = torch.autograd.grad(scores.sum(), wanted, allow_unused=True)
        else:  # the attributed function does not depend on the inputs (e.g. top_p_size): zero attributions
            grads = [None] * len(wanted)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads)]
    return grads, logits.detach(), {name: activations[name].detach() for name in layers}


def leaf(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().requires_grad_()


def chunks(total: int, rows: int, internal_batch_size: int | str | None) -> Iterable[range]:
    """Splits `total` path points into chunks of at most `internal_batch_size` rows in all; "auto":
    chunks sized from the measured free memory (`instrument.batching.auto_chunks`, an iterator)."""
    if batching.is_auto(internal_batch_size):
        return batching.auto_chunks(total, rows)
    per_chunk = total if not internal_batch_size else max(1, internal_batch_size // max(rows, 1))
    return [range(start, min(start + per_chunk, total)) for start in range(0, total, per_chunk)]
