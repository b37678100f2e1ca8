"""`show`: the heatmap of every example, in the console or as HTML; `save_html` writes it as a page.

show(out)                                          # rich tables, aggregated with "scores"
html = show(out, return_html=True, aggregate="subwords", step_score_highlight="probability")
save_html(out, "attributions.html", overwrite=True)      # the interactive page (static tables: interactive=False)
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from instrument.views.colours import bounds_scale
from instrument.views.console import show_console
from instrument.views.html_tables import display_in_notebook, html_document, to_html
from instrument.views.interactive import interactive_html, interactive_page, normalisation
from instrument.views.prepare import prepared


def show(
    obj,
    return_html: bool = False,
    aggregate: bool | str | list = True,
    display: bool = True,
    step_score_highlight: str | None = None,
    console=None,
    max_columns: int | None = None,
    **aggregate_kwargs,
) -> str | None:
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
    scale = bounds_scale(aggregate_kwargs.pop("min_val", None), aggregate_kwargs.pop("max_val", None))
    sequences = prepared(obj, aggregate, **aggregate_kwargs)
    if return_html:
        text = to_html(sequences, step_score_highlight, scale)
        if display:
            display_in_notebook(text)
        return text
    if display:
        note = "normalisation: " + normalisation("plain", aggregate, aggregate_kwargs)
        show_console(sequences, console, step_score_highlight, max_columns, scales=[scale] * len(sequences), note=note)
    return None


def save_html(
    obj,
    path: str | os.PathLike,
    overwrite: bool = False,
    aggregate: bool | str | list = True,
    step_score_highlight: str | None = None,
    interactive: bool = True,
    **aggregate_kwargs,
) -> Path:
    """`save_html(out, "attr.html")`: a standalone page, the interactive view (`instrument.views.interactive`),
    or with `interactive=False` the static tables of `show(out, return_html=True)`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists already; pass overwrite=True to replace it")
    if interactive:
        if step_score_highlight is not None:
            raise ValueError(
                "step_score_highlight is for interactive=False (the interactive view shows every step score)"
            )
        text = interactive_page(obj, aggregate=aggregate, **aggregate_kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path
    body = show(
        obj,
        return_html=True,
        aggregate=aggregate,
        display=False,
        step_score_highlight=step_score_highlight,
        **aggregate_kwargs,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_document(body), encoding="utf-8")
    return path


def repr_html(obj: Any) -> str:
    """For notebooks: the interactive view, or the escaped error when the output cannot be shown."""
    try:
        return interactive_html(obj)
    except (ValueError, TypeError) as error:
        return f"<pre>{html.escape(repr(error))}</pre>"
