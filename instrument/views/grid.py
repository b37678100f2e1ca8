"""What one example's heatmap holds: column labels, rows per section, step scores and the colour scale.

    grid = Grid(seq, step_score_highlight="probability")
    grid.columns, [title for title, _ in grid.sections]     # generated tokens, ["source", "target"]
    grid.chunks(width=80, max_columns=None)                 # [(0, 7), (7, 12)]: column ranges per table

The console and HTML renderings both draw a `Grid`; it checks that the sequence is 2-D.
"""

from __future__ import annotations

import torch

from instrument.outputs import FeatureAttributionSequenceOutput
from instrument.sequence_fields import TENSOR_FIELDS
from instrument.views.colours import colour, largest_magnitude
from instrument.views.labels import format_score, token_label


def check_two_dimensional(seq: FeatureAttributionSequenceOutput, view: str, advice: str) -> None:
    """ValueError unless every attribution tensor of `seq` has one score per token and step."""
    for name in TENSOR_FIELDS:
        value = getattr(seq, name)
        if value is not None and value.dim() != 2:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; {view} needs one score per token and step: {advice}"
            )


def check_step_score(seq: FeatureAttributionSequenceOutput, step_score_highlight: str | None) -> None:
    if step_score_highlight is not None and step_score_highlight not in seq.step_scores:
        raise ValueError(f"No step score {step_score_highlight!r}; available: {sorted(seq.step_scores)}")


class Grid:
    """What one example shows: column labels, (label, values) rows per section, and the colour scale."""

    def __init__(
        self, seq: FeatureAttributionSequenceOutput, step_score_highlight: str | None = None, scale: float | None = None
    ):
        check_two_dimensional(seq, "show", "aggregate first (e.g. .aggregate('scores')) or pass aggregate=True")
        check_step_score(seq, step_score_highlight)
        self.columns = [token_label(t.token) for t in seq.generated]
        self.sections: list[tuple[str, list[tuple[str, list[float]]]]] = []
        self.dtype = torch.float32
        for title, tokens, values in (
            ("source", seq.source, seq.source_attributions),
            ("target", seq.target, seq.target_attributions),
        ):
            if values is not None:
                self.dtype = values.dtype
                rows = values.detach().cpu().double().tolist()
                self.sections.append((title, [(token_label(t.token), row) for t, row in zip(tokens, rows)]))
        self.scores = [(name, v.detach().cpu().double().flatten().tolist()) for name, v in seq.step_scores.items()]
        all_values = [x for _, rows in self.sections for _, row in rows for x in row]
        self.scale = largest_magnitude(all_values) if scale is None else scale
        self.highlight, self.highlight_name = None, step_score_highlight
        if step_score_highlight is not None:
            values = dict(self.scores)[step_score_highlight]
            top = largest_magnitude(values)
            self.highlight = [colour(x, top) for x in values]

    def chunks(self, width: int | None, max_columns: int | None) -> list[tuple[int, int]]:
        """Column ranges of at most `max_columns` whose table fits `width` characters (rich's layout:
        each column is its widest cell plus 2 of padding, plus one box character between and around)."""
        n_columns, width = len(self.columns), width or 80
        if max_columns is not None and max_columns < 1:
            raise ValueError(f"max_columns must be at least 1, got {max_columns}")
        rows = [values for _, section in self.sections for _, values in section] + [values for _, values in self.scores]
        cells = [max([len(self.columns[i])] + [len(format_score(r[i])) for r in rows]) for i in range(n_columns)]
        labels = [label for _, section in self.sections for label, _ in section] + [name for name, _ in self.scores]
        self.label_width = min(max((len(x) for x in labels), default=1), max(10, width // 3))
        used = self.label_width + 2 + 2
        ranges, start, total = [], 0, used
        for i, cell in enumerate(cells):
            full = max_columns is not None and i - start >= max_columns
            if i > start and (full or total + cell + 3 > width):
                ranges.append((start, i))
                start, total = i, used
            total += cell + 3
        return ranges + [(start, n_columns)]
