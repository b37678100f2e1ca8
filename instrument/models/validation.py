"""Checks of what `AttributionModel.attribute` is given, and the model state it runs in.

    check_causal(bert_mlm, is_encoder_decoder=False)   # ValueError: bidirectional attention
    with eval_mode(model): ...                          # every module's own flag restored after

Everything here raises one `ValueError` or `TypeError` naming the argument at fault.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Sequence

import torch
from torch import nn

from instrument.hooks import eval_mode

# Inseq's step function that compares against contrastive inputs and is refused as attributed function
# unless contrast_force_inputs=True (its gradients mix two forwards).
FORCED_CONTRAST_STEPS = ("kl_divergence",)


# -- model state ---------------------------------------------------------------------------------


def in_eval_mode(method):
    """Decorator: `self.model` is in eval mode during the call (see `eval_mode`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with eval_mode(self.model):
            return method(self, *args, **kwargs)

    return wrapper


# -- which models can be attributed --------------------------------------------------------------


def check_causal(model: nn.Module, is_encoder_decoder: bool) -> None:
    """ValueError unless `model` is an encoder-decoder or a decoder with causal attention.

    The engine reads every step of a target from one forward of the whole target, which gives each
    step's prediction only when no position sees the positions after it. Known causal-LM classes
    pass; those that are causal only with `config.is_decoder` (BERT-like `*ForCausalLM`,
    `BertLMHeadModel`) need it set; masked-LM classes are refused; any other class is probed: a
    forward of two inputs that differ only in their last token must give the same first logits.
    """
    if is_encoder_decoder:
        return
    cls = type(model)
    name = cls.__name__
    config = model.config
    if _needs_is_decoder(cls) and not getattr(config, "is_decoder", False):
        raise ValueError(
            f"{name} has bidirectional attention unless config.is_decoder=True: "
            f"each step would see the tokens after it. "
            f"Load it with is_decoder=True (e.g. from_pretrained(..., is_decoder=True)) "
            f"or use a causal LM or an encoder-decoder"
        )
    if name in _causal_lm_classes() or name.endswith(("ForCausalLM", "LMHeadModel")):
        return
    if name in _masked_lm_classes() or name.endswith(("ForMaskedLM", "ForPreTraining")):
        raise _bidirectional(name)
    if not _probe_is_causal(model):
        raise _bidirectional(name)


def _bidirectional(name: str) -> ValueError:
    return ValueError(
        f"{name} is not a causal decoder or an encoder-decoder: its attention is bidirectional, so each step would see "
        f"the tokens after it and the attributions would be wrong. "
        f"Load a *ForCausalLM or *ForConditionalGeneration model"
    )


@functools.lru_cache(maxsize=None)
def _needs_is_decoder(cls: type) -> bool:
    """Whether the class reads `config.is_decoder` when built: BERT-like models, causal only with it."""
    try:
        return "is_decoder" in inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return False


@functools.lru_cache(maxsize=None)
def _causal_lm_classes() -> frozenset:
    from transformers.models.auto import modeling_auto

    return frozenset(_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


@functools.lru_cache(maxsize=None)
def _masked_lm_classes() -> frozenset:
    from transformers.models.auto import modeling_auto

    names = set()
    for mapping in ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_PRETRAINING_MAPPING_NAMES"):
        names |= _names(getattr(modeling_auto, mapping, {}))
    return frozenset(names - set(_causal_lm_classes()))


def _names(mapping) -> set:
    out = set()
    for value in mapping.values():
        out.update(value if isinstance(value, (list, tuple)) else [value])
    return out


def _probe_is_causal(model: nn.Module) -> bool:
    """Two inputs differing only in their last token: equal logits at the first position?"""
    vocab = getattr(model.config, "vocab_size", None) or 3
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    ids = torch.tensor([[0, 1, 1], [0, 1, 2 % vocab]], device=device)
    try:
        with torch.no_grad(), eval_mode(model):
            logits = model(input_ids=ids).logits.float()
    except Exception as error:  # noqa: BLE001 - any failure means we cannot tell
        raise ValueError(
            f"Could not check that {type(model).__name__} has causal attention ({error}); "
            "load a *ForCausalLM or *ForConditionalGeneration model"
        ) from error
    first = logits[:, :2]
    scale = first.abs().max().clamp_min(1e-6)
    return bool(((first[0] - first[1]).abs().max() / scale) < 1e-4)


# -- arguments of attribute() --------------------------------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_position(name: str, value: Any) -> None:
    if value is not None and not is_int(value):
        raise TypeError(f"{name} must be an integer position or None, got {value!r} ({type(value).__name__})")


def step_score_names(step_scores: Any) -> list:
    """`step_scores` as a list of names or step functions; one bare name is accepted as a list of one."""
    if step_scores is None:
        return []
    if isinstance(step_scores, str) or callable(step_scores):
        return [step_scores]
    if not isinstance(step_scores, (list, tuple)):
        raise TypeError(f"step_scores must be a list of step function names, got {step_scores!r}")
    for name in step_scores:
        if not isinstance(name, str) and not callable(name):
            raise TypeError(f"step_scores must be a list of step function names, got {name!r} in it")
    return list(step_scores)


def check_attribute_args(attr_pos_start: Any, attr_pos_end: Any, attributed_fn: Any, kwargs: dict, count: int) -> None:
    """Types of the positions, kl_divergence only with contrast_force_inputs, and the form of
    contrast_targets_alignments (`count`: the number of examples)."""
    check_position("attr_pos_start", attr_pos_start)
    check_position("attr_pos_end", attr_pos_end)
    name = attributed_fn if isinstance(attributed_fn, str) else getattr(attributed_fn, "__name__", None)
    if name in FORCED_CONTRAST_STEPS and not kwargs.get("contrast_force_inputs"):
        raise ValueError(
            f"attributed_fn={name!r} compares two forwards (input and contrastive input) and its gradients mix both: "
            "as in Inseq, pass contrast_force_inputs=True to attribute it anyway (it is fine in step_scores)"
        )
    check_alignments(kwargs.get("contrast_targets_alignments"), count)


def check_alignments(raw: Any, count: int) -> None:
    """`contrast_targets_alignments`: None, "auto", a list of (target position, contrast position)
    pairs of non-negative ints for every example, or one such list per example."""
    if raw is None or (isinstance(raw, str) and raw == "auto"):
        return
    what = "contrast_targets_alignments"
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) and not isinstance(raw, torch.Tensor):
        raise TypeError(
            f"{what} must be a list of (target position, contrast position) pairs, "
            f"or one such list per example; got {raw!r}"
        )
    raw = raw.tolist() if isinstance(raw, torch.Tensor) else list(raw)
    if not raw:
        return
    if all(_is_pair(item) for item in raw):
        per_example = [raw]
    elif all(isinstance(item, (list, tuple)) and all(_is_pair(pair) for pair in item) for item in raw):
        if len(raw) != count:
            raise ValueError(
                f"{what} has {len(raw)} lists of pairs for {count} examples; give one per example, or one list for all"
            )
        per_example = raw
    else:
        bad = next(item for item in raw if not _is_pair(item))
        raise TypeError(
            f"{what} must be (target position, contrast position) pairs of integers, "
            f"or one list of pairs per example; got {bad!r}"
        )
    for pairs in per_example:
        for t, c in pairs:
            if t < 0 or c < 0:
                raise ValueError(f"{what} positions must be non-negative, got ({t}, {c})")


def _is_pair(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(is_int(x) for x in item)


def check_alignment_range(index: int, alignment: Any, target_length: int, contrast_length: int) -> None:
    """Every (target, contrast) pair of example `index` must point inside both sequences."""
    if alignment is None:
        return
    pairs = alignment.items() if isinstance(alignment, dict) else alignment
    for t, c in pairs:
        if not (0 <= t < target_length and 0 <= c < contrast_length):
            raise ValueError(
                f"Example {index}: contrast_targets_alignments pair ({t}, {c}) is out of range for a target of "
                f"{target_length} tokens and a contrast target of {contrast_length}"
            )


def positions(
    index: int, start: int | None, end: int | None, length: int, first: int, is_encoder_decoder: bool
) -> tuple[int, int]:
    """The attributed target positions `[start, end)` of example `index`, as Inseq 0.7.1 reads them.

    `length`: target tokens (the prompt included on decoder-only models, the decoder start token on
    encoder-decoders); `first`: the default start (the prompt length, or 1). `end` beyond the target
    is the target's end; negative positions count from the end. On decoder-only models a start
    inside the prompt is the prompt's end (Inseq never attributes the prompt) and a negative start is
    refused (Inseq silently replaces it by the prompt length).
    """
    if not is_encoder_decoder and first >= length:
        raise ValueError(f"Example {index}: the generated text adds no token to the input text: nothing to attribute")
    if end is None or end > length:
        end = length
    elif end < 0:
        if end < -length:
            raise ValueError(f"Example {index}: attr_pos_end={end} is out of range for a target of {length} tokens")
        end += length
    given = start
    if start is None:
        start = first
    elif start < 0:
        if not is_encoder_decoder:
            raise ValueError(
                f"attr_pos_start={start}: negative starts are not supported on decoder-only models (Inseq 0.7.1 "
                f"ignores them there); give the position in the whole text, at least the prompt's {first} tokens"
            )
        if start < -length:
            raise ValueError(f"Example {index}: attr_pos_start={start} is out of range for a target of {length} tokens")
        start += length
    elif not is_encoder_decoder:
        start = max(start, first)
    if not 1 <= start < end:
        raise ValueError(
            f"Example {index}: attributed positions [{start}, {end}) are out of range for a target of {length} tokens "
            f"(attr_pos_start={given}, attr_pos_end must be above it; encoder-decoder targets start at 1)"
        )
    return start, end


def cut_at_end(sequence):
    """The output's target tokens and target attribution rows up to `attr_pos_end`. Inseq 0.7.1 cuts
    the rows there too, but keeps every target token, so that rows and tokens no longer match."""
    end = sequence.attr_pos_end
    if end >= len(sequence.target):
        return sequence
    sequence.target = sequence.target[:end]
    if sequence.target_attributions is not None:
        sequence.target_attributions = sequence.target_attributions[:end]
    return sequence
