"""The batched attribution engine: embeddings, baselines and the embedding-patched forward of rows.

    engine = Engine(model, tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
    rows = Rows.build(examples, pairs, engine.pad_token_id)  # one row per (example, attributed step)
    logits, acts = engine.forward(rows, target_embeds=engine.embed(rows)[1])

Rows (`instrument.rows`) of one example whose inputs agree are prefixes of its longest row, so one
forward of each example's longest row (`full_rows`, `Engine.forward_steps`, `Engine.forward_reads`)
serves all its steps, and the gradient methods take every step's gradient from that one forward
(`methods.base.gradients`). Rows whose inputs differ per step (gradient SHAP's random points,
sequential IG, patched layers) run as rows of their own, right-padded (`forward`). The vocabulary
projection only ever runs at the positions read. Step functions score rows in `instrument.steps`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from instrument.hooks import HookHandles
from instrument.rows import FullRows, Rows, full_rows
from instrument.selection import select_modules
from instrument.trace import trace


class _HeadReached(Exception):
    """Ends a forward that needs no logits where the LM head would run."""


@contextlib.contextmanager
def _head_at(head: nn.Module, rows: torch.Tensor | None, positions: torch.Tensor | None, fed: list | None = None):
    """Feeds the vocabulary projection only the hidden states `hidden[rows, positions]` (index
    tensors of one shape, `[N, K]`; None: raises `_HeadReached` instead). With a list `fed`, the
    head gets a leaf copy of them, and `(states, leaf)` is appended: the graph is cut there."""

    def pick(module, args):
        if rows is None:
            raise _HeadReached
        hidden = args[0]
        picked = hidden[rows.to(hidden.device), positions.to(hidden.device)]
        if fed is not None:
            fed.append((picked, picked.detach().requires_grad_(picked.requires_grad)))
            picked = fed[-1][1]
        return (picked,) + tuple(args[1:])

    with HookHandles() as hooks:
        hooks.forward_pre(head, pick)
        yield


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """Parameters without `requires_grad` for the block, each flag restored after (errors included).

        with frozen_parameters(model): grads = torch.autograd.grad(score, input_embeds)

    Gradients w.r.t. inputs then skip every weight gradient, and the forward saves no tensor that
    only a weight gradient would need (a linear layer's input), which bounds the graph's memory."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, flag in flags:
            if flag:
                parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def layer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's stacks of layers (encoder's then decoder's), [] where none is recognised."""
    try:
        return [model.get_submodule(name) for name in select_modules(model, "layers")]
    except (ValueError, KeyError, AttributeError):
        return []


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module):
    """Each layer of the model recomputed in the backward instead of keeping its activations, for
    the block only: the graph then holds the layers' inputs, and one layer's graph at a time.

        with checkpointed_layers(model): grads = torch.autograd.grad(score, input_embeds)

    Each block's `forward` is shadowed by an instance attribute running the original under
    `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` while gradients are enabled; the
    instance attribute (or its absence) is restored after, errors included. Hooks on modules inside a
    block fire again when it is recomputed (up to the last tensor the backward needs): forward hooks
    that capture would capture twice, so only methods whose hooks inside the layers are pure
    functions of their inputs (`activation_slopes`, `rescale_rule`) run checkpointed."""
    blocks = layer_blocks(model)
    if not blocks:
        raise ValueError(f"checkpoint_layers: no stack of layers found in {type(model).__name__} to checkpoint")
    missing = object()
    saved = []
    try:
        for block in blocks:
            saved.append((block, block.__dict__.get("forward", missing)))
            block.forward = _checkpointed(block.forward)
        yield
    finally:
        for block, forward in reversed(saved):
            if forward is missing:
                del block.forward
            else:
                block.forward = forward


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def train_mode(model: nn.Module):
    """Dropout on for the block, every module's own training flag restored after, errors included."""
    flags = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


class Engine:
    """Runs rows through a Hugging Face model with patched embeddings and optional layer capture."""

    def __init__(self, model: nn.Module, pad_token_id: int, unk_token_id: int | None, eos_token_id: int | None):
        self.model = model
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.pad_token_id, self.unk_token_id, self.eos_token_id = pad_token_id, unk_token_id, eos_token_id
        # The API layer's model (or a weak reference to it), handed to step functions; None: a view of this engine.
        self.attribution_model = None
        if self.is_encoder_decoder:
            self.source_embedding = model.get_encoder().get_input_embeddings()
            self.target_embedding = model.get_decoder().get_input_embeddings()
        else:
            self.source_embedding, self.target_embedding = None, model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise ValueError(
                f"{type(model).__name__} has no output embeddings (LM head); "
                "load a *ForCausalLM or *ForConditionalGeneration model"
            )

    @property
    def device(self) -> torch.device:
        return self.target_embedding.weight.device

    @property
    def special_token_ids(self) -> set[int]:
        """Pad, UNK and EOS, and the config's BOS and decoder start token (DIG keeps them off its paths)."""
        config = self.model.config
        ids = (
            self.pad_token_id,
            self.unk_token_id,
            self.eos_token_id,
            getattr(config, "bos_token_id", None),
            getattr(config, "decoder_start_token_id", None),
        )
        return {int(i) for i in ids if isinstance(i, int)}

    # -- embeddings and baselines ---------------------------------------------------------------

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype embeddings, baselines and path points are built in: that of the first layer
        after the embeddings (its first floating, not quantized parameter: on 8-/4-bit models a norm
        or bias), else the embedding weights'. Attributions are float32 whatever it is."""
        if not hasattr(self, "_input_dtype"):
            self._input_dtype = _first_layer_dtype(self.model) or self.target_embedding.weight.dtype
        return self._input_dtype

    def _as_input(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or not tensor.is_floating_point() or tensor.dtype == self.input_dtype:
            return tensor
        return tensor.to(self.input_dtype)

    def embed(self, rows: Rows) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Embedding-module outputs for the rows' source and target ids (no gradient history), in `input_dtype`."""
        with torch.no_grad():
            source = self.source_embedding(rows.source_ids) if rows.source_ids is not None else None
            return self._as_input(source), self._as_input(self.target_embedding(rows.target_ids))

    def baseline(self, rows: Rows, baselines: Any = None, include_eos_baseline: bool = False):
        """Baseline embeddings `(source, target)` for the rows (source None on decoder-only models).

            source_base, target_base = engine.baseline(rows)              # UNK, EOS kept
            engine.baseline(rows, ("zeros", "unk"))                       # per side (encoder-decoders)

        `baselines`: None or "unk" (the UNK token everywhere, EOS kept unless `include_eos_baseline`),
        "pad", "zeros" (also 0 or 0.0), a tensor of shape `(hidden,)` or `(length, hidden)` (`length`
        at least the side's longest sequence; positions past it are cut), or, on encoder-decoders,
        a `(source, target)` pair of those. The decoder start token of an encoder-decoder target is
        no attributed input: the token baselines ("unk", "pad") keep it as it is, as Inseq does.
        """
        if isinstance(baselines, (tuple, list)):
            if not self.is_encoder_decoder:
                raise ValueError(
                    "baselines: a (source, target) pair is for encoder-decoder models; "
                    "this decoder-only model has one input, so pass one baseline"
                )
            if len(baselines) != 2:
                raise ValueError(f"baselines: expected a (source, target) pair, got {len(baselines)} values")
            source_spec, target_spec = baselines
        else:
            source_spec = target_spec = baselines
        source = None
        if rows.source_ids is not None:
            source = self._baseline_side(
                rows.source_ids, self.source_embedding, source_spec, include_eos_baseline, "source"
            )
        target = self._baseline_side(
            rows.target_ids,
            self.target_embedding,
            target_spec,
            include_eos_baseline,
            "target",
            keep_start=self.is_encoder_decoder,
        )
        return self._as_input(source), self._as_input(target)

    def _baseline_side(
        self,
        ids: torch.Tensor,
        embedding: nn.Module,
        baselines: Any,
        include_eos: bool,
        side: str,
        keep_start: bool = False,
    ):
        with torch.no_grad():
            if isinstance(baselines, torch.Tensor):
                return self._baseline_tensor(baselines, embedding(ids), side)
            if isinstance(baselines, (int, float)) and not isinstance(baselines, bool) and baselines == 0:
                baselines = "zeros"
            if isinstance(baselines, str) or baselines is None:
                if baselines in (None, "unk"):
                    if self.unk_token_id is None:
                        raise ValueError(
                            "baselines: the tokenizer has no UNK token for the default baseline; "
                            "pass baselines='zeros' or 'pad'"
                        )
                    base = torch.full_like(ids, self.unk_token_id)
                    if not include_eos and self.eos_token_id is not None:
                        base = torch.where(ids == self.eos_token_id, ids, base)
                elif baselines == "pad":
                    base = torch.full_like(ids, self.pad_token_id)
                elif baselines == "zeros":
                    return torch.zeros_like(embedding(ids))
                else:
                    base = None
                if base is not None:
                    if keep_start:
                        base[:, 0] = ids[:, 0]
                    return embedding(base)
        raise ValueError(
            f"Unknown baselines {baselines!r}; use None (UNK), 'unk', 'zeros' (or 0), 'pad', a tensor"
            + (" or a (source, target) pair of those" if self.is_encoder_decoder else "")
        )

    @staticmethod
    def _baseline_tensor(baselines: torch.Tensor, reference: torch.Tensor, side: str) -> torch.Tensor:
        """A user's baseline tensor, `(hidden,)` or `(length, hidden)`, as `reference` `[R, L, hidden]`."""
        rows, width, hidden = reference.shape
        if baselines.dim() == 2 and baselines.shape[1] == hidden and baselines.shape[0] >= width:
            baselines = baselines[:width]
        elif not (baselines.dim() == 1 and baselines.shape[0] == hidden):
            raise ValueError(
                f"baselines: a tensor of shape {tuple(baselines.shape)} does not fit the {side} embeddings; "
                f"expected ({hidden},) or (length, {hidden}) with length >= {width} (the longest {side} sequence)"
            )
        if not baselines.is_floating_point():
            raise ValueError(f"baselines: expected a floating point tensor, got {baselines.dtype}")
        return baselines.to(reference).expand_as(reference)

    # -- the forward ----------------------------------------------------------------------------

    def forward(
        self,
        rows: Rows,
        source_embeds: torch.Tensor | None = None,
        target_embeds: torch.Tensor | None = None,
        layers: Sequence[str] = (),
        layer_patch: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits `[R, V]` at each row's last position, and the live outputs of `layers`.

        Embeddings given here replace the embedding modules' outputs, so whatever the model does
        after its embedding lookup (scaling, positions, norms) still happens.
        """
        logits, activations = self.forward_steps(
            rows, rows.last[:, None], source_embeds, target_embeds, layers, layer_patch
        )
        return logits[:, -1], activations

    def logits(
        self, rows: Rows, source_embeds: torch.Tensor | None = None, target_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`forward(rows, ...)[0]` from one forward per example (its longest row, see `full_rows`), for
        embeddings that agree across an example's rows (inputs, baselines): `[R, V]`."""
        fr = full_rows(rows)
        source, target = (None if t is None else t[fr.longest] for t in (source_embeds, target_embeds))
        return fr.gather(self.forward_steps(fr.full, fr.positions, source, target)[0])

    def forward_steps(
        self,
        rows: Rows,
        positions: torch.Tensor,
        source_embeds: torch.Tensor | None = None,
        target_embeds: torch.Tensor | None = None,
        layers: Sequence[str] = (),
        layer_patch: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Like `forward`, but logits `[R, K, V]` at `positions` `[R, K]` of each row: one forward
        of a full-length row gives the logits of every attributed step of its example (with
        `full_rows`). Embeddings and patches work as in `forward`. `positions=None`: the forward
        stops before the LM head, and the logits are None."""
        if positions is None:
            return self._run(rows, None, None, source_embeds, target_embeds, layers, layer_patch)
        each = torch.arange(len(rows), device=positions.device)[:, None].expand_as(positions)
        return self._run(rows, each, positions, source_embeds, target_embeds, layers, layer_patch)

    def forward_reads(
        self,
        fr: FullRows,
        source_embeds: torch.Tensor | None = None,
        target_embeds: torch.Tensor | None = None,
        layers: Sequence[str] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """One forward of the full rows `fr.full` for the rows they serve: logits `[R, V]`, the live
        outputs of `layers` (`[F, ...]`), and the hidden states read for the LM head `[R, 1, D]` with
        the leaf copy of them that it was fed: the graph is cut there, where the rows' gradients
        part ways (see `methods.base.gradients`)."""
        owner = fr.owner.to(fr.positions.device)
        read = fr.positions[owner, fr.slot.to(owner.device)]
        fed: list = []
        logits, activations = self._run(
            fr.full, owner[:, None], read[:, None], source_embeds, target_embeds, layers, fed=fed
        )
        return logits[:, 0], activations, fed[0]

    def _run(
        self, rows: Rows, head_rows, head_positions, source_embeds, target_embeds, layers, layer_patch=None, fed=None
    ):
        patch = dict(layer_patch or {})
        patch.update(self._embedding_patch(source_embeds, target_embeds))
        kwargs = {"use_cache": False}
        if self.is_encoder_decoder:
            kwargs.update(
                input_ids=rows.source_ids,
                attention_mask=rows.source_mask,
                decoder_input_ids=rows.target_ids,
                decoder_attention_mask=rows.target_mask,
            )
        else:
            kwargs.update(input_ids=rows.target_ids, attention_mask=rows.target_mask)
        with (
            trace(self.model, list(layers), detach=False, clone=False, patch=patch) as t,
            _head_at(self.head, head_rows, head_positions, fed),
        ):
            try:
                return self.model(**kwargs).logits, t.activations
            except _HeadReached:
                return None, t.activations

    def _embedding_patch(self, source_embeds, target_embeds) -> dict[nn.Module, Any]:
        if self.source_embedding is not None and self.source_embedding is self.target_embedding:
            # One module embeds both sides (older transformers): replace its outputs in call order.
            replacements = iter([source_embeds, target_embeds])
            return {self.target_embedding: lambda out: _or(next(replacements, None), out)}
        patch = {}
        if source_embeds is not None:
            patch[self.source_embedding] = source_embeds
        if target_embeds is not None:
            patch[self.target_embedding] = target_embeds
        return patch

    def layer_names(self, layers: Any) -> list[str]:
        return select_modules(self.model, layers)

    def layer_side(self, name: str) -> str:
        """'source' for modules inside the encoder, 'target' otherwise."""
        if not self.is_encoder_decoder:
            return "target"
        encoder = select_modules(self.model, self.model.get_encoder())[0]
        return "source" if name == encoder or name.startswith(encoder + ".") else "target"

    def contrast_logits(self, rows: Rows, source_embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the contrastive rows. On encoder-decoders they share the (differentiable)
        source embeddings unless `contrast_sources` replaced the source."""
        contrast = rows.contrast
        if contrast is None:
            raise ValueError("This step function needs contrast_targets (or contrast_ids / contrast_sources)")
        if self.is_encoder_decoder and not contrast.contrast_uses_source_ids and source_embeds is not None:
            return self.forward(contrast, source_embeds=source_embeds)[0], contrast.token
        with torch.no_grad():
            return self.forward(contrast)[0], contrast.token


def _or(value, default):
    return default if value is None else value


def _first_layer_dtype(model: nn.Module) -> torch.dtype | None:
    """Floating dtype of the first parameter of the first layer (block) that is not quantized storage
    (bitsandbytes' Int8Params / Params4bit, whose dtype says nothing of the compute dtype)."""
    try:
        layers = select_modules(model, "layers")
    except (ValueError, KeyError, AttributeError):  # no recognisable stack of layers
        return None
    if not layers:
        return None
    for parameter in model.get_submodule(layers[0]).parameters():
        if (
            parameter.is_floating_point()
            and not hasattr(parameter, "quant_state")
            and type(parameter).__name__ not in ("Int8Params", "Params4bit")
        ):
            return parameter.dtype
    return None
