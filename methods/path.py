"""Path methods beyond straight-line IG: discretized (DIG) and sequential (SIG) integrated gradients.

    out = model.attribute(text, method="discretized_integrated_gradients", n_steps=30, strategy="greedy")
    out = model.attribute(text, method="sequential_integrated_gradients", n_steps=50)

Both integrate gradients of the attributed function w.r.t. the outputs of the embedding modules, and
both are batched like integrated gradients: the path points of every row (and, for SIG, of every
token) go through the model together, `internal_batch_size` rows at a time.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from instrument import batching
from instrument.rows import RowAttribution
from methods.approximation import approximation
from methods.base import AttributionMethod, Request, chunks, gradients, leaf, path_request
from methods.gradient import PathMethod
from methods.registry import register


def _check_batch_size(internal_batch_size) -> None:
    batching.check_size("internal_batch_size", internal_batch_size)


# -- sequential integrated gradients ---------------------------------------------------------------


@register("sequential_integrated_gradients")
class SequentialIntegratedGradients(PathMethod):
    """Sequential integrated gradients (Enguehard 2023): each token gets its own integrated gradients,
    along the straight path on which only that token moves from its baseline to its embedding while
    every other token stays at its input. Baselines as for integrated gradients (default UNK, which
    plays the paper's mask token; EOS kept unless `include_eos_baseline`). On an encoder-decoder the
    source tokens and (with `attribute_target`) the target tokens each get their path; the other
    side stays at its input.

    Cost: `n_steps` path points per attributed token per row, all batched, at most
    `internal_batch_size` (default 512; None: all at once; "auto": sized from free memory) rows per
    forward and backward. The integration rule: `approximation_method` (or `method`), as for
    integrated gradients.
    """

    def attribute(
        self,
        request: Request,
        n_steps=50,
        method="gausslegendre",
        approximation_method=None,
        internal_batch_size=512,
        baselines=None,
        include_eos_baseline=False,
        multiply_by_inputs=True,
    ) -> RowAttribution:
        _check_batch_size(internal_batch_size)
        alphas, weights = approximation(approximation_method or method, n_steps)
        engine, rows = request.engine, request.rows
        (source, source_base), (target, target_base) = self.endpoints(request, baselines, include_eos_baseline)
        sides = {"target": (target, target_base, rows.target_mask)}
        if source is not None:
            sides = {"source": (source, source_base, rows.source_mask), "target": sides["target"]}
        moving = [name for name in sides if name == "source" or request.attribute_target]
        # One unit per (side, row, token); a path point is a unit at one alpha.
        units = [(name, r, i) for name in moving for r, i in sides[name][2].nonzero().tolist()]
        totals = {name: torch.zeros_like(sides[name][0], dtype=torch.float32) for name in moving}
        points = [(u, k) for u in range(len(units)) for k in range(n_steps)]
        device = rows.target_ids.device
        for chunk in chunks(len(points), rows, internal_batch_size, rows_per_point=1, request=request):
            picked = [points[j] for j in chunk]
            row_index = torch.tensor([units[u][1] for u, _ in picked], dtype=torch.long, device=device)
            embeds = {}
            for name, (x, base, _) in sides.items():
                value = x[row_index].clone()
                on_side = [(e, units[u][2], alphas[k]) for e, (u, k) in enumerate(picked) if units[u][0] == name]
                if on_side:
                    e = torch.tensor([e for e, _, _ in on_side], device=device)
                    i = torch.tensor([i for _, i, _ in on_side], device=device)
                    a = torch.tensor([a for _, _, a in on_side], dtype=x.dtype, device=device)[:, None]
                    r = row_index[e]
                    value[e, i] = base[r, i] + a * (x[r, i] - base[r, i])
                embeds[name] = leaf(value) if name in moving else value
            wrt = [embeds[name] for name in moving]
            grads, _, _ = gradients(
                path_request(request, rows, len(chunk), rows_per_point=1),
                rows.take(row_index),
                wrt,
                embeds.get("source"),
                embeds["target"],
            )
            for name, grad in zip(moving, grads):
                on_side = [
                    (e, units[u][1], units[u][2], weights[k]) for e, (u, k) in enumerate(picked) if units[u][0] == name
                ]
                if not on_side:
                    continue
                e = torch.tensor([e for e, _, _, _ in on_side], device=device)
                r = torch.tensor([r for _, r, _, _ in on_side], device=device)
                i = torch.tensor([i for _, _, i, _ in on_side], device=device)
                w = torch.tensor([w for _, _, _, w in on_side], dtype=torch.float32, device=device)[:, None]
                totals[name].index_put_((r, i), w * grad[e, i].float(), accumulate=True)
        attributions = {
            name: totals[name] * (sides[name][0] - sides[name][1]).float() if multiply_by_inputs else totals[name]
            for name in moving
        }
        with torch.no_grad():
            logits = engine.logits(rows, source, target) if request.needs_logits else None
        return RowAttribution(source=attributions.get("source"), target=attributions.get("target"), logits=logits)


# -- discretized integrated gradients --------------------------------------------------------------


class Vocabulary:
    """The outputs of an embedding module for every token id, and their nearest neighbours
    (Euclidean, the token itself excluded), computed with torch on first use and cached per
    module. Neighbours are found for the words a path visits only (one `[1, V]` distance row each)."""

    _cache: "weakref.WeakKeyDictionary[nn.Module, Vocabulary]" = weakref.WeakKeyDictionary()

    def __init__(self, module: nn.Module, vocab_size: int):
        self.module = module
        self.key = _weights_key(module)
        with torch.no_grad():
            device = _module_device(module)
            ids = torch.arange(vocab_size, device=device)
            self.features = torch.cat(
                [module(ids[start : start + 4096][None])[0] for start in range(0, vocab_size, 4096)]
            )
        self.features = self.features.detach()
        self.squared = (self.features.float() ** 2).sum(1)
        self.neighbours: dict[tuple[int, int], torch.Tensor] = {}
        self.paths: dict[tuple, torch.Tensor] = {}

    @classmethod
    def of(cls, module: nn.Module, vocab_size: int) -> "Vocabulary":
        cached = cls._cache.get(module)
        if cached is None or cached.key != _weights_key(module) or len(cached.features) != vocab_size:
            cached = cls._cache[module] = cls(module, vocab_size)
        return cached

    def knn(self, word: int, k: int) -> torch.Tensor:
        """Ids of the `k` nearest other tokens of `word`, nearest first (ties: lower id first).

        Candidates come from float32 distances `|a|^2 - 2 a.b + |b|^2` (one matrix-vector product,
        no `[V, H]` temporary), then the `k + 32` best are ranked again by exact float64 distances."""
        key = (word, k)
        if key not in self.neighbours:
            features = self.features.float()
            approximate = self.squared - 2 * (features @ features[word]) + self.squared[word]
            approximate[word] = float("inf")
            k = min(k, len(features) - 1)
            pool = torch.topk(approximate, min(k + 32, len(features) - 1), largest=False).indices.sort().values
            exact = ((self.features[pool].double() - self.features[word].double()) ** 2).sum(1)
            self.neighbours[key] = pool[torch.sort(exact, stable=True).indices[:k]]
        return self.neighbours[key]


def _rows_of(module: nn.Module) -> int:
    """Vocabulary size of an embedding module (its weight's rows)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ValueError(f"DIG needs an embedding module with a weight matrix, got {type(module).__name__}")
    return int(weight.shape[0])


def _weights_key(module: nn.Module):
    return tuple((p.data_ptr(), p._version, tuple(p.shape)) for p in module.parameters())


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def monotonic(baseline: torch.Tensor, current: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Per dimension: does `anchor` lie between `baseline` and `current` (equal where they are equal)?
    Works on a batch of anchors `[n, H]`."""
    return torch.where(
        baseline > current,
        (anchor <= baseline) & (anchor >= current),
        torch.where(
            baseline < current, (anchor >= baseline) & (anchor <= current), (anchor == baseline) & (anchor == current)
        ),
    )


def monotonize(baseline: torch.Tensor, current: torch.Tensor, anchor: torch.Tensor, n_points: int) -> torch.Tensor:
    """The anchor with its non-monotonic dimensions moved to `current - (current - baseline) / n_points`."""
    ok = monotonic(baseline, current, anchor)
    return torch.where(ok, anchor, current - (1.0 / n_points) * (current - baseline))


def word_path(vocab: Vocabulary, word: int, ref: int, n_points: int, strategy: str, n_neighbors: int) -> list[int]:
    """DIG's anchor words from `word` towards the baseline word `ref` for a path of `n_points` points
    (`n_points - 1` ids, `word` first; the baseline closes the path)."""
    features = vocab.features
    baseline = features[ref].double()
    path = [word]
    current = word
    for _ in range(n_points - 2):
        if current == ref:
            path.append(ref)
            continue
        candidates = vocab.knn(current, n_neighbors)
        candidates = candidates[candidates != ref]
        if not len(candidates):
            current = ref
            path.append(ref)
            continue
        anchors = features[candidates].double()
        if strategy == "greedy":
            moved = monotonize(baseline, features[current].double(), anchors, n_points)
            score = (anchors - moved).norm(dim=1)
        else:  # maxcount: fewest non-monotonic dimensions first
            score = -monotonic(baseline, features[current].double(), anchors).sum(1).double()
        order = torch.sort(score, stable=True).indices
        seen = set(path)
        nxt = next((int(candidates[j]) for j in order.tolist() if int(candidates[j]) not in seen), ref)
        path.append(nxt)
        current = nxt
    return path


def monotonic_path(
    vocab: Vocabulary,
    word: int,
    ref: int,
    n_points: int,
    strategy: str,
    n_neighbors: int,
    factor: int,
    special: bool = False,
) -> torch.Tensor:
    """DIG's interpolation points `[2 ** factor * (n_points - 1) + 1, H]` for one token, from the
    baseline (first) to the token's embedding (last); cached per vocabulary."""
    key = (word, ref, n_points, strategy, n_neighbors, factor, special)
    if key not in vocab.paths:
        features = vocab.features
        # A special token takes no detour through the vocabulary: it sits at its baseline, then at itself.
        ids = [word] * (n_points - 1) if special else word_path(vocab, word, ref, n_points, strategy, n_neighbors)
        points = [features[ids[0]].double()]
        for nxt in ids[1:]:
            points.append(monotonize(features[ref].double(), points[-1], features[nxt].double(), n_points))
        points.append(features[ref].double())
        path = torch.stack(points[::-1])
        for _ in range(factor):
            middle = 0.5 * (path[:-1] + path[1:])
            both = torch.empty(2 * len(path) - 1, path.shape[1], dtype=path.dtype, device=path.device)
            both[0::2], both[1::2] = path, middle
            path = both
        vocab.paths[key] = path
    return vocab.paths[key]


@register("discretized_integrated_gradients")
class DiscretizedIntegratedGradients(AttributionMethod):
    """Discretized integrated gradients (Sanyal and Ren 2021), on paths of `n_steps` points.

    Each token moves from its baseline token to itself along a monotonic path through the
    vocabulary: from the token, `n_steps - 2` anchor words are picked one after the other among the
    `n_neighbors` nearest neighbours (Euclidean, on the embedding module's outputs for every token
    id, found with torch and cached per model) of the last anchor — "greedy": the neighbour whose
    monotonized embedding moves least; "maxcount": the one with the most monotonic dimensions — and
    each anchor is monotonized (dimensions not between the baseline and the previous point are set
    1/n_steps of the way from the previous point to the baseline). `factor` inserts midpoints
    `factor` times. The attribution is the left Riemann sum along that path,
    `sum_k grad f(c_k) * (c_{k+1} - c_k)` (DIG's own code). Baselines are token ids: UNK (default,
    EOS kept unless `include_eos_baseline`), "pad", or an int id; a token equal to its baseline
    (or padding) stays put and gets zero; so does the decoder start token of an encoder-decoder
    target. As in Inseq, special tokens (`Engine.special_token_ids`) go straight from their
    baseline to themselves (`[baseline, token, ..., token]`), and the defaults are Inseq's
    (`n_steps=50`, `n_neighbors=50`).
    """

    checkpointable = True

    def attribute(
        self,
        request: Request,
        n_steps=50,
        strategy="greedy",
        n_neighbors=50,
        factor=0,
        baselines=None,
        include_eos_baseline=False,
        internal_batch_size=None,
        return_convergence_delta=False,
    ) -> RowAttribution:
        if strategy not in ("greedy", "maxcount"):
            raise ValueError(f"strategy must be 'greedy' or 'maxcount', got {strategy!r}")
        for name, value, low in (("n_steps", n_steps, 2), ("n_neighbors", n_neighbors, 1), ("factor", factor, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        _check_batch_size(internal_batch_size)
        engine, rows = request.engine, request.rows
        sides = {"target": (rows.target_ids, rows.target_mask, engine.target_embedding)}
        if rows.source_ids is not None:
            sides = {"source": (rows.source_ids, rows.source_mask, engine.source_embedding), **sides}
        moving = [name for name in sides if name == "source" or request.attribute_target]
        paths = {}
        inputs = dict(zip(("source", "target"), engine.embed(rows)))
        for name, (ids, mask, module) in sides.items():
            vocab = Vocabulary.of(module, _rows_of(module))
            x = inputs[name]
            if name not in moving:
                paths[name] = x[None].expand(2, *x.shape)  # stays at its input
                continue
            refs = self._baseline_ids(
                engine,
                ids,
                baselines,
                include_eos_baseline,
                len(vocab.features),
                keep_start=name == "target" and engine.is_encoder_decoder,
            )
            length = 2**factor * (n_steps - 1) + 1
            special = engine.special_token_ids
            path = x[None].repeat(length, *([1] * x.dim()))
            for r, i in mask.nonzero().tolist():
                word, ref = int(ids[r, i]), int(refs[r, i])
                if word != ref:
                    points = monotonic_path(vocab, word, ref, n_steps, strategy, n_neighbors, factor, word in special)
                    path[:, r, i] = points.to(path.device, path.dtype)
            paths[name] = path
        n_points = max(len(p) for p in paths.values())
        paths = {name: p if len(p) == n_points else p[:1].expand(n_points, *p.shape[1:]) for name, p in paths.items()}
        totals = {name: torch.zeros_like(paths[name][0], dtype=torch.float32) for name in moving}
        # The last point (the input) has step 0: the gradients at points 0 .. n_points - 2 are needed.
        extra = n_points * len(rows) * len(moving)  # the paths, every point of them
        for chunk in chunks(n_points - 1, rows, internal_batch_size, request=request, extra_rows=extra):
            index = torch.tensor(list(chunk), device=rows.target_ids.device)
            points = {name: p[index].flatten(0, 1) for name, p in paths.items()}
            points = {name: leaf(p) if name in moving else p for name, p in points.items()}
            grads, _, _ = gradients(
                path_request(request, rows, len(chunk), extra_rows=extra),
                rows.repeat(len(chunk)),
                [points[name] for name in moving],
                points.get("source"),
                points["target"],
            )
            for name, grad in zip(moving, grads):
                steps = (paths[name][index + 1] - paths[name][index]).float()
                totals[name] += (grad.float().unflatten(0, (len(chunk), -1)) * steps).sum(0)
        source_x = paths["source"][-1] if "source" in paths else None
        target_x = paths["target"][-1]
        delta = None
        with torch.no_grad():
            logits = engine.logits(rows, source_x, target_x)
            if return_convergence_delta:
                at_input = request.score(rows, logits, source_x, target_x)
                source_b = paths["source"][0] if "source" in paths else None
                target_b = paths["target"][0]
                at_base = request.score(rows, engine.logits(rows, source_b, target_b), source_b, target_b)
                delta = sum(totals[name].flatten(1).sum(1) for name in moving) - (at_input - at_base).float()
        return RowAttribution(source=totals.get("source"), target=totals.get("target"), logits=logits, delta=delta)

    @staticmethod
    def _baseline_ids(
        engine, ids: torch.Tensor, baselines: Any, include_eos: bool, vocab_size: int, keep_start: bool = False
    ) -> torch.Tensor:
        """Baseline token ids for `ids`; `keep_start`: the decoder start token (column 0) stays, as in
        `Engine.baseline`."""
        if baselines in (None, "unk"):
            if engine.unk_token_id is None:
                raise ValueError(
                    "The tokenizer has no UNK token for the default baseline; pass baselines='pad' or a token id"
                )
            ref = engine.unk_token_id
        elif baselines == "pad":
            ref = engine.pad_token_id
        elif isinstance(baselines, int) and not isinstance(baselines, bool):
            ref = baselines
        else:
            raise ValueError(
                f"DIG baselines are vocabulary tokens: None ('unk'), 'pad' or a token id, got {baselines!r}"
            )
        if not 0 <= ref < vocab_size:
            raise ValueError(f"Baseline token id {ref} is outside the vocabulary of {vocab_size} tokens")
        refs = torch.full_like(ids, ref)
        if not include_eos and engine.eos_token_id is not None:
            refs = torch.where(ids == engine.eos_token_id, ids, refs)
        if keep_start:
            refs[:, 0] = ids[:, 0]
        return refs
