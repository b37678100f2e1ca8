"""Occlusion on the input embeddings, as Captum computes it (run batched by `methods.perturber`).

out = model.attribute(text, method="occlusion")                          # [positions, steps], signed
out = model.attribute(text, method="occlusion", sliding_window_shapes=(2, 16), strides=(1, 8))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from instrument.rows import RowAttribution, full_rows
from methods.base import AttributionMethod, Request
from methods.perturber import Perturber, attributed_sides, side_lengths
from methods.registry import register


@dataclass
class _Windows:
    """The windows sliding over one attributed side: its embeddings and baselines `[F, length, hidden]`
    (full rows), and the window and stride as (tokens, hidden) pairs."""

    side: str
    inputs: torch.Tensor
    baselines: torch.Tensor
    window: tuple[int, int]
    stride: tuple[int, int]


def _pair(value, what: str, hidden: int, default) -> tuple[int, int]:
    """A (tokens, hidden) pair from an int / pair / None (default)."""
    if value is None:
        value = default
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value) if what == "strides" else (value, hidden)
    is_int = [isinstance(v, int) and not isinstance(v, bool) for v in value] if isinstance(value, (tuple, list)) else []
    if len(is_int) != 2 or not all(is_int):
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
    elements are set to `baselines` (default None: UNK embeddings, EOS kept, as Inseq; also "zeros",
    Captum's default, "pad", a tensor) and `f(input) - f(occluded)` is added to every element of the
    window; each element's total is divided by the number of windows covering it. A pair of pairs
    gives separate source / target settings. A step only counts the windows that fit in its own
    prefix, as Captum's windows over that prefix would (a prefix shorter than the window is an error,
    as in Captum).

    Shape: when every window spans the whole embedding (the default), all hidden units of a token get
    the same score, so one signed score per token is stored, `[positions, steps]`; Inseq stores its
    absolute value: take `.abs()` of the attributions for Inseq's numbers. Windows over part of the
    embedding (on any attributed side) give different scores per hidden unit, and then both sides
    keep Captum's granular `[positions, steps, hidden]`.
    """

    def attribute(
        self,
        request: Request,
        sliding_window_shapes=None,
        strides=None,
        baselines=None,
        include_eos_baseline=False,
        perturbations_per_eval=32,
    ) -> RowAttribution:
        if not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
            raise ValueError(f"perturbations_per_eval must be a positive integer, got {perturbations_per_eval!r}")
        engine, rows = request.engine, request.rows
        fr = full_rows(rows)
        perturber = Perturber(request, fr)
        with torch.no_grad():
            inputs = dict(zip(("source", "target"), engine.embed(fr.full)))
            bases = dict(zip(("source", "target"), engine.baseline(fr.full, baselines, include_eos_baseline)))
            sides = attributed_sides(request, inputs["source"] is not None)
            hidden = {side: inputs[side].shape[-1] for side in sides}
            windows = {
                side: _pair(v, "sliding_window_shapes", hidden[side], (1, hidden[side]))
                for side, v in _per_side(sliding_window_shapes, sides).items()
            }
            stride = {side: _pair(v, "strides", hidden[side], 1) for side, v in _per_side(strides, sides).items()}
            for side in sides:
                window, side_stride = windows[side], stride[side]
                if side_stride[0] > window[0] or side_stride[1] > window[1]:
                    raise ValueError(
                        f"strides {side_stride} cannot be larger than the sliding window {window} (as in Captum)"
                    )
                shortest = int(side_lengths(rows, side).min())
                if window[0] > shortest:
                    raise ValueError(
                        f"The {side} sliding window spans {window[0]} tokens but a {side} "
                        f"{'prefix ' if side == 'target' else ''}has only {shortest}; use a smaller window "
                        "or a later attr_pos_start"
                    )
            logits, original = perturber.original()
            granular = any(windows[side][1] < hidden[side] for side in sides)
            out = {
                side: self._side(
                    perturber,
                    _Windows(side, inputs[side], bases[side], windows[side], stride[side]),
                    original=original,
                    per_eval=perturber.per_eval(perturbations_per_eval),
                    granular=granular,
                )
                for side in sides
            }
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)

    @staticmethod
    def _side(
        perturber: Perturber, windows: _Windows, *, original: torch.Tensor, per_eval: int, granular: bool
    ) -> torch.Tensor:
        """`[R, length]` occlusion attributions of one side (`[R, length, hidden]` if `granular`). Windows
        are rectangles (token range x hidden range), so totals and counts are kept per token and hidden
        window, `[R, length, W]`, and spread over the hidden dimension once at the end."""
        fr, rows = perturber.fr, perturber.request.rows
        side, x, base, window, stride = windows.side, windows.inputs, windows.baselines, windows.window, windows.stride
        row_lengths = side_lengths(rows, side).tolist()
        full_lengths = side_lengths(fr.full, side).tolist()
        hidden_starts = _starts(x.shape[-1], window[1], stride[1])
        # Every (full row, token window index k, token start, hidden window index) perturbation.
        perturbations = [
            (f, k, t0, w)
            for f, length in enumerate(full_lengths)
            for k, t0 in enumerate(_starts(length, window[0], stride[0]))
            for w in range(len(hidden_starts))
        ]
        # Step r counts window k if Captum's windows over its own prefix include it.
        last_k = [math.ceil((length - window[0]) / stride[0]) for length in row_lengths]
        n_windows = len(hidden_starts)
        total = torch.zeros(len(rows) * n_windows, x.shape[1], dtype=torch.float64)
        count = torch.zeros(len(rows) * n_windows, x.shape[1], dtype=torch.float64)
        for start in range(0, len(perturbations), per_eval):
            chunk = perturbations[start : start + per_eval]
            owners = torch.tensor([f for f, _, _, _ in chunk], dtype=torch.long)
            tokens = torch.zeros(len(chunk), x.shape[1], dtype=torch.bool)
            mask = torch.zeros(len(chunk), *x.shape[1:], dtype=torch.bool)
            for n, (f, _, t0, w) in enumerate(chunk):
                tokens[n, t0 : min(t0 + window[0], full_lengths[f])] = True
                mask[n, :, hidden_starts[w] : hidden_starts[w] + window[1]] = tokens[n, :, None]
            perturbed = torch.where(mask.to(x.device), base[owners.to(x.device)], x[owners.to(x.device)])
            embeds = {"source": None, "target": None, side: perturbed}
            n_index, r_index, scores = perturber.run(
                owners, embeds["source"], embeds["target"], pairs=lambda n, r: chunk[n][1] <= last_k[r]
            )
            if not len(n_index):
                continue
            n_index, r_index = n_index.cpu(), r_index.cpu()
            diff = (original[r_index] - scores).double().cpu()
            hit = tokens[n_index].double()  # [E, length]
            slot = r_index * n_windows + torch.tensor([chunk[n][3] for n in n_index.tolist()], dtype=torch.long)
            total.index_add_(0, slot, diff[:, None] * hit)
            count.index_add_(0, slot, hit)
        total, count = total.view(len(rows), n_windows, -1), count.view(len(rows), n_windows, -1)
        if not granular:  # one window over the whole embedding: one score per token
            return (total[:, 0] / count[:, 0]).float()
        spread_total = torch.zeros(len(rows), *x.shape[1:], dtype=torch.float64)
        spread_count = torch.zeros(len(rows), *x.shape[1:], dtype=torch.float64)
        for w, h0 in enumerate(hidden_starts):
            spread_total[:, :, h0 : h0 + window[1]] += total[:, w, :, None]
            spread_count[:, :, h0 : h0 + window[1]] += count[:, w, :, None]
        return (spread_total / spread_count).float()
