"""The console view: rich heatmap tables, split into several tables when the steps do not fit the width,
each example followed by a legend line (the colour scale and the normalisation); `show_layers` prints
layer outputs as layers x tokens tables, one per generated token.

from rich.console import Console
show_console(prepared(out, aggregate=True), Console(width=100), step_score_highlight="probability")
show_layers(out, step=0)            # target_layers= outputs: one layers x tokens table for step 0
"""

from __future__ import annotations

from collections.abc import Sequence

from instrument.aggregation import aggregate_sequence
from instrument.outputs import FeatureAttributionSequenceOutput
from instrument.views.colours import colour, largest_magnitude, text_colour
from instrument.views.grid import Grid
from instrument.views.labels import format_score, token_label
from instrument.views.prepare import attribution_dims, sequences_of

LEGEND_PREFIX = "colour scale:"


def legend(scale: float, note: str | None = None):
    """One line: the diverging scale from -scale (blue) through 0 (white) to +scale (red), and `note`."""
    from rich.style import Style
    from rich.text import Text

    text = Text(f"{LEGEND_PREFIX} {format_score(-scale)} ")
    for step in range(-4, 5):
        background = colour(scale * step / 4, scale) or (255, 255, 255)
        text.append("  ", style=Style(bgcolor=f"rgb{background}"))
    text.append(f" {format_score(scale)} (blue negative, red positive, saturating at the largest magnitude)")
    if note:
        text.append(f"; {note}")
    return text


def column_ranges(widths: Sequence[int], used: int, width: int) -> list[tuple[int, int]]:
    """Consecutive column ranges whose cells (each `widths[i]` + 3 characters) fit `width` after `used`."""
    ranges, start, total = [], 0, used
    for i, cell in enumerate(widths):
        if i > start and total + cell + 3 > width:
            ranges.append((start, i))
            start, total = i, used
        total += cell + 3
    return ranges + [(start, len(widths))]


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
    note: str | None = None,
) -> None:
    """Prints one heatmap table (or several, for many steps) per example to `console`, then its legend."""
    from rich.console import Console

    console = console or Console()
    for index, seq in enumerate(sequences):
        grid = Grid(seq, step_score_highlight, scales[index] if scales else None)
        for table in _rich_tables(grid, titles[index] if titles else f"Example {index}", console.width, max_columns):
            console.print(table)
        console.print(legend(grid.scale, note))


def show_layers(obj, step: int | None = None, console=None, **aggregate_kwargs) -> None:
    """`show_layers(out)`: for a layer output (`[tokens, steps, layers, hidden]`, from `target_layers=`),
    one layers x tokens table per generated token (or only `step`), hidden reduced per layer by the
    "scores" aggregator (options in `aggregate_kwargs`); wide tables are split by the console width."""
    from rich import box
    from rich.console import Console
    from rich.style import Style
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    for number, seq in enumerate(sequences_of(obj)):
        if attribution_dims(seq) != 4:
            raise ValueError(
                f"Example {number} has no layer dimension (show_layers needs [tokens, steps, layers, hidden] "
                "scores, e.g. from target_layers=); use show()"
            )
        n_steps = len(seq.generated)
        if step is not None and not (isinstance(step, int) and -n_steps <= step < n_steps):
            raise ValueError(f"step must be an int in [-{n_steps}, {n_steps}), got {step!r}")
        per_layer = aggregate_sequence(seq, "scores", keep_layers=True, **aggregate_kwargs)
        steps = range(n_steps) if step is None else [step % n_steps]
        for side, tokens in (("source", seq.source), ("target", seq.target)):
            values = getattr(per_layer, f"{side}_attributions")
            if values is None:
                continue
            values = values.detach().cpu().double()  # [tokens, steps, layers]
            scale = largest_magnitude(values.flatten().tolist())
            labels = [token_label(t.token) for t in tokens]
            for j in steps:
                column = values[:, j, :].T.tolist()  # [layers, tokens]
                widths = [
                    max(len(labels[i]), *(len(format_score(row[i])) for row in column)) for i in range(len(labels))
                ]
                generated = token_label(seq.generated[j].token)
                ranges = column_ranges(widths, 12, console.width)
                for first, end in ranges:
                    part = f", {side} tokens {first}-{end - 1}" if len(ranges) > 1 else ""
                    title = f"Example {number}: {side} layers x tokens for {generated!r} (step {j}{part})"
                    table = Table(title=Text(title), box=box.SIMPLE_HEAVY)
                    table.add_column(Text("layer"), style="bold")
                    for i in range(first, end):
                        table.add_column(Text(labels[i]), justify="right", overflow="fold")
                    for layer, row in enumerate(column):
                        cells = []
                        for value in row[first:end]:
                            background = colour(value, scale)
                            style = (
                                Style(bgcolor=f"rgb{background}", color=text_colour(background)) if background else ""
                            )
                            cells.append(Text(format_score(value), style=style))
                        table.add_row(Text(str(layer)), *cells)
                    console.print(table)
            console.print(legend(scale, "hidden reduced per layer ('scores', each step and layer L1-normalised)"))
