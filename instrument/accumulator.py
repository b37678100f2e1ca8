"""Collects the results of batches of rows into one finished sequence output per example.

    collected = Accumulator(examples)
    collected.add([0, 2], rows, result, {"probability": scores})   # rows of examples 0 and 2
    sequences = collected.sequences(tokens)                        # FeatureAttributionSequenceOutput each

A batch holds some steps of some examples (`rows.example` indexes the batch's own list of examples);
each example's attributions are `[positions, steps, ...]` grids, NaN where a step is not (yet) seen.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from instrument.outputs import FeatureAttributionSequenceOutput, TokenWithId
from instrument.rows import Example, RowAttribution, Rows


class Accumulator:
    """Per-example results of `examples`, filled in batch after batch (in any order, steps overwritten)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)
        self.parts: list[dict[str, Any]] = [dict() for _ in self.examples]

    def add(
        self, batch: Sequence[int], rows: Rows, result: RowAttribution, step_scores: dict[str, torch.Tensor]
    ) -> None:
        """One batch's rows: `batch[i]` is the index in `examples` of the rows with `rows.example == i`;
        `step_scores` holds one value per row for each name."""
        # On the CPU: they index results that may live on the CPU (perturbation methods) or on the model's device.
        example_of_row, positions = rows.example.cpu(), rows.position.cpu()
        for i, index in enumerate(batch):
            example = self.examples[index]
            picked = (example_of_row == i).nonzero().squeeze(1)
            steps = positions[picked] - example.start
            n_steps = example.end - example.start
            pieces: dict[str, Any] = {}
            if result.source is not None and example.source_ids is not None:
                source = result.source[picked, : len(example.source_ids)]
                pieces["source"] = _columns(source, steps, n_steps, len(example.source_ids), None)
            if result.target is not None:
                pieces["target"] = _columns(
                    result.target[picked], steps, n_steps, len(example.target_ids), positions[picked]
                )
            if result.delta is not None:
                pieces["delta"] = torch.full((n_steps,), float("nan")).index_copy(
                    0, steps, result.delta[picked].detach().float().cpu()
                )
            for name, values in step_scores.items():
                pieces.setdefault("steps", {})[name] = values[picked].float().cpu()
            for name, values in result.sequence_scores.items():  # [R, source, source, ...], one example's per row
                length = len(example.source_ids)
                pieces.setdefault("sequence", {})[name] = values[picked[0], :length, :length].float().cpu()
            _merge(self.parts[index], pieces, steps, n_steps)

    def sequences(self, tokens: Callable[[torch.Tensor], list[TokenWithId]]) -> list[FeatureAttributionSequenceOutput]:
        """The finished outputs, `tokens(ids)` naming the tokens (decoder-only: the source is the prompt, as in
        Inseq)."""
        outputs = []
        for example, parts in zip(self.examples, self.parts):
            step_scores = dict(parts.get("steps", {}))
            if "delta" in parts:
                step_scores["deltas"] = parts["delta"]
            source = example.source_ids if example.source_ids is not None else example.target_ids[: example.start]
            outputs.append(
                FeatureAttributionSequenceOutput(
                    source=tokens(source),
                    target=tokens(example.target_ids),
                    source_attributions=parts.get("source"),
                    target_attributions=parts.get("target"),
                    step_scores=step_scores,
                    sequence_scores=dict(parts.get("sequence", {})),
                    attr_pos_start=example.start,
                    attr_pos_end=example.end,
                )
            )
        return outputs


def _columns(values: torch.Tensor, steps: torch.Tensor, n_steps: int, length: int, visible: torch.Tensor | None):
    """`values [rows, positions, ...]` -> `[length, n_steps, ...]`, NaN past each row's prefix."""
    values = values.detach().float().cpu()
    extra = values.shape[2:]
    grid = torch.full((length, n_steps, *extra), float("nan"))
    for row, step in enumerate(steps.tolist()):
        seen = values.shape[1] if visible is None else int(visible[row])
        grid[: min(seen, length), step] = values[row, : min(seen, length)]
    return grid


def _merge(into: dict, parts: dict, steps: torch.Tensor, n_steps: int) -> None:
    """Adds one batch's results (some steps of one example) to what that example has so far."""
    for key in ("source", "target", "delta"):
        if key in parts:
            if key not in into:
                into[key] = parts[key]
            else:
                _fill(into[key], parts[key], steps, step_dim=0 if key == "delta" else 1)
    into.setdefault("sequence", {}).update(parts.get("sequence", {}))
    for name, values in parts.get("steps", {}).items():
        row = into.setdefault("steps", {}).setdefault(name, torch.full((n_steps,), float("nan")))
        row[steps] = values


def _fill(into: torch.Tensor, new: torch.Tensor, steps: torch.Tensor, step_dim: int) -> None:
    index = [slice(None)] * into.dim()
    index[step_dim] = steps
    into[tuple(index)] = new[tuple(index)]
