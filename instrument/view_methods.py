"""The views of `instrument.views` as methods of the outputs (`seq.show()`, `out.show_tokens()`, ...).

    out.show()                                   # one heatmap per example in the console
    html = out[0].show(return_html=True, display=False)

The views are imported when called: they read the output classes, which inherit these methods.
"""

from __future__ import annotations

from typing import Any


class Views:
    """The views of `instrument.views` as methods, shared by a sequence output and a whole output."""

    def show(
        self,
        return_html: bool = False,
        aggregate: Any = True,
        display: bool = True,
        step_score_highlight: str | None = None,
        console: Any = None,
        **kwargs,
    ) -> str | None:
        """Heatmaps in the console (one per example), or their HTML with `return_html=True`.

        out.show(step_score_highlight="probability")
        """
        from instrument.views.heatmap import show

        return show(self, return_html, aggregate, display, step_score_highlight, console, **kwargs)

    def show_granular(
        self,
        min_val: float | None = None,
        max_val: float | None = None,
        max_show_size: int = 20,
        show_dim: int | None = None,
        slice_dims: dict | None = None,
        display: bool = True,
        return_html: bool = False,
        console: Any = None,
    ) -> str | None:
        """Heatmaps of the unaggregated scores: one per index of the extra (hidden, layer) dimensions.

        out.show_granular(slice_dims={2: (0, 4)})   # hidden units 0..3 of a [tokens, steps, hidden] tensor
        """
        from instrument.views.granular import show_granular

        return show_granular(self, min_val, max_val, max_show_size, show_dim, slice_dims, display, return_html, console)

    def show_tokens(
        self,
        min_val: float | None = None,
        max_val: float | None = None,
        display: bool = True,
        return_html: bool = False,
        replace_char: dict | None = None,
        wrap_after: Any = None,
        step_score_highlight: str | None = None,
        aggregator: Any = None,
        do_aggregation: bool = True,
        console: Any = None,
        **kwargs,
    ) -> str | None:
        """The text, each generated token followed by its attributed tokens coloured by score.

        out.show_tokens(step_score_highlight="probability", wrap_after=10)
        """
        from instrument.views.tokens import show_tokens

        return show_tokens(
            self,
            min_val,
            max_val,
            display,
            return_html,
            replace_char,
            wrap_after,
            step_score_highlight,
            aggregator,
            do_aggregation,
            console,
            **kwargs,
        )

    def show_layers(self, step: int | None = None, console: Any = None, **kwargs) -> None:
        """Layer outputs (`target_layers=`) in the console: a layers x tokens table per generated token.

        out.show_layers(step=0)
        """
        from instrument.views.console import show_layers

        show_layers(self, step, console, **kwargs)

    def plot(self, example: int = 0, step: int | None = None, **kwargs) -> Any:
        """A matplotlib Figure of one example (needs the `plots` extra); `step=` for layer outputs.

        out.plot(example=1).savefig("a.pdf")
        """
        from instrument.views.images import plot

        return plot(self, example, step, **kwargs)

    def save_png(self, path, overwrite: bool = False, **kwargs):
        """`out.save_png("a.png", example=0, dpi=200)`: `plot(...)` as a PNG."""
        from instrument.views.images import save_png

        return save_png(self, path, overwrite=overwrite, **kwargs)

    def save_svg(self, path, overwrite: bool = False, **kwargs):
        """`out.save_svg("a.svg", step=0)`: `plot(...)` as an SVG."""
        from instrument.views.images import save_svg

        return save_svg(self, path, overwrite=overwrite, **kwargs)

    def interactive_html(self, **kwargs) -> str:
        """The interactive view (heatmaps, hover, bar charts, layers, heads, search, export) as one
        self-contained `<div>`; see `instrument.views.interactive`.

        Path("view.html").write_text(out.interactive_html())   # or out.save_html("view.html")
        """
        from instrument.views.interactive import interactive_html

        return interactive_html(self, **kwargs)

    def save_html(self, path, overwrite: bool = False, **kwargs):
        """Writes the interactive view as a standalone page (`interactive=False`: the static tables of
        `show(return_html=True)`)."""
        from instrument.views.heatmap import save_html

        return save_html(self, path, overwrite=overwrite, **kwargs)

    def _repr_html_(self) -> str:
        from instrument.views.heatmap import repr_html

        return repr_html(self)
