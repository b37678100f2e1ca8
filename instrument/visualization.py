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

from instrument.aggregators import aggregate_sequence
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, copy_replace

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

    def __init__(self, seq: FeatureAttributionSequenceOutput, step_score_highlight: str | None = None,
                 scale: float | None = None):
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
        self.scale = max(finite, default=0.0) if scale is None else scale
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
                 max_columns: int | None = None, titles: Sequence[str] | None = None,
                 scales: Sequence[float | None] | None = None) -> None:
    """Prints one heatmap table (or several, for many steps) per example to `console`."""
    from rich.console import Console

    console = console or Console()
    for index, seq in enumerate(sequences):
        grid = Grid(seq, step_score_highlight, scales[index] if scales else None)
        for table in _rich_tables(grid, titles[index] if titles else f"Example {index}", console.width, max_columns):
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


def html_table(seq: FeatureAttributionSequenceOutput, title: str, step_score_highlight: str | None = None,
               scale: float | None = None) -> str:
    """One `<table>`: a header row of generated tokens, then a `<tbody>` per section of rows."""
    grid = Grid(seq, step_score_highlight, scale)
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


def to_html(sequences: Sequence[FeatureAttributionSequenceOutput], step_score_highlight: str | None = None,
            scale: float | None = None) -> str:
    """A `<div>` with one table per example; every style is inline, nothing external, no script."""
    tables = [html_table(seq, f"Example {i}", step_score_highlight, scale) for i, seq in enumerate(sequences)]
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
    if aggregate is True:
        return [_default_view(seq, **aggregate_kwargs) for seq in sequences]
    sequences = [aggregate_sequence(seq, aggregate, **aggregate_kwargs) for seq in sequences]
    return [aggregate_sequence(seq, "scores", keep_layers=False) if _dims(seq) > 2 else seq for seq in sequences]


def _default_view(seq: FeatureAttributionSequenceOutput, **aggregate_kwargs) -> FeatureAttributionSequenceOutput:
    """"scores" over every extra dimension, or the sequence's own default pipeline when it has one
    (`weight_attributions` leaves an empty one: already 2-D, shown as it is)."""
    if seq._aggregator is None:
        return aggregate_sequence(seq, "scores", keep_layers=False, **aggregate_kwargs)
    seq = aggregate_sequence(seq, seq._aggregator, **aggregate_kwargs)
    return aggregate_sequence(seq, "scores", keep_layers=False) if _dims(seq) > 2 else seq


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
    Inseq's spellings are taken too: `aggregator=` (for `aggregate=`), `do_aggregation=False`, and
    `min_val`/`max_val` (colours saturate at the larger magnitude of the two).
    """
    if "aggregator" in aggregate_kwargs:  # Inseq's spelling
        aggregator = aggregate_kwargs.pop("aggregator")
        if aggregate is not True:
            raise ValueError("Pass either aggregate= or aggregator=, not both")
        aggregate = True if aggregator is None else aggregator
    if not aggregate_kwargs.pop("do_aggregation", True):
        aggregate = False
    scale = _scale(aggregate_kwargs.pop("min_val", None), aggregate_kwargs.pop("max_val", None))
    sequences = _prepared(obj, aggregate, **aggregate_kwargs)
    if return_html:
        text = to_html(sequences, step_score_highlight, scale)
        if display:
            _ipython_display(text)
        return text
    if display:
        show_console(sequences, console, step_score_highlight, max_columns, scales=[scale] * len(sequences))
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


# -- granular and token views (Inseq's show_granular / show_tokens) --------------------------------------------


def _scale(min_val: float | None, max_val: float | None) -> float | None:
    """The colour scale for explicit bounds: colours saturate at the larger magnitude of the two."""
    if min_val is None and max_val is None:
        return None
    return max(abs(min_val or 0.0), abs(max_val or 0.0))


def _panels(seq: FeatureAttributionSequenceOutput, max_show_size: int, show_dim: int | None,
            slice_dims: dict | None) -> list[tuple[str, FeatureAttributionSequenceOutput]]:
    """2-D views of `seq`: one per index combination of the extra dimensions (after `slice_dims`)."""
    import itertools

    tensors = {n: getattr(seq, n) for n in ("source_attributions", "target_attributions") if getattr(seq, n) is not None}
    if not tensors:
        return [("", seq)]
    extra = {tuple(t.shape[2:]) for t in tensors.values()}
    if len(extra) != 1:
        raise ValueError(f"source and target attributions have different extra dimensions {sorted(extra)}")
    ndim = 2 + len(extra.pop())
    for dim, span in (slice_dims or {}).items():
        if isinstance(dim, bool) or not isinstance(dim, int) or not 2 <= dim < ndim:
            raise ValueError(f"slice_dims keys must be extra dimensions (2..{ndim - 1}), got {dim!r}")
        if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            raise ValueError(f"slice_dims[{dim}] must be a (start, end) pair, got {span!r}")
        tensors = {n: t.narrow(dim, span[0], max(0, min(span[1], t.shape[dim]) - span[0])) for n, t in tensors.items()}
    shape = next(iter(tensors.values())).shape
    if show_dim is not None:
        if isinstance(show_dim, bool) or not isinstance(show_dim, int) or not 2 <= show_dim < ndim:
            raise ValueError(f"show_dim must be an extra dimension (2..{ndim - 1}), got {show_dim!r}")
        others = [d for d in range(2, ndim) if d != show_dim and shape[d] != 1]
        if others:
            raise ValueError(f"With show_dim={show_dim}, slice the other extra dimensions {others} to one index "
                             "with slice_dims={dim: (i, i + 1)}")
    for dim in range(2, ndim):
        if shape[dim] > max_show_size:
            raise ValueError(f"Dimension {dim} has {shape[dim]} entries, more than max_show_size={max_show_size}: "
                             f"pass slice_dims={{{dim}: (0, {max_show_size})}} or a larger max_show_size")
    panels = []
    for index in itertools.product(*(range(n) for n in shape[2:])):
        label = ", ".join(f"dim {d} = {i}" for d, i in zip(range(2, ndim), index) if show_dim in (None, d))
        fields = {n: t[(slice(None), slice(None), *index)] for n, t in tensors.items()}
        panels.append((label, copy_replace(seq, **fields)))
    return panels


def show_granular(obj, min_val: float | None = None, max_val: float | None = None, max_show_size: int = 20,
                  show_dim: int | None = None, slice_dims: dict | None = None, display: bool = True,
                  return_html: bool = False, console=None) -> str | None:
    """`show_granular(out, slice_dims={2: (0, 4)})`: the unaggregated scores, one heatmap per index of
    the extra dimensions (2: hidden or layer, ...), on one colour scale per example (or `min_val`/`max_val`).

    Every extra dimension shown must have at most `max_show_size` entries: narrow it with
    `slice_dims={dim: (start, end)}`. `show_dim` shows only that dimension (the others sliced to one index).
    """
    titles, panels, scales = [], [], []
    for number, seq in enumerate(_sequences(obj)):
        views = _panels(seq, max_show_size, show_dim, slice_dims)
        grids = [Grid(view) for _, view in views]
        scale = _scale(min_val, max_val)
        scale = max((g.scale for g in grids), default=0.0) if scale is None else scale
        for label, view in views:
            titles.append(f"Example {number}" + (f" ({label})" if label else ""))
            panels.append(view)
            scales.append(scale)
    if return_html:
        text = '<div class="seq-instrument">\n' + "\n".join(
            html_table(p, t, scale=s) for t, p, s in zip(titles, panels, scales)) + "\n</div>"
        if display:
            _ipython_display(text)
        return text
    if display:
        show_console(panels, console, titles=titles, scales=scales)
    return None


def _token_texts(tokens, replace_char: dict | None) -> list[str]:
    texts = []
    for token in tokens:
        text = token.token
        for old, new in (replace_char or {}).items():
            text = text.replace(old, new)
        texts.append(_label(text.strip()))
    return texts


def _breaks_after(texts: list[str], wrap_after) -> list[bool]:
    """Where a line ends: every `wrap_after` tokens (an int), or after tokens equal to it (a string) or in it (a list)."""
    if wrap_after is None:
        return [False] * len(texts)
    if isinstance(wrap_after, bool) or not isinstance(wrap_after, (int, str, list, tuple)):
        raise TypeError(f"wrap_after must be an int, a string or a list of strings, got {type(wrap_after).__name__}")
    if isinstance(wrap_after, int):
        if wrap_after < 1:
            raise ValueError(f"wrap_after must be at least 1, got {wrap_after}")
        return [(i + 1) % wrap_after == 0 for i in range(len(texts))]
    words = {wrap_after} if isinstance(wrap_after, str) else set(wrap_after)
    return [t in words for t in texts]


GREEN = (22, 163, 74)


def _highlight(value: float, scale: float) -> tuple[int, int, int] | None:
    if math.isnan(value) or scale <= 0:
        return None
    strength = min(abs(value) / scale, 1.0)
    end = GREEN if value >= 0 else (180, 83, 9)
    return tuple(round(w + (e - w) * strength) for w, e in zip(WHITE, end))


def _token_rows(seq: FeatureAttributionSequenceOutput, replace_char, scale: float, step_score_highlight):
    """(generated token, its background, [(title, [(token, score, background)])]) per generated token."""
    for name in ("source_attributions", "target_attributions"):
        value = getattr(seq, name)
        if value is not None and value.dim() != 2:
            raise ValueError(f"{name} has shape {tuple(value.shape)}; show_tokens needs one score per token and step: "
                             "aggregate first, or keep do_aggregation=True")
    if step_score_highlight is not None and step_score_highlight not in seq.step_scores:
        raise ValueError(f"No step score {step_score_highlight!r}; available: {sorted(seq.step_scores)}")
    generated = _token_texts(seq.generated, replace_char)
    source, target = _token_texts(seq.source, replace_char), _token_texts(seq.target, replace_char)
    highlights = [None] * len(generated)
    if step_score_highlight is not None:
        values = seq.step_scores[step_score_highlight].detach().cpu().double().tolist()
        top = max((abs(x) for x in values if math.isfinite(x)), default=0.0)
        highlights = [_highlight(x, top) for x in values]
    rows = []
    for j, token in enumerate(generated):
        parts = []
        if seq.source_attributions is not None:
            scores = seq.source_attributions[:, j].detach().cpu().double().tolist()
            parts.append(("Source", [(t, x, colour(x, scale)) for t, x in zip(source, scores)]))
        if seq.target_attributions is not None:
            seen = seq.attr_pos_start + j
            scores = seq.target_attributions[:seen, j].detach().cpu().double().tolist()
            parts.append(("Target", [(t, x, colour(x, scale)) for t, x in zip(target[:seen], scores)]))
        rows.append((token, highlights[j], parts))
    return rows


def _tokens_html(number: int, rows, wrap_after, step_score_highlight) -> str:
    e = html.escape

    def span(text, background, title):
        style = "padding:1px 3px;margin:1px;border-radius:3px;white-space:pre"
        if background is not None:
            style += f";background-color:rgb{background};color:{_text_colour(background)}"
        return f'<span style="{style}" title="{e(title)}">{e(text)}</span>'

    heading = "Generated text" + (f" with {step_score_highlight} highlights" if step_score_highlight else "")
    out = [f'<div class="seq-instrument-tokens" style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;margin:0 0 16px 0">',
           f"<p><b>Example {number}: {e(heading)}</b></p>"]
    for token, background, parts in rows:
        out.append(f"<details><summary>{span(token, background, token)}</summary>")
        for title, cells in parts:
            breaks = _breaks_after([t for t, _, _ in cells], wrap_after)
            body = "".join(span(t, bg, exact(x, torch.float32)) + ("<br>" if b else "") for (t, x, bg), b in zip(cells, breaks))
            out.append(f'<p><i style="color:#888">{e(title)} attributions for "{e(token)}":</i><br>{body}</p>')
        out.append("</details>")
    out.append("</div>")
    return "\n".join(out)


def _tokens_console(console, number: int, rows, wrap_after, step_score_highlight) -> None:
    from rich.style import Style
    from rich.text import Text

    def styled(text, background):
        return Text(text, style=Style(bgcolor=f"rgb{background}", color=_text_colour(background)) if background else "")

    heading = "Generated text" + (f" with {step_score_highlight} highlights" if step_score_highlight else "")
    console.print(Text(f"Example {number}: {heading}", style="bold"))
    line = Text()
    for token, background, _ in rows:
        line.append_text(styled(token, background))
        line.append(" ")
    console.print(line)
    for token, background, parts in rows:
        for title, cells in parts:
            text = Text(f'{title} attributions for "{token}": ', style="italic")
            breaks = _breaks_after([t for t, _, _ in cells], wrap_after)
            for (t, _, bg), b in zip(cells, breaks):
                text.append_text(styled(t, bg))
                text.append("\n" if b else " ")
            console.print(text)


def show_tokens(obj, min_val: float | None = None, max_val: float | None = None, display: bool = True,
                return_html: bool = False, replace_char: dict | None = None, wrap_after=None,
                step_score_highlight: str | None = None, aggregator=None, do_aggregation: bool = True,
                console=None, **aggregate_kwargs) -> str | None:
    """`show_tokens(out, step_score_highlight="probability")`: each generated token, then its source and
    target tokens coloured by attribution score (HTML: click a generated token to unfold them).

    Tokens are cleaned as Inseq does (`replace_char` replacements, then surrounding spaces stripped).
    The colour scale is shared by all examples: the largest score magnitude, or `min_val`/`max_val`.
    `wrap_after` breaks lines after every N tokens (an int) or after the given token(s).
    """
    sequences = _sequences(obj)
    if do_aggregation:
        sequences = [_default_view(seq, **aggregate_kwargs) if aggregator is None else seq.aggregate(aggregator, **aggregate_kwargs)
                     for seq in sequences]
    scale = _scale(min_val, max_val)
    if scale is None:
        scale = max([max(abs(seq.minimum), abs(seq.maximum)) for seq in sequences], default=0.0)
    rendered = [(number, _token_rows(seq, replace_char, scale, step_score_highlight)) for number, seq in enumerate(sequences)]
    if return_html:
        text = '<div class="seq-instrument">\n' + "\n".join(
            _tokens_html(n, rows, wrap_after, step_score_highlight) for n, rows in rendered) + "\n</div>"
        if display:
            _ipython_display(text)
        return text
    if display:
        from rich.console import Console

        console = console or Console()
        for n, rows in rendered:
            _tokens_console(console, n, rows, wrap_after, step_score_highlight)
    return None


# -- Inseq's module-level functions ------------------------------------------------------------------------


def _as_sequences(attributions) -> list[FeatureAttributionSequenceOutput]:
    if isinstance(attributions, (list, tuple)):
        return [seq for item in attributions for seq in _sequences(item)]
    return _sequences(attributions)


def show_attributions(attributions, min_val: float | None = None, max_val: float | None = None, display: bool = True,
                      return_html: bool = False, console=None) -> str | None:
    """`instrument.show_attributions(out.aggregate())`: heatmaps of already 2-D attributions (no aggregation).

    Takes a sequence output, a list of them, or a whole output; `min_val`/`max_val` fix the colour scale.
    """
    sequences = _as_sequences(attributions)
    scales = [_scale(min_val, max_val)] * len(sequences)
    if return_html:
        text = '<div class="seq-instrument">\n' + "\n".join(
            html_table(seq, f"Example {i}", scale=s) for i, (seq, s) in enumerate(zip(sequences, scales))) + "\n</div>"
        if display:
            _ipython_display(text)
        return text
    if display:
        show_console(sequences, console, scales=scales)
    return None


def show_granular_attributions(attributions, max_show_size: int = 20, min_val: float | None = None,
                               max_val: float | None = None, show_dim: int | None = None, slice_dims: dict | None = None,
                               display: bool = True, return_html: bool = False, console=None) -> str | None:
    """`instrument.show_granular_attributions(seq, slice_dims={2: (0, 4)})`: see `show_granular`."""
    from instrument.outputs import FeatureAttributionOutput as Output

    return show_granular(Output(_as_sequences(attributions)), min_val, max_val, max_show_size, show_dim, slice_dims,
                         display, return_html, console)


def show_token_attributions(attributions, min_val: float | None = None, max_val: float | None = None, display: bool = True,
                            return_html: bool = False, replace_char: dict | None = None, wrap_after=None,
                            step_score_highlight: str | None = None, console=None) -> str | None:
    """`instrument.show_token_attributions(out.aggregate())`: see `show_tokens` (no aggregation here, as in Inseq)."""
    from instrument.outputs import FeatureAttributionOutput as Output

    return show_tokens(Output(_as_sequences(attributions)), min_val, max_val, display, return_html, replace_char,
                       wrap_after, step_score_highlight, do_aggregation=False, console=console)
