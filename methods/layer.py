"""Layer methods: attributions to the outputs of inner modules, many layers in one pass.

    out = model.attribute(text, method="layer_gradient_x_activation", target_layers="layers")
    out[0].target_attributions.shape   # [positions, steps, layers, hidden]

`target_layer=` takes one module (name, alias, module); `target_layers=` takes a list, glob or
alias and adds a layer dimension after the step dimension. Outputs of encoder modules land in
`source_attributions`, the others in `target_attributions`. The default layer is the input
embeddings (the encoder's, plus the decoder's with `attribute_target=True`).
"""

from __future__ import annotations

from typing import Any

import torch

from instrument import kernels
from instrument.rows import RowAttribution
from methods.approximation import approximation
from methods.base import AttributionMethod, Request, chunks, gradients, leaf
from methods.registry import register
from methods.slopes import rescale_rule


def resolve_layers(request: Request, target_layer: Any, target_layers: Any) -> tuple[list[str], bool]:
    """Module names to attribute, and whether the output gets a layer dimension."""
    if target_layer is not None and target_layers is not None:
        raise ValueError("Pass either target_layer or target_layers, not both")
    engine = request.engine
    if target_layers is not None:
        return engine.layer_names(target_layers), True
    if target_layer is not None:
        names = engine.layer_names(target_layer)
        if len(names) != 1:
            raise ValueError(
                f"target_layer must name one module, {target_layer!r} names {len(names)}; use target_layers"
            )
        return names, False
    names = engine.layer_names("embeddings")
    if engine.is_encoder_decoder and not request.attribute_target:
        names = [name for name in names if engine.layer_side(name) == "source"]
    return names, False


def rows_first(tensor: torch.Tensor, n_rows: int) -> torch.Tensor:
    """`[R, positions, hidden]` view of a layer output, also for modules that flatten rows and
    positions together (OPT's feed-forward sees `[R * positions, hidden]`)."""
    return tensor if tensor.shape[0] == n_rows else tensor.reshape(n_rows, -1, tensor.shape[-1])


def by_side(
    request: Request, names: list[str], per_layer: dict[str, torch.Tensor], stacked: bool, logits
) -> RowAttribution:
    """Groups per-layer `[R, positions, hidden]` results into the source and target sides."""
    sides: dict[str, list[torch.Tensor]] = {"source": [], "target": []}
    for name in names:  # (to one device: with a device_map, layers may sit on several)
        sides[request.engine.layer_side(name)].append(
            rows_first(per_layer[name], len(request.rows)).to(request.rows.token.device)
        )
    merged = {}
    for side, values in sides.items():
        if not values:
            merged[side] = None
        elif stacked:
            merged[side] = torch.stack(values, dim=2)
        elif len(values) == 1:
            merged[side] = values[0]
        else:
            raise ValueError("Several layers on one side need target_layers= (and get a layer dimension)")
    return RowAttribution(source=merged["source"], target=merged["target"], logits=logits)


@register("layer_gradient_x_activation")
class LayerGradientXActivation(AttributionMethod):
    """Gradient times activation of each target layer, every layer captured in the same pass."""

    attributes_inputs = False

    def attribute(
        self, request: Request, target_layer=None, target_layers=None, multiply_by_inputs=True
    ) -> RowAttribution:
        names, stacked = resolve_layers(request, target_layer, target_layers)
        grads, logits, acts = gradients(request, request.rows, [], layers=names, shared_prefix=True)
        per_layer = {name: grad * acts[name] if multiply_by_inputs else grad for name, grad in zip(names, grads)}
        return by_side(request, names, per_layer, stacked, logits)


@register("layer_integrated_gradients")
class LayerIntegratedGradients(AttributionMethod):
    """Integrated gradients on a layer's output, from its output on the baselines to its output on
    the inputs. Layers in series need separate paths: one group of passes per layer (the two
    embedding modules of an encoder-decoder are attributed together, as they are parallel). The
    integration rule: `approximation_method` (or `method`), as for integrated gradients."""

    attributes_inputs = False

    def attribute(
        self,
        request: Request,
        target_layer=None,
        target_layers=None,
        multiply_by_inputs=True,
        n_steps=50,
        method="gausslegendre",
        approximation_method=None,
        internal_batch_size=None,
        baselines=None,
        include_eos_baseline=False,
    ) -> RowAttribution:
        names, stacked = resolve_layers(request, target_layer, target_layers)
        engine, rows = request.engine, request.rows
        alphas, weights = approximation(approximation_method or method, n_steps)
        source_base, target_base = engine.baseline(rows, baselines, include_eos_baseline)
        if engine.is_encoder_decoder and not request.attribute_target:
            target_base = None  # the target prefix is no attributed input: it stays as it is
        with torch.no_grad():
            logits, at_input = engine.forward(rows, layers=names)
            _, at_base = engine.forward(rows, source_base, target_base, layers=names)
        embeddings = set(engine.layer_names("embeddings"))
        groups = [[n for n in names if n in embeddings]] + [[n] for n in names if n not in embeddings]
        per_layer = {}
        n_rows = len(rows)
        for group in (g for g in groups if g):
            totals = {
                name: torch.zeros(at_input[name].shape, dtype=torch.float32, device=at_input[name].device)
                for name in group
            }
            for chunk in chunks(n_steps, rows, internal_batch_size, auto=request.auto):
                chunk_alphas = torch.tensor([alphas[k] for k in chunk], dtype=torch.float32)
                points = {
                    name: leaf(
                        kernels.interpolate(
                            rows_first(at_input[name], n_rows), rows_first(at_base[name], n_rows), chunk_alphas
                        ).reshape(-1, *at_input[name].shape[1:])
                    )
                    for name in group
                }
                grads, _, _ = gradients(request, rows.repeat(len(chunk)), list(points.values()), layer_patch=points)
                chunk_weights = torch.tensor([weights[k] for k in chunk], dtype=torch.float32)
                for name, grad in zip(group, grads):  # in place into the [R, positions, hidden] view of the total
                    kernels.accumulate(
                        rows_first(totals[name], n_rows), rows_first(grad, len(chunk) * n_rows), chunk_weights
                    )
                del points, grads
            for name in group:
                per_layer[name] = (
                    kernels.finalize(
                        rows_first(totals[name], n_rows),
                        rows_first(at_input[name], n_rows),
                        rows_first(at_base[name], n_rows),
                    ).reshape(at_input[name].shape)
                    if multiply_by_inputs
                    else totals[name]
                )
        return by_side(request, names, per_layer, stacked, logits)


@register("layer_deeplift")
class LayerDeepLift(AttributionMethod):
    """DeepLIFT (rescale rule) on layer outputs: inputs and baselines in one batch, every target
    layer captured in the same pass."""

    attributes_inputs = False

    def attribute(
        self,
        request: Request,
        target_layer=None,
        target_layers=None,
        multiply_by_inputs=True,
        baselines=None,
        include_eos_baseline=False,
    ) -> RowAttribution:
        names, stacked = resolve_layers(request, target_layer, target_layers)
        engine, rows = request.engine, request.rows
        source, target = engine.embed(rows)
        source_base, target_base = engine.baseline(rows, baselines, include_eos_baseline)
        if not request.attribute_target and engine.is_encoder_decoder:
            target_base = target
        # Leaves, so that the embedding modules' outputs are differentiable when they are target layers.
        both_source = leaf(torch.cat([source, source_base])) if source is not None else None
        both_target = leaf(torch.cat([target, target_base]))
        with rescale_rule(engine.model):
            grads, logits, acts = gradients(
                request, rows.repeat(2), [], both_source, both_target, layers=names, shared_prefix=True
            )
        half = len(rows)
        per_layer = {}
        for name, grad in zip(names, grads):
            grad, act = rows_first(grad, 2 * half), rows_first(acts[name], 2 * half)
            if multiply_by_inputs and grad.dim() in (3, 4):  # multiplier times (activation - baseline activation)
                per_layer[name] = kernels.finalize(grad[:half].float(), act[:half], act[half:])
            else:
                per_layer[name] = grad[:half] * ((act[:half] - act[half:]) if multiply_by_inputs else 1.0)
        return by_side(request, names, per_layer, stacked, logits[:half])
