"""The console view: rich heatmap tables, split into several tables when the steps do not fit the width.

from rich.console import Console
show_console(prepared(out, aggregate=True), Console(width=100), step_score_highlight="probability")
"""

from __future__ import annotations

from collections.abc import Sequence

from instrument.outputs import FeatureAttributionSequenceOutput
from instrument.views.colours import colour, largest_magnitude, text_colour
from instrument.views.grid import Grid
from instrument.views.labels import format_score


def _rich_tables(grid: Grid, title: str, width: int, max_columns: int | None):
    from rich import box
    from rich.style import Style
    from rich.table import Table
    from rich.text import Text

    def cell(value, scale):
        background = colour(value, scale)
        if background is None:
            return Text(format_score(value))
        return Text(format_score(value), style=Style(bgcolor=f"rgb{background}", color=text_colour(background)))

    ranges = grid.chunks(width, max_columns)
    for first, end in ranges:
        steps = f"step {end}" if end - first == 1 else f"steps {first + 1}-{end}"
        suffix = f" ({steps} of {len(grid.columns)})" if len(ranges) > 1 else ""
        table = Table(title=Text(title + suffix), box=box.SIMPLE_HEAVY, show_lines=False, expand=False)
        table.add_column(Text(""), overflow="fold", style="bold", max_width=grid.label_width)
        for i in range(first, end):
            background = grid.highlight[i] if grid.highlight else None
            style = Style(bgcolor=f"rgb{background}", color=text_colour(background)) if background else ""
            table.add_column(Text(grid.columns[i], style=style), justify="right", overflow="fold")
        for index, (_, rows) in enumerate(grid.sections):
            for row_index, (label, values) in enumerate(rows):
                last_of_section = row_index == len(rows) - 1 and (index < len(grid.sections) - 1 or bool(grid.scores))
                table.add_row(
                    Text(label), *(cell(v, grid.scale) for v in values[first:end]), end_section=last_of_section
                )
        for name, values in grid.scores:
            scale = largest_magnitude(values)
            highlighted = name == grid.highlight_name
            table.add_row(
                Text(name, style="italic"),
                *(cell(v, scale) if highlighted else Text(format_score(v)) for v in values[first:end]),
            )
        yield table


def show_console(
    sequences: Sequence[FeatureAttributionSequenceOutput],
    console=None,
    step_score_highlight=None,
    max_columns: int | None = None,
    titles: Sequence[str] | None = None,
    scales: Sequence[float | None] | None = None,
) -> None:
    """Prints one heatmap table (or several, for many steps) per example to `console`."""
    from rich.console import Console

    console = console or Console()
    for index, seq in enumerate(sequences):
        grid = Grid(seq, step_score_highlight, scales[index] if scales else None)
        for table in _rich_tables(grid, titles[index] if titles else f"Example {index}", console.width, max_columns):
            console.print(table)
