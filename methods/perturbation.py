"""Perturbation methods: occlusion and LIME on the input embeddings, value zeroing inside attention,
and ReAGent on the input tokens.

    >>> out = model.attribute(text, method="occlusion")                          # [positions, steps], signed
    >>> out = model.attribute(text, method="occlusion", sliding_window_shapes=(2, 16), strides=(1, 8))
    >>> out = model.attribute(text, method="lime", n_samples=100, seed=0)       # Inseq's; variant="captum"
    >>> out = model.attribute(text, method="value_zeroing", layers=[-1])       # [positions, steps, layers]
    >>> out[0].sequence_scores["encoder_self_scores"]                          # encoder-decoders
    >>> out = model.attribute(text, method="reagent", max_probe_steps=100, num_probes=8)

Everything runs under `torch.no_grad()`. For occlusion, LIME and value zeroing, a perturbed input is
a perturbed copy of the *full* row of an example (its longest attributed prefix): under causal
attention one forward of it gives the attributed function at every step of the example
(`Engine.forward_steps`), so the number of forwards depends on the number of perturbations, not on
the number of steps; perturbed copies of all examples go through the model together,
`perturbations_per_eval` at a time. Where a step cannot see a perturbation (a window on target
tokens after its prefix), that perturbation does not count for it, so every step gets what the
method computes on its own prefix. ReAGent's probes depend on each step's own importance scores, so
they run per step; the probes of all steps and examples share each forward.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from instrument.engine import FullRows, RowAttribution, full_rows
from instrument.selection import model_config, resolve_alias, select_modules
from methods.attention import pick_indices
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
        return logits, self.request.score(rows, logits, source, target).double()  # differences of probabilities: no float32 rounding

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
        return index_n, index_r, scores.double()


def _same(a, b) -> bool:
    """`a == b` for option values (tensors compare by identity)."""
    return a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)


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

    params = {"sliding_window_shapes": None, "strides": None, "baselines": None,
              "include_eos_baseline": False, "perturbations_per_eval": 32}

    def attribute(self, request: Request, sliding_window_shapes=None, strides=None, baselines=None,
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
                        f"The {side} sliding window spans {window[0]} tokens but a {side} "
                        f"{'prefix ' if side == 'target' else ''}has only {shortest}; use a smaller window "
                        "or a later attr_pos_start"
                    )
            logits, original = perturber.original()
            granular = any(windows[side][1] < hidden[side] for side in sides)
            out = {side: self._side(perturber, side, inputs, bases, windows[side], stride[side], original,
                                    perturbations_per_eval, granular)
                   for side in sides}
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)

    def _side(self, perturber: Perturber, side, inputs, bases, window, stride, original, per_eval, granular) -> torch.Tensor:
        """`[R, length]` occlusion attributions of one side (`[R, length, hidden]` if `granular`). Windows
        are rectangles (token range x hidden range), so totals and counts are kept per token and hidden
        window, `[R, length, W]`, and spread over the hidden dimension once at the end."""
        fr, rows = perturber.fr, perturber.request.rows
        x, base = inputs[side], bases[side]
        row_lengths = _side_lengths(rows, side).tolist()
        full_lengths = _side_lengths(fr.full, side).tolist()
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


def value_projection(attention: nn.Module, name: str, value_vector: str | None = None):
    """The module computing an attention module's value vectors, and `zero(output, index)` setting
    token `index[n]`'s value vectors (all heads) to zero in copy n of its output. `value_vector`: the
    module's name inside `attention` registered by `instrument.register_model_config`."""
    if value_vector is not None:
        try:
            module = attention.get_submodule(value_vector)
        except AttributeError:
            raise ValueError(f"The registered value_vector {value_vector!r} is not a module inside {name}") from None
        return module, lambda out, index: _zero_rows(out, index, slice(None))
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
    """Value zeroing (Mohebbi et al. 2023), per layer: `[positions, steps, layers]`, as Inseq computes it.

    For each layer and each token j, token j's value vectors (every head) are set to zero in that
    layer's attention, the layer runs on its *unperturbed* input, and token j's score at query i is
    the cosine distance (`similarity_metric="cosine"`, or "euclidean": the L2 distance) between the
    layer's original and perturbed outputs at position i. The representation compared is the output
    hidden state of the transformer block (its first output), except for the last block of the
    stack, whose output is read after the stack's final norm (the model's last hidden state), as
    Inseq does. Step p reads query `p - 1`. Decoder self-attention gives the target side; on
    encoder-decoders, zeroing source token j's values in the decoder's cross-attention gives the
    source side, and encoder self-attention gives `sequence_scores["encoder_self_scores"]`,
    `[source tokens zeroed, source queries, layers]` (`output_encoder_self_scores=False` skips it),
    the same `layers` indices picking encoder blocks. As Inseq, scores below `min_score_threshold`
    (1e-5) are set to 0 and, with `normalize=True` (the default), each query's scores are divided
    by their sum over the tokens it sees (per side and layer); `normalize=False,
    min_score_threshold=0` give the raw distances. `layers` picks blocks (indices, negative from
    the end; default: all).

    Batched: a perturbed copy of an example's full row zeroes token j in every picked layer at
    once, and each block's output is replaced by its unperturbed output before the next block, so
    that every layer sees its unperturbed input: one forward per `perturbations_per_eval` copies,
    cut short after the last picked block.
    """

    params = {"layers": None, "similarity_metric": "cosine", "normalize": True, "min_score_threshold": 1e-5,
              "output_encoder_self_scores": True, "perturbations_per_eval": 32}

    def attribute(self, request: Request, layers=None, similarity_metric="cosine", normalize=True, min_score_threshold=1e-5,
                  output_encoder_self_scores=True, perturbations_per_eval=32) -> RowAttribution:
        if similarity_metric not in ("cosine", "euclidean"):
            raise ValueError(f"similarity_metric must be 'cosine' or 'euclidean', got {similarity_metric!r}")
        if not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
            raise ValueError(f"perturbations_per_eval must be a positive integer, got {perturbations_per_eval!r}")
        if isinstance(min_score_threshold, bool) or not isinstance(min_score_threshold, (int, float)) or not min_score_threshold >= 0:
            raise ValueError(f"min_score_threshold must be a number >= 0, got {min_score_threshold!r}")
        engine, rows = request.engine, request.rows
        model, enc_dec = engine.model, engine.is_encoder_decoder
        stacks = {"decoder": _Stack(model, "decoder" if enc_dec else None, layers)}
        if request.attribute_target or not enc_dec:
            stacks["decoder"].zero("target", "attention")
        if enc_dec:
            stacks["decoder"].zero("source", "cross_attention")
            if output_encoder_self_scores:
                stacks["encoder"] = _Stack(model, "encoder", layers)
                stacks["encoder"].zero("encoder", "attention")
        fr = full_rows(rows)
        perturber = Perturber(request, fr)
        encoder = select_modules(model, model.get_encoder())[0] if enc_dec else None
        read = [name for stack in stacks.values() for name in stack.read]
        with torch.no_grad():
            logits, clean = engine.forward_steps(fr.full, fr.positions, layers=list(dict.fromkeys(read + ([encoder] if enc_dec else []))))
            logits = fr.gather(logits)
            clean = {name: value.detach() for name, value in clean.items()}
            out = {side: self._side(perturber, side, stacks["decoder"], clean, encoder, similarity_metric, perturbations_per_eval)
                   for side in stacks["decoder"].zeroers}
            sequence = {}
            if "encoder" in stacks:
                scores = self._encoder_side(perturber, stacks["encoder"], clean, similarity_metric, perturbations_per_eval)
                sequence["encoder_self_scores"] = self._finish(scores, fr.full.source_mask.bool().cpu()[:, :, None, None],
                                                               min_score_threshold, normalize)[fr.owner.cpu()]
        for side, values in out.items():
            out[side] = self._finish(values, self._visible(rows, side).bool().cpu()[:, :, None], min_score_threshold, normalize)
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits, sequence_scores=sequence)

    @staticmethod
    def _finish(values: torch.Tensor, visible: torch.Tensor, threshold: float, normalize: bool) -> torch.Tensor:
        """Scores below `threshold` set to 0, then (`normalize`) divided by their sum over the visible
        tokens (dim 1), a zero sum left as is."""
        values = torch.where(values < threshold, torch.zeros_like(values), values)
        if normalize:
            total = (values * visible).sum(1, keepdim=True)
            values = values / torch.where(total == 0, torch.ones_like(total), total)
        return values

    @staticmethod
    def _visible(rows, side: str) -> torch.Tensor:
        if side == "source":
            return rows.source_mask.float()
        length = rows.target_ids.shape[1]
        return (torch.arange(length, device=rows.target_ids.device)[None] < rows.position[:, None]).float()

    @staticmethod
    def _zeroed_run(stack: "_Stack", side: str, clean, owners, zero_at, run) -> dict[str, torch.Tensor]:
        """Runs `run()` with token `zero_at[n]`'s values zeroed in copy n in every picked layer of
        `stack`, each read block's output replaced by its clean output (`clean[name][owners]`);
        returns the perturbed representations of the picked layers (the last block's after the
        stack's final norm), stopping once they are all read."""
        model = stack.model
        captured, handles = {}, []
        picked = set(stack.picked_names)

        def block_hook(name):
            def hook(module, args, output):
                if name in picked:
                    captured[name] = _first(output)
                if name == stack.read[-1] and not stack.final:
                    raise _Stop
                return _with_first(output, clean[name][owners])  # the next block sees its clean input
            return hook

        def stack_hook(module, args, output):
            captured[stack.blocks[-1]] = _first(output)
            raise _Stop

        try:
            for projection, zero in stack.zeroers[side]:
                handles.append(projection.register_forward_hook(lambda m, a, o, zero=zero: zero(o, zero_at)))
            for name in stack.read[:-2] if stack.final else stack.read:  # when final, read ends with the last block, the stack
                handles.append(model.get_submodule(name).register_forward_hook(block_hook(name)))
            if stack.final:
                handles.append(model.get_submodule(stack.name).register_forward_hook(stack_hook))
            try:
                run()
            except _Stop:
                pass
        finally:
            for handle in handles:
                handle.remove()
        return captured

    @staticmethod
    def _distances(stack: "_Stack", clean, captured, owners, queries, metric) -> torch.Tensor:
        """`[N, K, layers]` distances at positions `queries [N, K]` between clean and perturbed outputs."""
        n_index = torch.arange(len(owners), device=queries.device)[:, None]
        distances = []
        for name, key in zip(stack.picked_names, stack.clean_names):
            original, perturbed = clean[key][owners][n_index, queries], captured[name][n_index, queries]
            original, perturbed = original.double(), perturbed.double()  # 1 - cos of nearly equal vectors
            if metric == "cosine":
                distances.append(1 - torch.nn.functional.cosine_similarity(original, perturbed, dim=-1))
            else:
                distances.append((original - perturbed).norm(dim=-1))
        return torch.stack(distances, dim=-1).float().cpu()

    def _side(self, perturber, side, stack, clean, encoder, metric, per_eval):
        from transformers.modeling_outputs import BaseModelOutput

        engine, fr, rows = perturber.engine, perturber.fr, perturber.request.rows
        full = fr.full
        mask = full.source_mask if side == "source" else full.target_mask
        perturbations = [(f, j) for f, j in mask.nonzero().tolist()]
        result = torch.zeros(len(rows), mask.shape[1], len(stack.picked))
        for start in range(0, len(perturbations), per_eval):
            chunk = perturbations[start : start + per_eval]
            owners = torch.tensor([f for f, _ in chunk], dtype=torch.long, device=full.target_ids.device)
            zero_at = torch.tensor([j for _, j in chunk], dtype=torch.long, device=full.target_ids.device)
            sub = full.take(owners)
            kwargs = {"use_cache": False}
            if engine.is_encoder_decoder:
                kwargs.update(encoder_outputs=BaseModelOutput(last_hidden_state=clean[encoder][owners]),
                              attention_mask=sub.source_mask, decoder_input_ids=sub.target_ids,
                              decoder_attention_mask=sub.target_mask)
            else:
                kwargs.update(input_ids=sub.target_ids, attention_mask=sub.target_mask)
            captured = self._zeroed_run(stack, side, clean, owners, zero_at, lambda: engine.model(**kwargs))
            distances = self._distances(stack, clean, captured, owners, fr.positions[owners], metric)  # [N, K, layers]
            pairs_n, pairs_r = [], []
            for n, (f, _) in enumerate(chunk):
                for r in perturber.rows_of[f]:
                    pairs_n.append(n)
                    pairs_r.append(r)
            pairs_n, pairs_r = torch.tensor(pairs_n), torch.tensor(pairs_r)
            result[pairs_r, zero_at.cpu()[pairs_n]] = distances[pairs_n, fr.slot.cpu()[pairs_r]]
        return result

    def _encoder_side(self, perturber, stack, clean, metric, per_eval) -> torch.Tensor:
        """`[F, source tokens zeroed, source queries, layers]` encoder self-attention scores per full row."""
        full = perturber.fr.full
        mask = full.source_mask
        width = mask.shape[1]
        perturbations = [(f, j) for f, j in mask.nonzero().tolist()]
        result = torch.zeros(len(full), width, width, len(stack.picked))
        encoder = stack.model.get_encoder()
        for start in range(0, len(perturbations), per_eval):
            chunk = perturbations[start : start + per_eval]
            owners = torch.tensor([f for f, _ in chunk], dtype=torch.long, device=full.target_ids.device)
            zero_at = torch.tensor([j for _, j in chunk], dtype=torch.long, device=full.target_ids.device)
            sub = full.take(owners)
            captured = self._zeroed_run(stack, "encoder", clean, owners, zero_at,
                                        lambda: encoder(input_ids=sub.source_ids, attention_mask=sub.source_mask))
            queries = torch.arange(width, device=owners.device)[None].expand(len(chunk), -1)
            distances = self._distances(stack, clean, captured, owners, queries, metric)  # [N, S, layers]
            result[owners.cpu(), zero_at.cpu()] = distances
        return result


class _Stack:
    """The blocks of one stack (decoder-only model, decoder or encoder), the picked ones, and the
    value projections to zero in them, per side. `name` is the module holding the blocks, whose
    output is the stack's last hidden state (after its final norm)."""

    def __init__(self, model: nn.Module, scope: str | None, layers):
        self.model = model
        self.scope = scope
        self.blocks = resolve_alias(model, "layers", scope)
        if not self.blocks:
            raise ValueError(f"Found no transformer blocks in {type(model).__name__}" + (f"'s {scope}" if scope else ""))
        self.picked = pick_indices(layers, len(self.blocks), "layers")
        self.picked_names = [self.blocks[i] for i in self.picked]
        self.final = self.picked[-1] == len(self.blocks) - 1
        self.read = self.blocks[: self.picked[-1] + 1]
        holder = self.blocks[0].rsplit(".", 1)[0]  # the module list; its parent is the stack
        if "." not in holder:
            raise ValueError(f"value_zeroing needs the blocks {holder} inside a stack module (a *ForCausalLM / *ForConditionalGeneration model)")
        self.name = holder.rsplit(".", 1)[0]
        # Where the clean representation of each picked layer is read from.
        self.clean_names = [self.name if self.final and i == len(self.blocks) - 1 else self.blocks[i] for i in self.picked]
        if self.final:
            self.read = self.read + [self.name]
        self.zeroers: dict[str, list] = {}

    def zero(self, side: str, alias: str):
        names = resolve_alias(self.model, alias, self.scope)
        self.zeroers[side] = []
        for index in self.picked:
            inside = [n for n in names if n.startswith(self.blocks[index] + ".")]
            if len(inside) != 1:
                kind = "cross-" if alias == "cross_attention" else "self-"
                raise ValueError(f"Expected one {kind}attention module in {self.blocks[index]}, found {inside}")
            registered = getattr(model_config(self.model), "value_vector", None)
            self.zeroers[side].append(value_projection(self.model.get_submodule(inside[0]), inside[0], registered))


# -- LIME ------------------------------------------------------------------------------------------


def token_samples(seed: int, side: int, length: int, n_samples: int, keep_prob: float = 0.5) -> torch.Tensor:
    """`[n_samples, length]` booleans, sample k keeping token j with probability `keep_prob` (0.5:
    Captum's default LIME sampling; Inseq's LIME replaces a token with probability 0.3). Token j's
    column comes from a generator seeded by `(seed, side, j)` (side 0: source, 1: target), so it does
    not depend on the sequence's length: a step's samples are its example's samples restricted to its
    prefix, whether steps are attributed together or one by one."""
    columns = []
    for j in range(length):
        generator = torch.Generator().manual_seed(hash((int(seed), int(side), j)) & 0x7FFFFFFF)
        columns.append(torch.rand(n_samples, generator=generator) < keep_prob)
    return torch.stack(columns, dim=1) if columns else torch.zeros(n_samples, 0, dtype=torch.bool)


def weighted_least_squares(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coefficients (intercept dropped) of `targets ~ features @ coef + intercept` minimising
    `sum(weights * residual ** 2)`, in float64 on the CPU; minimum-norm when underdetermined."""
    design = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    root = weights.double().clamp_min(0).sqrt()[:, None]
    weighted_targets = (root[:, 0] * targets.double()).cpu()[:, None]
    solution = torch.linalg.lstsq((root * design).cpu(), weighted_targets, driver="gelsd").solution
    return solution[:-1, 0]


def token_ridge(kept: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                alpha: float) -> torch.Tensor:
    """Ridge regression (`alpha`, intercept, sample `weights`: scikit-learn's `Ridge`) of `targets [n]`
    on features that are, for sample a and token j, `c + kept[a, j] * directions[j]` (the token's
    embedding where kept, the constant c where replaced; `directions[j] = embedding_j - c`), in
    float64 through the `n x n` dual system, so that the `[tokens, hidden]` features are never built.
    Returns the `[tokens, hidden]` coefficients: `gamma_j * directions[j]`."""
    z, y, w = kept.double(), targets.double(), weights.double().clamp_min(0)
    directions = directions.double()
    total = w.sum()
    centered = z - (w[:, None] * z).sum(0) / total  # weighted centering, as with an intercept
    root = w.sqrt()[:, None] * centered  # [n, T]
    gram = (root * (directions * directions).sum(-1)[None]) @ root.T  # A A^T, A = sqrt(W) X_centered
    t = w.sqrt() * (y - (w * y).sum() / total)
    dual = torch.linalg.solve(gram + alpha * torch.eye(len(y), dtype=torch.float64), t)
    return (root.T @ dual)[:, None] * directions


@register("lime")
class Lime(AttributionMethod):
    """LIME (Ribeiro et al. 2016) with tokens as interpretable features, as Inseq (default) or Captum.

    `variant="inseq"`, Inseq 0.7.1's LIME: `n_samples` (50) perturbed inputs, each token replaced
    with probability `mask_prob` (0.3), as Inseq does on embeddings: a replaced token's embedding
    holds the *id* of `mask_token` ("unk" or "pad") in every element (not that token's embedding);
    each sample weighted by its number of embedding elements left equal to the original's; and a
    scikit-learn style `Ridge(alpha)` with intercept fitted on the perturbed embeddings themselves,
    one coefficient per embedding element: `[positions, steps, hidden]`, as Inseq returns it. Inseq
    refuses `attribute_target=True` on encoder-decoders; here both sides are features then.

    `variant="captum"`, Captum's `Lime` with a token feature mask: each token kept with probability
    0.5 (the others set to `baselines`, default "zeros"), weighted by Captum's default similarity
    `exp(-d ** 2 / (2 * kernel_width ** 2))`, `d` the cosine (`distance_mode`) distance between the
    flattened original and perturbed embeddings, and a linear surrogate with intercept fitted by
    weighted least squares (Captum's default surrogate is a Lasso, which needs scikit-learn); a
    token's coefficient is its attribution, repeated over the embedding as Captum returns it.

    Sampling is seeded by `seed`, per token (see `token_samples`), not by torch's global random state
    as in Inseq. Batched: sample k of an example is one perturbed copy of its full row (the same
    token subsets for every example), read at every step; each step fits on its own tokens.
    """

    params = {"variant": "inseq", "n_samples": 50, "perturbations_per_eval": 32, "mask_prob": 0.3, "mask_token": "unk",
              "alpha": 1.0, "baselines": "zeros", "include_eos_baseline": False, "kernel_width": 1.0,
              "distance_mode": "cosine", "seed": 42}
    VARIANT_OPTIONS = {"inseq": ("mask_prob", "mask_token", "alpha"), "captum": ("baselines", "kernel_width", "distance_mode")}

    def attribute(self, request: Request, variant="inseq", n_samples=50, perturbations_per_eval=32, mask_prob=0.3,
                  mask_token="unk", alpha=1.0, baselines="zeros", include_eos_baseline=False, kernel_width=1.0,
                  distance_mode="cosine", seed=42) -> RowAttribution:
        if variant not in self.VARIANT_OPTIONS:
            raise ValueError(f"variant must be 'inseq' or 'captum', got {variant!r}")
        given = dict(mask_prob=mask_prob, mask_token=mask_token, alpha=alpha, baselines=baselines,
                     kernel_width=kernel_width, distance_mode=distance_mode)
        other = "captum" if variant == "inseq" else "inseq"
        for name in self.VARIANT_OPTIONS[other]:
            if not _same(given[name], self.params[name]):
                raise ValueError(f"{name} is an option of variant={other!r}, not of variant={variant!r}")
        for name, value in (("n_samples", n_samples), ("perturbations_per_eval", perturbations_per_eval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if distance_mode not in ("cosine", "euclidean"):
            raise ValueError(f"distance_mode must be 'cosine' or 'euclidean', got {distance_mode!r}")
        if not kernel_width > 0:
            raise ValueError(f"kernel_width must be positive, got {kernel_width!r}")
        if not 0 <= mask_prob <= 1:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if mask_token not in ("unk", "pad"):
            raise ValueError(f"mask_token must be 'unk' or 'pad', got {mask_token!r}")
        engine, rows = request.engine, request.rows
        inseq = variant == "inseq"
        fill = engine.unk_token_id if mask_token == "unk" else engine.pad_token_id
        if inseq and fill is None:
            raise ValueError("The tokenizer has no UNK token for mask_token='unk'; pass mask_token='pad'")
        fr = full_rows(rows)
        perturber = Perturber(request, fr)
        with torch.no_grad():
            inputs = dict(zip(("source", "target"), engine.embed(fr.full)))
            if inseq:
                bases = {side: None if x is None else torch.full_like(x, float(fill)) for side, x in inputs.items()}
            else:
                bases = dict(zip(("source", "target"), engine.baseline(fr.full, baselines, include_eos_baseline)))
            sides = (["source"] if inputs["source"] is not None else []) + (["target"] if request.attribute_target else [])
            keep_prob = 1 - mask_prob if inseq else 0.5
            keep = {side: token_samples(seed, int(side == "target"), inputs[side].shape[1], n_samples, keep_prob) for side in sides}
            lengths = {side: _side_lengths(rows, side).tolist() for side in sides}
            visible = {side: (torch.arange(inputs[side].shape[1])[None] < torch.tensor(lengths[side])[:, None]).double()
                       for side in sides}  # [R, L]
            logits, _ = perturber.original()
            outputs = torch.full((len(rows), n_samples), float("nan"), dtype=torch.float64)
            equal = torch.zeros(len(rows), n_samples, dtype=torch.float64)  # Inseq's similarity: equal elements
            jobs = [(f, k) for f in range(len(fr.full)) for k in range(n_samples)]
            for start in range(0, len(jobs), perturbations_per_eval):
                chunk = jobs[start : start + perturbations_per_eval]
                owners = torch.tensor([f for f, _ in chunk], dtype=torch.long)
                samples = torch.tensor([k for _, k in chunk], dtype=torch.long)
                embeds = {"source": None, "target": None}
                for side in sides:
                    x, base = inputs[side], bases[side]
                    kept = keep[side][samples].to(x.device)[:, :, None]
                    embeds[side] = torch.where(kept, x[owners.to(x.device)], base[owners.to(x.device)])
                n_index, r_index, scores = perturber.run(owners, embeds["source"], embeds["target"])
                n_index, r_index = n_index.cpu(), r_index.cpu()
                outputs[r_index, samples[n_index]] = scores.double().cpu()
                if inseq:
                    for side in sides:
                        same = (embeds[side] == inputs[side][owners.to(inputs[side].device)]).sum(-1).double().cpu()  # [N, L]
                        equal[r_index, samples[n_index]] += (same[n_index] * visible[side][r_index]).sum(1)
            out = {side: torch.zeros(len(rows), *inputs[side].shape[1:]) for side in sides}
            if not inseq:
                similarity = self._similarity(rows, fr, sides, inputs, bases, keep, kernel_width, distance_mode)
            owner = fr.owner.tolist()
            for r in range(len(rows)):
                bits = torch.cat([keep[side][:, : lengths[side][r]] for side in sides], dim=1)
                if inseq:
                    directions = torch.cat([inputs[side][owner[r], : lengths[side][r]].double().cpu() - float(fill)
                                            for side in sides])
                    coef = token_ridge(bits, directions, outputs[r], equal[r], alpha).float()  # [T, hidden]
                else:
                    coef = weighted_least_squares(bits, outputs[r], similarity[r]).float()[:, None]
                offset = 0
                for side in sides:
                    n = lengths[side][r]
                    out[side][r, :n] = coef[offset : offset + n]
                    offset += n
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)

    @staticmethod
    def _similarity(rows, fr, sides, inputs, bases, keep, kernel_width, distance_mode) -> torch.Tensor:
        """`[R, n_samples]` kernel weights from per-token dot products (float64): the distance between
        the row's flattened inputs and each perturbed version, over the row's own tokens."""
        owner = fr.owner.cpu()
        dot = pert = orig = 0
        for side in sides:
            x, b = inputs[side].double().cpu()[owner], bases[side].double().cpu()[owner]  # [R, L, H]
            visible = (torch.arange(x.shape[1])[None] < _side_lengths(rows, side).cpu()[:, None]).double()  # [R, L]
            kept = keep[side].double()  # [n, L]
            xx, xb, bb = (x * x).sum(-1) * visible, (x * b).sum(-1) * visible, (b * b).sum(-1) * visible
            if distance_mode == "cosine":
                dot = dot + xx @ kept.T + xb @ (1 - kept).T
                pert = pert + xx @ kept.T + bb @ (1 - kept).T
                orig = orig + xx.sum(1, keepdim=True)
            else:  # squared L2 distance: only the removed tokens differ
                dot = dot + (xx - 2 * xb + bb) @ (1 - kept).T
        if distance_mode == "cosine":
            eps = 1e-8
            distance = 1 - dot / (orig.sqrt() * pert.sqrt()).clamp_min(eps)
        else:
            distance = dot.clamp_min(0).sqrt()
        return torch.exp(-(distance**2) / (2 * kernel_width**2))


# -- ReAGent ---------------------------------------------------------------------------------------


# Built-in step functions that are not probabilities: ReAGent's update would be NaN with them.
NOT_PROBABILITIES = {"logit", "entropy", "crossentropy", "perplexity", "contrast_logits", "contrast_logits_diff",
                     "contrast_prob_diff", "pcxmi", "kl_divergence", "in_context_pvi", "top_p_size"}


def _probabilities(request: Request, scores: torch.Tensor) -> torch.Tensor:
    """`scores`, checked to be probabilities (a custom attributed function, or `logprob=True`, may not be)."""
    bad = ~((scores >= 0) & (scores <= 1))
    if bad.any():
        raise ValueError(
            f"reagent needs attributed_fn to be a probability in [0, 1], but attributed_fn="
            f"{request.attributed_fn!r} gave {float(scores[bad][0]):.4g} (is logprob=True set?)"
        )
    return scores


def probe_generator(seed: int, probe: int, rows, r: int) -> torch.Generator:
    """The random stream of probe `probe` of row r, seeded by the row's own tokens (its prefix and
    source), so that it does not depend on which other rows share the batch."""
    prefix = rows.target_ids[r, : int(rows.target_mask[r].sum())].tolist()
    source = [] if rows.source_ids is None else rows.source_ids[r, : int(rows.source_mask[r].sum())].tolist()
    return torch.Generator().manual_seed(hash((int(seed), int(probe), tuple(prefix), tuple(source))) & 0x7FFFFFFF)


class _Probe:
    """One ReAGent probe of one row: its tokens, its logit importance scores and its random stream."""

    def __init__(self, r: int, ids: torch.Tensor, generator: torch.Generator, candidates: torch.Tensor):
        self.r, self.ids, self.generator, self.candidates = r, ids, generator, candidates
        self.logit = torch.rand(len(ids), generator=generator, dtype=torch.float64)
        self.stopped = False

    def replacements(self) -> torch.Tensor:
        """A random replacement token for every position (uniform over the candidate vocabulary)."""
        return self.candidates[torch.randint(len(self.candidates), (len(self.ids),), generator=self.generator)]

    def update_mask(self, ratio: float) -> torch.Tensor:
        return torch.rand(len(self.ids), generator=self.generator, dtype=torch.float64) < ratio

    @property
    def importance(self) -> torch.Tensor:
        return self.logit.softmax(-1)


@register("reagent")
class Reagent(AttributionMethod):
    """ReAGent (Zhao et al. 2024), with Inseq's parameters, run for every step and probe together.

    Per step, `num_probes` probes each start from random logit importance scores over the attributed
    tokens (the source, plus the target prefix when it is attributed) and repeat, at most
    `max_probe_steps` times: replace a random `replacing_ratio` of the tokens, take
    `delta = f(original) - f(replaced)` of the attributed function (default: the target's
    probability, as ReAGent), and add `logit(0.5 + 0.5 * delta)` to the replaced tokens' scores and
    `logit(0.5 - 0.5 * delta)` to the others'; then, with importance `softmax(scores)`, keep the
    `keep_top_n` most important tokens (or `ceil(keep_ratio * length)` when `keep_top_n` is 0;
    `invert_keep_ratio` replaces those instead), replace the rest, and stop the probe once the
    target token is among the `stopping_condition_top_k` top predictions. The attribution is the
    mean importance over the probes that stopped (over all probes if none did), repeated over the
    embedding dimension as Inseq returns it.

    Replacement tokens: ReAGent draws them from a language model (Inseq: same-POS words); here they
    are drawn uniformly from the attributed model's vocabulary (special tokens pad / UNK / EOS
    excluded), which needs no second model. Randomness is seeded per (seed, probe, row tokens).
    The attributed function must be a probability (its update is NaN otherwise): `attributed_fn`
    such as "logit" or "entropy", or values outside [0, 1], raise a ValueError.
    Every active probe of every row of the batch goes through one forward per stage.
    """

    params = {"keep_top_n": 5, "keep_ratio": None, "invert_keep_ratio": False, "stopping_condition_top_k": 3,
              "replacing_ratio": 0.3, "max_probe_steps": 3000, "num_probes": 16, "seed": 42, "internal_batch_size": None}

    def attribute(self, request: Request, keep_top_n=5, keep_ratio=None, invert_keep_ratio=False,
                  stopping_condition_top_k=3, replacing_ratio=0.3, max_probe_steps=3000, num_probes=16, seed=42,
                  internal_batch_size=None) -> RowAttribution:
        for name, value, low in (("keep_top_n", keep_top_n, 0), ("stopping_condition_top_k", stopping_condition_top_k, 1),
                                 ("max_probe_steps", max_probe_steps, 1), ("num_probes", num_probes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if keep_top_n == 0 and (keep_ratio is None or not 0 <= keep_ratio <= 1):
            raise ValueError(f"With keep_top_n=0, keep_ratio must be a fraction in [0, 1], got {keep_ratio!r}")
        if not 0 < replacing_ratio <= 1:
            raise ValueError(f"replacing_ratio must be in (0, 1], got {replacing_ratio!r}")
        if internal_batch_size is not None and (
                isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1):
            raise ValueError(f"internal_batch_size must be None or a positive integer, got {internal_batch_size!r}")
        if request.attributed_fn in NOT_PROBABILITIES:
            raise ValueError(
                f"reagent needs attributed_fn to be a probability (its update takes logit(0.5 +- 0.5 * delta)); "
                f"got attributed_fn={request.attributed_fn!r}: use 'probability' (the default) or 'contrast_prob'"
            )
        engine, rows = request.engine, request.rows
        vocab = int(engine.target_embedding.weight.shape[0])
        special = {t for t in (engine.pad_token_id, engine.unk_token_id, engine.eos_token_id) if t is not None}
        candidates = torch.tensor([t for t in range(vocab) if t not in special], dtype=torch.long)
        sides = (["source"] if rows.source_ids is not None else []) + (["target"] if request.attribute_target else [])
        lengths = {side: _side_lengths(rows, side).tolist() for side in sides}
        probes = []
        for r in range(len(rows)):
            ids = torch.cat([
                (rows.source_ids if side == "source" else rows.target_ids)[r, : lengths[side][r]].cpu() for side in sides
            ])
            probes += [_Probe(r, ids, probe_generator(seed, k, rows, r), candidates) for k in range(num_probes)]
        with torch.no_grad():
            logits = engine.forward(rows)[0]
            original = _probabilities(request, request.score(rows, logits, *engine.embed(rows)).double().cpu())
            for _ in range(max_probe_steps):
                active = [probe for probe in probes if not probe.stopped]
                if not active:
                    break
                masks = [probe.update_mask(replacing_ratio) for probe in active]
                replaced = [torch.where(mask, probe.replacements(), probe.ids) for probe, mask in zip(active, masks)]
                scores, _ = self._run(request, active, replaced, lengths, sides, internal_batch_size)
                for probe, mask, score in zip(active, masks, scores):
                    delta = original[probe.r] - score
                    signed = torch.where(mask, delta, -delta)
                    probe.logit = probe.logit + torch.logit(signed * 0.5 + 0.5)
                kept = [self._keep_mask(probe.importance, keep_top_n, keep_ratio, invert_keep_ratio) for probe in active]
                replaced = [torch.where(keep, probe.ids, probe.replacements()) for probe, keep in zip(active, kept)]
                _, hits = self._run(request, active, replaced, lengths, sides, internal_batch_size,
                                    top_k=stopping_condition_top_k)
                for probe, hit in zip(active, hits):
                    probe.stopped = bool(hit)
        out = {side: torch.zeros(len(rows), *(rows.source_ids if side == "source" else rows.target_ids).shape[1:],
                                 engine.target_embedding.weight.shape[1]) for side in sides}
        for r in range(len(rows)):
            mine = probes[r * num_probes : (r + 1) * num_probes]
            done = [probe for probe in mine if probe.stopped] or mine
            mean = torch.stack([probe.importance for probe in done]).mean(0).float()
            offset = 0
            for side in sides:
                n = lengths[side][r]
                out[side][r, :n] = mean[offset : offset + n, None]
                offset += n
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)

    @staticmethod
    def _keep_mask(importance: torch.Tensor, top_n: int, ratio, invert: bool) -> torch.Tensor:
        """Tokens left in place for the stopping check: the top-n by importance (the others when inverted)."""
        n = top_n if top_n > 0 else int(math.ceil(ratio * len(importance)))
        top = torch.zeros(len(importance), dtype=torch.bool)
        top[torch.argsort(importance, descending=True, stable=True)[:n]] = True
        return ~top if invert else top

    @staticmethod
    def _run(request, probes, replaced, lengths, sides, batch_size, top_k=None):
        """Attributed function (and, with top_k, whether the target is among the top-k predictions)
        of each probe's row with its tokens replaced, in forwards of at most `batch_size` rows."""
        from dataclasses import replace

        engine, rows = request.engine, request.rows
        scores, hits = [], []
        size = batch_size or len(probes)
        for start in range(0, len(probes), size):
            chunk, ids = probes[start : start + size], replaced[start : start + size]
            index = torch.tensor([probe.r for probe in chunk], dtype=torch.long, device=rows.target_ids.device)
            sub = rows.take(index)
            fields = {}
            for side in sides:
                name = "source_ids" if side == "source" else "target_ids"
                values = getattr(sub, name).clone()
                offset_of = {"source": 0, "target": 0}
                for n, (probe, new) in enumerate(zip(chunk, ids)):
                    offset = sum(lengths[s][probe.r] for s in sides[: sides.index(side)])
                    length = lengths[side][probe.r]
                    values[n, :length] = new[offset : offset + length].to(values.device)
                fields[name] = values
            sub = replace(sub, **fields)
            logits = engine.forward(sub)[0]
            scores.append(_probabilities(request, request.score(sub, logits, None, None).double().cpu()))
            if top_k is not None:
                top = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
                hits.append((top == sub.token[:, None]).any(-1).cpu())
        return torch.cat(scores), (torch.cat(hits) if hits else None)
