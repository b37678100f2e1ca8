"""Readouts of a model's intermediate predictions: `instrument.logit_lens`.

lens = instrument.logit_lens(am, "The capital of France is", "The capital of France is Paris")
lens.probabilities        # [layers + 1, steps]: p(target) read from each layer's residual stream
lens.show(); lens.save_html("lens.html")
"""

from __future__ import annotations

import torch

from instrument.hooks import eval_mode
from instrument.lens import LensResult, lens_logits, lens_table
from instrument.models import AttributionModel, load_model
from instrument.selection import resolve_alias


def logit_lens(model, input_text: str, generated_text: str | None = None, top_k: int = 5, tokenizer=None) -> LensResult:
    """The logit lens at the attributed steps of `(input_text, generated_text)`, read as `attribute`
    reads them (decoder-only: the steps after the prompt, or every token after the first without
    `generated_text`; encoder-decoders: every target token, `generated_text` required). Each layer's
    residual stream (row 0: the embeddings) goes through the model's final norm and unembedding:
    per layer and step, the target token's probability and rank and the `top_k` tokens.
    Cost: one forward (the LM head on `layers + 1` stacked states), no backward.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if not isinstance(input_text, str) or not (generated_text is None or isinstance(generated_text, str)):
        raise TypeError("input_text and generated_text must be texts")
    am = model if isinstance(model, AttributionModel) else None
    if am is None:
        if not isinstance(model, torch.nn.Module) or tokenizer is None:
            raise TypeError("model: pass an instrument.load_model(...) model, or a Hugging Face model and tokenizer=")
        am = load_model(model, tokenizer=tokenizer)
    engine = am.engine
    device = engine.device
    if engine.is_encoder_decoder:
        if generated_text is None:
            raise ValueError("generated_text: an encoder-decoder model needs the target text to read the lens on")
        source = am.encode_sources([input_text])[0]
        ids = am.encode_targets([input_text], [generated_text])[0]
        batch = {"input_ids": source[None].to(device), "decoder_input_ids": ids[None].to(device)}
        start, stack = 1, resolve_alias(engine.model, "layers", "decoder")
    else:
        ids = am.encode_targets([input_text], [generated_text or input_text])[0]
        start = am.default_start(input_text, ids) if generated_text is not None else 1
        batch = {"input_ids": ids[None].to(device)}
        stack = resolve_alias(engine.model, "layers")
    if start >= len(ids):
        raise ValueError("generated_text adds no token to input_text: no step to read the lens at")
    with eval_mode(engine.model):
        lens = lens_logits(engine.model, stack, batch)[:, 0]
    layers = ["embeddings"] + stack
    return lens_table(lens, range(start, len(ids)), ids, top_k, layers, am.tokenizer.convert_ids_to_tokens)
