"""Activation patching and attribution patching (AtP): which (layer, position) of a clean run
restores a metric in a corrupted one.

    am = instrument.load_model(hf_model, tokenizer=tokenizer)
    wrong = tokenizer.convert_tokens_to_ids("ĠMary")
    table = instrument.patching.activation(am, clean, corrupt, "logit_diff", metric_kwargs={"wrong_id": wrong})
    table.recovery            # [layers, positions]: (patched - corrupt) / (clean - corrupt)
    approx = instrument.patching.attribution(am, clean, corrupt, "logit_diff", metric_kwargs={"wrong_id": wrong})

`clean` and `corrupt` are texts of the same token length (decoder-only models) or `(source, target
prefix)` pairs (encoder-decoders: the metric reads the prediction after the target prefix, and
encoder layers are patched at source positions). The metric is a step function (a registered name
such as "logit_diff", "logit", "probability", or `fn(args) -> [rows]`) of the logits predicting the
token after the last position, for the token `target` (default: the clean run's top prediction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from instrument.hooks import eval_mode
from instrument.models import AttributionModel, load_model
from instrument.selection import select_modules
from instrument.step_args import StepFunctionArgs
from instrument.steps import call_step_function, get_step_function
from instrument.trace import trace


@dataclass
class PatchingResult:
    """`recovery[l, p]`: the share of the clean - corrupt metric gap that patching layer `layers[l]`
    at position `positions[p]` restores (NaN where a layer's side has no such position);
    `patched[l, p]`: the metric after patching (AtP: its first-order estimate)."""

    recovery: torch.Tensor
    patched: torch.Tensor
    clean: float
    corrupt: float
    layers: list[str]
    positions: list[int]
    tokens: dict[str, list[str]] = field(default_factory=dict)
    method: str = "activation"
    forwards: int = 0
    backwards: int = 0


def _wrap(model, tokenizer) -> AttributionModel:
    if isinstance(model, AttributionModel):
        return model
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("tokenizer: pass the model's tokenizer (or an instrument.load_model(...) model)")
        return load_model(model, tokenizer=tokenizer)
    raise TypeError(f"model must be an AttributionModel or a Hugging Face model, got {type(model).__name__}")


def _encode(am: AttributionModel, item: Any, name: str) -> dict[str, torch.Tensor]:
    device = am.engine.device
    if am.engine.is_encoder_decoder:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item)):
            raise TypeError(
                f"{name}: on an encoder-decoder model pass a (source text, target prefix) pair, got {item!r}"
            )
        source = am.encode_sources([item[0]])[0]
        target = am.encode_targets([item[0]], [item[1]])[0]
        if len(target) > 1 and int(target[-1]) == am.tokenizer.eos_token_id:
            target = target[:-1]  # a prefix: the metric reads the prediction of the next token
        return {"input_ids": source[None].to(device), "decoder_input_ids": target[None].to(device)}
    if not isinstance(item, str):
        raise TypeError(f"{name}: pass a text, got {type(item).__name__}")
    return {"input_ids": am.encode_targets([item], [item])[0][None].to(device)}


def _side_ids(am: AttributionModel, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    side = am.engine.layer_side(name)
    return batch["input_ids"][0] if side == "source" else batch.get("decoder_input_ids", batch["input_ids"])[0]


class _Metric:
    """The step function's value at the last position, for `n` copies of one input."""

    def __init__(self, metric, metric_kwargs: dict | None):
        self.step = get_step_function(metric)
        self.kwargs = dict(metric_kwargs or {})
        if self.step.needs_contrast:
            raise ValueError(f"metric: {self.step.identifier!r} needs a contrastive input; patching has none")
        self.target: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]

        def unavailable(*args, **kwargs):
            raise ValueError(f"metric: {self.step.identifier!r} reads a contrastive or repeated forward")

        args = StepFunctionArgs(last, self.target.to(last.device).expand(len(last)), unavailable, unavailable)
        scores = call_step_function(self.step, args, self.kwargs)
        if not isinstance(scores, torch.Tensor) or scores.shape != (len(last),):
            raise ValueError(f"metric {self.step.identifier!r} must return one value per row, got {scores!r}")
        return scores


def _setup(am, clean, corrupt, metric, metric_kwargs, target, target_layers, positions):
    engine = am.engine
    clean_batch, corrupt_batch = _encode(am, clean, "clean"), _encode(am, corrupt, "corrupt")
    for key in clean_batch:
        if clean_batch[key].shape != corrupt_batch[key].shape:
            raise ValueError(
                f"corrupt: its tokens ({corrupt_batch[key].shape[1]}) must align with clean's "
                f"({clean_batch[key].shape[1]}) position by position ({key})"
            )
    names = select_modules(engine.model, target_layers)
    if not names:
        raise ValueError(f"target_layers: {target_layers!r} selects no module")
    lengths = {name: len(_side_ids(am, name, clean_batch)) for name in names}
    width = max(lengths.values())
    if positions is None:
        positions = list(range(width))
    elif isinstance(positions, int) or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        raise TypeError(f"positions must be a list of integers or None, got {positions!r}")
    positions = [p + width if p < 0 else p for p in positions]
    if any(not 0 <= p < width for p in positions):
        raise ValueError(f"positions: {positions} out of range for {width} tokens")
    measure = _Metric(metric, metric_kwargs)
    if target is not None:
        if isinstance(target, str):
            ids = am.tokenizer(target, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"target: {target!r} is {len(ids)} tokens, not one; pass a token id")
            target = ids[0]
        measure.target = torch.tensor(int(target))
    return clean_batch, corrupt_batch, names, lengths, positions, measure


def _tokens(am, names, batch) -> dict[str, list[str]]:
    sides = {am.engine.layer_side(name): _side_ids(am, name, batch) for name in names}
    return {side: am.tokenizer.convert_ids_to_tokens(ids.tolist()) for side, ids in sides.items()}


def _rows_first(tensor: torch.Tensor, n: int) -> torch.Tensor:
    return tensor if tensor.shape[0] == n else tensor.view(n, -1, tensor.shape[-1])


def _run(model, batch, names=(), **options):
    with trace(model, list(names), **options) as t:
        logits = model(**batch, use_cache=False).logits
    return logits, t.activations


def _result(recovery_from, clean, corrupt, names, lengths, positions, **rest) -> PatchingResult:
    gap = clean - corrupt
    if gap == 0:
        raise ValueError("the metric is the same on clean and corrupt inputs: no gap to recover")
    patched = recovery_from
    for row, name in enumerate(names):
        patched[row, [i for i, p in enumerate(positions) if p >= lengths[name]]] = float("nan")
    return PatchingResult((patched - corrupt) / gap, patched, clean, corrupt, names, positions, **rest)


def activation(
    model,
    clean,
    corrupt,
    metric="logit_diff",
    target_layers="layers",
    positions: Sequence[int] | None = None,
    metric_kwargs: dict | None = None,
    target=None,
    batch_size: int = 64,
    tokenizer=None,
) -> PatchingResult:
    """Activation patching: for every (layer, position), the corrupted run with that one output
    replaced by the clean run's, and the metric's recovery `(patched - corrupt) / (clean - corrupt)`.

        table = activation(am, "When Mary and John went, John gave it to", "When Mary and John went, Mary gave it to",
                           "logit_diff", metric_kwargs={"wrong_id": john}, target=" Mary")

    `target_layers`: modules whose outputs are patched (names, globs, aliases; default: the blocks);
    `positions`: token positions (default: all; negative ones count from the end of the longest side).
    Cost: 2 forwards of one row (clean, corrupt), then `ceil(layers x positions / batch_size)`
    forwards of `batch_size` rows, no backward.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    am = _wrap(model, tokenizer)
    clean_batch, corrupt_batch, names, lengths, positions, measure = _setup(
        am, clean, corrupt, metric, metric_kwargs, target, target_layers, positions
    )
    hf = am.engine.model
    sites = [(li, p) for li, name in enumerate(names) for p in positions if p < lengths[name]]
    patched = torch.full((len(names), len(positions)), float("nan"))
    column = {p: i for i, p in enumerate(positions)}
    forwards = 2
    with eval_mode(hf), torch.no_grad():
        clean_logits, clean_acts = _run(hf, clean_batch, names)
        if measure.target is None:
            measure.target = clean_logits[0, -1].argmax()
        clean_value = float(measure(clean_logits)[0])
        corrupt_value = float(measure(_run(hf, corrupt_batch)[0])[0])
        for start in range(0, len(sites), batch_size):
            chunk = sites[start : start + batch_size]
            n = len(chunk)

            def patch(name, layer):
                rows = torch.tensor([r for r, (li, _) in enumerate(chunk) if li == layer], dtype=torch.long)
                at = torch.tensor([p for li, p in chunk if li == layer], dtype=torch.long)
                source = _rows_first(clean_acts[name], 1)[0]

                def replace(output):
                    shape, output = output.shape, _rows_first(output, n).clone()
                    output[rows.to(output.device), at.to(output.device)] = source[at.to(source.device)].to(output)
                    return output.view(shape)

                return replace

            layers = {li for li, _ in chunk}
            batch = {key: value.expand(n, -1) for key, value in corrupt_batch.items()}
            with trace(hf, [], patch={names[li]: patch(names[li], li) for li in layers}):
                logits = hf(**batch, use_cache=False).logits
            forwards += 1
            for (li, p), value in zip(chunk, measure(logits).float().cpu()):
                patched[li, column[p]] = value
    return _result(
        patched,
        clean_value,
        corrupt_value,
        names,
        lengths,
        positions,
        tokens=_tokens(am, names, clean_batch),
        method="activation",
        forwards=forwards,
    )


def attribution(
    model,
    clean,
    corrupt,
    metric="logit_diff",
    target_layers="layers",
    positions: Sequence[int] | None = None,
    metric_kwargs: dict | None = None,
    target=None,
    tokenizer=None,
) -> PatchingResult:
    """Attribution patching (AtP, Nanda 2023; Kramár et al. 2024): the first-order estimate of
    activation patching, `(a_clean - a_corrupt) . d metric / d a` at the corrupted run, for every
    (layer, position) at once. Same arguments and table as `activation`; `patched` is
    `corrupt + estimate`. Cost: 2 forwards (clean, corrupt) and 1 backward.
    """
    am = _wrap(model, tokenizer)
    clean_batch, corrupt_batch, names, lengths, positions, measure = _setup(
        am, clean, corrupt, metric, metric_kwargs, target, target_layers, positions
    )
    hf, engine = am.engine.model, am.engine
    embeddings = {m for m in (engine.source_embedding, engine.target_embedding) if m is not None}

    def leaf(output):
        return output.detach().requires_grad_()

    with eval_mode(hf):
        with torch.no_grad():
            clean_logits, clean_acts = _run(hf, clean_batch, names)
        if measure.target is None:
            measure.target = clean_logits[0, -1].argmax()
        clean_value = float(measure(clean_logits)[0])
        with torch.enable_grad():
            logits, acts = _run(
                hf, corrupt_batch, names, detach=False, clone=False, patch=dict.fromkeys(embeddings, leaf)
            )
            value = measure(logits)[0]
            if not value.requires_grad:
                raise ValueError(f"metric {measure.step.identifier!r} is not differentiable: AtP needs its gradient")
            wanted = [acts[name] for name in names]
            grads = torch.autograd.grad(value, wanted, allow_unused=True)
    corrupt_value = float(value.detach())
    estimate = torch.full((len(names), len(positions)), float("nan"))
    for li, (name, grad) in enumerate(zip(names, grads)):
        corrupt_act, clean_act = _rows_first(acts[name].detach(), 1)[0], _rows_first(clean_acts[name], 1)[0]
        grad = torch.zeros_like(corrupt_act) if grad is None else _rows_first(grad, 1)[0]
        effect = ((clean_act.float() - corrupt_act.float()) * grad.float()).flatten(1).sum(1).cpu()
        for column, p in enumerate(positions):
            if p < lengths[name]:
                estimate[li, column] = corrupt_value + effect[p]
    return _result(
        estimate,
        clean_value,
        corrupt_value,
        names,
        lengths,
        positions,
        tokens=_tokens(am, names, clean_batch),
        method="attribution",
        forwards=2,
        backwards=1,
    )
