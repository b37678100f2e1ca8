"""Attribution results, shaped as Inseq's: `[attributed tokens, generated tokens(, layers)(, hidden)]`.

out = model.attribute("Hello world", "Hello world, how are you?")
seq = out.sequence_attributions[0]
seq.target_attributions.shape  # [len(target), len(target) - attr_pos_start, hidden]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from instrument.view_methods import Views

RUNTIME_INFO = ("exec_time",)  # `info` measured, not chosen: summed by `merge_attributions`, ignored by `equals`


def copy_replace(obj: Any, **changes) -> Any:
    """`copy_replace(seq, source=tokens)`: `dataclasses.replace`, with the lists and dicts it keeps copied (not
    shared)."""
    kept = {f.name: getattr(obj, f.name) for f in fields(obj) if f.init and f.name not in changes}
    return replace(obj, **{k: copy.copy(v) if isinstance(v, (list, dict)) else v for k, v in kept.items()}, **changes)


@dataclass(frozen=True)
class TokenWithId:
    """A token string with its vocabulary id.

    TokenWithId("▁world", 1017)
    """

    token: str
    id: int

    def __str__(self) -> str:
        return self.token


@dataclass(eq=False)
class FeatureAttributionSequenceOutput(Views):
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
    # The pipeline `aggregate()` runs by default (None: "scores"); `weight_attributions` sets [] (none).
    _aggregator: Any = field(default=None, repr=False)

    @property
    def generated(self) -> list[TokenWithId]:
        """The target tokens that were attributed (one per column)."""
        return self.target[self.attr_pos_start : self.attr_pos_end]

    # -- aggregation (instrument.aggregators) ---------------------------------------------------

    def aggregate(self, aggregator: Any = None, aggregate_fn: Any = None, **kwargs) -> FeatureAttributionSequenceOutput:
        """A new, aggregated copy; see `instrument.aggregators`.

        seq.aggregate(["subwords", "scores"])   # default: "scores" (vnorm over hidden, normalized)
        """
        from instrument.aggregation import aggregate_sequence

        return aggregate_sequence(self, aggregator, aggregate_fn, **kwargs)

    def __getitem__(self, index: int | slice) -> FeatureAttributionSequenceOutput:
        """`seq[2:5]`: the "slices" aggregator (`instrument.aggregators.slices`) over source positions (target
        positions without source attributions, as for decoder-only models); generated tokens are always kept."""
        if isinstance(index, bool) or not isinstance(index, (int, slice)):
            raise TypeError(f"Index with an int or a slice, got {type(index).__name__}")
        side = "source" if self.source_attributions is not None else "target"
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

    # -- values --------------------------------------------------------------------------------

    @property
    def minimum(self) -> float:
        """The smallest attribution score, or 0 if none is below 0 (NaN counted as 0), as in Inseq."""
        return min([0.0] + [float(torch.nan_to_num(t).min()) for t in self._attribution_tensors()])

    @property
    def maximum(self) -> float:
        """The largest attribution score, or 0 if none is above 0 (NaN counted as 0), as in Inseq."""
        return max([0.0] + [float(torch.nan_to_num(t).max()) for t in self._attribution_tensors()])

    def _attribution_tensors(self) -> list[torch.Tensor]:
        tensors = [torch.as_tensor(t) for t in (self.source_attributions, self.target_attributions) if t is not None]
        return [t for t in tensors if t.numel() > 0]

    def _map_tensors(self, fn) -> FeatureAttributionSequenceOutput:
        for name in ("source_attributions", "target_attributions"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        for name in ("step_scores", "sequence_scores"):
            setattr(self, name, {k: fn(v) for k, v in getattr(self, name).items()})
        return self

    def to(self, *args, **kwargs) -> FeatureAttributionSequenceOutput:
        """In place, like Inseq: every tensor `.to(*args, **kwargs)` (a device or a dtype); returns self."""
        return self._map_tensors(lambda t: t.to(*args, **kwargs) if isinstance(t, torch.Tensor) else t)

    def numpy(self) -> FeatureAttributionSequenceOutput:
        """In place, like Inseq: every tensor becomes a numpy array (moved to the CPU); returns self."""
        return self._map_tensors(
            lambda t: np.ascontiguousarray(t.detach().cpu().numpy()) if isinstance(t, torch.Tensor) else t
        )

    def torch(self) -> FeatureAttributionSequenceOutput:
        """In place: numpy arrays (from `numpy()`) become tensors again; returns self."""
        return self._map_tensors(lambda t: torch.from_numpy(np.array(t)) if isinstance(t, np.ndarray) else t)

    def weight_attributions(self, step_score_id: str) -> FeatureAttributionSequenceOutput:
        """In place, like Inseq: attributions aggregated (default pipeline), then each step's column times
        that step's `step_scores[step_score_id]`; `aggregate()` then does nothing more. Returns self.

            seq.weight_attributions("probability")
        """
        if step_score_id not in self.step_scores:
            raise ValueError(f"No step score {step_score_id!r} to weight by; available: {sorted(self.step_scores)}")
        weights = self.step_scores[step_score_id].float()
        aggregated = self.aggregate()
        for name in ("source_attributions", "target_attributions"):
            value = getattr(aggregated, name)
            if value is not None:
                value = value.float()
                setattr(self, name, value * weights.to(value.device).view(1, -1, *[1] * (value.dim() - 2)))
        self._aggregator = []
        return self

    def get_scores_dicts(self, aggregator: Any = None, do_aggregation: bool = True, **kwargs) -> dict[str, dict]:
        """Scores as nested dicts keyed by `(position, token)`, as Inseq's (e.g. for `pandas.DataFrame`).

            seq.get_scores_dicts()["source_attributions"][(6, ",")][(0, "H")]   # score of "H" for ","

        Keys: "source_attributions" and "target_attributions" ({generated: {attributed: score}}; target
        rows up to `attr_pos_end`) and "step_scores" ({generated: {name: score}}).
        """
        aggregated = self.aggregate(aggregator, **kwargs) if do_aggregation else self
        for name in ("source_attributions", "target_attributions"):
            value = getattr(aggregated, name)
            if value is not None and value.dim() != 2:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}: get_scores_dicts needs one score per token "
                    "and step; aggregate to 2-D first (or keep do_aggregation=True)"
                )
        scores: dict[str, dict] = {"source_attributions": {}, "target_attributions": {}, "step_scores": {}}
        start = aggregated.attr_pos_start
        for position in range(start, aggregated.attr_pos_end):
            key = (position, aggregated.target[position].token)
            column = position - start
            if aggregated.source_attributions is not None:
                scores["source_attributions"][key] = {
                    (i, t.token): aggregated.source_attributions[i, column].item()
                    for i, t in enumerate(aggregated.source)
                }
            if aggregated.target_attributions is not None:
                scores["target_attributions"][key] = {
                    (i, aggregated.target[i].token): aggregated.target_attributions[i, column].item()
                    for i in range(aggregated.attr_pos_end)
                }
            scores["step_scores"][key] = {name: v[column].item() for name, v in aggregated.step_scores.items()}
        return scores

    def evaluate(self, model: Any, metrics: Any = None, **kwargs):
        """Faithfulness (and plausibility) of these attributions on `model`: an `EvaluationTable`;
        see `instrument.evaluation.evaluate`.

            out.evaluate(model, metrics=["comprehensiveness", "deletion"]).show()
        """
        from instrument.evaluation import evaluate

        return evaluate(self, model, metrics, **kwargs)

    # -- saving and equality (instrument.files, instrument.equality) ----------------------------

    def equals(self, other: Any, rtol: float = 0.0, atol: float = 0.0) -> bool:
        """Same tokens, positions and tensors (NaN equals NaN; exact unless rtol/atol are given)."""
        from instrument.equality import sequences_equal

        return sequences_equal(self, other, rtol, atol)

    def save(
        self,
        path,
        scores_precision: str = "float32",
        overwrite: bool = False,
        format: str | None = None,
        compress: bool | None = None,
    ):
        """Saves this sequence as a one-sequence FeatureAttributionOutput (see `FeatureAttributionOutput.save`)."""
        from instrument.files.saving import save

        return save(
            self, path, scores_precision=scores_precision, overwrite=overwrite, format=format, compress=compress
        )


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
class FeatureAttributionOutput(Views):
    """One `FeatureAttributionSequenceOutput` per example, plus `info` on how they were made.

    out.info["attribution_method"], len(out.sequence_attributions)
    """

    sequence_attributions: list[FeatureAttributionSequenceOutput]
    step_attributions: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequence_attributions)

    def __getitem__(self, index: int) -> FeatureAttributionSequenceOutput:
        return self.sequence_attributions[index]

    def __iter__(self):
        return iter(self.sequence_attributions)

    def __add__(self, other: Any) -> FeatureAttributionOutput:
        """`out1 + out2` is `merge_attributions([out1, out2])`."""
        if not isinstance(other, FeatureAttributionOutput):
            return NotImplemented
        from instrument.merging import merge_attributions

        return merge_attributions([self, other])

    def weight_attributions(self, step_score_id: str) -> FeatureAttributionOutput:
        """In place: `weight_attributions` on every sequence (see there); returns self."""
        for seq in self.sequence_attributions:
            seq.weight_attributions(step_score_id)
        return self

    def get_scores_dicts(self, aggregator: Any = None, do_aggregation: bool = True, **kwargs) -> list[dict]:
        """One `FeatureAttributionSequenceOutput.get_scores_dicts` per sequence.

        dfs = [pandas.DataFrame(d["source_attributions"]) for d in out.get_scores_dicts()]
        """
        return [seq.get_scores_dicts(aggregator, do_aggregation, **kwargs) for seq in self.sequence_attributions]

    def to(self, *args, **kwargs) -> FeatureAttributionOutput:
        """In place: every sequence's tensors `.to(*args, **kwargs)`; returns self."""
        for seq in self.sequence_attributions:
            seq.to(*args, **kwargs)
        return self

    def aggregate(self, aggregator: Any = None, aggregate_fn: Any = None, **kwargs) -> FeatureAttributionOutput:
        """Every sequence aggregated (a new output; `info` copied); see `instrument.aggregators`.

        out.aggregate("subwords").aggregate()   # words, then one normalized score per word
        """
        from instrument.aggregation import aggregate_output

        return aggregate_output(self, aggregator, aggregate_fn, **kwargs)

    def __sub__(self, other: Any) -> FeatureAttributionOutput:
        """`a - b`: sequence by sequence differences (the "pair" aggregator)."""
        if not isinstance(other, FeatureAttributionOutput):
            return NotImplemented
        return other.aggregate("pair", paired_attr=self)

    def equals(
        self,
        other: Any,
        rtol: float = 0.0,
        atol: float = 0.0,
        check_info: bool = True,
        ignore_info: tuple[str, ...] = RUNTIME_INFO,
    ) -> bool:
        """Equal sequences (see `FeatureAttributionSequenceOutput.equals`) and `info` equal as saved, apart
        from the run-time fields in `ignore_info` (by default `exec_time`; pass `()` to compare them too)."""
        from instrument.equality import outputs_equal

        return outputs_equal(self, other, rtol, atol, check_info, ignore_info)

    def save(
        self,
        path,
        scores_precision: str = "float32",
        overwrite: bool = False,
        format: str | None = None,
        compress: bool | None = None,
    ):
        """Saves to `.safetensors` (default) or `.json`, or in Inseq's JSON with `format="inseq"`; see
        `instrument.files`.

            out.save("attributions.safetensors", scores_precision="float16")
            # inseq.FeatureAttributionOutput.load(..., decompress=True)
            out.save("attributions.json.gz", format="inseq")
        """
        from instrument.files.saving import save

        return save(
            self, path, scores_precision=scores_precision, overwrite=overwrite, format=format, compress=compress
        )

    def evaluate(self, model: Any, metrics: Any = None, **kwargs):
        """Faithfulness (and plausibility) of these attributions on `model`: an `EvaluationTable`;
        see `instrument.evaluation.evaluate`.

            out.evaluate(model, metrics=["comprehensiveness", "deletion"]).show()
        """
        from instrument.evaluation import evaluate

        return evaluate(self, model, metrics, **kwargs)

    @classmethod
    def load(cls, path) -> FeatureAttributionOutput:
        """Reads a file written by `save`, or by Inseq's `save` (gzipped or not), or a whole directory written
        by `attribute_dataset` (`instrument.open_attributions` reads one lazily); raises ValueError for a
        corrupted or foreign file.

            out = FeatureAttributionOutput.load("attributions.safetensors")
        """
        from instrument.files.saving import load

        return load(path)
