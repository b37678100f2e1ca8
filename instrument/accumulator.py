"""Collects the results of batches of rows into one finished sequence output per example.

    collected = Accumulator(examples)
    collected.add([0, 2], rows, result, {"probability": scores})   # rows of examples 0 and 2
    sequences = collected.sequences(tokens)                        # FeatureAttributionSequenceOutput each

A batch holds some attributed positions (output columns) of some examples (`rows.example` indexes the
batch's own list of examples); each example's attributions are `[tokens, columns, ...]` grids, NaN
where a column is not (yet) filled.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from instrument.outputs import FeatureAttributionSequenceOutput, TokenWithId
from instrument.rows import Example, RowAttribution, Rows


class Accumulator:
    """Per-example results of `examples`, filled in batch after batch (in any order, columns overwritten)."""

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
            columns = positions[picked] - example.start
            n_columns = example.end - example.start
            pieces: dict[str, Any] = {}
            if result.source is not None and example.source_ids is not None:
                source = result.source[picked, : len(example.source_ids)]
                pieces["source"] = _columns(source, columns, n_columns, len(example.source_ids), None)
            if result.target is not None:
                pieces["target"] = _columns(
                    result.target[picked], columns, n_columns, len(example.target_ids), positions[picked]
                )
            if result.delta is not None:
                pieces["delta"] = torch.full((n_columns,), float("nan")).index_copy(
                    0, columns, result.delta[picked].detach().float().cpu()
                )
            for name, values in step_scores.items():
                pieces.setdefault("step_scores", {})[name] = values[picked].float().cpu()
            for name, values in result.sequence_scores.items():  # [R, source, source, ...], one example's per row
                length = len(example.source_ids)
                pieces.setdefault("sequence", {})[name] = values[picked[0], :length, :length].float().cpu()
            _merge(self.parts[index], pieces, columns, n_columns)

    def sequences(self, tokens: Callable[[torch.Tensor], list[TokenWithId]]) -> list[FeatureAttributionSequenceOutput]:
        """The finished outputs, `tokens(ids)` naming the tokens (decoder-only: the source is the prompt, as in
        Inseq)."""
        outputs = []
        for example, parts in zip(self.examples, self.parts):
            step_scores = dict(parts.get("step_scores", {}))
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


def _columns(values: torch.Tensor, columns: torch.Tensor, n_columns: int, length: int, visible: torch.Tensor | None):
    """`values [rows, positions, ...]` -> `[length, n_columns, ...]`, NaN past each row's prefix."""
    values = values.detach().float().cpu()
    extra = values.shape[2:]
    grid = torch.full((length, n_columns, *extra), float("nan"))
    for row, column in enumerate(columns.tolist()):
        seen = values.shape[1] if visible is None else int(visible[row])
        grid[: min(seen, length), column] = values[row, : min(seen, length)]
    return grid


def _merge(into: dict, parts: dict, columns: torch.Tensor, n_columns: int) -> None:
    """Adds one batch's results (some columns of one example) to what that example has so far."""
    for key in ("source", "target", "delta"):
        if key in parts:
            if key not in into:
                into[key] = parts[key]
            else:
                _fill(into[key], parts[key], columns, column_dim=0 if key == "delta" else 1)
    into.setdefault("sequence", {}).update(parts.get("sequence", {}))
    for name, values in parts.get("step_scores", {}).items():
        row = into.setdefault("step_scores", {}).setdefault(name, torch.full((n_columns,), float("nan")))
        row[columns] = values


def _fill(into: torch.Tensor, new: torch.Tensor, columns: torch.Tensor, column_dim: int) -> None:
    index = [slice(None)] * into.dim()
    index[column_dim] = columns
    into[tuple(index)] = new[tuple(index)]
