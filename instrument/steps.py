"""Step functions: one score per attributed step, usable as `step_scores` and as `attributed_fn`.

    out = model.attribute(text, step_scores=["probability", "entropy"])
    register_step_function(lambda args: args.logits.max(-1).values, "max_logit")

A step function takes a `StepFunctionArgs` (logits at the predicting position of each row, the
target token of each row, and lazy access to a contrastive forward; see `instrument.step_args`) plus
keyword arguments from `attribute(...)`, and returns a tensor with one value per row.

Step functions written for Inseq work too: `StepFunctionArgs` also has Inseq's fields, computed only
when read. The per-step ones (`decoder_*`) describe one generation step for all rows, so a function
that reads them is called once per step, on the rows at that step (see `call_step_function`).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from instrument.engine import Engine, train_mode
from instrument.hooks import eval_mode
from instrument.lens import lens_depth_of, lens_logits
from instrument.rows import Rows
from instrument.selection import resolve_alias
from instrument.step_args import PerStepRead, StepFunctionArgs, StepInputs


@dataclass(frozen=True)
class StepFunction:
    fn: Callable[..., torch.Tensor]
    identifier: str
    aggregate_map: dict[str, str] | None
    needs_contrast: bool


_REGISTRY: dict[str, StepFunction] = {}


def register_step_function(
    fn: Callable[..., torch.Tensor],
    identifier: str,
    aggregate_map: dict[str, str] | None = None,
    overwrite: bool = False,
    needs_contrast: bool = False,
) -> None:
    """Make `fn(args: StepFunctionArgs, **kwargs) -> Tensor[R]` available by `identifier`.

    register_step_function(lambda args: args.logits.max(-1).values, "max_logit")

    Inseq's signature: functions written for `inseq.register_step_function` register unchanged.
    `aggregate_map`: how its scores combine when steps are merged, {aggregator name: aggregation function};
    "spans" also serves "subwords" and "split", "logprob" comes first when `logprob=True` was passed;
    unlisted: "mean".
    """
    if not callable(fn):
        raise TypeError(f"A step function must be callable, got {type(fn).__name__}")
    if not isinstance(identifier, str) or not identifier:
        raise TypeError(f"identifier must be a non-empty string, got {identifier!r}")
    if identifier in _REGISTRY and not overwrite:
        raise ValueError(f"Step function {identifier!r} exists already; pass overwrite=True to replace it")
    _REGISTRY[identifier] = StepFunction(fn, identifier, aggregate_map, needs_contrast)


def list_step_functions() -> list[str]:
    """Names of the registered step functions."""
    return list(_REGISTRY)


def get_step_function(identifier: str | Callable) -> StepFunction:
    """`get_step_function("probability")`; a callable is wrapped and named after its `__name__`."""
    if callable(identifier):
        registered = next((step for step in _REGISTRY.values() if step.fn is identifier), None)
        return registered or StepFunction(identifier, step_function_name(identifier), None, False)
    if identifier not in _REGISTRY:
        raise ValueError(f"Unknown step function {identifier!r}. Available: {', '.join(_REGISTRY)}")
    return _REGISTRY[identifier]


def step_function_name(fn: str | Callable) -> str:
    """`step_function_name(my_score) == "my_score"`: the name a step score is shown and saved under."""
    if isinstance(fn, str):
        return fn
    registered = next((name for name, step in _REGISTRY.items() if step.fn is fn), None)
    name = registered or getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def step_functions_by_name(step_scores) -> dict[str, StepFunction]:
    """`step_functions_by_name(["probability", my_fn])`: {"probability": ..., "my_fn": ...}; names must be unique."""
    scorers: dict[str, StepFunction] = {}
    for item in step_scores:
        if not isinstance(item, str) and not callable(item):
            raise TypeError(f"step_scores takes step function names or callables, got {type(item).__name__}")
        step = get_step_function(item)
        if step.identifier in scorers:
            raise ValueError(f"step_scores names {step.identifier!r} twice; give each step function a distinct name")
        scorers[step.identifier] = step
    return scorers


def call_step_function(step: StepFunction, args: StepFunctionArgs, kwargs: dict[str, Any]) -> torch.Tensor:
    """Calls `step` with the keyword arguments its signature accepts: once for all rows, or, when it
    reads a per-step field (`decoder_input_ids`...) of rows at several steps, once per step on the
    rows at that step. Returns one value per row, in row order."""
    parameters = inspect.signature(step.fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = kwargs
    else:
        accepted = {key: value for key, value in kwargs.items() if key in parameters}
    try:
        return _one_per_row(step.fn(args, **accepted), len(args.logits))
    except PerStepRead:
        pass
    position = args.inputs.rows.position
    pieces, order = [], []
    for p in position.unique().tolist():
        index = (position == p).nonzero().squeeze(1)
        pieces.append(_one_per_row(step.fn(args.take(index), **accepted), len(index)))
        order.append(index)
    device = pieces[0].device
    scores = torch.cat([piece.to(device) for piece in pieces])
    return scores[torch.cat(order).to(device).argsort()]


def score_rows(
    engine: Engine,
    step: StepFunction,
    rows: Rows,
    logits: torch.Tensor,
    kwargs: dict[str, Any],
    source_embeds: torch.Tensor | None = None,
    target_embeds: torch.Tensor | None = None,
    is_attributed_fn: bool = False,
) -> torch.Tensor:
    """The step function's value for each row, differentiable where the logits are (and, for
    Inseq-style functions, the embeddings given).

        score_rows(engine, get_step_function("probability"), rows, engine.logits(rows), {})   # [R]
    """
    cache: dict[str, Any] = {}

    def contrast():
        if "value" not in cache:
            cache["value"] = engine.contrast_logits(rows, source_embeds)
        return cache["value"]

    def rerun(train: bool = True):
        with train_mode(engine.model) if train else contextlib.nullcontext():
            return engine.forward(rows, source_embeds, target_embeds)[0]

    engine.scored = step.identifier  # named by the gradient methods' errors (methods.base)
    args = StepFunctionArgs(
        logits=logits,
        target_ids=rows.token,
        contrast=contrast,
        rerun=rerun,
        extra=kwargs,
        inputs=StepInputs(engine, rows, source_embeds, target_embeds),
        is_attributed_fn=is_attributed_fn,
    )
    scores = call_step_function(step, args, kwargs)
    if scores.shape != (len(rows),):
        raise ValueError(
            f"Step function {step.identifier!r} returned shape {tuple(scores.shape)}, expected ({len(rows)},)"
        )
    return scores


def _one_per_row(scores: Any, rows: int) -> Any:
    """`[rows]` scores from `[rows, 1]` or, for one row, `[]` (Inseq's functions squeeze); others as they are."""
    if isinstance(scores, torch.Tensor) and scores.dim() != 1 and scores.numel() == rows and scores.dim() <= 2:
        return scores.reshape(rows)
    return scores


def _gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def logit(args: StepFunctionArgs) -> torch.Tensor:
    """The logit of the target token."""
    return _gather(args.logits.float(), args.target_ids)


def probability(args: StepFunctionArgs, logprob: bool = False) -> torch.Tensor:
    """The probability of the target token (its log-probability with `logprob=True`)."""
    scores = args.logits.float().log_softmax(-1) if logprob else args.logits.float().softmax(-1)
    return _gather(scores, args.target_ids)


def entropy(args: StepFunctionArgs) -> torch.Tensor:
    """The entropy (in nats) of the next-token distribution."""
    logprobs = args.logits.float().log_softmax(-1)
    return -(logprobs.exp() * logprobs).sum(-1)


def crossentropy(args: StepFunctionArgs) -> torch.Tensor:
    """The cross-entropy of the target token: -log p(target), in nats."""
    return -_gather(args.logits.float().log_softmax(-1), args.target_ids)


def perplexity(args: StepFunctionArgs) -> torch.Tensor:
    """2 ** crossentropy, with the cross-entropy in nats (Inseq's definition, kept for comparability)."""
    return 2 ** crossentropy(args)


def _contrast_args(args: StepFunctionArgs) -> StepFunctionArgs:
    logits, ids = args.contrast()
    return StepFunctionArgs(logits, ids, args.contrast, args.rerun, args.extra, args.inputs, args.is_attributed_fn)


def contrast_logits(args: StepFunctionArgs) -> torch.Tensor:
    """The logit of the contrastive target token given the contrastive input."""
    return logit(_contrast_args(args))


def contrast_prob(args: StepFunctionArgs, logprob: bool = False) -> torch.Tensor:
    """The probability of the contrastive target token given the contrastive input."""
    return probability(_contrast_args(args), logprob=logprob)


def contrast_logits_diff(args: StepFunctionArgs) -> torch.Tensor:
    """Logit of the target minus logit of the contrastive target (contrastive attribution, Yin and Neubig 2022)."""
    return logit(args) - contrast_logits(args)


def contrast_prob_diff(args: StepFunctionArgs, logprob: bool = False) -> torch.Tensor:
    """Probability of the target minus probability of the contrastive target."""
    return probability(args, logprob=logprob) - contrast_prob(args, logprob=logprob)


def pcxmi(args: StepFunctionArgs) -> torch.Tensor:
    """Pointwise conditional cross-mutual information (Yin et al. 2021): -log2(p(y | input) / p(y | contrast))."""
    return -torch.log2(probability(args) / contrast_prob(args))


def in_context_pvi(args: StepFunctionArgs) -> torch.Tensor:
    """In-context pointwise V-usable information (Lu et al. 2023): -log p(y | input) + log p(y | contrast)."""
    return -probability(args, logprob=True) + contrast_prob(args, logprob=True)


def _removed_by_top_p(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int) -> torch.Tensor:
    """Tokens outside the nucleus: the least likely ones whose cumulative probability is <= 1 - top_p."""
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    ascending, order = logits.sort(dim=-1)
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[..., -min_tokens_to_keep:] = False
    return drop.scatter(-1, order, drop)


def _removed_by_top_k(logits: torch.Tensor, top_k: int, min_tokens_to_keep: int) -> torch.Tensor:
    if not 0 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k must be in [0, {logits.shape[-1]}], got {top_k}")
    return logits < logits.topk(max(top_k, min_tokens_to_keep), dim=-1).values[..., -1:]


def kl_divergence(
    args: StepFunctionArgs, top_k: int = 0, top_p: float = 1.0, min_tokens_to_keep: int = 1
) -> torch.Tensor:
    """KL(p(. | input) || p(. | contrast)). With `top_p` and then `top_k`, both distributions keep only the
    tokens selected on the sum of the two logit vectors (as Inseq's "merged" filtering does)."""
    original, contrast = args.logits.float(), args.contrast()[0].float()
    if top_p < 1.0:
        removed = _removed_by_top_p(original + contrast, top_p, min_tokens_to_keep)
        original, contrast = original.masked_fill(removed, float("-inf")), contrast.masked_fill(removed, float("-inf"))
    if top_k > 0:
        removed = _removed_by_top_k(original + contrast, top_k, min_tokens_to_keep)
        original, contrast = original.masked_fill(removed, float("-inf")), contrast.masked_fill(removed, float("-inf"))
    logp, logq = original.log_softmax(-1), contrast.log_softmax(-1)
    kept = torch.isfinite(logp)
    return torch.where(kept, logp.exp() * (logp - logq), torch.zeros_like(logp)).sum(-1)


def mc_dropout_prob_avg(args: StepFunctionArgs, n_mcd_steps: int = 5, logprob: bool = False) -> torch.Tensor:
    """Target probability z-scored against `n_mcd_steps` forwards with dropout active (Gal and Ghahramani
    2016): (p - mean(p_dropout)) / std(p_dropout), as Inseq defines it."""
    if n_mcd_steps < 2:
        raise ValueError(f"n_mcd_steps must be at least 2 (a standard deviation is taken), got {n_mcd_steps}")
    noisy = torch.stack(
        [
            probability(StepFunctionArgs(args.rerun(train=True), args.target_ids, args.contrast, args.rerun), logprob)
            for _ in range(n_mcd_steps)
        ]
    )
    return (probability(args, logprob) - noisy.mean(0)) / noisy.std(0)


def logit_diff(args: StepFunctionArgs, wrong_id=None, correct_id=None) -> torch.Tensor:
    """Logit of the correct answer minus that of the wrong one (`correct_id`, default: the target
    token; `wrong_id`: a token id, or one per row), as in circuit analyses (Wang et al. 2023).

        model.attribute(text, attributed_fn="logit_diff", wrong_id=tokenizer.convert_tokens_to_ids("Mary"))
    """
    logits = args.logits.float()
    if wrong_id is None:
        raise ValueError("logit_diff needs wrong_id=: the token id (or one per row) whose logit is subtracted")

    def ids(value, name):
        value = torch.as_tensor(value, device=logits.device)
        if value.is_floating_point() or value.dim() > 1 or (value.dim() == 1 and len(value) != len(logits)):
            raise ValueError(f"logit_diff: {name} must be a token id or one per row ({len(logits)}), got {value!r}")
        if bool(((value < 0) | (value >= logits.shape[-1])).any()):
            raise ValueError(f"logit_diff: {name} {value.tolist()} is not in the vocabulary (size {logits.shape[-1]})")
        return value.long().expand(len(logits))

    correct = args.target_ids if correct_id is None else ids(correct_id, "correct_id")
    return _gather(logits, correct.to(logits.device)) - _gather(logits, ids(wrong_id, "wrong_id"))


def lens_depth(args: StepFunctionArgs) -> torch.Tensor:
    """Logit-lens depth: the first layer (0: the embeddings, l: block l's output) from which the
    target token is the top prediction of the residual stream read through the final norm and
    unembedding, and stays so to the last layer; the number of layers + 1 when the model itself does
    not rank it first. One extra forward of the rows (`instrument.lens`)."""
    inputs = args._inputs("lens_depth")
    engine, rows = inputs.engine, inputs.rows
    if engine.is_encoder_decoder:
        batch = {
            "input_ids": rows.source_ids,
            "attention_mask": rows.source_mask,
            "decoder_input_ids": rows.target_ids,
            "decoder_attention_mask": rows.target_mask,
        }
    else:
        batch = {"input_ids": rows.target_ids, "attention_mask": rows.target_mask}
    stack = resolve_alias(engine.model, "layers", "decoder" if engine.is_encoder_decoder else None)
    with torch.no_grad(), eval_mode(engine.model):
        lens = lens_logits(engine.model, stack, batch)
    last = rows.last.to(lens.device)
    return lens_depth_of(lens[:, torch.arange(len(last), device=lens.device), last], rows.token).to(args.logits.device)


def top_p_size(args: StepFunctionArgs, top_p: float = 0.9) -> torch.Tensor:
    """How many tokens the nucleus of probability mass `top_p` holds."""
    return (~_removed_by_top_p(args.logits.float(), top_p, 1)).sum(-1).float()


# How the scores of merged steps combine (e.g. a word's probability is the product of its subwords'),
# "logprob" when `attribute(..., logprob=True)` made them log-probabilities; unlisted: averaged.
_PROB, _SUM = {"spans": "prod", "logprob": "sum"}, {"spans": "sum"}
for _fn, _contrast, _aggregate_map in [
    (logit, False, None),
    (probability, False, _PROB),
    (entropy, False, _SUM),
    (crossentropy, False, _SUM),
    (perplexity, False, {"spans": "prod"}),
    (contrast_logits, True, None),
    (contrast_prob, True, _PROB),
    (contrast_logits_diff, True, None),
    (contrast_prob_diff, True, {"logprob": "sum"}),
    (pcxmi, True, _SUM),
    (kl_divergence, True, _SUM),
    (in_context_pvi, True, _SUM),
    (mc_dropout_prob_avg, False, _PROB),
    (top_p_size, False, None),
    (logit_diff, False, None),
    (lens_depth, False, None),
]:
    register_step_function(
        _fn, _fn.__name__, dict(_aggregate_map) if _aggregate_map else None, needs_contrast=_contrast
    )
