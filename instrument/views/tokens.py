"""`show_tokens` (Inseq's): the text, each generated token followed by its attributed tokens coloured by score.

show_tokens(out, step_score_highlight="probability", wrap_after=10)        # console
html = show_tokens(out, return_html=True, replace_char={"Ġ": " "})          # click a token to unfold it
"""

from __future__ import annotations

import html

import torch

from instrument.outputs import FeatureAttributionSequenceOutput
from instrument.views.colours import bounds_scale, colour, highlight_colour, largest_magnitude, text_colour
from instrument.views.grid import check_step_score, check_two_dimensional
from instrument.views.html_tables import display_in_notebook, html_block
from instrument.views.labels import exact, token_label
from instrument.views.prepare import default_view, sequences_of


def _token_texts(tokens, replace_char: dict | None) -> list[str]:
    texts = []
    for token in tokens:
        text = token.token
        for old, new in (replace_char or {}).items():
            text = text.replace(old, new)
        texts.append(token_label(text.strip()))
    return texts


def breaks_after(texts: list[str], wrap_after) -> list[bool]:
    """Where a line ends: every `wrap_after` tokens (an int), or after tokens equal to it (a string) or in it (a
    list)."""
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


def token_rows(seq: FeatureAttributionSequenceOutput, replace_char, scale: float, step_score_highlight):
    """(generated token, its background, [(title, [(token, score, background)])]) per generated token."""
    check_two_dimensional(seq, "show_tokens", "aggregate first, or keep do_aggregation=True")
    check_step_score(seq, step_score_highlight)
    generated = _token_texts(seq.generated, replace_char)
    source, target = _token_texts(seq.source, replace_char), _token_texts(seq.target, replace_char)
    highlights = [None] * len(generated)
    if step_score_highlight is not None:
        values = seq.step_scores[step_score_highlight].detach().cpu().double().tolist()
        top = largest_magnitude(values)
        highlights = [highlight_colour(x, top) for x in values]
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


def _heading(step_score_highlight: str | None) -> str:
    return "Generated text" + (f" with {step_score_highlight} highlights" if step_score_highlight else "")


def tokens_html(number: int, rows, wrap_after, step_score_highlight) -> str:
    """One example's token view: a `<details>` per generated token that unfolds its attributed tokens."""
    escape = html.escape

    def span(text, background, title):
        style = "padding:1px 3px;margin:1px;border-radius:3px;white-space:pre"
        if background is not None:
            style += f";background-color:rgb{background};color:{text_colour(background)}"
        return f'<span style="{style}" title="{escape(title)}">{escape(text)}</span>'

    font = "font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;margin:0 0 16px 0"
    out = [
        f'<div class="seq-instrument-tokens" style="{font}">',
        f"<p><b>Example {number}: {escape(_heading(step_score_highlight))}</b></p>",
    ]
    for token, background, parts in rows:
        out.append(f"<details><summary>{span(token, background, token)}</summary>")
        for title, cells in parts:
            breaks = breaks_after([t for t, _, _ in cells], wrap_after)
            body = "".join(
                span(text, cell_background, exact(score, torch.float32)) + ("<br>" if line_ends else "")
                for (text, score, cell_background), line_ends in zip(cells, breaks)
            )
            out.append(
                f'<p><i style="color:#888">{escape(title)} attributions for "{escape(token)}":</i><br>{body}</p>'
            )
        out.append("</details>")
    out.append("</div>")
    return "\n".join(out)


def tokens_console(console, number: int, rows, wrap_after, step_score_highlight) -> None:
    """Prints one example's token view: the generated text, then each token's attributed tokens."""
    from rich.style import Style
    from rich.text import Text

    def styled(text, background):
        return Text(text, style=Style(bgcolor=f"rgb{background}", color=text_colour(background)) if background else "")

    console.print(Text(f"Example {number}: {_heading(step_score_highlight)}", style="bold"))
    line = Text()
    for token, background, _ in rows:
        line.append_text(styled(token, background))
        line.append(" ")
    console.print(line)
    for token, background, parts in rows:
        for title, cells in parts:
            text = Text(f'{title} attributions for "{token}": ', style="italic")
            breaks = breaks_after([t for t, _, _ in cells], wrap_after)
            for (cell_text, _, cell_background), line_ends in zip(cells, breaks):
                text.append_text(styled(cell_text, cell_background))
                text.append("\n" if line_ends else " ")
            console.print(text)


def show_tokens(
    obj,
    min_val: float | None = None,
    max_val: float | None = None,
    display: bool = True,
    return_html: bool = False,
    replace_char: dict | None = None,
    wrap_after=None,
    step_score_highlight: str | None = None,
    aggregator=None,
    do_aggregation: bool = True,
    console=None,
    **aggregate_kwargs,
) -> str | None:
    """`show_tokens(out, step_score_highlight="probability")`: each generated token, then its source and
    target tokens coloured by attribution score (HTML: click a generated token to unfold them).

    Tokens are cleaned as Inseq does (`replace_char` replacements, then surrounding spaces stripped).
    The colour scale is shared by all examples: the largest score magnitude, or `min_val`/`max_val`.
    `wrap_after` breaks lines after every N tokens (an int) or after the given token(s).
    """
    sequences = sequences_of(obj)
    if do_aggregation:
        sequences = [
            default_view(seq, **aggregate_kwargs)
            if aggregator is None
            else seq.aggregate(aggregator, **aggregate_kwargs)
            for seq in sequences
        ]
    scale = bounds_scale(min_val, max_val)
    if scale is None:
        scale = max([max(abs(seq.minimum), abs(seq.maximum)) for seq in sequences], default=0.0)
    rendered = [
        (number, token_rows(seq, replace_char, scale, step_score_highlight)) for number, seq in enumerate(sequences)
    ]
    if return_html:
        text = html_block([tokens_html(number, rows, wrap_after, step_score_highlight) for number, rows in rendered])
        if display:
            display_in_notebook(text)
        return text
    if display:
        from rich.console import Console

        console = console or Console()
        for number, rows in rendered:
            tokens_console(console, number, rows, wrap_after, step_score_highlight)
    return None
