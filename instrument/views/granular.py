"""`show_granular` (Inseq's): the unaggregated scores, one heatmap per index of the extra dimensions.

show_granular(out, slice_dims={2: (0, 4)})                 # hidden units 0..3: four heatmaps per example
show_granular(out, show_dim=2, slice_dims={3: (0, 1)})     # only dimension 2, dimension 3 at index 0
"""

from __future__ import annotations

import itertools

from instrument.outputs import FeatureAttributionSequenceOutput, copy_replace
from instrument.sequence_fields import TENSOR_FIELDS
from instrument.views.colours import bounds_scale
from instrument.views.console import show_console
from instrument.views.grid import Grid
from instrument.views.html_tables import display_in_notebook, html_block, html_table
from instrument.views.prepare import sequences_of


def _is_int_in(value, low: int, high: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and low <= value < high


def panels(
    seq: FeatureAttributionSequenceOutput, max_show_size: int, show_dim: int | None, slice_dims: dict | None
) -> list[tuple[str, FeatureAttributionSequenceOutput]]:
    """2-D views of `seq`: one per index combination of the extra dimensions (after `slice_dims`)."""
    tensors = {name: getattr(seq, name) for name in TENSOR_FIELDS if getattr(seq, name) is not None}
    if not tensors:
        return [("", seq)]
    extra = {tuple(t.shape[2:]) for t in tensors.values()}
    if len(extra) != 1:
        raise ValueError(f"source and target attributions have different extra dimensions {sorted(extra)}")
    ndim = 2 + len(extra.pop())
    for dim, span in (slice_dims or {}).items():
        if not _is_int_in(dim, 2, ndim):
            raise ValueError(f"slice_dims keys must be extra dimensions (2..{ndim - 1}), got {dim!r}")
        if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            raise ValueError(f"slice_dims[{dim}] must be a (start, end) pair, got {span!r}")
        tensors = {n: t.narrow(dim, span[0], max(0, min(span[1], t.shape[dim]) - span[0])) for n, t in tensors.items()}
    shape = next(iter(tensors.values())).shape
    if show_dim is not None:
        if not _is_int_in(show_dim, 2, ndim):
            raise ValueError(f"show_dim must be an extra dimension (2..{ndim - 1}), got {show_dim!r}")
        others = [d for d in range(2, ndim) if d != show_dim and shape[d] != 1]
        if others:
            raise ValueError(
                f"With show_dim={show_dim}, slice the other extra dimensions {others} to one index "
                "with slice_dims={dim: (i, i + 1)}"
            )
    for dim in range(2, ndim):
        if shape[dim] > max_show_size:
            raise ValueError(
                f"Dimension {dim} has {shape[dim]} entries, more than max_show_size={max_show_size}: "
                f"pass slice_dims={{{dim}: (0, {max_show_size})}} or a larger max_show_size"
            )
    views = []
    for index in itertools.product(*(range(n) for n in shape[2:])):
        label = ", ".join(f"dim {d} = {i}" for d, i in zip(range(2, ndim), index) if show_dim in (None, d))
        fields = {n: t[(slice(None), slice(None), *index)] for n, t in tensors.items()}
        views.append((label, copy_replace(seq, **fields)))
    return views


def show_granular(
    obj,
    min_val: float | None = None,
    max_val: float | None = None,
    max_show_size: int = 20,
    show_dim: int | None = None,
    slice_dims: dict | None = None,
    display: bool = True,
    return_html: bool = False,
    console=None,
) -> str | None:
    """`show_granular(out, slice_dims={2: (0, 4)})`: the unaggregated scores, one heatmap per index of
    the extra dimensions (2: hidden or layer, ...), on one colour scale per example (or `min_val`/`max_val`).

    Every extra dimension shown must have at most `max_show_size` entries: narrow it with
    `slice_dims={dim: (start, end)}`. `show_dim` shows only that dimension (the others sliced to one index).
    """
    titles, shown, scales = [], [], []
    for number, seq in enumerate(sequences_of(obj)):
        views = panels(seq, max_show_size, show_dim, slice_dims)
        grids = [Grid(view) for _, view in views]
        scale = bounds_scale(min_val, max_val)
        scale = max((g.scale for g in grids), default=0.0) if scale is None else scale
        for label, view in views:
            titles.append(f"Example {number}" + (f" ({label})" if label else ""))
            shown.append(view)
            scales.append(scale)
    if return_html:
        text = html_block([html_table(view, title, scale=scale) for title, view, scale in zip(titles, shown, scales)])
        if display:
            display_in_notebook(text)
        return text
    if display:
        show_console(shown, console, titles=titles, scales=scales)
    return None
