"""Attention weights as attributions: decoder self-attention, cross-attention, encoder self-attention.

    out = model.attribute(text, method="attention")                      # mean over layers and heads
    out = model.attribute(text, method="attention", layers=[-1], heads=[0, 2], aggregate_fn="max")
    out = model.attribute(text, method="attention", aggregate_fn=None)  # [..., layers, heads]

Orientation as for every method: the column of step `p` holds the attention of the query at position
`p - 1` (the position that predicts token `p`) over the keys: the target prefix for decoder
self-attention (`target_attributions`), the source for cross-attention (`source_attributions` of
an encoder-decoder). With `source_attention="encoder"` the source side holds the encoder's
self-attention instead; it does not depend on the step, and as it has a query per source token, the
column holds the attention each source token *receives*, averaged over the (real) source queries.

One forward over the full sequence of each example gives every step (each attributed step is a
prefix of the longest one, and attention is causal). Every attention module is hooked, and its
weights `[batch, heads, queries, keys]` are cut down to the query rows that are read and reduced
(heads selected, then mean / max or kept) while the forward goes on, so the weights of every head
of every layer are never held at once. The model runs with eager attention during the call (the
other implementations return no weights); its implementation is restored after, errors included.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from instrument import planner
from instrument.hooks import HookHandles
from instrument.indices import pick_indices
from instrument.kernels import reduce_heads
from instrument.rows import RowAttribution, full_rows
from instrument.selection import resolve_alias
from methods.base import AttributionMethod, Request
from methods.registry import register

AGGREGATES = ("mean", "max", None)
SOURCE_ATTENTION = ("cross", "encoder")


def _configs(model: nn.Module) -> list:
    """Every configuration object the model's modules read their attention implementation from."""
    found: dict[int, Any] = {}
    pending = [getattr(module, "config", None) for module in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or not hasattr(config, "to_dict"):
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            pending.append(getattr(config, key, None))
    return list(found.values())


_MISSING = object()


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """The model computes attention eagerly (and so returns attention weights) inside the block; every
    configuration's attention implementation is put back as it was on exit, errors included."""
    saved = [(config, config.__dict__.get("_attn_implementation_internal", _MISSING)) for config in _configs(model)]
    try:
        if getattr(model.config, "_attn_implementation", "eager") != "eager" and hasattr(
            model, "set_attn_implementation"
        ):
            model.set_attn_implementation("eager")
        # Some versions leave copies alone (T5's decoder reads its own deep copy of the config in transformers 5.17).
        for config, _ in saved:
            if config.__dict__.get("_attn_implementation_internal", "eager") not in ("eager", None):
                config.__dict__["_attn_implementation_internal"] = "eager"
        yield
    finally:
        for config, value in saved:
            if value is _MISSING:
                config.__dict__.pop("_attn_implementation_internal", None)
            else:
                config.__dict__["_attn_implementation_internal"] = value


def attention_modules(model: nn.Module, kind: str, is_encoder_decoder: bool) -> list[str]:
    """Names of the attention modules of one kind ("self": decoder self-attention, "cross", "encoder")."""
    if kind == "self":
        return resolve_alias(model, "attention", "decoder" if is_encoder_decoder else None)
    if kind == "cross":
        return resolve_alias(model, "cross_attention", "decoder")
    return resolve_alias(model, "attention", "encoder")


def attention_weights(output) -> torch.Tensor | None:
    """The `[batch, heads, queries, keys]` weights an attention module returns (last tuple element)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[-1], torch.Tensor) and output[-1].dim() == 4:
        return output[-1]
    return None


class _Reducer:
    """Reduces each hooked module's weights to the query rows read, as the forward goes: heads
    selected, then mean / max over them (`kernels.reduce_heads`), then over layers; or kept."""

    def __init__(self, positions: torch.Tensor | None, heads: Any, aggregate_fn: str | None, n_layers: int):
        self.positions, self.heads, self.aggregate_fn, self.n_layers = positions, heads, aggregate_fn, n_layers
        self.total: torch.Tensor | None = None
        self.kept: list[torch.Tensor] = []
        self.key_mask: torch.Tensor | None = None  # for "encoder": which queries are real

    def add(self, weights: torch.Tensor) -> None:
        heads = pick_indices(self.heads, weights.shape[1], "heads", distinct=True)
        weights = weights.detach()
        if self.positions is not None:
            positions = self.positions.to(weights.device)  # [F, K_read]: the query rows each full row is read at
        else:
            # Encoder self-attention: attention received by each key, averaged over the real queries.
            mask = self.key_mask.to(weights.device, weights.dtype)  # [F, Q]
            received = torch.einsum("fhqk,fq->fhk", weights[:, heads].float(), mask) / mask.sum(1)[:, None, None]
            weights, heads = received[:, :, None], list(range(len(heads)))  # [F, H', 1, keys]
            positions = torch.zeros(len(weights), 1, dtype=torch.long, device=weights.device)
        rows = torch.arange(weights.shape[0], device=weights.device)[:, None]
        if self.aggregate_fn is None:  # [F, H, Q, K] -> [F, K_read, keys, H']
            self.kept.append(weights[rows, :, positions][:, :, heads].float().transpose(2, 3))
            return
        value = reduce_heads([weights], heads=heads, reduce=self.aggregate_fn)[rows, positions].float()
        if self.total is None:
            self.total = value
        elif self.aggregate_fn == "mean":
            self.total = self.total + value
        else:
            self.total = torch.maximum(self.total, value)

    def result(self) -> torch.Tensor:
        if self.aggregate_fn is None:
            return torch.stack(self.kept, dim=3)  # [F, K_read, keys, layers, heads]
        if self.aggregate_fn == "mean":
            return self.total / self.n_layers  # a mean over layers of means over heads
        return self.total


@register("attention")
class Attention(AttributionMethod):
    """Attention weights of the predicting position over the keys, selected and aggregated over
    layers and heads (`aggregate_fn=None` keeps them: two more dimensions, `[layers, heads]`).

    `layers` and `heads` take None (all), an index or a list of indices (negative from the end),
    used in model order without duplicates (kept dimensions follow that order). Layer indices count
    within each stack: the decoder's for self- and cross-attention, the encoder's for
    `source_attention="encoder"`.
    """

    def attribute(
        self, request: Request, layers=None, heads=None, aggregate_fn="mean", source_attention="cross"
    ) -> RowAttribution:
        if aggregate_fn not in AGGREGATES:
            raise ValueError(
                f"aggregate_fn must be 'mean', 'max' or None (keep layers and heads), got {aggregate_fn!r}"
            )
        if source_attention not in SOURCE_ATTENTION:
            raise ValueError(f"source_attention must be 'cross' or 'encoder', got {source_attention!r}")
        engine = request.engine
        model, rows = engine.model, request.rows
        fr = full_rows(rows)
        kinds = {}
        if request.attribute_target or not engine.is_encoder_decoder:
            kinds["target"] = "self"
        if engine.is_encoder_decoder:
            kinds["source"] = source_attention
        picked = {}
        for side, kind in kinds.items():
            names = attention_modules(model, kind, engine.is_encoder_decoder)
            if not names:
                raise ValueError(f"Found no {kind} attention modules in {type(model).__name__}")
            picked[side] = [names[i] for i in pick_indices(layers, len(names), "layers", distinct=True)]
        parts = []  # (logits, {side: values}) of each chunk of full rows
        for index in _row_chunks(request, fr, picked, aggregate_fn):
            full, positions = fr.full.take(index), fr.positions[index]
            reducers, hooks = {}, []
            for side, kind in kinds.items():
                reducer = _Reducer(None if kind == "encoder" else positions, heads, aggregate_fn, len(picked[side]))
                if kind == "encoder":
                    reducer.key_mask = full.source_mask
                reducers[side] = reducer
                hooks.extend((model.get_submodule(name), name, reducer) for name in picked[side])
            with torch.no_grad(), eager_attention(model), HookHandles() as handles:
                for module, name, reducer in hooks:
                    handles.forward(module, _hook(name, reducer))
                logits = engine.forward_steps(full, positions if request.needs_logits else None)[0]
            parts.append((logits, {side: reducer.result() for side, reducer in reducers.items()}))
        logits = fr.gather(torch.cat([part[0] for part in parts])) if parts[0][0] is not None else None
        out = {}
        for side, kind in kinds.items():
            values = torch.cat([part[1][side] for part in parts])
            if kind == "encoder":
                out[side] = values[fr.owner.to(values.device), 0]
            else:
                out[side] = fr.gather(values)
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)


def _row_chunks(request: Request, fr, picked: dict, aggregate_fn) -> list[torch.Tensor]:
    """Full rows per forward, as many as the memory planner fits in `request.max_memory` (eager
    attention; each row keeps its maps of the steps read: `[steps, keys]`, per layer and head
    when kept)."""
    full, steps = fr.full, fr.positions.shape[1]
    width = full.target_ids.shape[1] + full.source_length
    heads = planner.model_shape(request.engine.model).heads
    maps = sum(len(names) * heads if aggregate_fn is None else 1 for names in picked.values())
    count = planner.plan_rows(
        request.engine.model,
        full.target_ids.shape[1],
        len(full),
        source_length=full.source_length,
        reads=steps if request.needs_logits else 0,
        kept=maps * steps * width * 4,
        max_memory=request.max_memory,
        eager=True,
    )
    order = torch.arange(len(full), device=fr.positions.device)
    return list(order.split(count))


def _hook(name: str, reducer: _Reducer):
    def hook(module, args, output):
        weights = attention_weights(output)
        if weights is None:
            raise RuntimeError(
                f"{name} returned no attention weights under eager attention; this model family does not "
                "expose them, so the attention method cannot be used with it"
            )
        reducer.add(weights)

    return hook
