"""Context attribution by ablation (ContextCite, Cohen-Wang et al. 2024): which sources of the context
(sentences or documents) the response depends on, from a sparse linear surrogate of random ablations.

    model = instrument.load_model("demo-lm")
    context = "the code of mien is po34 . the code of kuen is qua56 ."
    out = attribute_context_ablation(model, "the code of mien is", context)
    out.show(); out.weights   # one weight per source: how much keeping it raises the response's score

The response (forced, or generated with the full context) is scored teacher-forced under `n_ablations`
random ablations (each source kept with probability 1/2), in batched forwards without a backward; a
Lasso fitted on the keep masks gives each source's weight. The surrogate's fit is measured out of fold
(`r2`, and `lds`: Spearman correlation of predicted and actual scores).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from instrument.models.validation import eval_mode
from instrument.rows import Example, Rows

__all__ = ["ContextAblationOutput", "attribute_context_ablation", "fit_lasso", "split_sources"]

SCORES = ("logit_prob", "log_prob")
SOURCE_KINDS = ("sentences", "documents")
N_FOLDS = 4


# -- the Lasso surrogate ----------------------------------------------------------------------------------


def fit_lasso(x: np.ndarray, y: np.ndarray, alpha: float, max_iter: int = 10_000, tol: float = 1e-12):
    """`(weights, intercept)` minimising `||y - x w - b||^2 / (2 n) + alpha ||w||_1` (scikit-learn's Lasso
    objective), by cyclic coordinate descent on centred data, in float64.

        w, b = fit_lasso(masks.astype(float), scores, alpha=0.01)
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, d = x.shape
    x_mean, y_mean = x.mean(0), y.mean()
    xc, residual = x - x_mean, y - y_mean
    norms = (xc**2).sum(0) / n
    w = np.zeros(d)
    for _ in range(max_iter):
        largest = 0.0
        for j in range(d):
            if norms[j] == 0.0:
                continue
            rho = xc[:, j] @ residual / n + norms[j] * w[j]
            new = math.copysign(max(abs(rho) - alpha, 0.0), rho) / norms[j]
            if new != w[j]:
                residual -= xc[:, j] * (new - w[j])
                largest = max(largest, abs(new - w[j]))
                w[j] = new
        if largest <= tol * max(1.0, np.abs(w).max()):
            break
    return w, float(y_mean - x_mean @ w)


def fit_surrogate(masks: np.ndarray, scores: np.ndarray, n_tokens: int, alpha: float) -> tuple[np.ndarray, float]:
    """ContextCite's surrogate: a Lasso on standardised keep masks against the scores per response token,
    mapped back to weights on the 0/1 masks and to whole-response units."""
    x = masks.astype(np.float64)
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0  # a source kept (or dropped) in every ablation: no signal, weight 0
    w, b = fit_lasso((x - mean) / scale, scores / n_tokens, alpha)
    weights = w / scale
    return weights * n_tokens, (b - mean @ weights) * n_tokens


def out_of_fold(masks: np.ndarray, scores: np.ndarray, n_tokens: int, alpha: float, folds: int = N_FOLDS) -> np.ndarray:
    """Each ablation's score as predicted by a surrogate fitted without its fold (folds: every `folds`-th)."""
    predicted = np.empty(len(scores))
    for k in range(folds):
        test = np.arange(len(scores)) % folds == k
        w, b = fit_surrogate(masks[~test], scores[~test], n_tokens, alpha)
        predicted[test] = masks[test] @ w + b
    return predicted


def r2_score(actual: np.ndarray, predicted: np.ndarray) -> float:
    total = ((actual - actual.mean()) ** 2).sum()
    return float(1 - ((actual - predicted) ** 2).sum() / total) if total > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [_ranks(v) for v in (a, b)]
    if min(r.std() for r in ranks) == 0:
        return float("nan")
    return float(np.corrcoef(*ranks)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (Spearman's convention)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


# -- sources ----------------------------------------------------------------------------------------------


def split_sources(context: str | Sequence[str], sources: str = "sentences") -> tuple[list[str], list[str]]:
    """`(pieces, separators)`: the context's sources and the whitespace after each (the last has none);
    `"".join(p + s for p, s in zip(pieces, separators))` is the context, stripped.

        split_sources("A b. C d.")              # (["A b.", "C d."], [" ", ""])
        split_sources(["doc one", "doc two"], "documents")   # joined by blank lines
    Sentences end at `.`, `!` or `?` followed by whitespace; documents are the items of a list, or the
    blocks of a string between blank lines."""
    if sources not in SOURCE_KINDS:
        raise ValueError(f"sources must be one of {SOURCE_KINDS}, got {sources!r}")
    if not isinstance(context, str):
        if sources != "documents":
            raise TypeError("input_context_text as a list of documents needs sources='documents'")
        pieces = [str(doc).strip() for doc in context]
        if not pieces or not all(pieces) or not all(isinstance(doc, str) for doc in context):
            raise ValueError("input_context_text: every document must be a non-empty string")
        return pieces, ["\n\n"] * (len(pieces) - 1) + [""]
    pattern = r"(?<=[.!?])(\s+)" if sources == "sentences" else r"(\n[ \t]*\n\s*)"
    parts = re.split(pattern, context.strip())
    pieces, separators = parts[0::2], parts[1::2] + [""]
    return pieces, separators


def _join(pieces: Sequence[str], separators: Sequence[str], keep: Sequence[bool]) -> str:
    kept = [i for i, k in enumerate(keep) if k]
    return "".join(pieces[i] + (separators[i] if i != kept[-1] else "") for i in kept) if kept else ""


def _format(template: str, context: str, current: str) -> str:
    if not context:  # every source ablated: the template without the context and the space around it
        return template.replace("{context}", "").strip().format(current=current)
    return template.format(context=context, current=current)


def _check_template(template: Any) -> str:
    if not isinstance(template, str):
        raise TypeError(f"input_template must be a string, got {type(template).__name__}")
    for name in ("{current}", "{context}"):
        if name not in template:
            raise ValueError(f"input_template must contain {name}, got {template!r}")
    try:
        template.format(context="", current="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"input_template may only use the fields {{context}} and {{current}} (double other braces): {error}"
        ) from None
    return template


# -- the output -------------------------------------------------------------------------------------------


@dataclass
class ContextAblationOutput:
    """Each source's surrogate weight (`weights[i]`: how much keeping `sources[i]` raises the response's
    score), the surrogate's out-of-fold fit, and what was run.

        out.top(3)    # [(source, weight), ...] largest weights first
    """

    input_context: str
    input_current: str
    output_current: str
    sources: list[str]
    weights: torch.Tensor  # [n_sources], float64
    intercept: float
    r2: float  # out-of-fold R^2 of the surrogate on the ablations' scores
    lds: float  # out-of-fold Spearman correlation (linear datamodeling score)
    n_forwards: int  # forward calls of the model: generation's (if any) and the scoring batches
    n_ablations: int
    masks: torch.Tensor  # [n_ablations, n_sources], bool: True where a source was kept
    scores: torch.Tensor  # [n_ablations], the response's score under each ablation
    full_score: float  # the response's score with the whole context (not used in the fit)
    info: dict = field(default_factory=dict)

    def top(self, k: int | None = None) -> list[tuple[str, float]]:
        order = sorted(range(len(self.sources)), key=lambda i: -float(self.weights[i]))
        return [(self.sources[i], float(self.weights[i])) for i in order[:k]]

    def to_dict(self) -> dict:
        return {
            "input_context": self.input_context,
            "input_current": self.input_current,
            "output_current": self.output_current,
            "sources": list(self.sources),
            "weights": self.weights.tolist(),
            "intercept": self.intercept,
            "r2": self.r2,
            "lds": self.lds,
            "n_forwards": self.n_forwards,
            "n_ablations": self.n_ablations,
            "masks": self.masks.int().tolist(),
            "scores": self.scores.tolist(),
            "full_score": self.full_score,
            "info": dict(self.info),
        }

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Writes `to_dict()` as JSON (NaN fits as null)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass overwrite=True to replace it")
        data = self.to_dict()
        for key in ("r2", "lds"):
            data[key] = None if math.isnan(data[key]) else data[key]
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def show(self, console=None) -> None:
        """A table of the sources with their weights, the largest highlighted, and the fit below."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        largest = max((abs(float(w)) for w in self.weights), default=0.0) or 1.0
        best = int(torch.argmax(self.weights)) if len(self.sources) else -1
        table = Table(title=f"Context attribution by ablation: {self.output_current!r}", show_lines=False)
        table.add_column("#", justify="right")
        table.add_column("weight", justify="right")
        table.add_column("", no_wrap=True)
        table.add_column("source")
        for i, (source, weight) in enumerate(zip(self.sources, self.weights.tolist())):
            bar = "█" * round(8 * abs(weight) / largest)
            colour = "green" if weight > 0 else "red"
            style = "bold" if i == best and weight > 0 else None
            table.add_row(str(i), f"{weight:+.3f}", f"[{colour}]{bar}[/]", source, style=style)
        console.print(table)
        console.print(
            f"surrogate fit (out of fold): R^2 {self.r2:.3f}, LDS {self.lds:.3f}; "
            f"{self.n_ablations} ablations, {self.n_forwards} forward calls"
        )


# -- scoring ----------------------------------------------------------------------------------------------


def _response_scores(model, prompts: list[torch.Tensor], response: torch.Tensor, score: str, batch_size: int):
    """The response's score after each prompt (decoder-only: ids the response continues; encoder-decoder:
    source ids), in forwards of `batch_size` rows, logits only at the response's positions."""
    engine, pad = model.engine, model.tokenizer.pad_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        if model.is_encoder_decoder:
            target = torch.cat([torch.tensor([model.decoder_start_token_id]), response])
            examples = [Example(target_ids=target, start=0, end=0, source_ids=p) for p in chunk]
            offsets = [0] * len(chunk)
        else:
            examples = [Example(target_ids=torch.cat([p, response]), start=0, end=0) for p in chunk]
            offsets = [len(p) - 1 for p in chunk]
        rows = Rows.build(examples, [(b, len(e.target_ids) - 1) for b, e in enumerate(examples)], pad)
        positions = torch.tensor(offsets)[:, None] + torch.arange(len(response))[None]
        with torch.no_grad():
            logits, _ = engine.forward_steps(rows.to(engine.device), positions.to(engine.device))
        out.append(_score(logits.float(), response.to(logits.device), score).cpu())
    return torch.cat(out).double()


def _score(logits: torch.Tensor, response: torch.Tensor, score: str) -> torch.Tensor:
    """`[N]`: sum over the response's tokens of log p (log_prob) or of log(p / (1 - p)) (logit_prob)."""
    logp_all = logits.log_softmax(-1)
    index = response.expand(logits.shape[:2])[..., None]
    logp = logp_all.gather(-1, index)[..., 0]
    if score == "logit_prob":
        others = logits.scatter(-1, index, float("-inf")).logsumexp(-1) - logits.logsumexp(-1)  # log(1 - p), exact
        logp = logp - others
    return logp.sum(-1)


# -- the entry point --------------------------------------------------------------------------------------


def attribute_context_ablation(
    model,
    input_current_text: str,
    input_context_text: str | Sequence[str] | None = None,
    output_current_text: str | None = None,
    input_template: str | None = None,
    sources: str = "sentences",
    n_ablations: int = 64,
    seed: int = 0,
    score: str = "logit_prob",
    lasso_alpha: float = 0.01,
    keep_probability: float = 0.5,
    batch_size: int | None = None,
    decoder_input_output_separator: str = " ",
    generation_args: dict | None = None,
) -> ContextAblationOutput:
    """Which sources of `input_context_text` the response relies on, by random ablations and a Lasso.

        out = attribute_context_ablation(model, "Who won?", doc_list, sources="documents", n_ablations=128)

    The model's input is `input_template` (default `"{context} {current}"`) filled with the kept
    sources and `input_current_text`; with no source kept, the template's context and the space around
    it go. The response `output_current_text` (generated greedily with the whole context when None) is
    scored teacher-forced after each ablated input: `logit_prob` (ContextCite's: the sum over its tokens
    of log(p / (1 - p))) or `log_prob`. On a decoder-only model the response follows the input after
    `decoder_input_output_separator`. The masks come from `torch.Generator().manual_seed(seed)`;
    `batch_size` rows per forward (default: all ablations in one). Weights are ContextCite's: a Lasso
    (`lasso_alpha`) on standardised masks against the score per response token, in score units.
    """
    pieces, separators = _check_inputs(model, input_current_text, input_context_text, sources)
    template = _check_template("{context} {current}" if input_template is None else input_template)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not isinstance(n_ablations, int) or isinstance(n_ablations, bool) or n_ablations < 2 * N_FOLDS:
        raise ValueError(f"n_ablations must be an integer of at least {2 * N_FOLDS}, got {n_ablations!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not 0 < keep_probability < 1:
        raise ValueError(f"keep_probability must be in (0, 1), got {keep_probability!r}")
    if not lasso_alpha >= 0:
        raise ValueError(f"lasso_alpha must be >= 0, got {lasso_alpha!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if output_current_text is not None and (
        not isinstance(output_current_text, str) or not output_current_text.strip()
    ):
        raise ValueError(f"output_current_text must be a non-empty string or None, got {output_current_text!r}")

    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_ablations, len(pieces), generator=generator) < keep_probability
    context = _join(pieces, separators, [True] * len(pieces))
    full_input = _format(template, context, input_current_text)
    inputs = [_format(template, _join(pieces, separators, m.tolist()), input_current_text) for m in masks]
    prompts = [_encode_input(model, text) for text in [full_input, *inputs]]
    limit, longest = _window(model), max(prompts, key=len)
    if output_current_text is not None:
        response = _encode_response(model, full_input, prompts[0], output_current_text, decoder_input_output_separator)
        _check_window(model, longest, response, limit)

    counter = _ForwardCounter(model.model)
    with counter, eval_mode(model.model):
        if output_current_text is None:
            _check_window(model, longest, torch.zeros(0, dtype=torch.long), limit)
            response = _generate(model, full_input, dict(generation_args or {}))
            _check_window(model, longest, response, limit)
        all_scores = _response_scores(model, prompts, response, score, batch_size or len(prompts))
    full_score, scores = float(all_scores[0]), all_scores[1:]

    x, y = masks.numpy().astype(np.float64), scores.numpy()
    weights, intercept = fit_surrogate(x, y, len(response), lasso_alpha)
    predicted = out_of_fold(x, y, len(response), lasso_alpha)
    output_text = model.tokenizer.decode(response, skip_special_tokens=True)
    return ContextAblationOutput(
        input_context=context,
        input_current=input_current_text,
        output_current=output_current_text if output_current_text is not None else output_text,
        sources=list(pieces),
        weights=torch.from_numpy(weights),
        intercept=float(intercept),
        r2=r2_score(y, predicted),
        lds=spearman(y, predicted),
        n_forwards=counter.count,
        n_ablations=n_ablations,
        masks=masks,
        scores=scores,
        full_score=full_score,
        info={
            "method": "ablation",
            "model_name": model.model_name,
            "input_template": template,
            "sources": sources,
            "score": score,
            "seed": seed,
            "lasso_alpha": lasso_alpha,
            "keep_probability": keep_probability,
            "batch_size": batch_size or len(prompts),
            "response_tokens": model.tokenizer.convert_ids_to_tokens(response.tolist()),
            "generated": output_current_text is None,
            "n_folds": N_FOLDS,
        },
    )


def _check_inputs(model, current, context, sources):
    if not hasattr(model, "engine") or not hasattr(model, "tokenizer"):
        raise TypeError(f"model must be an instrument AttributionModel (instrument.load_model), got {type(model)}")
    if not isinstance(current, str) or not current.strip():
        raise ValueError(f"input_current_text must be a non-empty string, got {current!r}")
    if context is None or (isinstance(context, str) and not context.strip()):
        raise ValueError("input_context_text is required: context attribution needs a context to ablate")
    return split_sources(context, sources)


def _encode_input(model, text: str) -> torch.Tensor:
    if model.is_encoder_decoder:
        return model.encode_sources([text])[0]
    return model._ids(text)


def _encode_response(model, full_input: str, prompt: torch.Tensor, text: str, separator: str) -> torch.Tensor:
    """The response's ids, without a final EOS. Decoder-only: the ids that follow the prompt's in the
    tokenized `full_input + separator + text`, which must start with the prompt's ids."""
    if model.is_encoder_decoder:
        ids = model.encode_targets([full_input], [text])[0][1:]
    else:
        whole = model._ids(full_input + separator + text)
        if not torch.equal(whole[: len(prompt)], prompt):
            raise ValueError(
                "output_current_text does not tokenize apart from the input: the tokens of "
                f"{full_input + separator + text!r} do not start with those of the input; "
                "change decoder_input_output_separator"
            )
        ids = whole[len(prompt) :]
    ids = _drop_eos(ids, model.tokenizer.eos_token_id)
    if not len(ids):
        raise ValueError(f"output_current_text {text!r} has no tokens")
    return ids


def _drop_eos(ids: torch.Tensor, eos: int | None) -> torch.Tensor:
    return ids[:-1] if len(ids) and eos is not None and int(ids[-1]) == eos else ids


def _generate(model, full_input: str, generation_args: dict) -> torch.Tensor:
    generation_args.setdefault("do_sample", False)
    ids = model.generate([full_input], None, generation_args)[0]
    start = 1 if model.is_encoder_decoder else len(model._ids(full_input))
    response = _drop_eos(ids[start:], model.tokenizer.eos_token_id)
    if not len(response):
        raise ValueError("The model generated an empty response with the full context; give output_current_text")
    return response


def _window(model) -> int | None:
    config = model.model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_window(model, prompt: torch.Tensor, response: torch.Tensor, limit: int | None) -> None:
    if limit is None:
        return
    if model.is_encoder_decoder:
        sides = {"input (context and current text)": len(prompt), "response": len(response) + 1}
    else:
        sides = {"input (context and current text) with the response": len(prompt) + len(response)}
    for name, length in sides.items():
        if length > limit:
            raise ValueError(f"The {name} has {length} tokens, more than the model's context window of {limit}")


class _ForwardCounter:
    """Counts the model's forward calls while entered (the hook is removed on exit, errors included)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.count, self.handle = module, 0, None

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args):
        self.count += 1

    def __exit__(self, *exc):
        self.handle.remove()
        return False
