"""Is the attribution right? Faithfulness and plausibility of attributions of generated tokens, batched.

    table = out.evaluate(model, metrics=["comprehensiveness", "deletion"])   # an EvaluationTable
    table.show()                                # methods x metrics, mean [95% bootstrap CI]
    evaluate(out, model, alignments=[[(0, 2), (1, 0)]], metrics=["plausibility"])

Every generated token (column of the attributions) is one unit. Its *candidates* are the input
tokens of the evaluated `side` that it could see, special tokens (pad, EOS, BOS, UNK, the decoder
start) left out; they are ranked by the aggregated attribution scores (`seq.aggregate()`, what the
heatmaps show, with layers reduced too for layer methods; the highest first, ties in position
order). `f` is the probability of the generated token. Removing a token replaces it with
`baseline` (the UNK token by default, as the methods' default baseline) or, with
`removal="delete"`, drops it from the input (an input left empty, as a decoder-only prefix without a
BOS token can be, gives no prediction: NaN, left out of the means).

- `comprehensiveness@k` = f(x) - f(x without the top k% candidates) and `sufficiency@k` =
  f(x) - f(x with only the top k% candidates) (ERASER; ceil(k% of n) tokens, at least one); their
  `_aopc` is the mean over the cut-offs.
- `deletion_auc` / `insertion_auc`: f after removing the top i candidates / after keeping only the top
  i, i = 0..n, over x = i / n, trapezoid rule (the mean curves are kept for plotting).
- `soft_comprehensiveness` / `soft_sufficiency` (Zhao & Aletras 2023): scores min-max normalised to
  s in [0, 1] over the candidates (all 0.5 when constant); each embedding element of a candidate is
  kept where u >= s (comprehensiveness) or u < s (sufficiency), u ~ U(0, 1) drawn with
  `torch.Generator().manual_seed(token_seed(seed, example, position))` as `torch.rand(n, hidden)`,
  else set to the baseline token's embedding element. With p0 = f(x), p_null = f(all candidates
  removed), d = max(0, p0 - p_null): soft comprehensiveness max(0, p0 - f(x')) / d and soft
  sufficiency ((1 - max(0, p0 - f(x'))) - (1 - d)) / d (Carton et al.'s normalisation; NaN where d = 0).
- `aer` (alignment error rate, per example) and `top1_accuracy` (per aligned token): the source
  token with the highest score against reference `alignments`, one list of (generated token index,
  source token index) pairs per example (source token index: into `seq.source`, or into `seq.target`
  on decoder-only models). AER = 1 - 2|A & S| / (|A| + |S|) with A the predicted pairs of the
  aligned tokens and S (= P) the reference.
- The "random" row: the same metrics for uniform random scores, `torch.rand(n)` drawn with
  `token_seed(seed, example, position, salt=1)`.

Means come with a percentile bootstrap 95% confidence interval over the units (tokens; examples for
AER). All perturbed inputs of every metric, token and example go through the model together, a batch
at a time: identical inputs run once, and an input whose target prefix is a prefix of another one's
(same source) is read off that one's forward at its own position (causal decoders), as in
`Engine.forward_steps`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from instrument.evaluation_table import EvaluationTable
from instrument.rows import Rows, _pad

FAITHFULNESS = (
    "comprehensiveness",
    "sufficiency",
    "deletion",
    "insertion",
    "soft_comprehensiveness",
    "soft_sufficiency",
)
METRICS = FAITHFULNESS + ("plausibility",)
DEFAULT_CUTOFFS = (1, 5, 10, 20, 50)
SIDES = ("source", "target", "both")
CURVE_GRID = 11  # points of the mean deletion / insertion curves, x = 0, 0.1, ..., 1


def token_seed(seed: int, example: int, position: int, salt: int = 0) -> int:
    """The seed of the random draws (soft masks: salt 0, random scores: salt 1) of one generated token."""
    return (((seed * 1_000_003 + example) * 10_007 + position) * 4 + salt) % (2**63 - 1)


def evaluate(
    output: Any,
    model: Any,
    metrics: Sequence[str] | None = None,
    *,
    cutoffs: Sequence[float] = DEFAULT_CUTOFFS,
    removal: str = "baseline",
    baseline: str | int = "unk",
    side: str | None = None,
    alignments: Sequence[Sequence[tuple[int, int]]] | None = None,
    random_baseline: bool = True,
    seed: int = 0,
    n_bootstrap: int = 1000,
    batch_size: int = 256,
    method: str | None = None,
) -> EvaluationTable:
    """Faithfulness (and, with `alignments`, plausibility) of `output`'s attributions on `model`.

        table = evaluate(out, model, metrics=["comprehensiveness", "sufficiency"], cutoffs=(10, 50))

    `output`: a FeatureAttributionOutput (or one sequence) made by `model` (an AttributionModel);
    `metrics`: names from `METRICS` (default: every faithfulness metric, plus "plausibility" when
    `alignments` are given); `side`: "source", "target" (the target prefix) or "both" (default: every
    side with attributions; on decoder-only models "source" is the prompt, "target" the generated
    prefix); `batch_size`: perturbed inputs per forward. Returns an `EvaluationTable`, one row for the
    method (`method`, default `output.info["attribution_method"]`) and one for "random".
    """
    from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput

    if isinstance(output, FeatureAttributionSequenceOutput):
        output = FeatureAttributionOutput([output])
    if not isinstance(output, FeatureAttributionOutput):
        raise TypeError(f"output: expected an attribution output, got {type(output).__name__}")
    engine, tokenizer = getattr(model, "engine", None), getattr(model, "tokenizer", None)
    if engine is None or tokenizer is None:
        raise TypeError(f"model: expected an AttributionModel (instrument.load_model), got {type(model).__name__}")
    metrics = _check_metrics(metrics, alignments)
    cutoffs = _check_cutoffs(cutoffs)
    if removal not in ("baseline", "delete"):
        raise ValueError(f"removal: expected 'baseline' or 'delete', got {removal!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    needs_baseline = removal == "baseline" or any(m.startswith("soft_") for m in metrics)
    baseline_id = _baseline_id(baseline, tokenizer, engine) if needs_baseline else None
    if alignments is not None and len(alignments) != len(output):
        raise ValueError(f"alignments: {len(alignments)} lists for {len(output)} examples; give one per example")
    sequences = [_prepare(seq, b, engine, tokenizer, side) for b, seq in enumerate(output)]
    name = method or output.info.get("attribution_method") or "attributions"
    scorings = {name: None} | ({"random": seed} if random_baseline else {})

    plan = _Plan(engine, removal, baseline_id, cutoffs, metrics, seed)
    for b, seq in enumerate(sequences):
        for unit in seq.units:
            for label, random_seed in scorings.items():
                plan.add(label, b, unit, random_seed)
    with _no_grad_eval(engine.model):
        probs = plan.prober.run(engine, batch_size, baseline_id)
    table = EvaluationTable(metrics=plan.columns(), cutoffs=list(cutoffs))
    for label in scorings:
        values, curves = plan.values(label, probs)
        if "plausibility" in metrics:
            values.update(_plausibility(sequences, alignments, label, seed))
        table.add(label, values, curves, n_bootstrap=n_bootstrap, seed=seed)
    table.info.update(removal=removal, side=side, baseline=baseline if needs_baseline else None, seed=seed)
    return table


# -- checks -----------------------------------------------------------------------------------------


def _check_metrics(metrics, alignments) -> list[str]:
    if metrics is None:
        return list(FAITHFULNESS) + (["plausibility"] if alignments is not None else [])
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; choose from {list(METRICS)}")
    if "plausibility" in metrics and alignments is None:
        raise ValueError("metrics: 'plausibility' needs reference alignments (alignments=...)")
    return [m for m in METRICS if m in metrics]


def _check_cutoffs(cutoffs) -> tuple[float, ...]:
    values = tuple(cutoffs) if isinstance(cutoffs, (list, tuple)) else (cutoffs,)
    if not values:
        raise ValueError("cutoffs: give at least one percentage in (0, 100]")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
            raise ValueError(f"cutoffs: every cut-off is a percentage in (0, 100], got {value!r}")
    return values


def _baseline_id(baseline, tokenizer, engine) -> int:
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        if not 0 <= baseline < engine.model.get_input_embeddings().num_embeddings:
            raise ValueError(f"baseline: token id {baseline} is outside the vocabulary")
        return baseline
    ids = {"unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}
    if baseline not in ids:
        raise ValueError(f"baseline: expected 'unk', 'pad' or a token id, got {baseline!r}")
    if ids[baseline] is None:
        raise ValueError(
            f"baseline: the tokenizer has no {baseline.upper()} token to replace removed tokens with; "
            "pass baseline='pad' or a token id, or removal='delete' (without the soft metrics)"
        )
    return ids[baseline]


@contextlib.contextmanager
def _no_grad_eval(model):
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


# -- the units: one generated token each ---------------------------------------------------------------


@dataclass
class _Unit:
    """One generated token: its example, target position, token id, and its candidates as
    (side, index) with their scores."""

    example: int
    position: int
    token: int
    candidates: list[tuple[str, int]]
    scores: torch.Tensor  # float64 [n]
    source: tuple[int, ...] | None
    target: tuple[int, ...]  # the whole target; the prefix is target[:position]


@dataclass
class _Sequence:
    units: list[_Unit]
    source_scores: torch.Tensor | None  # [source, steps] (decoder-only: target rows), for plausibility
    plausible: list[int]  # the indices plausibility may point at
    start: int


def _prepare(seq, b: int, engine, tokenizer, side: str | None) -> _Sequence:
    """The units of one sequence, after checking its tokens against the tokenizer."""
    encoder_decoder = engine.is_encoder_decoder
    for name in ("source", "target"):
        tokens = getattr(seq, name)
        ids = [t.id for t in tokens]
        if tokens and tokenizer.convert_ids_to_tokens(ids) != [t.token for t in tokens]:
            raise ValueError(
                f"output: the {name} tokens of example {b} do not match the model's tokenizer; "
                "evaluate an output with the model that made it"
            )
    if encoder_decoder != (seq.source_attributions is not None):
        kind = "an encoder-decoder" if encoder_decoder else "a decoder-only"
        raise ValueError(f"output: example {b} does not fit {kind} model (evaluate with the model that made it)")
    aggregated = seq.aggregate()
    if any(t is not None and t.dim() > 2 for t in (aggregated.source_attributions, aggregated.target_attributions)):
        aggregated = seq.aggregate(keep_layers=False)  # layer methods: one score per token over all layers
    src, tgt = aggregated.source_attributions, aggregated.target_attributions
    for t in (src, tgt):
        if t is not None and t.dim() != 2:
            raise ValueError(f"output: aggregated attributions of example {b} are not 2-D: {tuple(t.shape)}")
    has = {"source": src is not None, "target": tgt is not None}
    if not encoder_decoder:
        has = {"source": tgt is not None, "target": tgt is not None}
    if side is None:
        sides = [s for s in ("source", "target") if has[s]]
    elif side not in SIDES:
        raise ValueError(f"side: expected one of {SIDES}, got {side!r}")
    else:
        sides = ["source", "target"] if side == "both" else [side]
        missing = [s for s in sides if not has[s]]
        if missing:
            raise ValueError(f"side: example {b} has no {missing[0]} attributions (attribute_target=True?)")
    special = engine.special_token_ids
    source_ids = tuple(t.id for t in seq.source) if encoder_decoder else None
    target_ids = tuple(t.id for t in seq.target)
    start = seq.attr_pos_start
    units = []
    for column, position in enumerate(range(start, seq.attr_pos_end)):
        candidates, scores = [], []

        def take(kind, index, table):
            value = float(table[index, column])
            ids = source_ids if kind == "source" and encoder_decoder else target_ids
            if ids[index] not in special and math.isfinite(value):
                candidates.append((kind, index))
                scores.append(value)

        for kind in sides:
            if encoder_decoder and kind == "source":
                for i in range(len(source_ids)):
                    take("source", i, src)
            elif encoder_decoder:
                for i in range(1, position):  # position 0: the decoder start, no input
                    take("target", i, tgt)
            else:
                lo, hi = (0, min(start, position)) if kind == "source" else (start, position)
                for i in range(lo, hi):
                    take(kind, i, tgt)
        units.append(
            _Unit(
                b, position, target_ids[position], candidates, torch.tensor(scores, dtype=torch.float64),
                source_ids, target_ids,
            )
        )  # fmt: skip
    table = src if encoder_decoder else tgt
    ids = source_ids if encoder_decoder else target_ids[:start]
    plausible = [i for i, t in enumerate(ids) if t not in special]
    return _Sequence(units, table, plausible, start)


def _ranked(unit: _Unit, label_seed: int | None) -> tuple[list[tuple[str, int]], torch.Tensor]:
    """The unit's candidates, most important first, and their scores (random ones for the random row)."""
    scores = _scores(unit, label_seed)
    order = sorted(range(len(scores)), key=lambda k: -float(scores[k]))
    return [unit.candidates[k] for k in order], scores


def _scores(unit: _Unit, label_seed: int | None) -> torch.Tensor:
    if label_seed is None:
        return unit.scores
    generator = torch.Generator().manual_seed(token_seed(label_seed, unit.example, unit.position, salt=1))
    return torch.rand(len(unit.candidates), generator=generator, dtype=torch.float64)


# -- perturbed inputs and their forwards ---------------------------------------------------------------


class _Prober:
    """Collects perturbed inputs (deduplicated) and scores them all, `batch_size` inputs per forward.

    An input is (source ids, target prefix ids, token to score, optional soft masks). Hard inputs with
    the same source whose prefix is a prefix of a longer one are read off that one's forward."""

    def __init__(self):
        self.keys: dict[tuple, int] = {}
        self.inputs: list[tuple] = []

    def add(self, source, prefix, token, soft=None) -> int:
        key = (source, prefix, token) if soft is None else None
        if key is not None and key in self.keys:
            return self.keys[key]
        self.inputs.append((source, prefix, token, soft))
        if key is not None:
            self.keys[key] = len(self.inputs) - 1
        return len(self.inputs) - 1

    def hosts(self) -> list[tuple[tuple, tuple, dict, list[tuple[int, int, int]]]]:
        """Forwards to run: (source, prefix, soft masks, [(input index, read position, token)])."""
        hosts, tries = [], {}
        order = sorted(range(len(self.inputs)), key=lambda n: -len(self.inputs[n][1]))
        for n in order:
            source, prefix, token, soft = self.inputs[n]
            if not prefix:
                continue  # emptied by deletion: no prediction (NaN)
            if soft is not None:
                hosts.append((source, prefix, soft, [(n, len(prefix) - 1, token)]))
                continue
            node = tries.setdefault(source, {})
            for t in prefix:
                node = node.get(t)
                if node is None:
                    break
            if node is not None and "#" in node:
                hosts[node["#"]][3].append((n, len(prefix) - 1, token))
                continue
            host = len(hosts)
            hosts.append((source, prefix, None, [(n, len(prefix) - 1, token)]))
            node = tries[source]
            for t in prefix:
                node = node.setdefault(t, {})
                node.setdefault("#", host)
        return hosts

    def run(self, engine, batch_size: int, baseline_id: int | None) -> torch.Tensor:
        """The probability of each input's token, float64 `[inputs]` (NaN for an emptied input)."""
        probs = torch.full((len(self.inputs),), math.nan, dtype=torch.float64)
        hosts = self.hosts()
        hosts.sort(key=lambda h: (h[2] is not None, len(h[1])))  # similar lengths share a batch
        for chunk in _chunks(hosts, batch_size, engine.head.weight.shape[0]):
            rows = _rows(engine, chunk)
            width = max(len(h[3]) for h in chunk)
            positions = torch.tensor([[r for _, r, _ in h[3]] + [h[3][-1][1]] * (width - len(h[3])) for h in chunk])
            source_embeds = target_embeds = None
            if any(h[2] is not None for h in chunk):
                source_embeds, target_embeds = _soft_embeds(engine, rows, chunk, baseline_id)
            logits = engine.forward_steps(rows, positions.to(engine.device), source_embeds, target_embeds)[0]
            tokens = torch.tensor([[t for _, _, t in h[3]] + [h[3][-1][2]] * (width - len(h[3])) for h in chunk])
            logits = logits.float()
            picked = logits.gather(-1, tokens.to(logits.device)[..., None])[..., 0] - logits.logsumexp(-1)
            picked = picked.exp().double().cpu()
            for f, host in enumerate(chunk):
                for k, (n, _, _) in enumerate(host[3]):
                    probs[n] = picked[f, k]
        return probs


def _chunks(hosts: list, batch_size: int, vocab: int, budget: int = 2**25):
    """Runs of at most `batch_size` hosts whose logits (hosts x reads x vocabulary) stay within `budget`."""
    chunk, width = [], 0
    for host in hosts:
        wider = max(width, len(host[3]))
        if chunk and (len(chunk) == batch_size or (len(chunk) + 1) * wider * vocab > budget):
            yield chunk
            chunk, wider = [], len(host[3])
        chunk.append(host)
        width = wider
    if chunk:
        yield chunk


def _rows(engine, chunk) -> Rows:
    device = engine.device
    target_ids, target_mask = _pad([torch.tensor(h[1], dtype=torch.long) for h in chunk], engine.pad_token_id)
    rows = Rows(
        example=torch.arange(len(chunk)),
        position=target_mask.sum(1),
        token=torch.zeros(len(chunk), dtype=torch.long),
        target_ids=target_ids,
        target_mask=target_mask,
    )
    if chunk[0][0] is not None:
        rows.source_ids, rows.source_mask = _pad(
            [torch.tensor(h[0], dtype=torch.long) for h in chunk], engine.pad_token_id
        )
    return rows.to(device)


def _soft_embeds(engine, rows: Rows, chunk, baseline_id: int):
    """Embeddings of the rows, soft inputs' masked elements set to the baseline token's."""
    source, target = engine.embed(rows)
    for name, embeds, embedding, ids in (
        ("source", source, engine.source_embedding, rows.source_ids),
        ("target", target, engine.target_embedding, rows.target_ids),
    ):
        if embeds is None:
            continue
        base = engine._as_input(embedding(torch.full_like(ids[:1, :1], baseline_id)))[0, 0]
        for f, host in enumerate(chunk):
            if host[2] is None or name not in host[2]:
                continue
            for index, keep in host[2][name]:
                embeds[f, index] = torch.where(keep.to(embeds.device), embeds[f, index], base)
    return source, target


# -- the plan: which inputs each metric needs, and the metrics from their probabilities ---------------


@dataclass
class _Entry:
    """The inputs of one unit under one scoring."""

    unit: _Unit
    original: int
    null: int
    comp: list[int] = field(default_factory=list)
    suff: list[int] = field(default_factory=list)
    deletion: list[int] = field(default_factory=list)
    insertion: list[int] = field(default_factory=list)
    soft_comp: int | None = None
    soft_suff: int | None = None


class _Plan:
    def __init__(self, engine, removal, baseline_id, cutoffs, metrics, seed):
        self.engine, self.removal, self.baseline_id = engine, removal, baseline_id
        self.cutoffs, self.metrics, self.seed = cutoffs, metrics, seed
        self.prober = _Prober()
        self.entries: dict[str, list[_Entry]] = {}

    def _input(self, unit: _Unit, removed) -> int:
        """The input of `unit` with the candidates `removed` (an iterable of (side, index)) removed."""
        cut = {"source": [], "target": []}
        for kind, i in removed:  # decoder-only: prompt ("source") and generated positions of one sequence
            cut[kind if self.engine.is_encoder_decoder else "target"].append(i)

        def side(ids, indices):
            if ids is None or not indices:
                return ids
            if self.removal == "delete":
                drop = set(indices)
                return tuple(t for i, t in enumerate(ids) if i not in drop)
            ids = list(ids)
            for i in indices:
                ids[i] = self.baseline_id
            return tuple(ids)

        source, prefix = side(unit.source, cut["source"]), side(unit.target[: unit.position], cut["target"])
        return self.prober.add(source, prefix, unit.token)

    def add(self, label: str, b: int, unit: _Unit, label_seed: int | None) -> None:
        ranked, scores = _ranked(unit, label_seed)
        n = len(ranked)
        if n == 0:
            return
        entry = _Entry(unit, self._input(unit, ()), self._input(unit, ranked))
        wants = set(self.metrics)
        for k in self.cutoffs:
            m = min(n, max(1, math.ceil(k * n / 100)))
            if "comprehensiveness" in wants:
                entry.comp.append(self._input(unit, ranked[:m]))
            if "sufficiency" in wants:
                entry.suff.append(self._input(unit, ranked[m:]))
        if "deletion" in wants:
            entry.deletion = [self._input(unit, ranked[:i]) for i in range(n + 1)]
        if "insertion" in wants:
            entry.insertion = [self._input(unit, ranked[i:]) for i in range(n + 1)]
        if "soft_comprehensiveness" in wants or "soft_sufficiency" in wants:
            entry.soft_comp, entry.soft_suff = self._soft(unit, scores)
        self.entries.setdefault(label, []).append(entry)

    def _soft(self, unit: _Unit, scores: torch.Tensor) -> tuple[int, int]:
        low, high = float(scores.min()), float(scores.max())
        s = (scores - low) / (high - low) if high > low else torch.full_like(scores, 0.5)
        engine = self.engine
        hidden = engine.target_embedding.weight.shape[-1]
        generator = torch.Generator().manual_seed(token_seed(self.seed, unit.example, unit.position))
        u = torch.rand(len(s), hidden, generator=generator, dtype=torch.float64)
        out = []
        for keep in (u >= s[:, None], u < s[:, None]):
            masks: dict[str, list] = {}
            for k, (kind, i) in enumerate(unit.candidates):
                name = kind if engine.is_encoder_decoder else "target"
                masks.setdefault(name, []).append((i, keep[k]))
            prefix = unit.target[: unit.position]
            out.append(self.prober.add(unit.source, prefix, unit.token, soft=masks))
        return out[0], out[1]

    def columns(self) -> list[str]:
        names = []
        for metric, short in (("comprehensiveness", "comprehensiveness"), ("sufficiency", "sufficiency")):
            if metric in self.metrics:
                names += [f"{short}@{_fmt(k)}" for k in self.cutoffs] + [f"{short}_aopc"]
        names += [f"{m}_auc" for m in ("deletion", "insertion") if m in self.metrics]
        names += [m for m in ("soft_comprehensiveness", "soft_sufficiency") if m in self.metrics]
        if "plausibility" in self.metrics:
            names += ["aer", "top1_accuracy"]
        return names

    def values(self, label: str, probs: torch.Tensor) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Per-unit values of every metric column, and the mean deletion / insertion curves."""
        values: dict[str, list[float]] = {c: [] for c in self.columns() if c not in ("aer", "top1_accuracy")}
        grids: dict[str, list[torch.Tensor]] = {"deletion": [], "insertion": []}
        for entry in self.entries.get(label, []):
            p0, p_null = float(probs[entry.original]), float(probs[entry.null])
            for short, inputs in (("comprehensiveness", entry.comp), ("sufficiency", entry.suff)):
                if inputs:
                    drops = [p0 - float(probs[n]) for n in inputs]
                    for k, drop in zip(self.cutoffs, drops):
                        values[f"{short}@{_fmt(k)}"].append(drop)
                    values[f"{short}_aopc"].append(sum(drops) / len(drops))
            for curve in ("deletion", "insertion"):
                inputs = getattr(entry, curve)
                if inputs:
                    y = probs[inputs]
                    values[f"{curve}_auc"].append(auc(y))
                    grids[curve].append(_on_grid(y))
            if entry.soft_comp is not None:
                d = max(0.0, p0 - p_null)
                comp = max(0.0, p0 - float(probs[entry.soft_comp]))
                suff = 1 - max(0.0, p0 - float(probs[entry.soft_suff]))
                if "soft_comprehensiveness" in values:
                    values["soft_comprehensiveness"].append(comp / d if d > 0 else math.nan)
                if "soft_sufficiency" in values:
                    values["soft_sufficiency"].append((suff - (1 - d)) / d if d > 0 else math.nan)
        curves = {k: torch.stack(v).nanmean(0).tolist() for k, v in grids.items() if v}
        return values, curves


def auc(y: torch.Tensor) -> float:
    """Area under `y` over x = 0, 1/n, ..., 1 (trapezoid rule); one point: that value."""
    if len(y) == 1:
        return float(y[0])
    return float(((y[1:] + y[:-1]) / 2).sum() / (len(y) - 1))


def _on_grid(y: torch.Tensor) -> torch.Tensor:
    """A curve over x = i / n resampled (linearly) at `CURVE_GRID` evenly spaced points of [0, 1]."""
    n = len(y) - 1
    if n == 0:
        return y.expand(CURVE_GRID).clone()
    x = torch.linspace(0, 1, CURVE_GRID, dtype=torch.float64) * n
    low = x.floor().long().clamp(max=n - 1)
    return y[low] + (x - low) * (y[low + 1] - y[low])


def _fmt(k: float) -> str:
    return f"{k:g}"


# -- plausibility ------------------------------------------------------------------------------------


def _plausibility(sequences: list[_Sequence], alignments, label: str, seed: int) -> dict[str, list[float]]:
    aer, top1 = [], []
    for b, (seq, pairs) in enumerate(zip(sequences, alignments)):
        pairs = [(int(j), int(i)) for j, i in pairs]
        steps = len(seq.units)
        reference: dict[int, set[int]] = {}
        for j, i in pairs:
            if not 0 <= j < steps:
                raise ValueError(f"alignments: example {b} has no generated token {j} ({steps} generated tokens)")
            if i not in seq.plausible:
                raise ValueError(f"alignments: example {b}'s source token {i} is no attributed input token")
            reference.setdefault(j, set()).add(i)
        if not reference or not seq.plausible:
            continue
        predicted = set()
        for j in sorted(reference):
            unit = seq.units[j]
            if label == "random":
                generator = torch.Generator().manual_seed(token_seed(seed, unit.example, unit.position, salt=1))
                scores = torch.rand(len(seq.plausible), generator=generator, dtype=torch.float64)
            else:
                scores = seq.source_scores[seq.plausible, j].double().nan_to_num(-math.inf)
            best = seq.plausible[int(scores.argmax())]
            predicted.add((j, best))
            top1.append(float(best in reference[j]))
        gold = {(j, i) for j, links in reference.items() for i in links}
        aer.append(1 - 2 * len(predicted & gold) / (len(predicted) + len(gold)))
    return {"aer": aer, "top1_accuracy": top1}
