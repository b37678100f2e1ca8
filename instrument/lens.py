"""The logit lens (nostalgebraist 2020): every layer's residual stream read through the model's own
final norm and unembedding.

    logits = lens_logits(model, resolve_alias(model, "layers"), {"input_ids": ids})   # [layers + 1, B, T, V]
    table = lens_table(logits[:, 0], steps, ids[0], top_k=5, layers=names, tokens=tokens)
    table.show(); html = table.to_html()

Row 0 is the embeddings (the first block's input), row l the output of block l. The stacked states
replace the last block's output in one forward, so that whatever the model does after its last block
(final norm, T5's rescaling, final logit biases) is applied to each of them as it is to the real
output: the last row is the model's own prediction.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from instrument.hooks import HookHandles


def lens_logits(model: nn.Module, stack: Sequence[str], batch: dict) -> torch.Tensor:
    """`[len(stack) + 1, B, T, V]` logits of the embeddings and each block's output of the blocks
    `stack` (module names, in order), from one forward of `model(**batch)`."""
    if not stack:
        raise ValueError("the logit lens needs the model's stack of blocks (the 'layers' alias found none)")
    states: list[torch.Tensor] = []

    def keep_input(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"the logit lens could not read the input hidden states of {type(module).__name__}")
        states.append(hidden)

    def stack_states(module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        stacked = torch.cat([*states, hidden], dim=0)
        return stacked if isinstance(output, torch.Tensor) else (stacked, *output[1:])

    blocks = [model.get_submodule(name) for name in stack]
    with HookHandles() as hooks, torch.no_grad():
        for block in blocks:
            hooks.forward_pre(block, keep_input, with_kwargs=True)
        hooks.forward(blocks[-1], stack_states)
        logits = model(**batch, use_cache=False).logits
    n = len(blocks) + 1
    if logits.shape[0] != n * len(next(iter(batch.values()))):
        raise ValueError(f"the logit lens expected {n} stacked copies of the batch, the model returned {logits.shape}")
    return logits.view(n, -1, *logits.shape[1:])


def lens_depth_of(lens: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """`lens [layers, R, V]`: the first layer from which `token [R]` stays the top prediction to the
    last layer (`layers`: it is not the model's top prediction)."""
    top = (lens.argmax(-1) == token.to(lens.device)[None]).long()
    stays = top.flip(0).cumprod(0).flip(0)
    return (lens.shape[0] - stays.sum(0)).float()


@dataclass
class LensResult:
    """Per layer (row 0: embeddings) and attributed step (step at position p reads position p - 1):
    `probabilities` and `ranks` (0: top) of the step's target token, `top_ids` / `top_probabilities`
    `[layers, steps, k]`, with `layers` (names), `positions`, `targets` (the tokens predicted) and
    `top_tokens`."""

    probabilities: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor
    top_probabilities: torch.Tensor
    layers: list[str]
    positions: list[int]
    targets: list[str]
    top_tokens: list[list[list[str]]]

    def _cells(self):
        from instrument.views.labels import token_label  # (views import the step functions, which import this)

        for li, layer in enumerate(self.layers):
            yield (
                layer,
                [
                    (token_label(self.top_tokens[li][s][0]), float(self.probabilities[li, s]), int(self.ranks[li, s]))
                    for s in range(len(self.positions))
                ],
            )

    def show(self, console=None) -> None:
        """A rich table: layers x steps, each cell the layer's top token, coloured by the target's probability."""
        from rich.console import Console
        from rich.style import Style
        from rich.table import Table
        from rich.text import Text

        from instrument.views.colours import colour, text_colour
        from instrument.views.labels import token_label

        table = Table(title="Logit lens: top token per layer (colour: probability of the target)")
        table.add_column("layer", style="bold")
        for target in self.targets:
            table.add_column(Text(token_label(target)), justify="center")
        for layer, cells in self._cells():
            row = []
            for top, prob, rank in cells:
                background = colour(prob, 1.0)
                row.append(
                    Text(
                        f"{top} {prob:.2f}",
                        style=Style(bgcolor=f"rgb{background}", color=text_colour(background)),
                    )
                )
            table.add_row(Text(layer), *row)
        (console or Console()).print(table)

    def to_html(self) -> str:
        """One self-contained `<table>` (inline styles): layers x steps heatmap of the target's probability."""
        from instrument.views.colours import colour, text_colour
        from instrument.views.labels import token_label

        head = "".join(f"<th>{html.escape(token_label(t))}</th>" for t in self.targets)
        rows = []
        for layer, cells in self._cells():
            tds = []
            for top, prob, rank in cells:
                red, green, blue = colour(prob, 1.0)
                style = f"background:rgb({red},{green},{blue});color:{text_colour((red, green, blue))};padding:2px 6px"
                title = f"p(target)={prob:.4g}, rank {rank}; top: {top}"
                tds.append(f'<td style="{style}" title="{html.escape(title)}">{html.escape(top)}</td>')
            rows.append(f"<tr><th>{html.escape(layer)}</th>{''.join(tds)}</tr>")
        return (
            '<table style="border-collapse:collapse;font-family:monospace">'
            f"<caption>Logit lens (colour: probability of the target)</caption><tr><th></th>{head}</tr>"
            f"{''.join(rows)}</table>"
        )

    def save_html(self, path) -> None:
        with open(path, "w", encoding="utf-8") as file:
            file.write(f"<!DOCTYPE html><html><meta charset='utf-8'><body>{self.to_html()}</body></html>")


def lens_table(
    lens: torch.Tensor, steps: Sequence[int], ids: torch.Tensor, top_k: int, layers: list[str], tokens
) -> LensResult:
    """`lens [layers, T, V]` logits of one sequence `ids [T]` -> the table of the steps `steps`
    (step p: position p - 1 predicting `ids[p]`); `tokens(ids) -> strings`."""
    steps = list(steps)
    read = torch.tensor([p - 1 for p in steps], dtype=torch.long)
    probs = lens[:, read.to(lens.device)].float().softmax(-1)  # [layers, steps, V]
    target = ids[steps].to(probs.device)
    picked = probs.gather(-1, target.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(-1)
    ranks = (probs > picked[..., None]).sum(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    top_tokens = [[tokens(step.tolist()) for step in layer] for layer in top.indices.cpu()]
    return LensResult(
        picked.cpu(),
        ranks.cpu(),
        top.indices.cpu(),
        top.values.cpu(),
        layers,
        steps,
        tokens(ids[steps].tolist()),
        top_tokens,
    )
