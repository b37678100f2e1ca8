"""The interactive HTML view: one self-contained `<div>` (inline script and styles, data as JSON) per output.

    html = interactive_html(out)              # for a notebook (`out._repr_html_()`) or a page
    page = interactive_page(out)              # a standalone document (`out.save_html(path)` writes it)
    data = view_data(out)                     # what the page draws, as plain JSON-able values

Nothing is fetched: the script (`interactive.js`) and styles (`interactive.css`) are inlined, and the
scores travel as compact JSON, each one written as the shortest decimal that reads back as the same
float32 (so what the page shows on hover is the stored value). Every output shape is drawn:
2-D scores as a tokens x generated-tokens heatmap; layer outputs (`target_layers=`, `[..., layers,
hidden]`) also as a layers x tokens heatmap per generated token, with a layer selector for the main
heatmap; attention with layers and heads kept (`aggregate_fn=None`, `[..., layers, heads]`) also as a
grid of heads per layer, the main heatmap being their mean.
"""

from __future__ import annotations

import html
import json
import math
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instrument.aggregation import aggregate_sequence
from instrument.outputs import FeatureAttributionOutput
from instrument.views.colours import NEGATIVE, POSITIVE, WHITE
from instrument.views.labels import token_label
from instrument.views.prepare import attribution_dims, default_view, prepared, sequences_of

ASSETS = Path(__file__).parent
# Finds its <div> by id, else as the script's previous sibling; retries while a notebook has not yet
# attached the output to the page (JupyterLab evaluates the scripts of an output before that).
START = """(function (script, tries) {
  function start() {
    const root = document.getElementById("ELEMENT") || (script && script.previousElementSibling);
    if (root && root.id === "ELEMENT") seqInstrumentView(root); else if (tries-- > 0) setTimeout(start, 50);
  }
  start();
})(document.currentScript, 200);"""


def numbers(tensor: torch.Tensor) -> Any:
    """Nested lists of the shortest decimals that read back as the same float32 (NaN and inf: None)."""
    array = tensor.detach().cpu().float().numpy()
    flat = [float(str(x)) if math.isfinite(x) else None for x in array.reshape(-1)]
    return np.array(flat, dtype=object).reshape(array.shape).tolist() if array.ndim > 1 else flat


def library_version() -> str:
    try:
        return metadata.version("seq-instrument")
    except metadata.PackageNotFoundError:
        return "unknown"


def _layout(seq, info: dict) -> str:
    """ "heads" (attention with layers and heads kept), "layers" (a layer dimension), or "plain"."""
    if attribution_dims(seq) != 4:
        return "plain"
    if info.get("attribution_method") == "attention":
        return "heads"
    return "layers"


def _stack(tensor: torch.Tensor | None, order: tuple[int, ...]) -> Any:
    return None if tensor is None else numbers(tensor.permute(*order))


def _view(seq, layout: str, aggregate, **aggregate_kwargs) -> dict:
    """One example at one granularity: labels, the main matrix, step scores, and layer or head stacks."""
    extra: dict[str, Any] = {}
    if layout == "heads":  # [rows, steps, layers, heads]: the mean over both, and every head kept
        tensors = {side: getattr(seq, f"{side}_attributions") for side in ("source", "target")}
        main = {side: None if t is None else t.float().nanmean(dim=(2, 3)) for side, t in tensors.items()}
        extra["heads"] = {side: _stack(t, (2, 3, 0, 1)) for side, t in tensors.items()}
    elif layout == "layers":  # [rows, steps, layers, hidden]: hidden reduced per layer, then over layers
        per_layer = aggregate_sequence(seq, "scores", keep_layers=True, **aggregate_kwargs)
        extra["layers"] = {
            side: _stack(getattr(per_layer, f"{side}_attributions"), (2, 0, 1)) for side in ("source", "target")
        }
        shown = default_view(seq, **aggregate_kwargs)
        main = {side: getattr(shown, f"{side}_attributions") for side in ("source", "target")}
    else:
        seq = prepared(seq, aggregate, **aggregate_kwargs)[0]  # True, False, or a pipeline (may merge tokens)
        main = {side: getattr(seq, f"{side}_attributions") for side in ("source", "target")}
        if any(t is not None and t.dim() != 2 for t in main.values()):
            raise ValueError("the interactive view needs 2-D scores with aggregate=False: aggregate first")
    rows, values = [], []
    for side, tokens in (("source", seq.source), ("target", seq.target)):
        if main[side] is not None:
            rows += [[token_label(t.token), t.id, side] for t in tokens]
            values += numbers(main[side])
    finite = [abs(x) for row in values for x in row if x is not None]
    return {
        "cols": [[token_label(t.token), t.id] for t in seq.generated],
        "rows": rows,
        "start": seq.attr_pos_start,
        "values": values,
        "scale": max(finite, default=0.0),
        "steps": {name: numbers(v.reshape(-1)) for name, v in seq.step_scores.items()},
        **extra,
    }


def _words(seq, layout: str, aggregate_kwargs: dict) -> dict | None:
    """The word-level view, when merging subwords changes something (2-D outputs only)."""
    if layout != "plain":
        return None
    try:
        words = aggregate_sequence(seq, "subwords")
    except (ValueError, TypeError):
        return None
    if len(words.source) == len(seq.source) and len(words.target) == len(seq.target):
        return None
    return _view(words, layout, True, **aggregate_kwargs)


def normalisation(layout: str, aggregate, aggregate_kwargs: dict) -> str:
    """How the scores shown were normalised, in words (for the legends)."""
    if layout == "heads":
        return "attention weights as stored; the main heatmap is their mean over layers and heads"
    if aggregate is False:
        return "none: scores as stored"
    pipeline = "" if aggregate is True else f"pipeline {aggregate!r}, then "
    how = "each step's absolute scores sum to 1 (L1)"
    if aggregate_kwargs.get("rescale"):
        how = "divided by the largest magnitude of the example"
    elif aggregate_kwargs.get("normalize") is False:
        how = "not normalised"
    fn = aggregate_kwargs.get("aggregate_fn", "vnorm")
    reduced = f"hidden reduced with {fn}" + (", per layer, then over layers" if layout == "layers" else "")
    return f"{pipeline}'scores' aggregator: {reduced}; {how}"


def _texts(info: dict, key: str, index: int) -> str | None:
    values = info.get(key)
    if isinstance(values, list) and index < len(values) and isinstance(values[index], str):
        return values[index]
    return None


def view_data(
    obj,
    aggregate: bool | str | list = True,
    words: bool = True,
    info: dict | None = None,
    titles: list[str] | None = None,
    **aggregate_kwargs,
) -> dict:
    """`view_data(out)`: the header and, per example, its views ("tokens", and "words" when merging
    subwords changes the tokens and `words` is true), ready for `json.dumps`. `info` adds to (or
    replaces) the output's own `info`; `titles` names the examples (default "Example i")."""
    info = dict(obj.info if isinstance(obj, FeatureAttributionOutput) else {}, **(info or {}))
    examples, layouts = [], set()
    for index, seq in enumerate(sequences_of(obj)):
        layout = _layout(seq, info)
        layouts.add(layout)
        views = {"tokens": _view(seq, layout, aggregate, **aggregate_kwargs)}
        word_view = _words(seq, layout, aggregate_kwargs) if words and aggregate is True else None
        if word_view is not None:
            views["words"] = word_view
        source = "".join(t.token for t in seq.source) or "".join(t.token for t in seq.target[: seq.attr_pos_start])
        examples.append(
            {
                "title": titles[index] if titles else f"Example {index}",
                "input": _texts(info, "input_texts", index) or source,
                "generated": _texts(info, "generated_texts", index) or "".join(t.token for t in seq.generated),
                "layout": layout,
                "views": views,
            }
        )
    arguments = info.get("attribution_args") or {}
    header = {
        "model": info.get("model_name"),
        "method": info.get("attribution_method"),
        "attributed_fn": info.get("attributed_fn"),
        "arguments": json.dumps(arguments, default=str) if arguments else None,
        "step_scores": ", ".join(info.get("step_scores") or []) or None,
        "version": f"seq-instrument {library_version()}",
        "normalisation": "; ".join(sorted({normalisation(layout, aggregate, aggregate_kwargs) for layout in layouts})),
    }
    colours = {"positive": list(POSITIVE), "negative": list(NEGATIVE), "zero": list(WHITE)}
    return {"header": header, "colours": colours, "examples": examples}


def embed(data: dict) -> str:
    """Compact JSON that cannot close the `<script>` holding it."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def interactive_html(obj, title: str | None = None, **options) -> str:
    """`interactive_html(out)`: a `<div>` with its own styles, data and script (options: `view_data`'s)."""
    data = view_data(obj, **options)
    if title is not None:
        data["header"]["title"] = title
    element = f"si-{uuid.uuid4().hex[:12]}"
    script = (ASSETS / "interactive.js").read_text(encoding="utf-8")
    style = (ASSETS / "interactive.css").read_text(encoding="utf-8")
    return (
        f'<div class="si-root" id="{element}"><style>{style}</style>'
        f'<script type="application/json" class="si-data">{embed(data)}</script>'
        "<noscript>This view needs JavaScript; out.show(return_html=True) gives static tables.</noscript></div>"
        f"<script>{script}\n{START.replace('ELEMENT', element)}</script>"
    )


def interactive_page(obj, title: str = "Attributions", **options) -> str:
    """A standalone HTML document around `interactive_html`."""
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n</head>\n<body>\n'
        f"{interactive_html(obj, **options)}\n</body>\n</html>\n"
    )
