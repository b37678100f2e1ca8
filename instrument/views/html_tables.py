"""The HTML view: one self-contained `<table>` per example (inline styles only, no script), and a page around them.

html = to_html(prepared(out, aggregate=True), step_score_highlight="probability")
Path("attributions.html").write_text(html_document(html))
display_in_notebook(html)            # shown when IPython is running, else nothing happens
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch

from instrument.outputs import FeatureAttributionSequenceOutput
from instrument.views.colours import colour, largest_magnitude, text_colour
from instrument.views.grid import Grid
from instrument.views.labels import exact, format_score

CELL_STYLE = "padding:2px 6px;border:1px solid #ddd;text-align:right;font-variant-numeric:tabular-nums"
HEAD_STYLE = "padding:2px 6px;border:1px solid #ddd;background:#f4f4f4;white-space:pre;font-weight:600"
ROW_STYLE = "padding:2px 6px;border:1px solid #ddd;text-align:left;white-space:pre;font-weight:600;background:#fafafa"
TABLE_STYLE = (
    "border-collapse:collapse;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;margin:0 0 16px 0"
)


def _td(value: float, scale: float, dtype: torch.dtype) -> str:
    background = colour(value, scale)
    style = CELL_STYLE + (f";background-color:rgb{background};color:{text_colour(background)}" if background else "")
    return f'<td style="{style}" title="{exact(value, dtype)}">{html.escape(format_score(value))}</td>'


def html_table(
    seq: FeatureAttributionSequenceOutput,
    title: str,
    step_score_highlight: str | None = None,
    scale: float | None = None,
) -> str:
    """One `<table>`: a header row of generated tokens, then a `<tbody>` per section of rows."""
    grid = Grid(seq, step_score_highlight, scale)
    escape = html.escape
    head = []
    for i, column in enumerate(grid.columns):
        background = grid.highlight[i] if grid.highlight else None
        extra = f";background-color:rgb{background};color:{text_colour(background)}" if background else ""
        token = seq.generated[i]
        head.append(
            f'<th scope="col" style="{HEAD_STYLE}{extra}" title="{escape(token.token)} (id {token.id})">'
            f"{escape(column)}</th>"
        )
    parts = [
        f'<table class="seq-instrument-attributions" style="{TABLE_STYLE}">',
        f'<caption style="text-align:left;font-weight:600;padding:4px 0">{escape(title)}</caption>',
        f'<thead><tr><th style="{HEAD_STYLE}"></th>{"".join(head)}</tr></thead>',
    ]
    for section, rows in grid.sections:
        parts.append(f'<tbody class="{section}" style="border-top:2px solid #888">')
        for label, values in rows:
            cells = "".join(_td(v, grid.scale, grid.dtype) for v in values)
            parts.append(f'<tr><th scope="row" style="{ROW_STYLE}">{escape(label)}</th>{cells}</tr>')
        parts.append("</tbody>")
    if grid.scores:
        parts.append('<tbody class="step-scores" style="border-top:2px solid #888">')
        for name, values in grid.scores:
            scale = largest_magnitude(values) if name == step_score_highlight else 0.0
            cells = "".join(_td(v, scale, torch.float32) for v in values)
            parts.append(f'<tr><th scope="row" style="{ROW_STYLE};font-style:italic">{escape(name)}</th>{cells}</tr>')
        parts.append("</tbody>")
    parts.append("</table>")
    return "\n".join(parts)


def html_block(tables: Sequence[str]) -> str:
    """The `<div class="seq-instrument">` that holds the tables (or token views) of one call."""
    return '<div class="seq-instrument">\n' + "\n".join(tables) + "\n</div>"


def to_html(
    sequences: Sequence[FeatureAttributionSequenceOutput],
    step_score_highlight: str | None = None,
    scale: float | None = None,
) -> str:
    """A `<div>` with one table per example; every style is inline, nothing external, no script."""
    return html_block([html_table(seq, f"Example {i}", step_score_highlight, scale) for i, seq in enumerate(sequences)])


def html_document(body: str, title: str = "Attributions") -> str:
    """A standalone page around `body`."""
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def display_in_notebook(text: str) -> None:
    """Displays the HTML `text` when IPython is running; does nothing otherwise."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(HTML(text))
