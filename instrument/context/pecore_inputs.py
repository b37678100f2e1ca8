"""PECoRe's settings and texts: Inseq's arguments checked and filled in, outputs generated, texts tokenized.

    settings = context_settings(input_current_text="...", input_context_text="...")   # Inseq's `info` keys
    texts = prepare_outputs(model, settings, [example])                              # generates when needed
    seqs = tokenize(model, settings, texts)                                          # ids, spans; bad input raises

Everything here runs before any attribution forward, so that bad input fails early and clearly.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

import torch

from instrument.steps import get_step_function

STRATEGIES = ("manual", "auto", "pre")


def concat_with_sep(left: str, right: str, sep: str) -> str:
    """`left + sep + right`, without a second separator when either side has it already (Inseq's rule)."""
    return left + right if left.endswith(sep) or right.startswith(sep) else left + sep + right


def context_settings(**given: Any) -> dict[str, Any]:
    """Inseq's `AttributeContextArgs` checks and defaults on one example's arguments; the dict has the keys
    (and order) of Inseq's saved `info`."""
    s = dict(given)
    for name in ("input_current_text",):
        if not isinstance(s.get(name), str) or not s[name].strip():
            raise ValueError(f"{name} must be a non-empty string, got {s.get(name)!r}")
    for name in ("input_context_text", "output_context_text", "output_current_text"):
        if s.get(name) is not None and not isinstance(s[name], str):
            raise TypeError(f"{name} must be a string or None, got {type(s[name]).__name__}")
    if s["handle_output_context_strategy"] not in STRATEGIES:
        raise ValueError(
            f"handle_output_context_strategy must be one of {STRATEGIES}, got {s['handle_output_context_strategy']!r}"
        )
    if s["contextless_output_next_tokens"] and s["prompt_user_for_contextless_output_next_tokens"]:
        raise ValueError(
            "Give either contextless_output_next_tokens or prompt_user_for_contextless_output_next_tokens, not both"
        )
    for name, fallback in (("input_template", "input_context_text"), ("output_template", "output_context_text")):
        if s.get(name) is None:
            s[name] = "{current}" if s.get(fallback) is None else "{context} {current}"
        if not isinstance(s[name], str) or "{current}" not in s[name]:
            raise ValueError(f"{name} must contain the {{current}} placeholder, got {s[name]!r}")
        _check_placeholders(name, s[name], ("context", "current"))
    for name in ("contextless_input_current_text", "contextless_output_current_text"):
        if s.get(name) is None:
            s[name] = "{current}"
        if "{current}" not in s[name]:
            raise ValueError(f"{name} must contain the {{current}} placeholder, got {s[name]!r}")
        _check_placeholders(name, s[name], ("current",))
    s["has_input_context"] = "{context}" in s["input_template"]
    s["has_output_context"] = "{context}" in s["output_template"]
    if s["has_input_context"] and not s.get("input_context_text"):
        raise ValueError(f"input_template {s['input_template']!r} has {{context}} but no input_context_text was given")
    if s.get("input_context_text") and not s["has_input_context"]:
        raise ValueError(f"input_context_text was given but input_template {s['input_template']!r} has no {{context}}")
    if s.get("output_context_text") is not None and not s["has_output_context"]:
        raise ValueError(
            f"output_context_text was given but output_template {s['output_template']!r} has no {{context}}"
        )
    if s["has_output_context"] and s["output_template"].find("{context}") > s["output_template"].find("{current}"):
        raise ValueError(f"output_template {s['output_template']!r}: {{context}} must come before {{current}}")
    if (
        s["handle_output_context_strategy"] == "pre"
        and s["has_output_context"]
        and s.get("output_context_text") is None
    ):
        raise ValueError(
            "handle_output_context_strategy='pre' with {context} in output_template needs output_context_text"
        )
    if not s["has_input_context"] and not s["has_output_context"]:
        raise ValueError(
            "No context given: pass input_context_text (with {context} in input_template) or an output context "
            "(output_template with {context}); without one there is nothing to compare against"
        )
    metric = get_step_function(s["context_sensitivity_metric"])
    if not metric.needs_contrast:
        raise ValueError(
            f"context_sensitivity_metric must be a contrastive step function (e.g. kl_divergence, "
            f"contrast_prob_diff), got {s['context_sensitivity_metric']!r}"
        )
    if s.get("attributed_fn") is not None:
        get_step_function(s["attributed_fn"])
    for name in ("context_sensitivity_std_threshold", "attribution_std_threshold"):
        if s[name] is not None and (isinstance(s[name], bool) or not isinstance(s[name], (int, float))):
            raise TypeError(f"{name} must be a number or None, got {s[name]!r}")
    for name in ("context_sensitivity_topk", "attribution_topk"):
        if s[name] is not None and (isinstance(s[name], bool) or not isinstance(s[name], int) or s[name] < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {s[name]!r}")
    if not isinstance(s["decoder_input_output_separator"], str):
        raise TypeError("decoder_input_output_separator must be a string")
    return s


def _check_placeholders(name: str, template: str, allowed: tuple[str, ...]) -> None:
    for field_name in re.findall(r"(?<!\{)\{([^{}]*)\}(?!\})", template):
        if field_name not in allowed:
            raise ValueError(f"{name} {template!r}: unknown placeholder {{{field_name}}} (allowed: {allowed})")


def format_template(template: str, current: str, context: str | None = None) -> str:
    return template.format(current=current, **({"context": context} if context is not None else {}))


# -- tokens ----------------------------------------------------------------------------------------


def filtered_tokens(model, text_or_ids, keep=(), is_target: bool = False) -> list[str]:
    """Token strings of a text (or ids) without special tokens, except those in `keep` (Inseq's get_filtered_tokens)."""
    tokenizer = model.tokenizer
    if isinstance(text_or_ids, str):
        if is_target and model.is_encoder_decoder:
            ids = tokenizer(text_target=text_or_ids)["input_ids"]
        else:
            ids = tokenizer(text_or_ids)["input_ids"]
    else:
        ids = [int(i) for i in text_or_ids]
    special = set(tokenizer.all_special_tokens)
    return [t for t in tokenizer.convert_ids_to_tokens(ids) if t not in special or t in keep]


def _ask(prompt: str) -> str:
    if not sys.stdin.isatty():
        raise ValueError(f"{prompt}: no terminal to ask on; pass the answer as an argument instead")
    from rich.prompt import Prompt

    return Prompt.ask(prompt)


def prepare_outputs(model, s: dict[str, Any]) -> tuple[str | None, str]:
    """(output context, output current) of one example, generated where not given (Inseq's six cases)."""
    template, has_ctx = s["output_template"], s.get("output_context_text") is not None
    has_cur = s.get("output_current_text") is not None
    use_ctx = s["has_output_context"]
    if has_ctx == use_ctx and has_cur:
        return s.get("output_context_text"), s["output_current_text"]
    sep = s["decoder_input_output_separator"]
    input_full = format_template(s["input_template"], s["input_current_text"], s.get("input_context_text"))
    prefix = template.split("{context}" if use_ctx else "{current}")[0]
    current_prefix_template, suffix = template.split("{current}")
    decoder_prefix, model_input = None, input_full
    if has_ctx and not has_cur:
        prefix = current_prefix_template.strip().format(context=s["output_context_text"])
        if model.is_encoder_decoder:
            decoder_prefix = prefix
        else:
            model_input, prefix = concat_with_sep(input_full, prefix, sep), ""  # in the prompt: not generated
    elif not model.is_encoder_decoder:
        model_input = concat_with_sep(input_full, "", sep)
    generated = _generate(model, model_input, decoder_prefix, s)
    if prefix:
        if not generated.startswith(prefix):
            raise ValueError(
                f"output_template {template!r} starts with {prefix!r} but the model generated {generated!r}; "
                "check the template or force the outputs"
            )
        generated = generated[len(prefix) :]
    if suffix:
        if not generated.endswith(suffix):
            raise ValueError(f"output_template {template!r} ends with {suffix!r} but the model generated {generated!r}")
        generated = generated[: -len(suffix)]
    if has_ctx == use_ctx:
        if not generated.strip():
            raise ValueError(f"The model generated an empty output for {model_input!r}; pass output_current_text")
        return s.get("output_context_text"), generated.strip()
    context = _split_output_context(model, generated, template, s)
    head = template.split("{current}")[0].format(context=context)
    current = generated[min(len(head if context else head.strip()), len(generated)) :]
    if not has_cur and not current:
        raise ValueError(
            f"The model generated no current output after the context {context!r}; pass output_context_text"
        )
    return context, (s["output_current_text"] if has_cur else current.strip())


def _generate(model, model_input: str, decoder_prefix: str | None, s: dict[str, Any]) -> str:
    limit = context_length(model)
    kwargs = dict(s.get("generation_kwargs") or {})
    if decoder_prefix is not None:
        ids = model.encode_targets([decoder_prefix], [decoder_prefix])[0]
        ids = ids[:-1] if int(ids[-1]) == model.tokenizer.eos_token_id else ids
        kwargs["decoder_input_ids"] = ids[None].to(model.device)
    prompt_len = len(_encode_input(model, model_input))
    if limit is not None and prompt_len >= limit:
        raise ValueError(f"The input has {prompt_len} tokens, no room to generate in the model's context of {limit}")
    with torch.no_grad():
        if model.is_encoder_decoder:
            batch = model.tokenizer([model_input], return_tensors="pt").to(model.device)
            new = model.model.generate(**batch, **kwargs)[0].cpu()  # the whole decoder side, as Inseq
        else:
            ids = _encode_input(model, model_input)[None].to(model.device)
            kwargs.setdefault("pad_token_id", model.tokenizer.pad_token_id)
            out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0].cpu()
            new = out[ids.shape[1] :]
    tokens = filtered_tokens(model, new, s["special_tokens_to_keep"])
    return model.tokenizer.convert_tokens_to_string(tokens) if tokens else ""


def _split_output_context(model, generated: str, template: str, s: dict[str, Any]) -> str:
    """The output context part of a generated text holding both (strategy "auto" or "manual")."""
    separator = template.split("{context}")[1].split("{current}")[0]
    candidate = None
    pieces = generated.split(separator) if separator else []
    if len(pieces) == 2:
        candidate = pieces[0]
    if not candidate:
        pieces = [p for p in re.split(r"[\s{}]+".format(re.escape(".?!,;:)]}")), generated) if p]
        if len(pieces) == 2:
            candidate = pieces[0]
    if s["handle_output_context_strategy"] == "auto":
        if not candidate:
            raise ValueError(
                f"Could not split the generated output {generated!r} into context and current text "
                "(handle_output_context_strategy='auto'); pass output_context_text"
            )
        return candidate
    answer = _ask(f"The model generated {generated!r}. Which part is the output context? (default: {candidate!r})")
    context = answer if answer.strip() else (candidate or "")
    if not generated.startswith(context):
        raise ValueError(f"The output context {context!r} is not a prefix of the generated output {generated!r}")
    return context


def _encode_input(model, text: str) -> torch.Tensor:
    if model.is_encoder_decoder:
        return model.encode_sources([text])[0]
    return model._ids(text)


def context_length(model) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(model.model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# -- one example's sequences ----------------------------------------------------------------------


@dataclass
class Sequences:
    """One example's token ids. `context_*`: with context (what CCI attributes), `contextless_*`: without.
    The n tokens CTI scores sit at `context_ids[context_start:context_start + n]` and
    `contextless_ids[contextless_start:...]`. `input_span` / `output_span`: (start, length) of the input
    context (in the source on encoder-decoders, else the target) and of the output context (target)."""

    context_ids: torch.Tensor
    contextless_ids: torch.Tensor
    context_source: torch.Tensor | None
    contextless_source: torch.Tensor | None
    context_start: int
    contextless_start: int
    n: int
    input_span: tuple[int, int] | None
    output_span: tuple[int, int] | None
    input_context_tokens: list[str] | None
    output_context_tokens: list[str] | None


def tokenize(model, s: dict[str, Any]) -> Sequences:
    """The example's ids with and without context; ValueError (before any forward) when the output does not
    tokenize the same way with and without context, or a sequence is longer than the model's window."""
    keep, sep = s["special_tokens_to_keep"], s["decoder_input_output_separator"]
    current, context = s["input_current_text"], s.get("input_context_text")
    input_full = format_template(s["input_template"], current, context)
    output_full = format_template(s["output_template"], s["output_current_text"], s.get("output_context_text"))
    contextless_input = s["contextless_input_current_text"].format(current=current)
    contextless_output = s["contextless_output_current_text"].format(current=s["output_current_text"])
    n_prefix = len(
        filtered_tokens(model, s["contextless_output_current_text"].split("{current}")[0], keep, is_target=True)
    )
    if model.is_encoder_decoder:
        context_source, contextless_source = model.encode_sources([input_full, contextless_input])
        context_ids, contextless_ids = model.encode_targets(
            [output_full, contextless_output], [output_full, contextless_output]
        )
        contextless_start = 1 + n_prefix
        tail = 1  # the EOS: Inseq drops its score
    else:
        context_source = contextless_source = None
        contextless_input = concat_with_sep(contextless_input, "", sep)
        context_ids = model._ids(concat_with_sep(input_full, output_full, sep))
        contextless_ids = model._ids(contextless_input + contextless_output)
        contextless_start = max(len(model._ids(contextless_input.rstrip(" "))), 1) + n_prefix
        tail = 0
    n = len(contextless_ids) - contextless_start - tail
    context_start = len(context_ids) - tail - n
    if n < 1:
        raise ValueError(f"output_current_text {s['output_current_text']!r} has no tokens to score")
    if context_start < 1 or not torch.equal(context_ids[context_start:], contextless_ids[contextless_start:]):
        shown = [
            model.tokenizer.convert_ids_to_tokens(ids[-n - tail :].tolist()) for ids in (context_ids, contextless_ids)
        ]
        raise ValueError(
            f"output_current_text {s['output_current_text']!r} does not tokenize the same way with context "
            f"({shown[0]}) and without ({shown[1]}); change the separator or the templates so that it does"
        )
    limit = context_length(model)
    for name, ids in (("with context", context_ids), ("with context (source)", context_source)):
        if limit is not None and ids is not None and len(ids) > limit:
            raise ValueError(
                f"The input and output {name} have {len(ids)} tokens, more than the model's context of {limit}; "
                "shorten input_context_text"
            )
    input_span = output_span = None
    input_context_tokens = output_context_tokens = None
    if s["has_input_context"]:
        input_context_tokens = filtered_tokens(model, context, keep)
        prefix = s["input_template"].partition("{context}")[0]
        if "{current}" in prefix:
            prefix = prefix.format(current=current)
        start = _lead(model, context_source if model.is_encoder_decoder else context_ids, keep)
        input_span = (start + len(filtered_tokens(model, prefix, keep)), len(input_context_tokens))
    if s["has_output_context"]:
        output_context_tokens = filtered_tokens(model, s["output_context_text"], keep, is_target=True)
        prefix = s["output_template"].partition("{context}")[0]
        if model.is_encoder_decoder:
            start = 1 + len(filtered_tokens(model, prefix, keep, is_target=True))
        else:
            prefix = sep + prefix if prefix else prefix
            start = _lead(model, context_ids, keep) + len(filtered_tokens(model, input_full, keep))
            start += len(filtered_tokens(model, prefix, keep, is_target=True))
        output_span = (start, len(output_context_tokens))
    return Sequences(
        context_ids,
        contextless_ids,
        context_source,
        contextless_source,
        context_start,
        contextless_start,
        n,
        input_span,
        output_span,
        input_context_tokens,
        output_context_tokens,
    )


def _lead(model, ids: torch.Tensor, keep) -> int:
    """How many special tokens (a BOS) the tokenizer put before the text."""
    special = set(model.tokenizer.all_special_tokens) - set(keep)
    tokens = model.tokenizer.convert_ids_to_tokens(ids.tolist())
    count = 0
    while count < len(tokens) and tokens[count] in special:
        count += 1
    return count
