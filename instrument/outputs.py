"""Attribution results, shaped as Inseq's: `[attributed tokens, generated tokens(, layers)(, hidden)]`.

    >>> out = model.attribute("Hello world", "Hello world, how are you?")
    >>> seq = out.sequence_attributions[0]
    >>> seq.target_attributions.shape  # [len(target), len(target) - attr_pos_start, hidden]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TokenWithId:
    """A token string with its vocabulary id.

    >>> TokenWithId("▁world", 1017)
    """

    token: str
    id: int

    def __str__(self) -> str:
        return self.token


@dataclass(eq=False)
class FeatureAttributionSequenceOutput:
    """Attributions of one example.

    Rows of `source_attributions` are source tokens, of `target_attributions` target tokens (for a
    decoder-only model the prompt is part of the target); columns are the attributed steps
    `attr_pos_start .. attr_pos_end - 1` of the target. Positions a step cannot see are NaN.
    `step_scores` maps a step function's name to one value per attributed step.
    """

    source: list[TokenWithId]
    target: list[TokenWithId]
    source_attributions: torch.Tensor | None
    target_attributions: torch.Tensor | None
    step_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    sequence_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    attr_pos_start: int = 0
    attr_pos_end: int = 0

    @property
    def generated(self) -> list[TokenWithId]:
        """The target tokens that were attributed (one per column)."""
        return self.target[self.attr_pos_start : self.attr_pos_end]

    # -- aggregation (instrument.aggregation) ---------------------------------------------------

    def aggregate(self, aggregator: Any = None, aggregate_fn: Any = None, **kwargs) -> FeatureAttributionSequenceOutput:
        """A new, aggregated copy; see `instrument.aggregation` for the aggregators.

            >>> seq.aggregate(["subwords", "scores"])   # default: "scores" (vnorm over hidden, normalized)
        """
        from instrument.aggregation import aggregate_sequence

        return aggregate_sequence(self, aggregator, aggregate_fn, **kwargs)

    def __getitem__(self, index: int | slice) -> FeatureAttributionSequenceOutput:
        """`seq[2:5]`: the "slices" aggregator over source positions (target positions for decoder-only).

        Generated tokens and their columns are always kept; see `instrument.aggregation.slices`.
        """
        if isinstance(index, bool) or not isinstance(index, (int, slice)):
            raise TypeError(f"Index with an int or a slice, got {type(index).__name__}")
        side = "source" if self.source_attributions is not None else "target"  # decoder-only: slice the prompt
        length = len(getattr(self, side))
        if isinstance(index, int):
            position = index + length if index < 0 else index
            if not 0 <= position < length:
                raise IndexError(f"{side} index {index} out of range for {length} tokens")
            start, stop = position, position + 1
        else:
            start, stop, step = index.indices(length)
            if step != 1:
                raise ValueError("Slices with a step are not supported")
            if start >= stop:
                raise ValueError(f"Empty slice {index} of the {side} ({length} tokens)")
        return self.aggregate("slices", **{f"{side}_spans": (start, stop)})

    def __sub__(self, other: Any) -> FeatureAttributionSequenceOutput:
        """`a - b`: the "pair" aggregator, elementwise a minus b (shapes must match)."""
        if not isinstance(other, FeatureAttributionSequenceOutput):
            return NotImplemented
        return other.aggregate("pair", paired_attr=self)

    # -- saving and equality (instrument.serialization) -----------------------------------------

    def equals(self, other: Any, rtol: float = 0.0, atol: float = 0.0) -> bool:
        """Same tokens, positions and tensors (NaN equals NaN; exact unless rtol/atol are given)."""
        from instrument.serialization import sequences_equal

        return sequences_equal(self, other, rtol, atol)

    def save(self, path, scores_precision: str = "float32", overwrite: bool = False):
        """Saves this sequence as a one-sequence FeatureAttributionOutput (see `FeatureAttributionOutput.save`)."""
        from instrument.serialization import save

        return save(self, path, scores_precision=scores_precision, overwrite=overwrite)

    # -- views (instrument.visualization) -------------------------------------------------------

    def show(self, return_html: bool = False, aggregate: Any = True, display: bool = True,
             step_score_highlight: str | None = None, console: Any = None, **kwargs) -> str | None:
        """Heatmap of this example in the console, or its HTML with `return_html=True`.

            >>> seq.show(step_score_highlight="probability")
        """
        from instrument.visualization import show

        return show(self, return_html, aggregate, display, step_score_highlight, console, **kwargs)

    def save_html(self, path, overwrite: bool = False, **kwargs):
        """Writes `show(return_html=True)` as a standalone HTML page."""
        from instrument.visualization import save_html

        return save_html(self, path, overwrite=overwrite, **kwargs)

    def _repr_html_(self) -> str:
        from instrument.visualization import repr_html

        return repr_html(self)


@dataclass(eq=False)
class FeatureAttributionStepOutput:
    """One generation step of every example (`attribute(..., output_step_attributions=True)`), as Inseq's.

    Tensors are stacked over examples: `source_attributions` `[examples, source_len(, ...)]`,
    `target_attributions` `[examples, prefix_len(, ...)]` (NaN-padded), `step_scores[name]` `[examples]`;
    `source`, `prefix` (target tokens before the step) and `target` (the step's token) are per example.
    """

    source_attributions: torch.Tensor | None = None
    target_attributions: torch.Tensor | None = None
    step_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    sequence_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    source: list[list[TokenWithId]] | None = None
    prefix: list[list[TokenWithId]] | None = None
    target: list[list[TokenWithId]] | None = None


@dataclass(eq=False)
class FeatureAttributionOutput:
    """One `FeatureAttributionSequenceOutput` per example, plus `info` on how they were made.

    >>> out.info["attribution_method"], len(out.sequence_attributions)
    """

    sequence_attributions: list[FeatureAttributionSequenceOutput]
    step_attributions: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequence_attributions)

    def __getitem__(self, index: int) -> FeatureAttributionSequenceOutput:
        return self.sequence_attributions[index]

    def aggregate(self, aggregator: Any = None, aggregate_fn: Any = None, **kwargs) -> FeatureAttributionOutput:
        """Every sequence aggregated (a new output; `info` copied); see `instrument.aggregation`.

            >>> out.aggregate("subwords").aggregate()   # words, then one normalized score per word
        """
        from instrument.aggregation import aggregate_output

        return aggregate_output(self, aggregator, aggregate_fn, **kwargs)

    def __sub__(self, other: Any) -> FeatureAttributionOutput:
        """`a - b`: sequence by sequence differences (the "pair" aggregator)."""
        if not isinstance(other, FeatureAttributionOutput):
            return NotImplemented
        return other.aggregate("pair", paired_attr=self)

    def equals(self, other: Any, rtol: float = 0.0, atol: float = 0.0, check_info: bool = True) -> bool:
        """Equal sequences (see `FeatureAttributionSequenceOutput.equals`) and `info` equal as saved."""
        from instrument.serialization import outputs_equal

        return outputs_equal(self, other, rtol, atol, check_info)

    def save(self, path, scores_precision: str = "float32", overwrite: bool = False):
        """Saves to `.safetensors` (default) or `.json`; see `instrument.serialization`.

            >>> out.save("attributions.safetensors", scores_precision="float16")
        """
        from instrument.serialization import save

        return save(self, path, scores_precision=scores_precision, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> FeatureAttributionOutput:
        """Reads a file written by `save`; raises ValueError for a corrupted or foreign file.

            >>> out = FeatureAttributionOutput.load("attributions.safetensors")
        """
        from instrument.serialization import load

        return load(path)

    def show(self, return_html: bool = False, aggregate: Any = True, display: bool = True,
             step_score_highlight: str | None = None, console: Any = None, **kwargs) -> str | None:
        """One heatmap per example in the console, or their HTML with `return_html=True`.

            >>> out.show()                         # rich tables; see instrument.visualization
        """
        from instrument.visualization import show

        return show(self, return_html, aggregate, display, step_score_highlight, console, **kwargs)

    def save_html(self, path, overwrite: bool = False, **kwargs):
        """Writes `show(return_html=True)` as a standalone HTML page."""
        from instrument.visualization import save_html

        return save_html(self, path, overwrite=overwrite, **kwargs)

    def _repr_html_(self) -> str:
        from instrument.visualization import repr_html

        return repr_html(self)
