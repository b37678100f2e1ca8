"""Heatmap views of attributions: rich tables in the console, or self-contained HTML.

    from instrument.views import show, save_html
    show(out)                                    # console: one heatmap table per example
    html = show(out, return_html=True)           # one <table> per example, inline styles only
    save_html(out, "attributions.html")          # the interactive view (interactive=False: the tables)
    html = interactive_html(out)                 # what notebooks show (`out._repr_html_()`)

Columns are the generated tokens; rows the source tokens, then the target tokens (decoder-only
models: target rows only), then one row per step score. By default the output is first aggregated
with "scores" (hidden and layer dimensions reduced with `vnorm`, each step normalized so that its
absolute scores sum to 1); pass `aggregate=False` for outputs that are already 2-D. Cell colours are
diverging: red for positive, blue for negative, stronger with the magnitude relative to the largest
absolute score of the example; NaN cells (positions a step cannot see) are blank. Tokens are shown
as they are, with control characters escaped (`\\n`); they are never read as markup.

Modules: `labels` (how scores and tokens are written), `colours` (the colour scales), `grid` (what
one example's table holds), `prepare` (which 2-D sequences are shown), `console` and `html_tables`
(the two renderings; `console.show_layers`: layers x tokens tables), `heatmap` (`show`, `save_html`),
`granular` (`show_granular`), `tokens` (`show_tokens`), `inseq_functions` (Inseq's module-level `show_*`
functions), `interactive` (the interactive HTML view, with `interactive.js` and `interactive.css`),
`images` (matplotlib: `plot`, `save_png`, `save_svg`), `server` (`instrument view DIR`).
"""

from instrument.views.console import show_layers
from instrument.views.granular import show_granular
from instrument.views.heatmap import repr_html, save_html, show
from instrument.views.inseq_functions import show_attributions, show_granular_attributions, show_token_attributions
from instrument.views.interactive import interactive_html, interactive_page
from instrument.views.tokens import show_tokens

__all__ = [
    "interactive_html",
    "interactive_page",
    "repr_html",
    "save_html",
    "show",
    "show_attributions",
    "show_granular",
    "show_granular_attributions",
    "show_layers",
    "show_token_attributions",
    "show_tokens",
]
