"""Inseq's module-level view functions, on a sequence output, a list of them, or a whole output.

instrument.show_attributions(out.aggregate())                       # already 2-D: no aggregation
instrument.show_granular_attributions(seq, slice_dims={2: (0, 4)})
instrument.show_token_attributions(out.aggregate(), wrap_after=10)
"""

from __future__ import annotations

from instrument.outputs import FeatureAttributionOutput
from instrument.views.colours import bounds_scale
from instrument.views.console import show_console
from instrument.views.granular import show_granular
from instrument.views.html_tables import display_in_notebook, html_block, html_table
from instrument.views.prepare import flattened_sequences
from instrument.views.tokens import show_tokens


def show_attributions(
    attributions,
    min_val: float | None = None,
    max_val: float | None = None,
    display: bool = True,
    return_html: bool = False,
    console=None,
) -> str | None:
    """`instrument.show_attributions(out.aggregate())`: heatmaps of already 2-D attributions (no aggregation).

    Takes a sequence output, a list of them, or a whole output; `min_val`/`max_val` fix the colour scale.
    """
    sequences = flattened_sequences(attributions)
    scales = [bounds_scale(min_val, max_val)] * len(sequences)
    if return_html:
        tables = [html_table(seq, f"Example {i}", scale=scale) for i, (seq, scale) in enumerate(zip(sequences, scales))]
        text = html_block(tables)
        if display:
            display_in_notebook(text)
        return text
    if display:
        show_console(sequences, console, scales=scales)
    return None


def show_granular_attributions(
    attributions,
    max_show_size: int = 20,
    min_val: float | None = None,
    max_val: float | None = None,
    show_dim: int | None = None,
    slice_dims: dict | None = None,
    display: bool = True,
    return_html: bool = False,
    console=None,
) -> str | None:
    """`instrument.show_granular_attributions(seq, slice_dims={2: (0, 4)})`: see `show_granular`."""
    return show_granular(
        FeatureAttributionOutput(flattened_sequences(attributions)),
        min_val,
        max_val,
        max_show_size,
        show_dim,
        slice_dims,
        display,
        return_html,
        console,
    )


def show_token_attributions(
    attributions,
    min_val: float | None = None,
    max_val: float | None = None,
    display: bool = True,
    return_html: bool = False,
    replace_char: dict | None = None,
    wrap_after=None,
    step_score_highlight: str | None = None,
    console=None,
) -> str | None:
    """`instrument.show_token_attributions(out.aggregate())`: see `show_tokens` (no aggregation here, as in Inseq)."""
    return show_tokens(
        FeatureAttributionOutput(flattened_sequences(attributions)),
        min_val,
        max_val,
        display,
        return_html,
        replace_char,
        wrap_after,
        step_score_highlight,
        do_aggregation=False,
        console=console,
    )
