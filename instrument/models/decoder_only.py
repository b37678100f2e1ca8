"""Decoder-only (`*ForCausalLM`) models: the target text continues the input text.

model = DecoderOnlyModel(gpt2, tokenizer, "saliency")
model.attribute("The capital of France is", "The capital of France is Paris")
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from instrument.models.base import AttributionModel
from instrument.models.inseq_options import TokenIds


class DecoderOnlyModel(AttributionModel):
    """Attributions are target-side only: `[sequence_len, generated_len(, hidden)]`."""

    def encode_sources(self, texts: Sequence[str], add_special_tokens: bool = True) -> None:
        return None

    def _ids(self, text: str, add_special_tokens: bool = True) -> torch.Tensor:
        """The text's ids; a text that starts with the BOS token itself (a chat template) gets no second one."""
        if isinstance(text, TokenIds):
            return text.ids
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return torch.tensor(ids, dtype=torch.long)

    def encode_targets(
        self, input_texts: Sequence[str], texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[torch.Tensor]:
        for index, (prompt, text) in enumerate(zip(input_texts, texts)):
            if isinstance(prompt, TokenIds) and isinstance(text, TokenIds):
                if not torch.equal(text.ids[: len(prompt.ids)], prompt.ids):
                    raise ValueError(f"Example {index}: the generated token ids must start with the prompt's token ids")
            elif not text.startswith(prompt):
                raise ValueError(
                    f"Example {index}: on a decoder-only model generated_texts must start with the input text; "
                    f"{text!r} does not start with {prompt!r}"
                )
        return [self._ids(text, add_special_tokens) for text in texts]

    def default_start(self, input_text: str, target_ids: torch.Tensor, add_special_tokens: bool = True) -> int:
        prompt = self._ids(input_text, add_special_tokens)
        if not torch.equal(target_ids[: len(prompt)], prompt):
            warnings.warn(
                f"The tokens of {input_text!r} are not a prefix of the target's tokens (a token spans the boundary); "
                f"attribution starts after the first {len(prompt)} target tokens",
                stacklevel=4,
            )
        return max(len(prompt), 1)

    def generate(
        self, input_texts, target_prefixes, generation_args: dict, add_special_tokens: bool = True
    ) -> list[torch.Tensor]:
        prompts = [
            self._ids(text, add_special_tokens)
            for text in (target_prefixes if target_prefixes is not None else input_texts)
        ]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])  # left padding
        mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]).long() for p in prompts])
        generation_args.setdefault("pad_token_id", pad)
        with torch.no_grad():
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **generation_args
            ).cpu()
        return [
            torch.cat([p, _until_eos(row[width:], self.tokenizer.eos_token_id, pad)])
            for p, row in zip(prompts, sequences)
        ]


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
