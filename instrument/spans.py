"""Spans: which tokens go together (given spans, words, sentences), and merging them in an output.

    spans_to_groups([(1, 3)], 5, "source")                  # [(0, 1), (1, 3), (3, 4), (4, 5)]
    word_spans(["▁H", "ello", "▁world"])                     # [(0, 2), (2, 3)]
    merge_groups(seq, word_spans(seq.source), word_spans(seq.target), absmax)

A group is a `(start, end)` pair (end excluded); a list of groups partitions the tokens. Merging a
target group merges its rows and, for the generated tokens, its columns; the step scores of merged
columns combine as their step function's `aggregate_map` says (see `step_score_function`).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch

from instrument.outputs import FeatureAttributionSequenceOutput, TokenWithId, copy_replace
from instrument.reductions import AggregationFunction, get_aggregation_function
from instrument.steps import get_step_function

Span = tuple[int, int]

# -- groups from spans ---------------------------------------------------------------------------


def singletons(n: int) -> list[Span]:
    """`singletons(3) == [(0, 1), (1, 2), (2, 3)]`: every token on its own."""
    return [(i, i + 1) for i in range(n)]


def spans_to_groups(spans: Any, n: int, what: str) -> list[Span]:
    """`spans_to_groups([(1, 3)], 5, "source") == [(0, 1), (1, 3), (3, 4), (4, 5)]`: a partition of range(n)."""
    if spans is None or (isinstance(spans, (list, tuple)) and len(spans) == 0):
        return singletons(n)
    spans = (
        [spans]
        if isinstance(spans, (list, tuple)) and len(spans) == 2 and all(isinstance(v, int) for v in spans)
        else spans
    )
    groups, position = [], 0
    for span in spans:
        if not (
            isinstance(span, (list, tuple))
            and len(span) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
        ):
            raise ValueError(f"{what} spans must be (start, end) pairs of integers, got {span!r}")
        start, end = span
        if not 0 <= start < end <= n:
            raise ValueError(f"{what} span {tuple(span)} is out of range: need 0 <= start < end <= {n} ({what} length)")
        if start < position:
            raise ValueError(f"{what} spans must be sorted and must not overlap, got {list(spans)!r}")
        groups += singletons(start)[position:] + [(start, end)]
        position = end
    return groups + [(i, i + 1) for i in range(position, n)]


def kept_positions(spans: Any, n: int, what: str) -> list[int]:
    """`kept_positions([(1, 3)], 5, "source") == [1, 2]`: the positions inside `spans` (validated as by
    `spans_to_groups`), in order."""
    groups = spans_to_groups(spans, n, what)
    wanted = [spans] if len(spans) == 2 and all(isinstance(v, int) for v in spans) else spans
    wanted = {tuple(span) for span in wanted}
    return [i for a, b in groups if (a, b) in wanted for i in range(a, b)]


def split_spans(tokens: Sequence[TokenWithId], pattern: str | re.Pattern) -> list[Span]:
    """`split_spans(tokens_of("A b. C d."), ".")`: groups that end at each token matching `pattern`."""
    regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
    groups, start = [], 0
    for i, token in enumerate(tokens):
        if regex.search(token.token):
            groups.append((start, i + 1))
            start = i + 1
    return groups + ([(start, len(tokens))] if start < len(tokens) else [])


# -- groups from subword markers -------------------------------------------------------------------

WORD_START_CHARS = ("▁", "Ġ")  # SentencePiece and byte-level BPE: the token starts a new word
CONTINUATION_CHARS = ("##",)  # WordPiece: the token continues the previous word
WORD_END_CHARS = ("</w>",)  # BPE with end-of-word suffixes: the token ends a word
MARKER_CHARS = {"word_start": WORD_START_CHARS, "continuation": CONTINUATION_CHARS, "word_end": WORD_END_CHARS}
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
    if marker not in MARKER_CHARS:
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


def detect_marker(
    tokens: Iterable[str], special_tokens: Iterable[str] | None = None
) -> tuple[str, tuple[str, ...]] | None:
    """`detect_marker(["▁H", "ello"]) == ("word_start", ("▁", "Ġ"))`; None when no subword marker is found."""
    texts = [t for t in tokens if not _is_special(t, special_tokens)]
    if any(t.startswith(WORD_START_CHARS) for t in texts):
        return "word_start", WORD_START_CHARS
    if any(t.startswith(CONTINUATION_CHARS) for t in texts):
        return "continuation", CONTINUATION_CHARS
    if any(t.endswith(WORD_END_CHARS) for t in texts):
        return "word_end", WORD_END_CHARS
    return None


# -- merging groups ------------------------------------------------------------------------------

# Step scores that come from no step function: the convergence deltas of path methods, as a step
# function's `aggregate_map` would say it.
OTHER_STEP_SCORES = {"deltas": {"spans": "absmax"}}


def step_score_function(
    name: str, aggregator: str = "spans", logprob: bool = False, overrides: dict[str, Any] | None = None
) -> AggregationFunction:
    """`step_score_function("probability")` is `nan_prod`: how merged steps of score `name` combine.

    `overrides` ({name: function}, the aggregators' `step_score_fns`) comes first, then the step
    function's `aggregate_map`: its "logprob" entry when the scores are log-probabilities
    (`attribute(..., logprob=True)`), else its entry for `aggregator`, else its "spans" entry, else "mean".
    """
    if overrides and name in overrides:
        return get_aggregation_function(overrides[name])
    try:
        mapping = get_step_function(name).aggregate_map or {}
    except ValueError:
        mapping = OTHER_STEP_SCORES.get(name, {})
    chosen = (logprob and mapping.get("logprob")) or mapping.get(aggregator) or mapping.get("spans") or "mean"
    return get_aggregation_function(chosen)


def _merge_dim(
    t: torch.Tensor | None, groups: Sequence[Span], dim: int, fn: AggregationFunction
) -> torch.Tensor | None:
    """Merges each group `(a, b)` of positions along `dim` with `fn`; single positions are copied."""
    if t is None:
        return None
    if all(b - a == 1 for a, b in groups) and len(groups) == t.shape[dim]:
        return t
    parts = [
        t.narrow(dim, a, b - a) if b - a == 1 else fn(t.narrow(dim, a, b - a), dim).unsqueeze(dim) for a, b in groups
    ]
    return torch.cat(parts, dim)


def _merge_tokens(tokens: Sequence[TokenWithId], groups: Sequence[Span]) -> list[TokenWithId]:
    return [tokens[a] if b - a == 1 else TokenWithId("".join(t.token for t in tokens[a:b]), -1) for a, b in groups]


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
        name: both(values, source_groups)
        if values.dim() >= 2
        and values.shape[0] == len(seq.source)
        and values.shape[1] == seq.attr_pos_end - seq.attr_pos_start
        else values
        for name, values in seq.sequence_scores.items()
    }
    return copy_replace(
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
