"""`AttributionModel.attribute`: Inseq's entry point, on the batched engine.

model = instrument.load_model(hf_model, "saliency", tokenizer=tokenizer)
out = model.attribute("The capital of France is", step_scores=["probability"])
"""

from __future__ import annotations

import inspect
import time
import warnings
import weakref
from typing import Any, Sequence

import torch

from instrument import batching, planner
from instrument.engine import Engine
from instrument.models import inseq_options, validation
from instrument.models.run import AttributionRun
from instrument.outputs import FeatureAttributionOutput, TokenWithId
from instrument.rows import Example
from instrument.step_args import output2logits
from instrument.steps import get_step_function, step_functions_by_name
from methods.registry import get_method

CONTRAST_ARGS = (
    "contrast_targets",
    "contrast_sources",
    "contrast_ids",
    "contrast_attention_mask",
    "contrast_targets_alignments",
    "contrast_force_inputs",
)


class AttributionModel:
    """A Hugging Face model and tokenizer, ready to attribute. Subclasses say how texts become ids."""

    is_encoder_decoder = False

    def __init__(self, model, tokenizer, attribution_method: str | None = None, **method_kwargs):
        self.model, self.tokenizer = model, tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token) first")
        validation.check_causal(model, self.is_encoder_decoder)
        self.engine = Engine(model, tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
        self.engine.attribution_model = weakref.ref(self)  # step functions see it as args.attribution_model
        self.attribution_method = attribution_method
        self.method_kwargs = method_kwargs
        if attribution_method is not None:
            get_method(attribution_method)(**method_kwargs)  # fail now on an unknown name or option

    @property
    def model_name(self) -> str:
        return getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__

    @property
    def device(self) -> torch.device:
        return self.engine.device

    output2logits = staticmethod(output2logits)  # Inseq's: logits at the last position of model(...)'s output

    # -- to be given by subclasses --------------------------------------------------------------

    def encode_sources(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[torch.Tensor] | None:
        raise NotImplementedError

    def encode_targets(
        self, input_texts: Sequence[str], texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    def default_start(self, input_text: str, target_ids: torch.Tensor, add_special_tokens: bool = True) -> int:
        raise NotImplementedError

    def generate(
        self, input_texts: Sequence[str], target_prefixes, generation_args: dict, add_special_tokens: bool = True
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- attribution ----------------------------------------------------------------------------

    @validation.in_eval_mode
    @inseq_options.inseq_call_options
    def attribute(
        self,
        input_texts: str | Sequence[str],
        generated_texts: str | Sequence[str] | None = None,
        method: str | None = None,
        attr_pos_start: int | None = None,
        attr_pos_end: int | None = None,
        show_progress: bool = True,
        attribute_target: bool = False,
        step_scores: Sequence[str] = (),
        include_eos_baseline: bool = False,
        attributed_fn: Any = None,
        batch_size: int | str | None = None,
        max_memory: int | str = "auto",
        checkpoint_layers: bool | str = "auto",
        generate_from_target_prefix: bool = False,
        skip_special_tokens: bool = False,
        generation_args: dict | None = None,
        **kwargs,
    ) -> FeatureAttributionOutput:
        """Attribute `generated_texts` (or the model's own generations) to `input_texts`.

            out = model.attribute(["Hello world"], ["Hallo Welt"], step_scores=["probability"])

        Method options (`n_steps`, `baselines`, `target_layers`...) and
        step function options (`contrast_targets`, `logprob`, `top_k`...) go in `kwargs`. Inseq's
        `device`, `override_default_attribution`, `pretty_progress`, `output_step_attributions` and
        `clean_special_chars` are handled in `inseq_options.inseq_call_options`. A decoder-only prompt
        may be token ids (e.g. `tokenizer.apply_chat_template(...)`), its target then ids too.
        `skip_special_tokens=True` removes special tokens from the texts and adds none (Inseq).

        `max_memory`: bytes a batch may use beyond the weights, or "auto" (what the device has free):
        the memory planner (`instrument.planner`) chunks batched backwards to fit it.
        `checkpoint_layers`: recompute each layer in the backward rather than keep its activations
        (memory linear in length; the model is patched for the call only): True, False, or "auto"
        (where the planner finds that one graph does not fit `max_memory`). Methods taking gradients
        w.r.t. the input embeddings only (saliency, input_x_gradient, integrated_gradients, deeplift,
        gradient_shap, sequential and discretized IG); True with any other method is an error.
        `attr_pos_start` / `attr_pos_end` select the target steps `[start, end)` as Inseq 0.7.1 does
        (an end past the target is its end, negatives count from the end, a start inside a decoder-only
        prompt is the prompt's end) and the output's target stops at `attr_pos_end`. Refused where
        Inseq's behaviour is accidental: a negative start on a decoder-only model (Inseq ignores it).
        Unlike Inseq, an encoder-decoder's `attr_pos_end` is exclusive too (Inseq adds the step at
        `attr_pos_end` when it is inside the target). The model runs in eval mode; its mode is restored.
        """
        started = time.perf_counter()
        reference = bool(kwargs.pop("_reference", False))  # see `attribute_reference`
        inputs = _as_list(input_texts, "input_texts")
        targets = None if generated_texts is None else _as_list(generated_texts, "generated_texts")
        if targets is not None and len(targets) != len(inputs):
            raise ValueError(f"{len(inputs)} input texts but {len(targets)} generated texts; give one per input")
        step_scores = validation.step_score_names(step_scores)
        validation.check_attribute_args(attr_pos_start, attr_pos_end, attributed_fn, kwargs, len(inputs))
        method_name = method or self.attribution_method
        if method_name is None:
            raise ValueError("No attribution method: pass method=... here or to load_model")
        method_cls = get_method(method_name)
        defaults = self.method_kwargs if method_name == self.attribution_method else {}
        method_options = {k: v for k, v in kwargs.items() if k in method_cls.params}
        if "include_eos_baseline" in method_cls.params:
            method_options["include_eos_baseline"] = include_eos_baseline
        attributor = method_cls(**{**defaults, **method_options})
        attributed = get_step_function(attributed_fn or "probability")
        scorers = step_functions_by_name(step_scores)
        step_kwargs = {k: v for k, v in kwargs.items() if k not in method_cls.params}
        _check_step_kwargs(step_kwargs, [attributed, *scorers.values()])
        if attribute_target and not self.is_encoder_decoder:
            warnings.warn(
                "attribute_target is ignored on decoder-only models: the whole prefix is always attributed",
                stacklevel=2,
            )
        attribute_target = attribute_target or not self.is_encoder_decoder
        batching.check_size("batch_size", batch_size)
        planner.check_max_memory(max_memory)
        _check_checkpoint_layers(checkpoint_layers, method_name, method_cls)

        if targets is None or generate_from_target_prefix:
            target_ids = self.generate(
                inputs, targets, dict(generation_args or {}), add_special_tokens=not skip_special_tokens
            )
            targets = [self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in target_ids]
        else:
            target_ids = self.encode_targets(inputs, targets, add_special_tokens=not skip_special_tokens)
        examples = self._examples(
            inputs, target_ids, attr_pos_start, attr_pos_end, step_kwargs, add_special_tokens=not skip_special_tokens
        )

        batch_size = batch_size or len(examples)
        run = AttributionRun(
            self.engine,
            examples,
            attributor,
            attributed,
            scorers,
            step_kwargs,
            attribute_target,
            max_memory,
            checkpoint_layers if method_cls.checkpointable else False,
        )
        run.attribute_all(
            batch_size, reference=reference, show_progress=show_progress, label=f"Attributing with {method_name}"
        )
        sequences = [
            validation.cut_at_end(seq) for seq in run.collected.sequences(self._tokens)
        ]  # as in Inseq, nothing past attr_pos_end
        info = {
            "attribution_method": method_name,
            "attributed_fn": getattr(attributed, "identifier", str(attributed_fn)),
            "model_name": self.model_name,
            "model_class": type(self.model).__name__,
            "tokenizer_class": type(self.tokenizer).__name__,
            "input_texts": inputs,
            "generated_texts": targets,
            "attr_pos_start": attr_pos_start,
            "attr_pos_end": attr_pos_end,
            "attribute_target": attribute_target,
            "step_scores": list(scorers),
            "attribution_args": attributor.defaults,
            "step_scores_args": {k: v for k, v in step_kwargs.items() if k not in CONTRAST_ARGS},
            "batch_size": batch_size,
            "generation_args": dict(generation_args or {}),
            "reference": reference,
            "exec_time": time.perf_counter() - started,
        }
        return FeatureAttributionOutput(sequences, info=info)

    def attribute_dataset(self, data, output_dir=None, **kwargs):
        """Every row of a data set, attributed into resumable shards in `output_dir` (see
        `instrument.models.dataset.attribute_dataset` for the arguments); returns `open_attributions(output_dir)`.

            ds = model.attribute_dataset(hf_dataset, "out/", input_text_field="prompt", n_steps=20)
        """
        from instrument.models.dataset import attribute_dataset

        return attribute_dataset(self, data, output_dir, **kwargs)

    def _examples(
        self, inputs, target_ids, attr_pos_start, attr_pos_end, step_kwargs, add_special_tokens=True
    ) -> list[Example]:
        sources = self.encode_sources(inputs, add_special_tokens=add_special_tokens)
        contrast_ids, contrast_sources, alignments = self._contrast(
            inputs, step_kwargs, len(inputs), add_special_tokens
        )
        limit = _context_length(self.model.config)
        examples = []
        for b, ids in enumerate(target_ids):
            start, end = validation.positions(
                b,
                attr_pos_start,
                attr_pos_end,
                len(ids),
                self.default_start(inputs[b], ids, add_special_tokens),
                self.is_encoder_decoder,
            )
            for name, seq in (("target", ids), ("source", sources[b] if sources is not None else None)):
                if seq is not None and limit is not None and len(seq) > limit:
                    raise ValueError(
                        f"Example {b}: the {name} has {len(seq)} tokens, more than the model's context of {limit}"
                    )
            example = Example(target_ids=ids, start=start, end=end, source_ids=None if sources is None else sources[b])
            if contrast_ids is not None or contrast_sources is not None:
                example.contrast_ids = contrast_ids[b] if contrast_ids is not None else ids
                example.contrast_source_ids = contrast_sources[b] if contrast_sources is not None else None
                example.alignment = self._alignment(b, alignments[b], start, end, len(ids), len(example.contrast_ids))
            examples.append(example)
        return examples

    def _contrast(self, inputs, kwargs, count, add_special_tokens=True):
        """Contrastive target ids, source ids and alignments per example, from the step kwargs."""
        contrast_ids = contrast_sources = None
        if kwargs.get("contrast_targets") is not None:
            texts = _as_list(kwargs["contrast_targets"], "contrast_targets")
            contrast_ids = self.encode_targets(texts, texts, add_special_tokens)  # need not continue the input text
        elif kwargs.get("contrast_ids") is not None:
            ids = torch.as_tensor(kwargs["contrast_ids"])
            ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
            mask = kwargs.get("contrast_attention_mask")
            mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
            contrast_ids = [row[m.bool()] for row, m in zip(ids, mask)]
        if kwargs.get("contrast_sources") is not None:
            if not self.is_encoder_decoder:
                raise ValueError(
                    "contrast_sources is for encoder-decoder models; "
                    "on decoder-only models give the whole contrastive text in contrast_targets"
                )
            contrast_sources = self.encode_sources(
                _as_list(kwargs["contrast_sources"], "contrast_sources"), add_special_tokens
            )
        for name, value in (("contrast targets", contrast_ids), ("contrast sources", contrast_sources)):
            if value is not None and len(value) != count:
                raise ValueError(f"{len(value)} {name} for {count} input texts; give one per input")
        if kwargs.get("contrast_targets_alignments") is not None and contrast_ids is None:
            raise ValueError("contrast_targets_alignments needs contrast_targets (or contrast_ids)")
        return (
            contrast_ids,
            contrast_sources,
            inseq_options.parse_alignments(kwargs.get("contrast_targets_alignments"), count),
        )

    def _alignment(self, b, pairs, start, end, length, contrast_length) -> dict[int, int]:
        """Inseq's alignment of the attributed positions to contrast positions, missing ones filled from the right.

        Without pairs and with equal lengths: the identity (Inseq's fill would shift it when attr_pos_end
        ends before the target does)."""
        validation.check_alignment_range(b, pairs, length, contrast_length)
        if pairs is None and contrast_length == length:
            return {p: p for p in range(start, end)}
        if pairs is None:
            warnings.warn(
                f"Example {b}: the contrast target has {contrast_length} tokens and the target {length}, and no "
                "contrast_targets_alignments were given: attributed positions are aligned to the contrast's last "
                "positions, right to left (Inseq's rule)",
                UserWarning,
                stacklevel=5,
            )
        return inseq_options.fill_alignment(pairs, start, end, contrast_length)

    def _tokens(self, ids: torch.Tensor) -> list[TokenWithId]:
        ids = ids.tolist()
        return [TokenWithId(token, i) for token, i in zip(self.tokenizer.convert_ids_to_tokens(ids), ids)]


def _check_checkpoint_layers(checkpoint_layers, method_name: str, method_cls) -> None:
    planner.check_checkpoint_layers(checkpoint_layers)
    if checkpoint_layers is True and not method_cls.checkpointable:
        raise ValueError(
            f"checkpoint_layers=True: {method_name!r} does not take gradients w.r.t. the input embeddings "
            "alone (or captures layer internals, which recomputation would capture twice); layers can be "
            "checkpointed with saliency, input_x_gradient, integrated_gradients, deeplift, gradient_shap, "
            "sequential_integrated_gradients and discretized_integrated_gradients"
        )


def attribute_reference(model: AttributionModel, *args, **kwargs) -> FeatureAttributionOutput:
    """`model.attribute(*args, **kwargs)` one row at a time: one prefix forward per step and example,
    as Inseq does. Slow; an oracle for tests of the batched engine.

        expected = attribute_reference(model, "Hello", "Hello world", method="saliency")
    """
    return model.attribute(*args, _reference=True, **kwargs)


def _as_list(texts, name: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Every entry of {name} must be a non-empty string, got {text!r}")
    return texts


def _context_length(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_step_kwargs(kwargs: dict, functions) -> None:
    accepted = set(CONTRAST_ARGS)
    for function in functions:
        params = inspect.signature(function.fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        accepted |= set(list(params)[1:])
    unknown = set(kwargs) - accepted
    if unknown:
        raise TypeError(f"Unknown argument(s) {sorted(unknown)}: neither the method nor the step functions take them")
