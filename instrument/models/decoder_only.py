"""Decoder-only (`*ForCausalLM`) models: the target text continues the input text.

    >>> model = DecoderOnlyModel(gpt2, tokenizer, "saliency")
    >>> model.attribute("The capital of France is", "The capital of France is Paris")
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from instrument.models.base import AttributionModel


class DecoderOnlyModel(AttributionModel):
    """Attributions are target-side only: `[sequence_len, generated_len(, hidden)]`."""

    def encode_sources(self, texts: Sequence[str]) -> None:
        return None

    def _ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)

    def encode_targets(self, input_texts: Sequence[str], texts: Sequence[str]) -> list[torch.Tensor]:
        for index, (prompt, text) in enumerate(zip(input_texts, texts)):
            if not text.startswith(prompt):
                raise ValueError(
                    f"Example {index}: on a decoder-only model generated_texts must start with the input text; "
                    f"{text!r} does not start with {prompt!r}"
                )
        return [self._ids(text) for text in texts]

    def default_start(self, input_text: str, target_ids: torch.Tensor) -> int:
        prompt = self._ids(input_text)
        if not torch.equal(target_ids[: len(prompt)], prompt):
            warnings.warn(
                f"The tokens of {input_text!r} are not a prefix of the target's tokens (a token spans the boundary); "
                f"attribution starts after the first {len(prompt)} target tokens",
                stacklevel=4,
            )
        return max(len(prompt), 1)

    def generate(self, input_texts, target_prefixes, generation_args: dict) -> list[torch.Tensor]:
        prompts = target_prefixes if target_prefixes is not None else input_texts
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        finally:
            self.tokenizer.padding_side = side
        generation_args.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with torch.no_grad():
            sequences = self.model.generate(**batch, **generation_args).cpu()
        width = batch["input_ids"].shape[1]
        out = []
        for row, mask in zip(sequences, batch["attention_mask"].cpu()):
            prompt = row[:width][mask.bool()]
            out.append(torch.cat([prompt, _until_eos(row[width:], self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)]))
        return out


def _until_eos(ids: torch.Tensor, eos: int | None, pad: int | None) -> torch.Tensor:
    """Generated ids up to and including the first EOS (generation pads after it)."""
    if eos is not None:
        hits = (ids == eos).nonzero()
        if len(hits):
            return ids[: int(hits[0]) + 1]
    if pad is not None and pad != eos:
        keep = ids != pad
        return ids[keep] if not keep.all() else ids
    return ids
