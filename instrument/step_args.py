"""What a step function sees: `StepFunctionArgs`, for R rows (one row = one example at one attributed step).

    def max_logit(args: StepFunctionArgs) -> torch.Tensor:
        return args.logits.max(-1).values          # [R, V] logits -> one score per row

Besides the logits at each row's predicting position, the target tokens and lazy access to a
contrastive forward, `StepFunctionArgs` has Inseq's fields (`attribution_model`, `forward_output`,
`encoder_input_ids`, `decoder_input_ids`, their embeddings and attention masks, `is_attributed_fn`),
computed only when read from `StepInputs`. The per-step ones (`decoder_*`) describe one generation
step for all rows: reading them from rows at several steps raises `PerStepRead`, on which
`instrument.steps.call_step_function` calls the function once per step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class ForwardOutput:
    """What `StepFunctionArgs.forward_output` holds for the engine's own forward: the logits `[R, 1, V]`
    at each row's predicting position (so `output2logits(output)` is `args.logits`)."""

    logits: torch.Tensor


def output2logits(forward_output: Any) -> torch.Tensor:
    """`[batch, vocabulary]` logits at the last position of a model output (`output2logits(model(**batch))`)."""
    return forward_output.logits[:, -1, :]


class ModelView:
    """`args.attribution_model` when the engine runs without the API layer's `AttributionModel`:
    the model, where it is and `output2logits`, as Inseq step functions use them."""

    output2logits = staticmethod(output2logits)

    def __init__(self, model: torch.nn.Module, is_encoder_decoder: bool, device: torch.device, tokenizer: Any = None):
        self.model, self.is_encoder_decoder, self.device, self.tokenizer = model, is_encoder_decoder, device, tokenizer


class PerStepRead(BaseException):
    """Raised when a per-step field is read from rows at several steps (caught by `call_step_function`).
    Not an Exception, so that a step function's own `except Exception` lets it through."""


@dataclass
class StepInputs:
    """What the engine ran for the rows, from which Inseq's fields are computed on demand:
    `engine` (model, embeddings, `attribution_model`), `rows` (`instrument.engine.Rows`) and the
    embeddings fed in place of the embedding modules' outputs (None: those of the ids)."""

    engine: Any
    rows: Any
    source_embeds: torch.Tensor | None = None
    target_embeds: torch.Tensor | None = None

    def take(self, index: torch.Tensor) -> "StepInputs":
        source, target = (
            None if t is None else t[index.to(t.device)] for t in (self.source_embeds, self.target_embeds)
        )
        return StepInputs(self.engine, self.rows.take(index), source, target)

    def embed_scale(self) -> float:
        """Inseq's factor between embedding-module outputs and `inputs_embeds`: the encoder's (or, on
        decoder-only models, the model's) `embed_scale` attribute, else 1."""
        model = self.engine.model
        owner = model.get_encoder() if self.engine.is_encoder_decoder else model
        return getattr(owner, "embed_scale", 1.0)


@dataclass
class StepFunctionArgs:
    """What a step function sees, for R rows (one row = one example at one attributed step).

    `contrast()` returns `(logits [R, V], token ids [R])` of the contrastive input (from
    `contrast_targets` / `contrast_ids` / `contrast_sources`), computed once on first use.
    `rerun(train=True)` runs the rows' forward again (used by Monte Carlo dropout).

    Inseq's fields, computed when read (from `inputs`):

    - `attribution_model`: the `AttributionModel` (`.model`, `.tokenizer`, `.device`,
      `.is_encoder_decoder`, `.output2logits(output)`); `forward_output`: an output whose
      `output2logits` is `logits` (assigning one sets `logits` to its last position's logits);
    - `encoder_input_ids`, `encoder_attention_mask` `[R, S]`, `encoder_input_embeds` `[R, S, D]`
      (encoder-decoders only; the embeddings as the model's `inputs_embeds` takes them, so that
      gradients reach the attributed inputs through them);
    - `decoder_input_ids`, `decoder_attention_mask` `[R, p]`, `decoder_input_embeds` `[R, p, D]`: the
      target prefix before the predicted token (the whole sequence so far on decoder-only models),
      p tokens for rows at step p;
    - `is_attributed_fn`: whether the function is the attributed one (else a step score).
    """

    logits: torch.Tensor
    target_ids: torch.Tensor
    contrast: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    rerun: Callable[..., torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
    inputs: StepInputs | None = None
    is_attributed_fn: bool = False
    _forward_output: Any = field(default=None, repr=False)

    def take(self, index: torch.Tensor) -> "StepFunctionArgs":
        """The same arguments for the rows at `index` only."""
        parent = self

        def contrast():
            logits, ids = parent.contrast()
            return logits[index.to(logits.device)], ids[index.to(ids.device)]

        def rerun(*args, **kwargs):
            logits = parent.rerun(*args, **kwargs)
            return logits[index.to(logits.device)]

        return StepFunctionArgs(
            self.logits[index.to(self.logits.device)],
            self.target_ids[index.to(self.target_ids.device)],
            contrast,
            rerun,
            self.extra,
            None if self.inputs is None else self.inputs.take(index),
            self.is_attributed_fn,
        )

    # -- Inseq's fields -------------------------------------------------------------------------

    def _inputs(self, name: str) -> StepInputs:
        if self.inputs is None:
            raise AttributeError(f"{name} is not available: these StepFunctionArgs were built without the rows' inputs")
        return self.inputs

    @property
    def attribution_model(self) -> Any:
        engine = self._inputs("attribution_model").engine
        model = getattr(engine, "attribution_model", None)
        model = model() if isinstance(model, weakref.ref) else model
        return model if model is not None else ModelView(engine.model, engine.is_encoder_decoder, engine.device)

    @property
    def forward_output(self) -> Any:
        if self._forward_output is not None and self._forward_output[1] is self.logits:
            return self._forward_output[0]
        return ForwardOutput(self.logits[:, None, :])

    @forward_output.setter
    def forward_output(self, output: Any) -> None:
        self.logits = output2logits(output)
        self._forward_output = (output, self.logits)

    def _encoder(self, name: str) -> StepInputs:
        inputs = self._inputs(name)
        if not inputs.engine.is_encoder_decoder:
            raise AttributeError(f"{name} exists for encoder-decoder models only")
        return inputs

    @property
    def encoder_input_ids(self) -> torch.Tensor:
        return self._encoder("encoder_input_ids").rows.source_ids

    @property
    def encoder_attention_mask(self) -> torch.Tensor:
        return self._encoder("encoder_attention_mask").rows.source_mask

    @property
    def encoder_input_embeds(self) -> torch.Tensor:
        inputs = self._encoder("encoder_input_embeds")
        embeds = inputs.source_embeds
        if embeds is None:
            with torch.no_grad():
                embeds = inputs.engine.source_embedding(inputs.rows.source_ids)
        return embeds * inputs.embed_scale()

    def _step(self, name: str) -> tuple[StepInputs, int]:
        """The inputs and the prefix length p of rows that are all at step p (else `PerStepRead`)."""
        inputs = self._inputs(name)
        position = inputs.rows.position
        if len(position) > 1 and bool((position != position[0]).any()):
            raise PerStepRead
        return inputs, int(position[0]) if len(position) else 0

    @property
    def decoder_input_ids(self) -> torch.Tensor:
        inputs, p = self._step("decoder_input_ids")
        return inputs.rows.target_ids[:, :p]

    @property
    def decoder_attention_mask(self) -> torch.Tensor:
        inputs, p = self._step("decoder_attention_mask")
        return inputs.rows.target_mask[:, :p]

    @property
    def decoder_input_embeds(self) -> torch.Tensor:
        inputs, p = self._step("decoder_input_embeds")
        embeds = inputs.target_embeds
        if embeds is None:
            with torch.no_grad():
                embeds = inputs.engine.target_embedding(inputs.rows.target_ids)
        return embeds[:, :p] * inputs.embed_scale()
