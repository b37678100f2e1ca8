"""Encoder-decoder (`*ForConditionalGeneration`) models: source attributions, and target-prefix
attributions with `attribute_target=True`.

    model = EncoderDecoderModel(marian, tokenizer, "integrated_gradients")
    model.attribute("Hello world", "Hallo Welt")
"""

from __future__ import annotations

from typing import Sequence

import torch

from instrument.models.base import AttributionModel
from instrument.models.decoder_only import _until_eos


class EncoderDecoderModel(AttributionModel):
    """The target starts with the decoder start token; attributed steps start after it."""

    is_encoder_decoder = True

    @property
    def decoder_start_token_id(self) -> int:
        config = self.model.config
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(getattr(self.model, "generation_config", None), "decoder_start_token_id", None)
        if start is None:
            raise ValueError("The model config has no decoder_start_token_id")
        return int(start)

    def encode_sources(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[torch.Tensor]:
        encoded = self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [torch.tensor(ids, dtype=torch.long) for ids in encoded]

    def encode_targets(
        self, input_texts: Sequence[str], texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[torch.Tensor]:
        encoded = self.tokenizer(text_target=list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [torch.tensor([self.decoder_start_token_id, *ids], dtype=torch.long) for ids in encoded]

    def default_start(self, input_text: str, target_ids: torch.Tensor, add_special_tokens: bool = True) -> int:
        return 1

    def generate(
        self, input_texts, target_prefixes, generation_args: dict, add_special_tokens: bool = True
    ) -> list[torch.Tensor]:
        batch = self.tokenizer(
            list(input_texts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        ).to(self.device)
        if target_prefixes is not None:
            prefixes = [
                ids[:-1] if ids[-1] == self.tokenizer.eos_token_id else ids
                for ids in self.encode_targets(input_texts, target_prefixes, add_special_tokens)
            ]
            if len({len(p) for p in prefixes}) > 1:
                raise ValueError("generate_from_target_prefix needs target prefixes of equal token length in one call")
            batch["decoder_input_ids"] = torch.stack(prefixes).to(self.device)
        with torch.no_grad():
            sequences = self.model.generate(**batch, **generation_args).cpu()
        return [
            torch.cat([row[:1], _until_eos(row[1:], self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)])
            for row in sequences
        ]
