"""Perturbation methods: occlusion and LIME on the input embeddings, value zeroing inside attention.

    >>> out = model.attribute(text, method="occlusion")                          # one token at a time
    >>> out = model.attribute(text, method="occlusion", sliding_window_shapes=(2, 16), strides=(1, 8))
    >>> out = model.attribute(text, method="lime", n_samples=100, seed=0)

Everything runs under `torch.no_grad()`. A perturbed input is a perturbed copy of the *full* row of
an example (its longest attributed prefix): under causal attention one forward of it gives the
attributed function at every step of the example (`Engine.forward_steps`), so the number of forwards
depends on the number of perturbations, not on the number of steps; perturbed copies of all
examples go through the model together, `perturbations_per_eval` at a time. Where a step cannot
see a perturbation (a window on target tokens after its prefix), that perturbation does not count
for it, so every step gets what the method computes on its own prefix.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from instrument.engine import FullRows, RowAttribution, full_rows
from methods.base import AttributionMethod, Request
from methods.registry import register


class Perturber:
    """Scores perturbed copies of full rows at every step (row) of their examples."""

    def __init__(self, request: Request, fr: FullRows):
        self.request, self.fr = request, fr
        self.engine = request.engine
        owner = fr.owner.tolist()
        self.rows_of: list[list[int]] = [[] for _ in range(len(fr.full))]
        for r, f in enumerate(owner):
            self.rows_of[f].append(r)

    def original(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[R, V]` and attributed function `[R]` of every row at the unperturbed input."""
        rows = self.request.rows
        logits = self.fr.gather(self.engine.forward_steps(self.fr.full, self.fr.positions)[0])
        source, target = self.engine.embed(rows)
        return logits, self.request.score(rows, logits, source, target).float()

    def run(self, owners: torch.Tensor, source: torch.Tensor | None, target: torch.Tensor | None, pairs=None):
        """Scores of `(perturbation n, row r)` pairs: `(n [E], r [E], scores [E])`.

        `owners[n]` is the full row perturbation n copies, `source` / `target` its embeddings
        (None: unperturbed side); `pairs(n, r) -> bool` filters the pairs (default: every row of
        the example)."""
        engine, fr, rows = self.engine, self.fr, self.request.rows
        owners_list = owners.tolist()
        index_n, index_r = [], []
        for n, f in enumerate(owners_list):
            for r in self.rows_of[f]:
                if pairs is None or pairs(n, r):
                    index_n.append(n)
                    index_r.append(r)
        if not index_n:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, torch.zeros(0)
        device = rows.target_ids.device
        index_n = torch.tensor(index_n, dtype=torch.long, device=device)
        index_r = torch.tensor(index_r, dtype=torch.long, device=device)
        full = fr.full.take(owners.to(device))
        logits = engine.forward_steps(full, fr.positions[owners.to(device)], source, target)[0]
        logits = logits[index_n, fr.slot[index_r]]
        picked = rows.take(index_r)
        scores = self.request.score(
            picked, logits,
            source[index_n] if source is not None else None,
            target[index_n] if target is not None else None,
        )
        return index_n, index_r, scores.float()


def _side_lengths(rows, side: str) -> torch.Tensor:
    """Length of each row's source, or of its target prefix."""
    mask = rows.source_mask if side == "source" else rows.target_mask
    return mask.sum(1)


def _pair(value, what: str, hidden: int, default) -> tuple[int, int]:
    """A (tokens, hidden) pair from an int / pair / None (default)."""
    if value is None:
        value = default
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value) if what == "strides" else (value, hidden)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{what} must be a (tokens, hidden) pair of ints, got {value!r}")
    tokens, dims = value
    if tokens < 1 or not 1 <= dims <= hidden:
        raise ValueError(f"{what} {tuple(value)} out of range: tokens >= 1 and 1 <= hidden <= {hidden}")
    return tokens, dims


def _per_side(value, sides: list[str]) -> dict[str, Any]:
    """One setting per side: a pair of pairs gives (source, target) settings on encoder-decoders."""
    nested = isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (tuple, list)) for v in value)
    if nested:
        if len(sides) == 1 and sides[0] == "target":
            return {"target": value[-1]}
        return dict(zip(["source", "target"], value))
    return {side: value for side in sides}


def _starts(length: int, window: int, stride: int) -> list[int]:
    """Captum's window starts over `length`: `ceil((length - window) / stride) + 1` of them, the last
    one cropped at the end when the stride does not divide evenly."""
    return [k * stride for k in range(math.ceil((length - window) / stride) + 1)]


@register("occlusion")
class Occlusion(AttributionMethod):
    """Occlusion (Zeiler and Fergus 2014) as Captum computes it, on the input embeddings.

    A window of `sliding_window_shapes = (tokens, hidden)` (default: one token, the whole embedding)
    slides over each attributed side with `strides = (tokens, hidden)` (default 1); the window's
    elements are set to `baselines` (default "zeros", as Captum; also None / "unk", "pad", a tensor)
    and `f(input) - f(occluded)` is added to every element of the window; each element's total is
    divided by the number of windows covering it. A pair of pairs gives separate source / target
    settings. A step only counts the windows that fit in its own prefix, as Captum's windows over
    that prefix would (a prefix shorter than the window is an error, as in Captum).
    """

    params = {"sliding_window_shapes": None, "strides": None, "baselines": "zeros",
              "include_eos_baseline": False, "perturbations_per_eval": 32}

    def attribute(self, request: Request, sliding_window_shapes=None, strides=None, baselines="zeros",
                  include_eos_baseline=False, perturbations_per_eval=32) -> RowAttribution:
        if not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
            raise ValueError(f"perturbations_per_eval must be a positive integer, got {perturbations_per_eval!r}")
        engine, rows = request.engine, request.rows
        fr = full_rows(rows)
        perturber = Perturber(request, fr)
        with torch.no_grad():
            inputs = dict(zip(("source", "target"), engine.embed(fr.full)))
            bases = dict(zip(("source", "target"), engine.baseline(fr.full, baselines, include_eos_baseline)))
            sides = (["source"] if inputs["source"] is not None else []) + (["target"] if request.attribute_target else [])
            hidden = {side: inputs[side].shape[-1] for side in sides}
            windows = {side: _pair(v, "sliding_window_shapes", hidden[side], (1, hidden[side]))
                       for side, v in _per_side(sliding_window_shapes, sides).items()}
            stride = {side: _pair(v, "strides", hidden[side], 1) for side, v in _per_side(strides, sides).items()}
            for side in sides:
                window, step = windows[side], stride[side]
                if step[0] > window[0] or step[1] > window[1]:
                    raise ValueError(f"strides {step} cannot be larger than the sliding window {window} (as in Captum)")
                shortest = int(_side_lengths(rows, side).min())
                if window[0] > shortest:
                    raise ValueError(
                        f"The {side} sliding window spans {window[0]} tokens but a {side} {'prefix ' if side == 'target' else ''}"
                        f"has only {shortest}; use a smaller window or a later attr_pos_start"
                    )
            logits, original = perturber.original()
            totals = {side: torch.zeros(len(rows), *inputs[side].shape[1:]) for side in sides}
            counts = {side: torch.zeros(len(rows), *inputs[side].shape[1:]) for side in sides}
            for side in sides:
                self._side(perturber, side, inputs, bases, windows[side], stride[side], original,
                           totals[side], counts[side], perturbations_per_eval)
        out = {side: totals[side] / counts[side] for side in sides}
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)

    def _side(self, perturber: Perturber, side, inputs, bases, window, stride, original, total, count, per_eval):
        fr, rows = perturber.fr, perturber.request.rows
        x, base = inputs[side], bases[side]
        row_lengths = _side_lengths(rows, side).tolist()
        full_lengths = _side_lengths(fr.full, side).tolist()
        hidden_starts = _starts(x.shape[-1], window[1], stride[1])
        # Every (full row, token window, hidden window) perturbation; the token window's index k.
        perturbations = [
            (f, k, t0, h0)
            for f, length in enumerate(full_lengths)
            for k, t0 in enumerate(_starts(length, window[0], stride[0]))
            for h0 in hidden_starts
        ]
        # Step r counts window k if Captum's windows over its own prefix include it.
        last_k = [math.ceil((length - window[0]) / stride[0]) for length in row_lengths]
        for start in range(0, len(perturbations), per_eval):
            chunk = perturbations[start : start + per_eval]
            owners = torch.tensor([f for f, _, _, _ in chunk], dtype=torch.long)
            mask = torch.zeros(len(chunk), *x.shape[1:], dtype=torch.bool)
            for n, (f, k, t0, h0) in enumerate(chunk):
                mask[n, t0 : min(t0 + window[0], full_lengths[f]), h0 : h0 + window[1]] = True
            device_mask = mask.to(x.device)
            perturbed = torch.where(device_mask, base[owners.to(x.device)], x[owners.to(x.device)])
            embeds = {"source": None, "target": None, side: perturbed}
            n_index, r_index, scores = perturber.run(
                owners, embeds["source"], embeds["target"], pairs=lambda n, r: chunk[n][1] <= last_k[r]
            )
            if not len(n_index):
                continue
            diff = (original[r_index] - scores).cpu()
            hit = mask[n_index.cpu()].float()
            total.index_add_(0, r_index.cpu(), diff[:, None, None] * hit)
            count.index_add_(0, r_index.cpu(), hit)


# -- value zeroing ---------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends a forward once the last block whose output is read has run."""


def _zero_rows(output: torch.Tensor, index: torch.Tensor, columns) -> torch.Tensor:
    """`output [N, tokens, ...]` with `output[n, index[n], *columns] = 0` where `index[n] >= 0`."""
    output = output.clone()
    n = (index >= 0).nonzero().squeeze(1)
    columns = columns if isinstance(columns, tuple) else (columns,)
    output[(n, index[n]) + columns] = 0
    return output


def value_projection(attention: nn.Module, name: str):
    """The module computing an attention module's value vectors, and `zero(output, index)` setting
    token `index[n]`'s value vectors (all heads) to zero in copy n of its output."""
    children = dict(attention.named_children())
    for key in ("v_proj", "v", "value", "value_proj"):
        if key in children:
            return children[key], lambda out, index: _zero_rows(out, index, slice(None))
    if "c_attn" in children and hasattr(attention, "split_size"):  # GPT-2: [q | k | v] (or [k | v] for cross-attention)
        split = attention.split_size
        return children["c_attn"], lambda out, index: _zero_rows(out, index, slice(out.shape[-1] - split, None))
    if "query_key_value" in children and "GPTNeoX" in type(attention).__name__:  # per head [q | k | v]
        size = attention.head_size

        def zero(out, index):
            view = out.reshape(*out.shape[:-1], -1, 3 * size)
            return _zero_rows(view, index, (slice(None), slice(2 * size, None))).reshape(out.shape)

        return children["query_key_value"], zero
    raise ValueError(
        f"value_zeroing does not know where {name} ({type(attention).__name__}) computes its value vectors "
        "(looked for v_proj, v, value, GPT-2's c_attn and GPT-NeoX's query_key_value)"
    )


def _first(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_first(output, value: torch.Tensor):
    return value if isinstance(output, torch.Tensor) else (value, *output[1:])


@register("value_zeroing")
class ValueZeroing(AttributionMethod):
    """Value zeroing (Mohebbi et al. 2023), per layer: `[positions, steps, layers]`.

    For each layer and each token j, token j's value vectors (every head) are set to zero in that
    layer's attention, the layer runs on its *unperturbed* input, and token j's score at query i is
    the cosine distance (`similarity_metric="cosine"`, or "euclidean": the L2 distance) between the
    layer's original and perturbed outputs at position i. The representation compared is the output
    hidden state of the whole transformer block (its first output: after attention, residual
    connections, normalisation and feed-forward), as in the paper and Inseq. Step p reads query
    `p - 1`. Decoder self-attention gives the target side; on encoder-decoders, zeroing source token
    j's values in the decoder's cross-attention gives the source side (encoder self-attention is
    not step-oriented and is not reported). `normalize=True` divides each column by its sum over the
    visible tokens (per side), as Inseq does; `layers` picks blocks (indices, negative from the end).

    Batched: a perturbed copy of an example's full row zeroes token j in every picked layer at
    once, and each block's output is replaced by its unperturbed output before the next block, so
    that every layer sees its unperturbed input: one forward per `perturbations_per_eval` copies,
    cut short after the last picked block.
    """

    params = {"layers": None, "similarity_metric": "cosine", "normalize": False, "perturbations_per_eval": 32}

    def attribute(self, request: Request, layers=None, similarity_metric="cosine", normalize=False,
                  perturbations_per_eval=32) -> RowAttribution:
        from instrument.selection import resolve_alias, select_modules
        from methods.attention import _indices

        if similarity_metric not in ("cosine", "euclidean"):
            raise ValueError(f"similarity_metric must be 'cosine' or 'euclidean', got {similarity_metric!r}")
        if not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
            raise ValueError(f"perturbations_per_eval must be a positive integer, got {perturbations_per_eval!r}")
        engine, rows = request.engine, request.rows
        model, enc_dec = engine.model, engine.is_encoder_decoder
        blocks = resolve_alias(model, "layers", "decoder" if enc_dec else None)
        if not blocks:
            raise ValueError(f"Found no transformer blocks in {type(model).__name__}")
        picked = sorted(set(_indices(layers, len(blocks), "layers")))
        kinds = {}
        if request.attribute_target or not enc_dec:
            kinds["target"] = resolve_alias(model, "attention", "decoder" if enc_dec else None)
        if enc_dec:
            kinds["source"] = resolve_alias(model, "cross_attention", "decoder")
        zeroers = {}
        for side, names in kinds.items():
            zeroers[side] = []
            for index in picked:
                inside = [n for n in names if n.startswith(blocks[index] + ".")]
                if len(inside) != 1:
                    raise ValueError(f"Expected one {'cross-' if side == 'source' else 'self-'}attention module in {blocks[index]}, found {inside}")
                zeroers[side].append(value_projection(model.get_submodule(inside[0]), inside[0]))
        fr = full_rows(rows)
        perturber = Perturber(request, fr)
        last = picked[-1]
        read = blocks[: last + 1]
        encoder = select_modules(model, model.get_encoder())[0] if enc_dec else None
        with torch.no_grad():
            logits, clean = engine.forward_steps(fr.full, fr.positions, layers=read + ([encoder] if enc_dec else []))
            logits = fr.gather(logits)
            clean = {name: value.detach() for name, value in clean.items()}
            out = {}
            for side in kinds:
                out[side] = self._side(perturber, side, blocks, picked, read, clean, encoder, zeroers[side],
                                       similarity_metric, perturbations_per_eval)
        if normalize:
            for side, values in out.items():
                visible = self._visible(rows, side).to(values.device)[:, :, None]
                total = (values * visible).sum(1, keepdim=True)
                out[side] = values / torch.where(total == 0, torch.ones_like(total), total)
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)

    @staticmethod
    def _visible(rows, side: str) -> torch.Tensor:
        if side == "source":
            return rows.source_mask.float()
        length = rows.target_ids.shape[1]
        return (torch.arange(length, device=rows.target_ids.device)[None] < rows.position[:, None]).float()

    def _side(self, perturber, side, blocks, picked, read, clean, encoder, zeroers, metric, per_eval):
        from transformers.modeling_outputs import BaseModelOutput

        engine, fr, rows = perturber.engine, perturber.fr, perturber.request.rows
        model = engine.model
        full = fr.full
        mask = full.source_mask if side == "source" else full.target_mask
        perturbations = [(f, j) for f, j in mask.nonzero().tolist()]
        width = mask.shape[1]
        result = torch.zeros(len(rows), width, len(picked))
        for start in range(0, len(perturbations), per_eval):
            chunk = perturbations[start : start + per_eval]
            owners = torch.tensor([f for f, _ in chunk], dtype=torch.long, device=full.target_ids.device)
            zero_at = torch.tensor([j for _, j in chunk], dtype=torch.long, device=full.target_ids.device)
            sub = full.take(owners)
            captured = {}
            handles = []

            def patch(name):
                def hook(module, args, output):
                    if name in picked_names:
                        captured[name] = _first(output)
                    if name == read[-1]:
                        raise _Stop
                    return _with_first(output, clean[name][owners])
                return hook

            picked_names = {blocks[i] for i in picked}
            try:
                for projection, zero in zeroers:
                    handles.append(projection.register_forward_hook(lambda m, a, o, zero=zero: zero(o, zero_at)))
                for name in read:
                    handles.append(model.get_submodule(name).register_forward_hook(patch(name)))
                kwargs = {"use_cache": False}
                if engine.is_encoder_decoder:
                    kwargs.update(encoder_outputs=BaseModelOutput(last_hidden_state=clean[encoder][owners]),
                                  attention_mask=sub.source_mask, decoder_input_ids=sub.target_ids,
                                  decoder_attention_mask=sub.target_mask)
                else:
                    kwargs.update(input_ids=sub.target_ids, attention_mask=sub.target_mask)
                try:
                    model(**kwargs)
                except _Stop:
                    pass
            finally:
                for handle in handles:
                    handle.remove()
            queries = fr.positions[owners]  # [N, K]
            n_index = torch.arange(len(chunk), device=queries.device)[:, None]
            distances = []
            for index in picked:
                name = blocks[index]
                original, perturbed = clean[name][owners][n_index, queries], captured[name][n_index, queries]
                original, perturbed = original.double(), perturbed.double()  # 1 - cos of nearly equal vectors
                if metric == "cosine":
                    distances.append(1 - torch.nn.functional.cosine_similarity(original, perturbed, dim=-1))
                else:
                    distances.append((original - perturbed).norm(dim=-1))
            distances = torch.stack(distances, dim=-1).float().cpu()  # [N, K, layers]
            pairs_n, pairs_r = [], []
            for n, (f, _) in enumerate(chunk):
                for r in perturber.rows_of[f]:
                    pairs_n.append(n)
                    pairs_r.append(r)
            pairs_n, pairs_r = torch.tensor(pairs_n), torch.tensor(pairs_r)
            result[pairs_r, zero_at.cpu()[pairs_n]] = distances[pairs_n, fr.slot.cpu()[pairs_r]]
        return result
