"""The token a model generates without context at a context-sensitive step: PECoRe's contrast.

    token = contrast_token(model, settings, seq, i, k, contextless_logits)   # an id

Greedy decoding is the argmax of the logits the CTI forward computed already; sampling, beams or logits
processors in the generation settings run `model.generate` (one call per token, as Inseq).
"""

from __future__ import annotations

import torch

from instrument.context.pecore_inputs import Sequences, _ask


def contrast_token(model, s, seq: Sequences, i: int, k: int, logits: torch.Tensor) -> int:
    """The token generated without context after the first i output tokens (greedy, from the CTI forward),
    or the k-th of `contextless_output_next_tokens`, or the user's answer."""
    given = s["contextless_output_next_tokens"]
    text = given[k] if given else None
    if s["prompt_user_for_contextless_output_next_tokens"]:
        token = model.tokenizer.convert_ids_to_tokens(int(seq.context_ids[seq.context_start + i]))
        text = _ask(f"Contextual token {token!r}: a word to compare it with (empty: the model's own)") or None
    if text is not None:
        if model.is_encoder_decoder:
            ids = model.tokenizer(text_target=text, add_special_tokens=False)["input_ids"]
        else:
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"contextless_output_next_tokens: {text!r} has no tokens")
        return int(ids[0])
    if _greedy(model, s["generation_kwargs"]):
        return int(logits[i].argmax())
    return _generated_next(model, seq, i, s["generation_kwargs"])


_PROCESSORS = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_decoder_ids",
    "min_new_tokens",
    "sequence_bias",
    "temperature",
)


def _greedy(model, generation_kwargs: dict) -> bool:
    """Whether generating one token is the argmax of the logits (no sampling, beams or logits processors)."""
    config = getattr(model.model, "generation_config", None)

    def get(name, default=None):
        return generation_kwargs.get(name, getattr(config, name, default))

    if get("do_sample", False) or (get("num_beams", 1) or 1) > 1:
        return False
    neutral = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "temperature": 1.0}
    return all(get(name) in (None, 0, [], neutral.get(name)) for name in _PROCESSORS)


def _generated_next(model, seq: Sequences, i: int, generation_kwargs: dict) -> int:
    """The next token `model.generate` gives without context (for sampling, beams or logits processors)."""
    kwargs = dict(generation_kwargs)
    device = model.device
    prefix = seq.contextless_ids[: seq.contextless_start + i][None].to(device)
    with torch.no_grad():
        if model.is_encoder_decoder:
            kwargs["max_new_tokens"] = 2  # the second is the forced EOS, as Inseq
            out = model.model.generate(
                input_ids=seq.contextless_source[None].to(device), decoder_input_ids=prefix, **kwargs
            )
        else:
            kwargs["max_new_tokens"] = 1
            kwargs.setdefault("pad_token_id", model.tokenizer.pad_token_id)
            out = model.model.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix), **kwargs)
    return int(out[0, prefix.shape[1]])
