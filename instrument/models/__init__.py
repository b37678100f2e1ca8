"""`load_model`: wrap a Hugging Face model (object, local directory or hub name) for attribution.

model = instrument.load_model("path/to/model", "integrated_gradients", n_steps=20)
out = model.attribute("Hello world")
"""

from __future__ import annotations

from typing import Any

import torch

from instrument.models.base import AttributionModel
from instrument.models.decoder_only import DecoderOnlyModel
from instrument.models.encoder_decoder import EncoderDecoderModel

__all__ = ["AttributionModel", "DecoderOnlyModel", "EncoderDecoderModel", "load_model"]


def load_model(
    model: Any,
    attribution_method: str | None = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    model_kwargs: dict | None = None,
    tokenizer_kwargs: dict | None = None,
    **method_kwargs,
) -> AttributionModel:
    """An `AttributionModel` for `model`, a loaded `PreTrainedModel`, a local directory or a hub name.

    load_model(hf_model, "saliency", tokenizer=tokenizer)

    The model's train/eval mode is left as it is (`attribute` runs in eval mode and restores it). It
    is moved to `device` only when one is given and it was not loaded quantized or with a
    `device_map` (those stay where they are, in their dtypes). Quantized
    loading by name or path: `model_kwargs={"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}`
    (with `device`, it is the `device_map` unless model_kwargs has one).
    """
    import transformers

    model_kwargs, tokenizer_kwargs = dict(model_kwargs or {}), dict(tokenizer_kwargs or {})
    if not isinstance(model, str) and model_kwargs.get("quantization_config") is not None:
        raise ValueError(
            "model_kwargs={'quantization_config': ...} applies when loading by name or path; "
            "load the model object with from_pretrained(..., quantization_config=...) instead"
        )
    if isinstance(model, str):
        if model_kwargs.get("quantization_config") is not None and device is not None:
            model_kwargs.setdefault("device_map", str(device))  # quantized weights are placed while loading
        name = _demo_path(model) or model
        config = transformers.AutoConfig.from_pretrained(
            name, **{k: v for k, v in model_kwargs.items() if k == "trust_remote_code"}
        )
        auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(name, **model_kwargs)
        tokenizer = tokenizer or name
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"model must be a Hugging Face PreTrainedModel, a directory or a hub name, not {type(model).__name__}"
        )
    if tokenizer is None:
        tokenizer = getattr(model.config, "_name_or_path", None)
        if not tokenizer:
            raise ValueError("Pass tokenizer=... : the model does not say where its tokenizer is")
    if isinstance(tokenizer, str):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer, **tokenizer_kwargs)
    placed = (
        getattr(model, "hf_device_map", None) is not None
        or getattr(model, "hf_quantizer", None) is not None
        or getattr(model, "is_quantized", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_loaded_in_4bit", False)
    )
    if device is not None and not placed:
        model = model.to(device)
    wrapper = EncoderDecoderModel if getattr(model.config, "is_encoder_decoder", False) else DecoderOnlyModel
    return wrapper(model, tokenizer, attribution_method, **method_kwargs)


def _demo_path(name: str) -> str | None:
    """The folder of a shipped demo model ("demo-lm", "demo-mt"), else None."""
    from instrument import demo

    path = demo.model_path(name)
    return None if path is None else str(path)
