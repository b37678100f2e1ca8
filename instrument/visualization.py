"""Heatmap views of attributions: rich tables in the console, or self-contained HTML.

    >>> out.show()                                   # console: one heatmap table per example
    >>> html = out.show(return_html=True)            # one <table> per example, inline styles only
    >>> out.save_html("attributions.html")

Columns are the generated tokens; rows the source tokens, then the target tokens (decoder-only
models: target rows only), then one row per step score. By default the output is first aggregated
with "scores" (hidden and layer dimensions reduced with `vnorm`, each step normalized so that its
absolute scores sum to 1); pass `aggregate=False` for outputs that are already 2-D. Cell colours are
diverging: red for positive, blue for negative, stronger with the magnitude relative to the largest
absolute score of the example; NaN cells (positions a step cannot see) are blank. Tokens are shown
as they are, with control characters escaped (`\\n`); they are never read as markup.
"""
from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput

POSITIVE, NEGATIVE, WHITE = (220, 38, 38), (37, 99, 235), (255, 255, 255)
CELL_WIDTH = 7  # "-0.123" plus a space


def _label(token: str) -> str:
    """`_label("a\\nb") == "a\\\\nb"`: the token on one line, control characters escaped."""
    out = []
    for char in token:
        if char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out) or "''"


def format_score(value: float) -> str:
    """`format_score(0.25) == "0.250"`, `format_score(1.5e-05) == "1.50e-05"`, NaN is ""."""
    if math.isnan(value):
        return ""
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3f}"
    return f"{value:.2e}"


def exact(value: float, dtype: torch.dtype) -> str:
    """The shortest string that reads back as the same value of `dtype` (used in HTML titles)."""
    kind = {torch.float16: np.float16, torch.float64: np.float64}.get(dtype, np.float32)
    return str(kind(value)) if not math.isnan(value) else "nan"


def colour(value: float, scale: float) -> tuple[int, int, int] | None:
    """Background for `value`: white to red (positive) or blue (negative) by `|value| / scale`."""
    if math.isnan(value) or scale <= 0:
        return None
    strength = min(abs(value) / scale, 1.0)
    end = POSITIVE if value >= 0 else NEGATIVE
    return tuple(round(w + (e - w) * strength) for w, e in zip(WHITE, end))


def _text_colour(background: tuple[int, int, int] | None) -> str:
    if background is None:
        return "black"
    r, g, b = background
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "black"


class Grid:
    """What one example shows: column labels, (label, values) rows per section, and the colour scale."""

    def __init__(self, seq: FeatureAttributionSequenceOutput, step_score_highlight: str | None = None):
        for name in ("source_attributions", "target_attributions"):
            value = getattr(seq, name)
            if value is not None and value.dim() != 2:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}; show needs one score per token and step: "
                    "aggregate first (e.g. .aggregate('scores')) or pass aggregate=True"
                )
        if step_score_highlight is not None and step_score_highlight not in seq.step_scores:
            raise ValueError(f"No step score {step_score_highlight!r}; available: {sorted(seq.step_scores)}")
        self.columns = [_label(t.token) for t in seq.generated]
        self.sections: list[tuple[str, list[tuple[str, list[float]]]]] = []
        self.dtype = torch.float32
        for title, tokens, values in (("source", seq.source, seq.source_attributions),
                                      ("target", seq.target, seq.target_attributions)):
            if values is not None:
                self.dtype = values.dtype
                rows = values.detach().cpu().double().tolist()
                self.sections.append((title, [(_label(t.token), row) for t, row in zip(tokens, rows)]))
        self.scores = [(name, v.detach().cpu().double().flatten().tolist()) for name, v in seq.step_scores.items()]
        finite = [abs(x) for _, rows in self.sections for _, row in rows for x in row if math.isfinite(x)]
        self.scale = max(finite, default=0.0)
        self.highlight, self.highlight_name = None, step_score_highlight
        if step_score_highlight is not None:
            values = dict(self.scores)[step_score_highlight]
            top = max((abs(x) for x in values if math.isfinite(x)), default=0.0)
            self.highlight = [colour(x, top) for x in values]

    def chunks(self, width: int | None, max_columns: int | None) -> list[tuple[int, int]]:
        """Column ranges of at most `max_columns` whose table fits `width` characters (rich's layout:
        each column is its widest cell plus 2 of padding, plus one box character between and around)."""
        n, width = len(self.columns), width or 80
        if max_columns is not None and max_columns < 1:
            raise ValueError(f"max_columns must be at least 1, got {max_columns}")
        rows = [values for _, section in self.sections for _, values in section] + [values for _, values in self.scores]
        cells = [max([len(self.columns[i])] + [len(format_score(r[i])) for r in rows]) for i in range(n)]
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
        return ranges + [(start, n)]


# -- console --------------------------------------------------------------------------------------------


def _rich_tables(grid: Grid, title: str, width: int, max_columns: int | None):
    from rich import box
    from rich.style import Style
    from rich.table import Table
    from rich.text import Text

    def cell(value, scale):
        background = colour(value, scale)
        if background is None:
            return Text(format_score(value))
        return Text(format_score(value), style=Style(bgcolor=f"rgb{background}", color=_text_colour(background)))

    ranges = grid.chunks(width, max_columns)
    for a, b in ranges:
        steps = f"step {b}" if b - a == 1 else f"steps {a + 1}-{b}"
        suffix = f" ({steps} of {len(grid.columns)})" if len(ranges) > 1 else ""
        table = Table(title=Text(title + suffix), box=box.SIMPLE_HEAVY, show_lines=False, expand=False)
        table.add_column(Text(""), overflow="fold", style="bold", max_width=grid.label_width)
        for i in range(a, b):
            background = grid.highlight[i] if grid.highlight else None
            header = Text(grid.columns[i], style=Style(bgcolor=f"rgb{background}", color=_text_colour(background)) if background else "")
            table.add_column(header, justify="right", overflow="fold")
        for index, (_, rows) in enumerate(grid.sections):
            for row_index, (label, values) in enumerate(rows):
                table.add_row(Text(label), *(cell(v, grid.scale) for v in values[a:b]),
                              end_section=row_index == len(rows) - 1 and (index < len(grid.sections) - 1 or bool(grid.scores)))
        for name, values in grid.scores:
            scale = max((abs(x) for x in values if math.isfinite(x)), default=0.0)
            highlighted = name == grid.highlight_name
            table.add_row(Text(name, style="italic"),
                          *(cell(v, scale) if highlighted else Text(format_score(v)) for v in values[a:b]))
        yield table


def show_console(sequences: Sequence[FeatureAttributionSequenceOutput], console=None, step_score_highlight=None,
                 max_columns: int | None = None) -> None:
    """Prints one heatmap table (or several, for many steps) per example to `console`."""
    from rich.console import Console

    console = console or Console()
    for index, seq in enumerate(sequences):
        grid = Grid(seq, step_score_highlight)
        for table in _rich_tables(grid, f"Example {index}", console.width, max_columns):
            console.print(table)


# -- HTML ------------------------------------------------------------------------------------------------

CELL_STYLE = "padding:2px 6px;border:1px solid #ddd;text-align:right;font-variant-numeric:tabular-nums"
HEAD_STYLE = "padding:2px 6px;border:1px solid #ddd;background:#f4f4f4;white-space:pre;font-weight:600"
ROW_STYLE = "padding:2px 6px;border:1px solid #ddd;text-align:left;white-space:pre;font-weight:600;background:#fafafa"
TABLE_STYLE = "border-collapse:collapse;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;margin:0 0 16px 0"


def _td(value: float, scale: float, dtype: torch.dtype) -> str:
    background = colour(value, scale)
    style = CELL_STYLE + (f";background-color:rgb{background};color:{_text_colour(background)}" if background else "")
    return f'<td style="{style}" title="{exact(value, dtype)}">{html.escape(format_score(value))}</td>'


def html_table(seq: FeatureAttributionSequenceOutput, title: str, step_score_highlight: str | None = None) -> str:
    """One `<table>`: a header row of generated tokens, then a `<tbody>` per section of rows."""
    grid = Grid(seq, step_score_highlight)
    e = html.escape
    head = []
    for i, column in enumerate(grid.columns):
        background = grid.highlight[i] if grid.highlight else None
        extra = f";background-color:rgb{background};color:{_text_colour(background)}" if background else ""
        head.append(f'<th scope="col" style="{HEAD_STYLE}{extra}" title="{e(seq.generated[i].token)} (id {seq.generated[i].id})">{e(column)}</th>')
    parts = [f'<table class="seq-instrument-attributions" style="{TABLE_STYLE}">',
             f'<caption style="text-align:left;font-weight:600;padding:4px 0">{e(title)}</caption>',
             f'<thead><tr><th style="{HEAD_STYLE}"></th>{"".join(head)}</tr></thead>']
    for section, rows in grid.sections:
        parts.append(f'<tbody class="{section}" style="border-top:2px solid #888">')
        for label, values in rows:
            cells = "".join(_td(v, grid.scale, grid.dtype) for v in values)
            parts.append(f'<tr><th scope="row" style="{ROW_STYLE}">{e(label)}</th>{cells}</tr>')
        parts.append("</tbody>")
    if grid.scores:
        parts.append('<tbody class="step-scores" style="border-top:2px solid #888">')
        for name, values in grid.scores:
            scale = max((abs(x) for x in values if math.isfinite(x)), default=0.0) if name == step_score_highlight else 0.0
            cells = "".join(_td(v, scale, torch.float32) for v in values)
            parts.append(f'<tr><th scope="row" style="{ROW_STYLE};font-style:italic">{e(name)}</th>{cells}</tr>')
        parts.append("</tbody>")
    parts.append("</table>")
    return "\n".join(parts)


def to_html(sequences: Sequence[FeatureAttributionSequenceOutput], step_score_highlight: str | None = None) -> str:
    """A `<div>` with one table per example; every style is inline, nothing external, no script."""
    tables = [html_table(seq, f"Example {i}", step_score_highlight) for i, seq in enumerate(sequences)]
    return '<div class="seq-instrument">\n' + "\n".join(tables) + "\n</div>"


def html_document(body: str, title: str = "Attributions") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"</head>\n<body>\n{body}\n</body>\n</html>\n")


# -- entry points ----------------------------------------------------------------------------------------


def _sequences(obj) -> list[FeatureAttributionSequenceOutput]:
    if isinstance(obj, FeatureAttributionOutput):
        return list(obj.sequence_attributions)
    if isinstance(obj, FeatureAttributionSequenceOutput):
        return [obj]
    raise TypeError(f"Expected a FeatureAttributionOutput or FeatureAttributionSequenceOutput, got {type(obj).__name__}")


def _prepared(obj, aggregate: bool | str | list, **aggregate_kwargs) -> list[FeatureAttributionSequenceOutput]:
    """The sequences to show: as they are, or aggregated, then reduced to 2-D with "scores" if needed."""
    sequences = _sequences(obj)
    if aggregate is False:
        return sequences
    from instrument.aggregation import aggregate_sequence

    if aggregate is True:
        return [aggregate_sequence(seq, "scores", keep_layers=False, **aggregate_kwargs) for seq in sequences]
    sequences = [aggregate_sequence(seq, aggregate, **aggregate_kwargs) for seq in sequences]
    return [aggregate_sequence(seq, "scores", keep_layers=False) if _dims(seq) > 2 else seq for seq in sequences]


def _dims(seq: FeatureAttributionSequenceOutput) -> int:
    return max((t.dim() for t in (seq.source_attributions, seq.target_attributions) if t is not None), default=2)


def show(obj, return_html: bool = False, aggregate: bool | str | list = True, display: bool = True,
         step_score_highlight: str | None = None, console=None, max_columns: int | None = None,
         **aggregate_kwargs) -> str | None:
    """`show(out)` prints heatmaps; `show(out, return_html=True)` returns the HTML instead.

    `aggregate=True` applies "scores" (reducing every extra dimension, options in `aggregate_kwargs`);
    an aggregator name or list applies that pipeline, followed by "scores" while the result has more
    than 2 dimensions; False shows the tensors as they are (they must be 2-D).
    With `return_html=True` nothing is printed; the HTML is also displayed when `display` is true and
    IPython is running. `max_columns` caps the columns per console table (default: fit the width).
    """
    sequences = _prepared(obj, aggregate, **aggregate_kwargs)
    if return_html:
        text = to_html(sequences, step_score_highlight)
        if display:
            _ipython_display(text)
        return text
    if display:
        show_console(sequences, console, step_score_highlight, max_columns)
    return None


def _ipython_display(text: str) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(HTML(text))


def save_html(obj, path: str | os.PathLike, overwrite: bool = False, aggregate: bool | str | list = True,
              step_score_highlight: str | None = None, **aggregate_kwargs) -> Path:
    """`save_html(out, "attr.html")`: a standalone HTML page of `show(out, return_html=True)`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists already; pass overwrite=True to replace it")
    body = show(obj, return_html=True, aggregate=aggregate, display=False, step_score_highlight=step_score_highlight,
                **aggregate_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_document(body), encoding="utf-8")
    return path


def repr_html(obj: Any) -> str:
    """For notebooks: the HTML view, or the escaped error when the output cannot be shown."""
    try:
        return show(obj, return_html=True, display=False)
    except (ValueError, TypeError) as error:
        return f"<pre>{html.escape(repr(error))}</pre>"
