"""Aggregation: reduce, merge, slice and compare attributions, with Inseq's `aggregate` semantics.

    >>> out.aggregate()                                         # "scores": L2 norm over hidden, normalized per step
    >>> out.aggregate(["subwords", "scores"])                   # whole words, then one score per word
    >>> seq.aggregate("spans", source_spans=[(0, 3)], aggregate_fn="sum")
    >>> seq.aggregate("split", split_pattern=".")               # one span per sentence
    >>> seq[2:5]                                                # "slices": keep source (or prompt) tokens 2..4
    >>> seq_a - seq_b                                           # "pair": elementwise a - b

Every aggregator returns a new object; the input is never modified. Tensors are laid out as in
`instrument.outputs`: rows are attributed tokens, columns generated steps, then optional
`(layers)(, hidden)` dimensions. Aggregators:

- `scores`: reduces the hidden dimension (the last one) to one score per token with `aggregate_fn`
  (default `vnorm`). With a layer dimension (4-D tensors) only hidden is reduced and layers are kept,
  unless `keep_layers=False` (then layers are reduced too, with `layer_fn`, default `aggregate_fn`).
  Then, by default (`normalize=True`), every column (one generated step, and one layer if kept) is
  divided by the sum of the absolute values of all its non-NaN cells, source and target rows together,
  so that the absolute scores of a step sum to 1 (Inseq's L1 normalization); all-zero columns stay 0.
  `rescale=True` (Inseq's option) divides everything by the largest absolute value of the example
  instead (scores in [-1, 1]); pass `normalize=False` for raw values. A 2-D tensor is only normalized.
  `normalize` and `rescale` are accepted by every aggregator of a pipeline (as Inseq passes them down)
  but only "scores" uses them; both true together is an error.
- `spans`: merges the given contiguous `source_spans` / `target_spans` (`(start, end)`, end excluded)
  with `aggregate_fn` (default `absmax`). Merged target tokens merge both their rows and, for the
  generated ones, their columns; step scores of merged columns are merged per step function (see
  `STEP_SCORE_AGGREGATION`). Tokens outside any span are kept as they are; merged tokens are labelled
  with their concatenated strings and id -1. Rows are merged first, then columns.
- `subwords`: `spans` over the words found from subword markers (see `word_spans`).
- `split`: `spans` ending at every token matching `split_pattern` (a literal string, or a compiled regex).
- `slices`: keeps only the source tokens in `source_spans`, or the prompt (pre-generation) target tokens
  in `target_spans`; generated tokens, columns and step scores are always kept.
- `pair`: `attr.aggregate("pair", paired_attr=other)` is `other - attr` elementwise (as in Inseq), also
  written `other - attr`; shapes must match. Differing tokens are labelled `"attr → other"`.

Aggregation functions take `(tensor, dim)` and ignore NaN: a result is NaN only where every input is
NaN, so positions a step cannot see stay NaN after merging.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId

AggregationFunction = Callable[[torch.Tensor, int], torch.Tensor]

# -- aggregation functions ----------------------------------------------------------------------


def _masked(x: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, fill), x) if x.is_floating_point() else x


def _nan_where_all_nan(result: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    if not x.is_floating_point():
        return result
    return result.masked_fill(torch.isnan(x).all(dim), float("nan"))


def nan_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_sum(torch.tensor([1., nan, 2.]), 0) == 3.`: sum of the non-NaN values."""
    return _nan_where_all_nan(_masked(x, 0.0).sum(dim), x, dim)


def nan_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_mean(torch.tensor([1., nan, 2.]), 0) == 1.5`: mean of the non-NaN values."""
    return torch.nanmean(x, dim) if x.is_floating_point() else x.float().mean(dim)


def vnorm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`vnorm(torch.tensor([3., nan, 4.]), 0) == 5.`: L2 norm of the non-NaN values."""
    work = torch.promote_types(x.dtype, torch.float32)  # half precision and integers are computed in float32
    return _nan_where_all_nan(torch.linalg.vector_norm(_masked(x, 0.0).to(work), 2, dim), x, dim)


def absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`absmax(torch.tensor([0.3, -0.7, nan]), 0) == -0.7`: the value of largest magnitude, sign kept."""
    filled = _masked(x, 0.0)
    index = filled.abs().argmax(dim, keepdim=True)
    return _nan_where_all_nan(filled.gather(dim, index).squeeze(dim), x, dim)


def nan_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_max(torch.tensor([1., nan, -2.]), 0) == 1.`"""
    return _nan_where_all_nan(_masked(x, -math.inf).amax(dim), x, dim)


def nan_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_min(torch.tensor([1., nan, -2.]), 0) == -2.`"""
    return _nan_where_all_nan(_masked(x, math.inf).amin(dim), x, dim)


def nan_prod(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`nan_prod(torch.tensor([2., nan, 3.]), 0) == 6.`"""
    return _nan_where_all_nan(_masked(x, 1.0).prod(dim), x, dim)


_FUNCTIONS: dict[str, AggregationFunction] = {
    "sum": nan_sum, "mean": nan_mean, "vnorm": vnorm, "absmax": absmax, "max": nan_max, "min": nan_min, "prod": nan_prod,
}


def list_aggregation_functions() -> list[str]:
    """Names accepted as `aggregate_fn`: `["sum", "mean", "vnorm", "absmax", "max", "min", "prod"]` and registered ones."""
    return list(_FUNCTIONS)


def register_aggregation_function(fn: AggregationFunction, name: str, overwrite: bool = False) -> None:
    """Make `fn(tensor, dim) -> tensor` usable as `aggregate_fn=name`.

    >>> register_aggregation_function(lambda x, dim: x.nan_to_num().abs().sum(dim), "abssum")
    """
    if not callable(fn):
        raise TypeError(f"An aggregation function must be callable, got {type(fn).__name__}")
    if name in _FUNCTIONS and not overwrite:
        raise ValueError(f"Aggregation function {name!r} exists already; pass overwrite=True to replace it")
    _FUNCTIONS[name] = fn


def get_aggregation_function(fn: str | AggregationFunction) -> AggregationFunction:
    """`get_aggregation_function("vnorm")(x, dim)`; callables are returned as they are."""
    if callable(fn):
        return fn
    if fn not in _FUNCTIONS:
        raise ValueError(f"Unknown aggregation function {fn!r}. Available: {', '.join(_FUNCTIONS)}")
    return _FUNCTIONS[fn]


# -- step scores ------------------------------------------------------------------------------

# How the step scores of merged generated tokens combine (e.g. the probability of a word is the product
# of its subwords' probabilities); every other score is averaged. With `logprob=True` (as passed to
# `attribute`) the probability-like scores are log-probabilities and are summed. A registered step
# function's `aggregate_map` ({aggregator name or "spans": function name}) takes precedence.
STEP_SCORE_AGGREGATION = {
    "probability": "prod", "contrast_prob": "prod", "mc_dropout_prob_avg": "prod", "perplexity": "prod",
    "crossentropy": "sum", "entropy": "sum", "pcxmi": "sum", "in_context_pvi": "sum", "kl_divergence": "sum",
    "deltas": "absmax",
}
LOGPROB_SCORES = ("probability", "contrast_prob", "mc_dropout_prob_avg", "contrast_prob_diff")


def step_score_function(name: str, aggregator: str = "spans", logprob: bool = False,
                        overrides: dict[str, Any] | None = None) -> AggregationFunction:
    """`step_score_function("probability")` is `nan_prod`: how merged steps of score `name` combine."""
    if overrides and name in overrides:
        return get_aggregation_function(overrides[name])
    from instrument.steps import get_step_function

    try:
        mapping = get_step_function(name).aggregate_map or {}
    except ValueError:
        mapping = {}
    chosen = mapping.get(aggregator) or mapping.get("spans")
    if chosen is None:
        chosen = "sum" if logprob and name in LOGPROB_SCORES else STEP_SCORE_AGGREGATION.get(name, "mean")
    return get_aggregation_function(chosen)


# -- helpers ----------------------------------------------------------------------------------

Span = tuple[int, int]


def _replace(seq: FeatureAttributionSequenceOutput, **changes) -> FeatureAttributionSequenceOutput:
    fields = dict(
        source=list(seq.source), target=list(seq.target), source_attributions=seq.source_attributions,
        target_attributions=seq.target_attributions, step_scores=dict(seq.step_scores),
        sequence_scores=dict(seq.sequence_scores), attr_pos_start=seq.attr_pos_start, attr_pos_end=seq.attr_pos_end,
        _aggregator=getattr(seq, "_aggregator", None),
    )
    fields.update(changes)
    return FeatureAttributionSequenceOutput(**fields)


def _merge_dim(t: torch.Tensor | None, groups: Sequence[Span], dim: int, fn: AggregationFunction) -> torch.Tensor | None:
    """Merges each group `(a, b)` of positions along `dim` with `fn`; single positions are copied."""
    if t is None:
        return None
    if all(b - a == 1 for a, b in groups) and len(groups) == t.shape[dim]:
        return t
    parts = [t.narrow(dim, a, b - a) if b - a == 1 else fn(t.narrow(dim, a, b - a), dim).unsqueeze(dim) for a, b in groups]
    return torch.cat(parts, dim)


def _merge_tokens(tokens: Sequence[TokenWithId], groups: Sequence[Span]) -> list[TokenWithId]:
    return [tokens[a] if b - a == 1 else TokenWithId("".join(t.token for t in tokens[a:b]), -1) for a, b in groups]


def _singletons(n: int) -> list[Span]:
    return [(i, i + 1) for i in range(n)]


def spans_to_groups(spans: Any, n: int, what: str) -> list[Span]:
    """`spans_to_groups([(1, 3)], 5, "source") == [(0, 1), (1, 3), (3, 4), (4, 5)]`: a partition of range(n)."""
    if spans is None or (isinstance(spans, (list, tuple)) and len(spans) == 0):
        return _singletons(n)
    spans = [spans] if isinstance(spans, (list, tuple)) and len(spans) == 2 and all(isinstance(v, int) for v in spans) else spans
    groups, position = [], 0
    for span in spans:
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise ValueError(f"{what} spans must be (start, end) pairs of integers, got {span!r}")
        start, end = span
        if not 0 <= start < end <= n:
            raise ValueError(f"{what} span {tuple(span)} is out of range: need 0 <= start < end <= {n} ({what} length)")
        if start < position:
            raise ValueError(f"{what} spans must be sorted and must not overlap, got {list(spans)!r}")
        groups += _singletons(start)[position:] + [(start, end)]
        position = end
    return groups + [(i, i + 1) for i in range(position, n)]


def _column_groups(target_groups: Sequence[Span], start: int, end: int) -> tuple[list[Span], int, int]:
    """Column groups (step indices) of the merged generated tokens, and the new attr_pos_start / end."""
    columns, new_start, new_end = [], None, None
    for index, (a, b) in enumerate(target_groups):
        lo, hi = max(a, start), min(b, end)
        if lo < hi:
            new_start = index if new_start is None else new_start
            new_end = index + 1
            columns.append((lo - start, hi - start))
    if new_start is None:  # no attributed steps
        new_start = new_end = sum(1 for a, b in target_groups if b <= start)
    return columns, new_start, new_end


def merge_groups(
    seq: FeatureAttributionSequenceOutput,
    source_groups: Sequence[Span],
    target_groups: Sequence[Span],
    fn: AggregationFunction,
    aggregator: str = "spans",
    logprob: bool = False,
    step_score_fns: dict[str, Any] | None = None,
) -> FeatureAttributionSequenceOutput:
    """Merges the rows of each source / target group, and the columns of the generated target groups."""
    columns, new_start, new_end = _column_groups(target_groups, seq.attr_pos_start, seq.attr_pos_end)

    def both(t, row_groups):
        return _merge_dim(_merge_dim(t, row_groups, 0, fn), columns, 1, fn)

    step_scores = {
        name: _merge_dim(values, columns, 0, step_score_function(name, aggregator, logprob, step_score_fns))
        for name, values in seq.step_scores.items()
    }
    sequence_scores = {  # Inseq's convention: sequence scores are shaped like source attributions
        name: both(values, source_groups) if values.dim() >= 2 and values.shape[0] == len(seq.source)
        and values.shape[1] == seq.attr_pos_end - seq.attr_pos_start else values
        for name, values in seq.sequence_scores.items()
    }
    return _replace(
        seq,
        source=_merge_tokens(seq.source, source_groups),
        target=_merge_tokens(seq.target, target_groups),
        source_attributions=both(seq.source_attributions, source_groups),
        target_attributions=both(seq.target_attributions, target_groups),
        step_scores=step_scores,
        sequence_scores=sequence_scores,
        attr_pos_start=new_start,
        attr_pos_end=new_end,
    )


# -- word detection ---------------------------------------------------------------------------

WORD_START_CHARS = ("▁", "Ġ")  # SentencePiece and byte-level BPE: the token starts a new word
CONTINUATION_CHARS = ("##",)  # WordPiece: the token continues the previous word
WORD_END_CHARS = ("</w>",)  # BPE with end-of-word suffixes: the token ends a word
SPECIAL_TOKEN = re.compile(r"<[^<>\s]+>|\[[A-Z][A-Z_]*\]")  # <s>, </s>, <pad>, <|endoftext|>, [CLS], [SEP]
SPACE_CHARS = set(" \t\r\n▁ĠĊĉč")  # spaces, and their SentencePiece / byte-level renderings


def _is_special(token: str, special_tokens: Iterable[str] | None) -> bool:
    return token in special_tokens if special_tokens is not None else bool(SPECIAL_TOKEN.fullmatch(token))


def word_spans(
    tokens: Sequence[TokenWithId | str],
    marker: str = "word_start",
    special_chars: Sequence[str] = WORD_START_CHARS,
    special_tokens: Iterable[str] | None = None,
) -> list[Span]:
    """`word_spans(["▁H", "ello", "▁world"]) == [(0, 2), (2, 3)]`: the words as a partition of the tokens.

    `marker` says what `special_chars` mark: "word_start" (a token starting with one begins a word:
    `▁`, `Ġ`), "continuation" (a token starting with one continues the previous word: `##`) or
    "word_end" (a token ending with one ends its word: `</w>`). Special tokens (`special_tokens`, by
    default anything like `<s>` or `[CLS]`) and whitespace-only tokens are always words of their own.
    """
    if marker not in ("word_start", "continuation", "word_end"):
        raise ValueError(f"marker must be 'word_start', 'continuation' or 'word_end', got {marker!r}")
    chars = (special_chars,) if isinstance(special_chars, str) else tuple(special_chars)
    texts = [t.token if isinstance(t, TokenWithId) else str(t) for t in tokens]
    alone = [_is_special(t, special_tokens) or (t != "" and set(t) <= SPACE_CHARS) for t in texts]
    groups: list[Span] = []
    for i, text in enumerate(texts):
        if i == 0 or alone[i] or alone[i - 1]:
            new_word = True
        elif marker == "word_start":
            new_word = text.startswith(chars)
        elif marker == "continuation":
            new_word = not text.startswith(chars)
        else:
            new_word = texts[i - 1].endswith(chars)
        if new_word:
            groups.append((i, i + 1))
        else:
            groups[-1] = (groups[-1][0], i + 1)
    return groups


def detect_marker(tokens: Iterable[str], special_tokens: Iterable[str] | None = None) -> tuple[str, tuple[str, ...]] | None:
    """`detect_marker(["▁H", "ello"]) == ("word_start", ("▁", "Ġ"))`; None when no subword marker is found."""
    texts = [t for t in tokens if not _is_special(t, special_tokens)]
    if any(t.startswith(WORD_START_CHARS) for t in texts):
        return "word_start", WORD_START_CHARS
    if any(t.startswith(CONTINUATION_CHARS) for t in texts):
        return "continuation", CONTINUATION_CHARS
    if any(t.endswith(WORD_END_CHARS) for t in texts):
        return "word_end", WORD_END_CHARS
    return None


# -- aggregators ------------------------------------------------------------------------------


def _reduce_columns(src, tgt, how: str):
    """Per-column denominators over all rows of source and target: sum of |x| or max |x|, NaN ignored."""
    parts = [t.abs() for t in (src, tgt) if t is not None]
    if how == "sum":
        return sum(nan_sum(p, 0).nan_to_num(nan=0.0) for p in parts)
    return torch.stack([nan_max(p, 0).nan_to_num(nan=0.0) for p in parts]).amax(0)


def scores(seq, aggregate_fn: AggregationFunction, normalize: bool | None = None, rescale: bool = False,
           keep_layers: bool = True, layer_fn: str | AggregationFunction | None = None):
    """`seq.aggregate("scores")`: one score per token (and layer) and step, normalized per step."""
    if normalize and rescale:
        raise ValueError("Pass either normalize=True or rescale=True, not both")
    normalize = not rescale if normalize is None else normalize
    reduce_layers = get_aggregation_function(layer_fn) if layer_fn is not None else aggregate_fn

    def reduce(t):
        if t is None or t.dim() <= 2:
            return t
        layered = t.dim() == 4
        t = aggregate_fn(t, -1)  # hidden
        if keep_layers and layered:
            return t
        while t.dim() > 2:
            t = reduce_layers(t, -1)
        return t

    src, tgt = reduce(seq.source_attributions), reduce(seq.target_attributions)
    if normalize or rescale:
        if normalize:
            denominator = _reduce_columns(src, tgt, "sum")
        else:  # Inseq's rescale: one largest magnitude over all cells of source and target
            denominator = _reduce_columns(src, tgt, "max")
            denominator = denominator.reshape(-1).max() if denominator.numel() else denominator
        denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        src = None if src is None else src / denominator
        tgt = None if tgt is None else tgt / denominator
    return _replace(seq, source_attributions=src, target_attributions=tgt)


def spans(seq, aggregate_fn: AggregationFunction, source_spans=None, target_spans=None, logprob: bool = False,
          step_score_fns: dict[str, Any] | None = None):
    """`seq.aggregate("spans", source_spans=[(0, 2)], target_spans=(3, 5))`: merges contiguous spans."""
    return merge_groups(
        seq, spans_to_groups(source_spans, len(seq.source), "source"), spans_to_groups(target_spans, len(seq.target), "target"),
        aggregate_fn, "spans", logprob, step_score_fns,
    )


def subwords(seq, aggregate_fn: AggregationFunction, special_chars: str | Sequence[str] | None = None,
             marker: str | None = None, is_suffix_symbol: bool = False, special_tokens: Iterable[str] | None = None,
             aggregate_source: bool = True, aggregate_target: bool = True, logprob: bool = False,
             step_score_fns: dict[str, Any] | None = None):
    """`seq.aggregate("subwords")`: merges subword tokens into words (see `word_spans`).

    By default the marker is detected from the tokens (`▁`/`Ġ` word starts, `##` continuations, `</w>`
    word ends; nothing is merged when none is found). `special_chars=("##",), is_suffix_symbol=True`
    (Inseq's spelling) or `marker="continuation"` choose explicitly.
    """
    special_tokens = None if special_tokens is None else set(special_tokens)
    if special_chars is None and marker is None and not is_suffix_symbol:
        found = detect_marker([t.token for t in [*seq.source, *seq.target]], special_tokens)
        if found is None:
            return _replace(seq)
        marker, special_chars = found
    marker = marker or ("continuation" if is_suffix_symbol else "word_start")
    if special_chars is None:
        special_chars = {"word_start": WORD_START_CHARS, "continuation": CONTINUATION_CHARS, "word_end": WORD_END_CHARS}[marker]

    def groups(tokens, enabled):
        return word_spans(tokens, marker, special_chars, special_tokens) if enabled else _singletons(len(tokens))

    return merge_groups(seq, groups(seq.source, aggregate_source), groups(seq.target, aggregate_target),
                        aggregate_fn, "subwords", logprob, step_score_fns)


def split_spans(tokens: Sequence[TokenWithId], pattern: str | re.Pattern) -> list[Span]:
    """`split_spans(tokens_of("A b. C d."), ".")`: groups that end at each token matching `pattern`."""
    regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
    groups, start = [], 0
    for i, token in enumerate(tokens):
        if regex.search(token.token):
            groups.append((start, i + 1))
            start = i + 1
    return groups + ([(start, len(tokens))] if start < len(tokens) else [])


def split(seq, aggregate_fn: AggregationFunction, split_pattern: str | re.Pattern | None = None,
          aggregate_source: bool = True, aggregate_target: bool = True, logprob: bool = False,
          step_score_fns: dict[str, Any] | None = None):
    """`seq.aggregate("split", split_pattern=re.compile(r"[.!?]"))`: one span per sentence.

    A plain string is matched literally inside token strings; a compiled regex is searched.
    """
    if split_pattern is None or split_pattern == "":
        raise ValueError("The split aggregator needs split_pattern=<string or compiled regex>")
    if not isinstance(split_pattern, (str, re.Pattern)):
        raise TypeError(f"split_pattern must be a string or a compiled regex, got {type(split_pattern).__name__}")

    def groups(tokens, enabled):
        return split_spans(tokens, split_pattern) if enabled else _singletons(len(tokens))

    return merge_groups(seq, groups(seq.source, aggregate_source), groups(seq.target, aggregate_target),
                        aggregate_fn, "split", logprob, step_score_fns)


def _kept_positions(spans_: Any, n: int, what: str) -> list[int]:
    """The positions inside `spans_` (validated as by `spans_to_groups`), in order."""
    groups = spans_to_groups(spans_, n, what)
    wanted = [spans_] if len(spans_) == 2 and all(isinstance(v, int) for v in spans_) else spans_
    wanted = {tuple(span) for span in wanted}
    return [i for a, b in groups if (a, b) in wanted for i in range(a, b)]


def slices(seq, aggregate_fn=None, source_spans=None, target_spans=None):
    """`seq.aggregate("slices", source_spans=(2, 5))`: keeps source tokens 2..4 (and all columns).

    `target_spans` selects target positions before `attr_pos_start` (the prompt of a decoder-only
    model, the decoder start of an encoder-decoder); the generated tokens are always kept, so the
    columns and step scores do not change. Also written `seq[2:5]`.
    """
    if source_spans is None and target_spans is None:
        raise ValueError("The slices aggregator needs source_spans and/or target_spans, e.g. source_spans=(0, 3)")
    changes: dict[str, Any] = {}
    if source_spans is not None:
        if seq.source_attributions is None:
            raise ValueError("This output has no source attributions (decoder-only model): slice the prompt with "
                             "target_spans, or seq[a:b]")
        keep = _kept_positions(source_spans, len(seq.source), "source")
        changes["source"] = [seq.source[i] for i in keep]
        changes["source_attributions"] = _rows(seq.source_attributions, keep)
        changes["sequence_scores"] = {
            name: _rows(v, keep) if v.dim() >= 1 and v.shape[0] == len(seq.source) else v for name, v in seq.sequence_scores.items()
        }
    if target_spans is not None:
        prompt = [i for i in _kept_positions(target_spans, len(seq.target), "target") if i < seq.attr_pos_start]
        keep = prompt + list(range(seq.attr_pos_start, len(seq.target)))
        changes["target"] = [seq.target[i] for i in keep]
        if seq.source_attributions is None and seq.source and source_spans is None:  # decoder-only: the prompt
            changes["source"] = [seq.source[i] for i in prompt if i < len(seq.source)]
        changes["target_attributions"] = _rows(seq.target_attributions, keep)
        changes["attr_pos_start"] = len(prompt)
        changes["attr_pos_end"] = len(prompt) + seq.attr_pos_end - seq.attr_pos_start
    return _replace(seq, **changes)


def _rows(t: torch.Tensor | None, keep: list[int]) -> torch.Tensor | None:
    return None if t is None else t[torch.tensor(keep, dtype=torch.long)]


def difference(attr: torch.Tensor, paired: torch.Tensor) -> torch.Tensor:
    """The pair aggregator's default: `paired - attr`."""
    return paired - attr


def _check_pair(a: FeatureAttributionSequenceOutput, b: Any) -> None:
    if not isinstance(b, FeatureAttributionSequenceOutput):
        raise TypeError(f"paired_attr must be a FeatureAttributionSequenceOutput, got {type(b).__name__}")
    problems = []
    for name in ("source", "target"):
        if len(getattr(a, name)) != len(getattr(b, name)):
            problems.append(f"{name} lengths differ ({len(getattr(a, name))} vs {len(getattr(b, name))} tokens)")
    if (a.attr_pos_start, a.attr_pos_end) != (b.attr_pos_start, b.attr_pos_end):
        problems.append(f"attributed steps differ ([{a.attr_pos_start}, {a.attr_pos_end}) vs [{b.attr_pos_start}, {b.attr_pos_end}))")
    for name in ("source_attributions", "target_attributions"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None):
            problems.append(f"{name} is None on one side only")
        elif x is not None and x.shape != y.shape:
            problems.append(f"{name} shapes differ ({tuple(x.shape)} vs {tuple(y.shape)})")
    for name in ("step_scores", "sequence_scores"):
        x, y = getattr(a, name), getattr(b, name)
        if set(x) != set(y):
            problems.append(f"{name} names differ ({sorted(x)} vs {sorted(y)})")
        else:
            problems += [f"{name}[{k!r}] shapes differ ({tuple(x[k].shape)} vs {tuple(y[k].shape)})" for k in x if x[k].shape != y[k].shape]
    if problems:
        raise ValueError("Cannot pair these attributions (minimal pairs need equal shapes): " + "; ".join(problems))


def _pair_tokens(a: Sequence[TokenWithId], b: Sequence[TokenWithId]) -> list[TokenWithId]:
    return [x if x == y else TokenWithId(f"{x.token} → {y.token}", -1) for x, y in zip(a, b)]


def pair(seq, aggregate_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], paired_attr=None):
    """`seq.aggregate("pair", paired_attr=other)` is `other - seq` on every tensor (`aggregate_fn(seq, other)`)."""
    if paired_attr is None:
        raise ValueError("The pair aggregator needs paired_attr=<the other FeatureAttributionSequenceOutput>")
    _check_pair(seq, paired_attr)

    def combine(x, y):
        return None if x is None else aggregate_fn(x, y)

    return _replace(
        seq,
        source=_pair_tokens(seq.source, paired_attr.source),
        target=_pair_tokens(seq.target, paired_attr.target),
        source_attributions=combine(seq.source_attributions, paired_attr.source_attributions),
        target_attributions=combine(seq.target_attributions, paired_attr.target_attributions),
        step_scores={k: combine(v, paired_attr.step_scores[k]) for k, v in seq.step_scores.items()},
        sequence_scores={k: combine(v, paired_attr.sequence_scores[k]) for k, v in seq.sequence_scores.items()},
    )


# -- registry and entry points -----------------------------------------------------------------


@dataclass(frozen=True)
class Aggregator:
    name: str
    fn: Callable[..., FeatureAttributionSequenceOutput]
    default_fn: Any
    params: tuple[str, ...]


_AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(fn: Callable[..., FeatureAttributionSequenceOutput], name: str, default_fn: Any = None,
                        overwrite: bool = False) -> None:
    """Make `fn(seq, aggregate_fn, **options) -> FeatureAttributionSequenceOutput` usable as `aggregator=name`.

    >>> register_aggregator(lambda seq, aggregate_fn: seq, "identity")
    """
    if name in _AGGREGATORS and not overwrite:
        raise ValueError(f"Aggregator {name!r} exists already; pass overwrite=True to replace it")
    params = tuple(list(inspect.signature(fn).parameters)[2:])
    _AGGREGATORS[name] = Aggregator(name, fn, default_fn, params)


for _fn, _default in [(scores, "vnorm"), (spans, "absmax"), (subwords, "absmax"), (split, "absmax"),
                      (slices, None), (pair, difference)]:
    register_aggregator(_fn, _fn.__name__, _default)


def list_aggregators() -> list[str]:
    """Names accepted as `aggregator`: `["scores", "spans", "subwords", "split", "slices", "pair"]` and registered ones."""
    return list(_AGGREGATORS)


def _pipeline(aggregator, aggregate_fn) -> list[tuple[Aggregator, Any]]:
    """The (aggregator, function) steps of `aggregator`, spelled as Inseq takes it.

    An aggregation function's name stands for "scores" with that function (`"vnorm"`); a list mixes
    both (`["vnorm", "subwords"]`) or holds `(aggregator, function)` pairs (`[("scores", "sum")]`).
    """
    names = ["scores"] if aggregator is None else [aggregator] if isinstance(aggregator, str) else list(aggregator)
    if not names:
        raise ValueError("aggregator is an empty list")
    if isinstance(aggregator, str) and isinstance(aggregate_fn, (list, tuple)):
        raise ValueError("With a single aggregator, aggregate_fn must be a single function (or its name), not a list")
    if isinstance(aggregate_fn, (list, tuple)):
        if len(aggregate_fn) != len(names):
            raise ValueError(f"{len(aggregate_fn)} aggregate functions for {len(names)} aggregators {names}; give one per aggregator")
        fns = list(aggregate_fn)
    else:
        fns = [aggregate_fn] * len(names)
    steps = []
    for name, fn in zip(names, fns):
        if isinstance(name, (list, tuple)):
            if len(name) != 2 or fn is not None:
                raise ValueError(f"Pipeline steps are aggregator names or (aggregator, aggregate_fn) pairs, got {name!r}"
                                 + (" together with aggregate_fn" if fn is not None else ""))
            name, fn = name
        if not isinstance(name, str):
            raise TypeError(f"Aggregators are given by name, got {type(name).__name__}")
        if name not in _AGGREGATORS and name in _FUNCTIONS:
            if fn is not None:
                raise ValueError(f"{name!r} is an aggregation function used as aggregator (\"scores\" with {name!r}); "
                                 "do not pass aggregate_fn with it")
            name, fn = "scores", name
        if name not in _AGGREGATORS:
            raise ValueError(f"Unknown aggregator {name!r}. Available: {', '.join(_AGGREGATORS)}; "
                             f"or an aggregation function for \"scores\": {', '.join(_FUNCTIONS)}")
        agg = _AGGREGATORS[name]
        fn = agg.default_fn if fn is None else fn
        if name == "pair" and isinstance(fn, str):
            raise ValueError("The pair aggregator takes a function of two tensors, e.g. lambda a, b: b - a")
        steps.append((agg, fn if name in ("pair", "slices") or fn is None else get_aggregation_function(fn)))
    return steps


def accepts(aggregator, option: str) -> bool:
    """Whether some aggregator of the pipeline `aggregator` takes keyword `option`."""
    if isinstance(aggregator, (list, tuple)) and not aggregator:
        return False
    return any(option in agg.params for agg, _ in _pipeline(aggregator, None))


# Options every aggregator takes, as Inseq passes them down a pipeline; only "scores" uses them.
SHARED_OPTIONS = ("normalize", "rescale")


def aggregate_sequence(seq: FeatureAttributionSequenceOutput, aggregator=None, aggregate_fn=None, **kwargs):
    """`aggregate_sequence(seq, ["subwords", "scores"], ["absmax", "vnorm"])`: the aggregators in order."""
    if aggregator is None:
        aggregator = getattr(seq, "_aggregator", None)
    if isinstance(aggregator, (list, tuple)) and not aggregator and aggregate_fn is None:
        return _replace(seq)  # an empty pipeline, as left by `weight_attributions`: nothing to do
    steps = _pipeline(aggregator, aggregate_fn)
    if kwargs.get("normalize") and kwargs.get("rescale"):
        raise ValueError("Pass either normalize=True or rescale=True, not both")
    unknown = set(kwargs) - {p for agg, _ in steps for p in agg.params} - set(SHARED_OPTIONS)
    if unknown:
        raise TypeError(f"Unknown option(s) {sorted(unknown)} for aggregator(s) {[agg.name for agg, _ in steps]}")
    for agg, fn in steps:
        seq = agg.fn(seq, fn, **{k: v for k, v in kwargs.items() if k in agg.params})
    return seq


def aggregate_output(out: FeatureAttributionOutput, aggregator=None, aggregate_fn=None, **kwargs) -> FeatureAttributionOutput:
    """`aggregate_output(out, "subwords")`: every sequence aggregated; `paired_attr` may be a whole output."""
    if "logprob" not in kwargs and accepts(aggregator, "logprob"):
        kwargs["logprob"] = bool((out.info.get("step_scores_args") or {}).get("logprob", False))
    paired = kwargs.pop("paired_attr", None)
    if isinstance(paired, FeatureAttributionOutput):
        if len(paired) != len(out):
            raise ValueError(f"Cannot pair {len(out)} sequences with {len(paired)}: give outputs of the same length")
        pairs = paired.sequence_attributions
    else:
        pairs = [paired] * len(out)
    sequences = [
        aggregate_sequence(seq, aggregator, aggregate_fn, **kwargs, **({} if other is None else {"paired_attr": other}))
        for seq, other in zip(out.sequence_attributions, pairs)
    ]
    return FeatureAttributionOutput(sequences, step_attributions=out.step_attributions, info=dict(out.info))


PER_EXAMPLE_INFO = ("input_texts", "generated_texts")  # one entry per sequence: concatenated when merging
RUNTIME_INFO = ("exec_time",)  # measured, not chosen: summed when merging, ignored by `equals`


def merge_attributions(outputs: Sequence[FeatureAttributionOutput]) -> FeatureAttributionOutput:
    """`merge_attributions([out1, out2])`: all their sequences, in order, with merged `info`.

    In `info`, per-example lists (`input_texts`, `generated_texts`) are concatenated, `exec_time` is
    summed, values equal in all outputs are kept, and any other key (e.g. `step_scores` when the outputs
    computed different ones) gets the list of per-output values, None where an output lacks the key.
    """
    outputs = list(outputs)
    if not outputs:
        raise ValueError("merge_attributions needs at least one FeatureAttributionOutput")
    for item in outputs:
        if not isinstance(item, FeatureAttributionOutput):
            raise TypeError(f"merge_attributions takes FeatureAttributionOutput objects, got {type(item).__name__}")
    info: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for item in outputs for k in item.info))
    for key in keys:
        values = [item.info.get(key) for item in outputs]
        present = [key in item.info for item in outputs]
        if key in PER_EXAMPLE_INFO and all(present) and all(isinstance(v, list) for v in values):
            info[key] = [x for v in values for x in v]
        elif key in RUNTIME_INFO and all(isinstance(v, (int, float)) for v in values):
            info[key] = sum(values)
        elif all(present) and all(_same(v, values[0]) for v in values):
            info[key] = values[0]
        else:
            info[key] = values
    steps = [item.step_attributions for item in outputs]
    step_attributions = None if all(s is None for s in steps) else (
        [x for s in steps for x in s] if all(isinstance(s, list) for s in steps) else steps)
    return FeatureAttributionOutput([s for item in outputs for s in item.sequence_attributions], step_attributions, info)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else isinstance(b, torch.Tensor) and torch.equal(a, b)
    except Exception:
        return a is b
