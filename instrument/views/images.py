"""Images for papers: one example's heatmap with matplotlib (the optional extra `plots`), on the views'
diverging scale (blue negative, white 0, red positive, centred at 0, saturating at the largest magnitude).

    figure = plot(out, example=0)                   # attributed tokens x generated tokens
    figure = plot(out, step=3)                      # layer outputs: layers x tokens for generated token 3
    # attention with layers and heads kept (aggregate_fn=None): the mean over layers and heads
    save_png(out, "attributions.png", dpi=200); save_svg(out, "attributions.svg")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from instrument.aggregation import aggregate_sequence
from instrument.outputs import copy_replace
from instrument.views.colours import NEGATIVE, POSITIVE, WHITE
from instrument.views.labels import token_label
from instrument.views.prepare import attribution_dims, default_view, sequences_of


def colour_map():
    """The views' diverging scale as a matplotlib colormap (NaN cells light grey)."""
    from matplotlib.colors import LinearSegmentedColormap

    stops = [tuple(v / 255 for v in rgb) for rgb in (NEGATIVE, WHITE, POSITIVE)]
    cmap = LinearSegmentedColormap.from_list("seq-instrument", stops, N=257)  # odd: 0 is exactly white
    return cmap.with_extremes(bad="#f3f4f6")


def _panels(
    seq, step: int | None, aggregate, aggregate_kwargs, heads: bool
) -> list[tuple[str, np.ndarray, list[str], list[str]]]:
    """(title, matrix, row labels, column labels) per panel of the figure."""
    generated = [token_label(t.token) for t in seq.generated]
    sides = (("source", seq.source), ("target", seq.target))
    if heads:  # attention with layers and heads kept: their mean, as the interactive view's main heatmap
        if step is not None:
            raise ValueError(
                "step= is for layer outputs; attention with heads kept is plotted as the mean of its heads"
            )
        means = [getattr(seq, f"{side}_attributions") for side, _ in sides]
        seq = copy_replace(
            seq,
            **{
                f"{side}_attributions": None if t is None else t.float().nanmean(dim=(2, 3))
                for (side, _), t in zip(sides, means)
            },
        )
        aggregate = False
    if step is not None:
        if attribution_dims(seq) != 4:
            raise ValueError("step= is for layer outputs ([tokens, steps, layers, hidden], from target_layers=)")
        if not (isinstance(step, int) and -len(generated) <= step < len(generated)):
            raise ValueError(f"step must be an int in [-{len(generated)}, {len(generated)}), got {step!r}")
        per_layer = aggregate_sequence(seq, "scores", keep_layers=True, **aggregate_kwargs)
        panels = []
        for side, tokens in sides:
            values = getattr(per_layer, f"{side}_attributions")
            if values is not None:
                matrix = values[:, step, :].T.detach().cpu().numpy()
                title = f"{side} layers x tokens for {generated[step]!r} (step {step % len(generated)})"
                panels.append(
                    (title, matrix, [f"layer {i}" for i in range(len(matrix))], [token_label(t.token) for t in tokens])
                )
        return panels
    shown = default_view(seq, **aggregate_kwargs) if aggregate else seq
    parts = [
        (token_label(t.token), row)
        for side, tokens in sides
        if getattr(shown, f"{side}_attributions") is not None
        for t, row in zip(tokens, getattr(shown, f"{side}_attributions").detach().cpu())
    ]
    if any(row.dim() != 1 for _, row in parts):
        raise ValueError("plot needs 2-D scores with aggregate=False: aggregate first")
    matrix = torch.stack([row for _, row in parts]).numpy()
    return [("attributed tokens x generated tokens", matrix, [label for label, _ in parts], generated)]


def plot(
    obj, example: int = 0, step: int | None = None, aggregate: bool = True, title: str | None = None, **aggregate_kwargs
):
    """`plot(out)`: a matplotlib Figure of one example (`example`), or for layer outputs with `step` the
    layers x tokens heatmap of that generated token; colours centred at 0 with a colour bar."""
    import matplotlib.pyplot as plt

    sequences = sequences_of(obj)
    if isinstance(example, bool) or not isinstance(example, int) or not -len(sequences) <= example < len(sequences):
        raise ValueError(f"example must be an int in [-{len(sequences)}, {len(sequences)}), got {example!r}")
    info = getattr(obj, "info", {}) or {}
    heads = attribution_dims(sequences[example]) == 4 and info.get("attribution_method") == "attention"
    panels = _panels(sequences[example], step, aggregate, aggregate_kwargs, heads)
    heights = [max(2.0, 0.22 * len(rows) + 1.2) for _, _, rows, _ in panels]
    width = max(4.0, 0.28 * max(len(cols) for _, _, _, cols in panels) + 2.5)
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(width, sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
        constrained_layout=True,
    )
    cmap = colour_map()
    for ax, (name, matrix, rows, cols) in zip(axes[:, 0], panels):
        scale = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
        image = ax.imshow(
            np.ma.masked_invalid(matrix), cmap=cmap, vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest"
        )
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7, fontfamily="monospace")
        ax.set_yticks(range(len(rows)), rows, fontsize=7, fontfamily="monospace")
        ax.set_title(name, fontsize=9)
        figure.colorbar(image, ax=ax, shrink=0.8).set_label("score (0 = white)", fontsize=8)
    heading = title or " / ".join(
        str(info[k]) for k in ("model_name", "attribution_method", "attributed_fn") if info.get(k)
    )
    if heading:
        figure.suptitle(heading, fontsize=10)
    return figure


def _save(obj, path, kind: str, overwrite: bool, dpi: int, **plot_kwargs) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists already; pass overwrite=True to replace it")
    figure = plot(obj, **plot_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(path, format=kind, dpi=dpi)
    finally:
        plt.close(figure)
    return path


def save_png(obj, path: str | os.PathLike, overwrite: bool = False, dpi: int = 200, **plot_kwargs) -> Path:
    """`save_png(out, "a.png", example=1)`: `plot(...)` written as a PNG."""
    return _save(obj, path, "png", overwrite, dpi, **plot_kwargs)


def save_svg(obj, path: str | os.PathLike, overwrite: bool = False, **plot_kwargs) -> Path:
    """`save_svg(out, "a.svg", step=0)`: `plot(...)` written as an SVG."""
    return _save(obj, path, "svg", overwrite, 72, **plot_kwargs)
