"""Inseq's call options around `AttributionModel.attribute`, and its rules for contrastive inputs.

    out = model.attribute(prompt, device="cuda", output_step_attributions=True, clean_special_chars=True)
    out.step_attributions[0].target_attributions.shape   # [examples, prefix length(, hidden)]

Also here: prompts given as token ids (`TokenIds`, e.g. from `tokenizer.apply_chat_template`), the
completion of partial `contrast_targets_alignments` (`fill_alignment`) and the scoring of a contrastive
attributed function on the original inputs (`on_original_inputs`), each as Inseq 0.7 defines it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import replace
from typing import Any, Sequence

import torch

from instrument.outputs import FeatureAttributionStepOutput, TokenWithId
from instrument.steps import StepFunction, call_step_function, get_step_function
from methods.registry import get_method

OPTIONS = (
    "device",
    "override_default_attribution",
    "pretty_progress",
    "output_step_attributions",
    "clean_special_chars",
)


class TokenIds(str):
    """A prompt or target given as token ids: the decoded text (for display) carrying the exact ids.

    TokenIds(tokenizer.decode(ids), ids).ids
    """

    ids: torch.Tensor

    def __new__(cls, text: str, ids) -> TokenIds:
        self = super().__new__(cls, text)
        self.ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        return self


def inseq_call_options(attribute):
    """Adds Inseq's `device`, `override_default_attribution`, `pretty_progress`, `output_step_attributions`
    and `clean_special_chars` to `attribute`, and token-id prompts.

        class AttributionModel:
            @inseq_call_options
            def attribute(self, input_texts, ...): ...

    - `device`: the model is moved there for this call and moved back after it, errors included.
    - `override_default_attribution=True` with `method=...`: that method becomes the model's default
      (without the options given to `load_model`, as in Inseq).
    - `pretty_progress`: Inseq's choice between its rich and its plain progress bar; accepted, the bar here
      is the same either way.
    - `output_step_attributions=True`: `out.step_attributions` is one `FeatureAttributionStepOutput` per
      generation step, as Inseq's.
    - `clean_special_chars=True`: token strings are shown as text (`Ġworld` -> ` world`), as Inseq's
      `clean_tokens`: a token whose text is empty keeps its raw form.
    """
    signature = inspect.signature(attribute)

    @functools.wraps(attribute)
    def wrapper(
        self,
        *args,
        device=None,
        override_default_attribution: bool = False,
        pretty_progress: bool = True,
        output_step_attributions: bool = False,
        clean_special_chars: bool = False,
        **kwargs,
    ):
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        method = arguments.get("method")
        if override_default_attribution and method:
            get_method(method)  # an unknown name fails before the default changes
            if method != self.attribution_method:
                self.attribution_method, self.method_kwargs = method, {}
        _prepare_texts(self, arguments)
        options = arguments.get("kwargs", {})
        if (
            arguments.get("attributed_fn") is not None
            and not options.get("contrast_force_inputs")
            and any(options.get(name) is not None for name in ("contrast_targets", "contrast_ids", "contrast_sources"))
        ):
            if get_step_function(arguments["attributed_fn"]).needs_contrast or callable(arguments["attributed_fn"]):
                warn_original_inputs()
        with _on_device(self, device):
            out = attribute(*bound.args, **bound.kwargs)
        if clean_special_chars:
            for seq in out.sequence_attributions:
                seq.source, seq.target = (
                    clean_tokens(self.tokenizer, seq.source),
                    clean_tokens(self.tokenizer, seq.target),
                )
        out.info["output_step_attributions"] = bool(output_step_attributions)
        if output_step_attributions:
            out.step_attributions = step_outputs(out.sequence_attributions)
        return out

    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
        for name, value in zip(OPTIONS, (None, False, True, False, False))
    ]
    parameters = list(signature.parameters.values())
    wrapper.__signature__ = signature.replace(parameters=parameters[:-1] + extra + parameters[-1:])
    return wrapper


@contextlib.contextmanager
def _on_device(model, device):
    if device is None:
        yield
        return
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine")
    original = model.device
    if device == original or (device.index is None and device.type == original.type):
        yield
        return
    hf = model.model
    if getattr(hf, "hf_device_map", None) is not None or getattr(hf, "hf_quantizer", None) is not None:
        raise ValueError(
            "device=... cannot move a model loaded with a device_map or quantized; it stays where it was loaded"
        )
    hf.to(device)
    try:
        yield
    finally:
        hf.to(original)


def _as_ids(value) -> list[torch.Tensor] | None:
    """Token ids given for one example (1-D tensor, list of ints) or several (2-D tensor, list of those); None for
    texts."""
    if isinstance(value, str) or value is None:
        return None
    if (
        hasattr(value, "keys") and "input_ids" in value
    ):  # apply_chat_template(..., tokenize=True) returns a BatchEncoding
        value = value["input_ids"]
    if isinstance(value, torch.Tensor):
        return [value] if value.dim() == 1 else list(value) if value.dim() == 2 else None
    value = list(value)
    if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [torch.tensor(value)]
    if value and all(not isinstance(v, str) and _as_ids(v) is not None and len(_as_ids(v)) == 1 for v in value):
        return [_as_ids(v)[0] for v in value]
    return None


def _prepare_texts(model, arguments: dict) -> None:
    """Token-id prompts become `TokenIds`; `skip_special_tokens=True` removes special tokens from the texts (Inseq)."""
    inputs, targets = _as_ids(arguments.get("input_texts")), _as_ids(arguments.get("generated_texts"))
    if inputs is not None:
        if model.is_encoder_decoder:
            raise TypeError(
                "input_texts must be texts on encoder-decoder models; token ids are accepted for decoder-only prompts"
            )
        if arguments.get("generated_texts") is not None and targets is None:
            raise TypeError(
                "With input_texts given as token ids, give generated_texts as token ids too (prompt ids first)"
            )
        decode = functools.partial(model.tokenizer.decode, skip_special_tokens=False)
        arguments["input_texts"] = [TokenIds(decode(ids.tolist()), ids) for ids in inputs]
        if targets is not None:
            arguments["generated_texts"] = [TokenIds(decode(ids.tolist()), ids) for ids in targets]
    elif targets is not None:
        raise TypeError("generated_texts are token ids but input_texts are texts; give both as texts or both as ids")
    if arguments.get("skip_special_tokens") and inputs is None:
        special = [t for t in model.tokenizer.all_special_tokens if t]
        for name in ("input_texts", "generated_texts"):
            texts = arguments.get(name)
            if texts is not None:
                arguments[name] = [_without(t, special) for t in ([texts] if isinstance(texts, str) else texts)]


def _without(text, special: Sequence[str]):
    if not isinstance(text, str):
        return text  # left for the argument checks to report
    for token in special:
        text = text.replace(token, "")
    return text


def clean_tokens(tokenizer, tokens: Sequence[TokenWithId]) -> list[TokenWithId]:
    """Each token as its text (`tokenizer.convert_tokens_to_string`), raw when that text is empty."""
    return [TokenWithId(tokenizer.convert_tokens_to_string([t.token]) or t.token, t.id) for t in tokens]


def step_outputs(sequences) -> list[FeatureAttributionStepOutput]:
    """Inseq's `step_attributions`: for each generation step k, what every example's k-th attributed step got.

    Tensors are stacked over examples (dim 0) and padded with NaN to the longest; an example with fewer
    steps has NaN rows there and an empty `target`. `prefix[b]` are the target tokens before the step.
    """
    steps = []
    for k in range(max(seq.attr_pos_end - seq.attr_pos_start for seq in sequences)):
        present = [k < seq.attr_pos_end - seq.attr_pos_start for seq in sequences]
        position = [seq.attr_pos_start + k for seq in sequences]

        def column(name: str, rows: Any = None):
            values = [getattr(seq, name) for seq in sequences]
            if all(v is None for v in values):
                return None
            picked = [v[: rows[b] if rows else None, k] if present[b] else None for b, v in enumerate(values)]
            return _stack(picked)

        step_scores = {
            name: _stack(
                [seq.step_scores[name][k : k + 1] if present[b] else None for b, seq in enumerate(sequences)]
            ).reshape(-1)
            for name in sequences[0].step_scores
        }
        steps.append(
            FeatureAttributionStepOutput(
                source_attributions=column("source_attributions"),
                target_attributions=column("target_attributions", position),
                step_scores=step_scores,
                source=[list(seq.source) for seq in sequences],
                prefix=[list(seq.target[: position[b]]) for b, seq in enumerate(sequences)],
                target=[[seq.target[position[b]]] if present[b] else [] for b, seq in enumerate(sequences)],
            )
        )
    return steps


def _stack(values: list[torch.Tensor | None]) -> torch.Tensor:
    """Stacks along a new dim 0, NaN-padding dim 0 of each to the longest (and filling absent entries)."""
    like = next(v for v in values if v is not None)
    length = max(len(v) for v in values if v is not None)
    out = torch.full((len(values), length, *like.shape[1:]), float("nan"), dtype=like.dtype)
    for b, v in enumerate(values):
        if v is not None:
            out[b, : len(v)] = v
    return out


# -- contrastive inputs, as Inseq ------------------------------------------------------------------


def fill_alignment(pairs, start: int, end: int, contrast_length: int) -> dict[int, int]:
    """Target position -> contrast position for every attributed position `start .. end - 1`.

        fill_alignment([(5, 6)], 4, 7, 9)   # {4: 6, 5: 6, 6: 8}

    Inseq's rules (`get_adjusted_alignments` with `fill_missing=True`): pairs are sorted and deduplicated;
    each position keeps its first pair whose contrast position lies in the contrast and is not taken yet
    (else its first pair); a position without pair is aligned right to left from the end of the contrast:
    the i-th position counted back from `end` gets `contrast_length - i`, or the last contrast position
    when that is below 1.
    """
    ordered = sorted({(int(t), int(c)) for t, c in pairs or ()})
    chosen: dict[int, int] = {}
    for position in range(start, end):
        matches = [c for t, c in ordered if t == position and 0 <= c < contrast_length]
        if matches:
            free = [c for c in matches if c not in chosen.values()]
            chosen[position] = (free or matches)[0]
    for i, position in enumerate(reversed(range(start, end)), start=1):
        if position not in chosen:
            chosen[position] = contrast_length - i if contrast_length - i > 0 else contrast_length - 1
    return dict(sorted(chosen.items()))


def parse_alignments(raw, count: int) -> list[list[tuple[int, int]] | None]:
    """`contrast_targets_alignments` as one list of (target, contrast) pairs per example."""
    if raw is None:
        return [None] * count
    if isinstance(raw, str):
        if raw == "auto":
            raise ValueError(
                "contrast_targets_alignments='auto' needs Inseq's word aligner model (sentence-transformers/LaBSE), "
                "which this library does not download or run; pass (target position, contrast position) pairs instead"
            )
        raise ValueError(
            f"Unknown contrast_targets_alignments {raw!r}: give (target position, contrast position) pairs"
        )
    raw = list(raw)
    nested = bool(raw) and all(isinstance(x, (list, tuple)) and (not x or isinstance(x[0], (list, tuple))) for x in raw)
    per_example = raw if nested else [raw] * count
    if len(per_example) != count:
        raise ValueError(f"Give one list of contrast_targets_alignments per input text ({count}), or one for all")
    # the form of each pair was checked by validation.check_attribute_args
    return [list(pairs) for pairs in per_example]


def on_original_inputs(step: StepFunction, rows) -> StepFunction:
    """`step` with `args.contrast()` answering the original inputs' logits and the contrast target tokens.

    Inseq's default for a contrastive *attributed* function (`contrast_force_inputs=False`): gradients
    cannot flow through the contrastive inputs, so only the predicted contrast token changes.
    """
    if rows.contrast is None:
        return step  # the step function raises its own error asking for contrast_targets
    tokens = rows.contrast.token

    def fn(args, **kwargs):
        return call_step_function(step, replace(args, contrast=lambda: (args.logits, tokens)), kwargs)

    return StepFunction(fn, step.identifier, step.aggregate_map, step.needs_contrast)


def warn_original_inputs() -> None:
    warnings.warn(
        "A contrastive attributed function scores the contrast targets on the original inputs (Inseq's default): "
        "only the predicted contrast token differs. Pass contrast_force_inputs=True to run it on the contrastive "
        "inputs instead (their forward then carries no gradient on decoder-only models).",
        UserWarning,
        stacklevel=3,
    )
