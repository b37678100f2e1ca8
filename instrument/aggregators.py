"""Aggregators: reduce, merge, slice and compare attributions, with Inseq's `aggregate` semantics.

    out.aggregate()                                         # "scores": L2 norm over hidden, normalized per step
    out.aggregate(["subwords", "scores"])                   # whole words, then one score per word
    seq.aggregate("spans", source_spans=[(0, 3)], aggregate_fn="sum")
    seq.aggregate("split", split_pattern=".")               # one span per sentence
    seq[2:5]                                                # "slices": keep source (or prompt) tokens 2..4
    seq_a - seq_b                                           # "pair": elementwise a - b

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
  generated ones, their columns; step scores of merged columns combine as their step function's
  `aggregate_map` says (see `instrument.spans.step_score_function`).
  Tokens outside any span are kept as they are; merged tokens are labelled
  with their concatenated strings and id -1. Rows are merged first, then columns.
- `subwords`: `spans` over the words found from subword markers (see `instrument.spans.word_spans`).
- `split`: `spans` ending at every token matching `split_pattern` (a literal string, or a compiled regex).
- `slices`: keeps only the source tokens in `source_spans`, or the prompt (pre-generation) target tokens
  in `target_spans`; generated tokens, columns and step scores are always kept.
- `pair`: `attr.aggregate("pair", paired_attr=other)` is `other - attr` elementwise (as in Inseq), also
  written `other - attr`; shapes must match. Differing tokens are labelled `"attr → other"`.

Aggregation functions (`aggregate_fn`) are those of `instrument.reductions`, which ignore NaN.
`instrument.aggregation` registers these aggregators and runs pipelines of them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import torch

from instrument.outputs import FeatureAttributionSequenceOutput, TokenWithId, copy_replace
from instrument.reductions import (
    AggregationFunction,
    get_aggregation_function,
    nan_max,
    nan_sum,
)
from instrument.spans import (
    MARKER_CHARS,
    detect_marker,
    kept_positions,
    merge_groups,
    singletons,
    spans_to_groups,
    split_spans,
    word_spans,
)


def _reduce_columns(src, tgt, how: str):
    """Per-column denominators over all rows of source and target: sum of |x| or max |x|, NaN ignored."""
    parts = [t.abs() for t in (src, tgt) if t is not None]
    if how == "sum":
        return sum(nan_sum(p, 0).nan_to_num(nan=0.0) for p in parts)
    return torch.stack([nan_max(p, 0).nan_to_num(nan=0.0) for p in parts]).amax(0)


def scores(
    seq,
    aggregate_fn: AggregationFunction,
    normalize: bool | None = None,
    rescale: bool = False,
    keep_layers: bool = True,
    layer_fn: str | AggregationFunction | None = None,
):
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
    return copy_replace(seq, source_attributions=src, target_attributions=tgt)


def spans(
    seq,
    aggregate_fn: AggregationFunction,
    source_spans=None,
    target_spans=None,
    logprob: bool = False,
    step_score_fns: dict[str, Any] | None = None,
):
    """`seq.aggregate("spans", source_spans=[(0, 2)], target_spans=(3, 5))`: merges contiguous spans."""
    return merge_groups(
        seq,
        spans_to_groups(source_spans, len(seq.source), "source"),
        spans_to_groups(target_spans, len(seq.target), "target"),
        aggregate_fn,
        "spans",
        logprob,
        step_score_fns,
    )


def subwords(
    seq,
    aggregate_fn: AggregationFunction,
    special_chars: str | Sequence[str] | None = None,
    marker: str | None = None,
    is_suffix_symbol: bool = False,
    special_tokens: Iterable[str] | None = None,
    aggregate_source: bool = True,
    aggregate_target: bool = True,
    logprob: bool = False,
    step_score_fns: dict[str, Any] | None = None,
):
    """`seq.aggregate("subwords")`: merges subword tokens into words (see `word_spans`).

    By default the marker is detected from the tokens (`▁`/`Ġ` word starts, `##` continuations, `</w>`
    word ends; nothing is merged when none is found). `special_chars=("##",), is_suffix_symbol=True`
    (Inseq's spelling) or `marker="continuation"` choose explicitly.
    """
    special_tokens = None if special_tokens is None else set(special_tokens)
    if special_chars is None and marker is None and not is_suffix_symbol:
        found = detect_marker([t.token for t in [*seq.source, *seq.target]], special_tokens)
        if found is None:
            return copy_replace(seq)
        marker, special_chars = found
    marker = marker or ("continuation" if is_suffix_symbol else "word_start")
    if special_chars is None:
        special_chars = MARKER_CHARS[marker]

    def words(tokens):
        return word_spans(tokens, marker, special_chars, special_tokens)

    return _merge_found(
        seq, words, "subwords", aggregate_fn, aggregate_source, aggregate_target, logprob, step_score_fns
    )


def split(
    seq,
    aggregate_fn: AggregationFunction,
    split_pattern: str | re.Pattern | None = None,
    aggregate_source: bool = True,
    aggregate_target: bool = True,
    logprob: bool = False,
    step_score_fns: dict[str, Any] | None = None,
):
    """`seq.aggregate("split", split_pattern=re.compile(r"[.!?]"))`: one span per sentence.

    A plain string is matched literally inside token strings; a compiled regex is searched.
    """
    if split_pattern is None or split_pattern == "":
        raise ValueError("The split aggregator needs split_pattern=<string or compiled regex>")
    if not isinstance(split_pattern, (str, re.Pattern)):
        raise TypeError(f"split_pattern must be a string or a compiled regex, got {type(split_pattern).__name__}")

    def sentences(tokens):
        return split_spans(tokens, split_pattern)

    return _merge_found(
        seq, sentences, "split", aggregate_fn, aggregate_source, aggregate_target, logprob, step_score_fns
    )


def _merge_found(seq, find, name, aggregate_fn, aggregate_source, aggregate_target, logprob, step_score_fns):
    """`merge_groups` over the groups `find(tokens)` gives on each enabled side (single tokens elsewhere)."""

    def groups(tokens, enabled):
        return find(tokens) if enabled else singletons(len(tokens))

    source, target = groups(seq.source, aggregate_source), groups(seq.target, aggregate_target)
    return merge_groups(seq, source, target, aggregate_fn, name, logprob, step_score_fns)


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
            raise ValueError(
                "This output has no source attributions (decoder-only model): slice the prompt with "
                "target_spans, or seq[a:b]"
            )
        keep = kept_positions(source_spans, len(seq.source), "source")
        changes["source"] = [seq.source[i] for i in keep]
        changes["source_attributions"] = _rows(seq.source_attributions, keep)
        changes["sequence_scores"] = {
            name: _rows(v, keep) if v.dim() >= 1 and v.shape[0] == len(seq.source) else v
            for name, v in seq.sequence_scores.items()
        }
    if target_spans is not None:
        prompt = [i for i in kept_positions(target_spans, len(seq.target), "target") if i < seq.attr_pos_start]
        keep = prompt + list(range(seq.attr_pos_start, len(seq.target)))
        changes["target"] = [seq.target[i] for i in keep]
        if seq.source_attributions is None and seq.source and source_spans is None:  # decoder-only: the prompt
            changes["source"] = [seq.source[i] for i in prompt if i < len(seq.source)]
        changes["target_attributions"] = _rows(seq.target_attributions, keep)
        changes["attr_pos_start"] = len(prompt)
        changes["attr_pos_end"] = len(prompt) + seq.attr_pos_end - seq.attr_pos_start
    return copy_replace(seq, **changes)


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
        problems.append(
            f"attributed steps differ ([{a.attr_pos_start}, {a.attr_pos_end}) vs "
            f"[{b.attr_pos_start}, {b.attr_pos_end}))"
        )
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
            problems += [
                f"{name}[{k!r}] shapes differ ({tuple(x[k].shape)} vs {tuple(y[k].shape)})"
                for k in x
                if x[k].shape != y[k].shape
            ]
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

    return copy_replace(
        seq,
        source=_pair_tokens(seq.source, paired_attr.source),
        target=_pair_tokens(seq.target, paired_attr.target),
        source_attributions=combine(seq.source_attributions, paired_attr.source_attributions),
        target_attributions=combine(seq.target_attributions, paired_attr.target_attributions),
        step_scores={k: combine(v, paired_attr.step_scores[k]) for k, v in seq.step_scores.items()},
        sequence_scores={k: combine(v, paired_attr.sequence_scores[k]) for k, v in seq.sequence_scores.items()},
    )
