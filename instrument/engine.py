"""The batched attribution engine: rows, the embedding-patched forward, and scattering results back.

    >>> engine = Engine(model, pad_token_id=tokenizer.pad_token_id)
    >>> rows = Rows.for_examples(examples)                 # one row per (example, attributed step)
    >>> logits, acts = engine.forward(rows, target_embeds=engine.embed(rows)[1])

A *row* is one example at one attributed step `p`: the decoder sees the target prefix `target[:p]`
and predicts `target[p]`. Rows of one example whose inputs agree are prefixes of its longest row,
and under causal attention that row's hidden state at position `p - 1` is the one row `p` would
compute: so one forward of each example's longest row (`full_rows`, `Engine.forward_steps`,
`Engine.forward_reads`) serves all its steps, and the gradient methods take every step's gradient
from that one forward (`methods.base.gradients`). Rows whose inputs differ per step (gradient SHAP's
random points, sequential IG, patched layers) run as rows of their own, right-padded (`forward`). The
vocabulary projection only ever runs at the positions read.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from instrument.selection import select_modules
from instrument.steps import StepFunction, StepFunctionArgs, StepInputs, call_step_function
from instrument.trace import trace


@dataclass
class Example:
    """One prepared example: token ids and the attributed target positions `[start, end)`.

    `contrast_ids` / `contrast_source_ids` feed contrastive step functions; `alignment` maps a
    target position to the contrast position holding its counterpart.
    """

    target_ids: torch.Tensor
    start: int
    end: int
    source_ids: torch.Tensor | None = None
    contrast_ids: torch.Tensor | None = None
    contrast_source_ids: torch.Tensor | None = None
    alignment: dict[int, int] | None = None

    @property
    def positions(self) -> range:
        return range(self.start, self.end)


def _pad(sequences: Sequence[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for index, seq in enumerate(sequences):
        ids[index, : len(seq)] = seq
        mask[index, : len(seq)] = 1
    return ids, mask


@dataclass
class Rows:
    """A padded batch of (example, step) rows. Row `i` predicts `token[i]` from `target_ids[i]`."""

    example: torch.Tensor
    position: torch.Tensor
    token: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    source_ids: torch.Tensor | None = None
    source_mask: torch.Tensor | None = None
    contrast: "Rows | None" = None
    contrast_uses_source_ids: bool = False
    copy: torch.Tensor | None = None  # which block of `repeat` a row is in (None: one block)

    @classmethod
    def build(cls, examples: Sequence[Example], pairs: Sequence[tuple[int, int]], pad_id: int) -> "Rows":
        """Rows for `pairs` of (example index, target position)."""
        target_ids, target_mask = _pad([examples[b].target_ids[:p] for b, p in pairs], pad_id)
        rows = cls(
            example=torch.tensor([b for b, _ in pairs], dtype=torch.long),
            position=torch.tensor([p for _, p in pairs], dtype=torch.long),
            token=torch.stack([examples[b].target_ids[p] for b, p in pairs]),
            target_ids=target_ids,
            target_mask=target_mask,
        )
        if examples[0].source_ids is not None:
            rows.source_ids, rows.source_mask = _pad([examples[b].source_ids for b, _ in pairs], pad_id)
        if examples[0].contrast_ids is not None:
            rows.contrast = _contrast_rows(examples, pairs, pad_id)
        return rows

    def __len__(self) -> int:
        return len(self.example)

    @property
    def last(self) -> torch.Tensor:
        """Index of each row's last real target position (where its prediction is read)."""
        return self.target_mask.sum(1) - 1

    def repeat(self, times: int) -> "Rows":
        """The rows `times` times over, block after block (row `k * R + r` is row `r` of block `k`)."""
        if times == 1:
            return self
        values = {}
        for name in ("example", "position", "token", "target_ids", "target_mask", "source_ids", "source_mask"):
            value = getattr(self, name)
            values[name] = None if value is None else value.repeat(times, *([1] * (value.dim() - 1)))
        contrast = self.contrast.repeat(times) if self.contrast is not None else None
        copy = self.example.new_zeros(len(self)) if self.copy is None else self.copy
        blocks = torch.arange(times, device=copy.device).repeat_interleave(len(self))
        return replace(self, **values, contrast=contrast, copy=blocks * (int(copy.max()) + 1) + copy.repeat(times))

    def take(self, index: torch.Tensor) -> "Rows":
        """The rows at `index` (a 1-D index tensor), in that order; the padded width is kept."""
        index = torch.as_tensor(index, dtype=torch.long)
        values = {}
        for name in ("example", "position", "token", "target_ids", "target_mask", "source_ids", "source_mask", "copy"):
            value = getattr(self, name)
            values[name] = None if value is None else value[index.to(value.device)]
        contrast = self.contrast.take(index) if self.contrast is not None else None
        return replace(self, **values, contrast=contrast)

    def to(self, device) -> "Rows":
        values = {
            name: getattr(self, name).to(device)
            for name in ("example", "position", "token", "target_ids", "target_mask", "source_ids", "source_mask", "copy")
            if getattr(self, name) is not None
        }
        return replace(self, **values, contrast=self.contrast.to(device) if self.contrast is not None else None)


def _contrast_rows(examples: Sequence[Example], pairs: Sequence[tuple[int, int]], pad_id: int) -> Rows:
    contrast_pairs = []
    for b, p in pairs:
        example = examples[b]
        q = example.alignment.get(p, p) if example.alignment else p
        if not 0 < q < len(example.contrast_ids):
            raise ValueError(f"Contrast position {q} (aligned to target position {p}) is outside the contrast sequence")
        contrast_pairs.append((b, q))
    contrast_examples = [
        Example(target_ids=e.contrast_ids, start=0, end=0, source_ids=e.contrast_source_ids if e.contrast_source_ids is not None else e.source_ids)
        for e in examples
    ]
    rows = Rows.build(contrast_examples, contrast_pairs, pad_id)
    rows.contrast_uses_source_ids = examples[0].contrast_source_ids is not None
    return rows


@dataclass
class RowAttribution:
    """What a method returns for R rows: granular scores over source / target positions.

    `source`: `[R, source_len, ...]`, `target`: `[R, prefix_len, ...]`; `logits` are the logits at
    the unperturbed input when the method computed them anyway; `delta` the convergence delta;
    `sequence_scores` per-example scores, `[R, source_len, source_len, ...]` (each row holds its
    example's), such as value zeroing's encoder self-attention scores.
    """

    source: torch.Tensor | None = None
    target: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    sequence_scores: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class FullRows:
    """Each row of `rows` read off one full-length forward of its example (see `full_rows`).

    `full` holds one row per example (per block of `Rows.repeat`): its longest prefix, at index
    `longest[f]` of the rows. Every other row of the example is a prefix of it, so under causal
    attention its hidden state at position `p - 1` is the one row `p` computes. `owner[r]` is row
    r's full row, `positions[f]` the positions read from full row f (padded by repeating its last
    one), `slot[r]` where row r's position sits in them.
    """

    full: Rows
    longest: torch.Tensor
    owner: torch.Tensor
    slot: torch.Tensor
    positions: torch.Tensor

    def gather(self, per_full: torch.Tensor) -> torch.Tensor:
        """`[F, K, ...]` values at `positions` -> `[R, ...]` values, one per row."""
        return per_full[self.owner.to(per_full.device), self.slot.to(per_full.device)]


def full_rows(rows: Rows) -> FullRows:
    """The longest row of each example (and block of `Rows.repeat`) in `rows`, and where every row
    reads from it.

        >>> fr = full_rows(rows)
        >>> logits = fr.gather(engine.forward_steps(fr.full, fr.positions)[0])   # [R, V], as engine.forward(rows)[0]
    """
    groups = rows.example.tolist() if rows.copy is None else list(zip(rows.example.tolist(), rows.copy.tolist()))
    positions = rows.position.tolist()
    longest: dict[Any, int] = {}
    for r, (g, p) in enumerate(zip(groups, positions)):
        if g not in longest or p > positions[longest[g]]:
            longest[g] = r
    index = {g: f for f, g in enumerate(longest)}
    read: list[dict[int, int]] = [{} for _ in longest]  # position -> slot, per full row
    owner, slot = [], []
    for g, p in zip(groups, positions):
        f = index[g]
        owner.append(f)
        slot.append(read[f].setdefault(p - 1, len(read[f])))
    width = max(len(q) for q in read)
    padded = torch.tensor([list(q) + [list(q)[-1]] * (width - len(q)) for q in read], dtype=torch.long)
    device = rows.target_ids.device
    picked = torch.tensor(list(longest.values()), dtype=torch.long, device=device)
    return FullRows(
        full=rows.take(picked),
        longest=picked,
        owner=torch.tensor(owner, dtype=torch.long, device=device),
        slot=torch.tensor(slot, dtype=torch.long, device=device),
        positions=padded.to(device),
    )


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

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


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
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head); load a *ForCausalLM or *ForConditionalGeneration model")

    @property
    def device(self) -> torch.device:
        return self.target_embedding.weight.device

    @property
    def special_token_ids(self) -> set[int]:
        """Pad, UNK and EOS, and the config's BOS and decoder start token (DIG keeps them off its paths)."""
        config = self.model.config
        ids = (self.pad_token_id, self.unk_token_id, self.eos_token_id, getattr(config, "bos_token_id", None),
               getattr(config, "decoder_start_token_id", None))
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

            >>> source_base, target_base = engine.baseline(rows)              # UNK, EOS kept
            >>> engine.baseline(rows, ("zeros", "unk"))                       # per side (encoder-decoders)

        `baselines`: None or "unk" (the UNK token everywhere, EOS kept unless `include_eos_baseline`),
        "pad", "zeros" (also 0 or 0.0), a tensor of shape `(hidden,)` or `(length, hidden)` (`length`
        at least the side's longest sequence; positions past it are cut), or, on encoder-decoders,
        a `(source, target)` pair of those. The decoder start token of an encoder-decoder target is
        no attributed input: the token baselines ("unk", "pad") keep it as it is, as Inseq does.
        """
        if isinstance(baselines, (tuple, list)):
            if not self.is_encoder_decoder:
                raise ValueError("baselines: a (source, target) pair is for encoder-decoder models; "
                                 "this decoder-only model has one input, so pass one baseline")
            if len(baselines) != 2:
                raise ValueError(f"baselines: expected a (source, target) pair, got {len(baselines)} values")
            source_spec, target_spec = baselines
        else:
            source_spec = target_spec = baselines
        source = None
        if rows.source_ids is not None:
            source = self._baseline_side(rows.source_ids, self.source_embedding, source_spec, include_eos_baseline, "source")
        target = self._baseline_side(rows.target_ids, self.target_embedding, target_spec, include_eos_baseline, "target",
                                     keep_start=self.is_encoder_decoder)
        return self._as_input(source), self._as_input(target)

    def _baseline_side(self, ids: torch.Tensor, embedding: nn.Module, baselines: Any, include_eos: bool, side: str,
                       keep_start: bool = False):
        with torch.no_grad():
            if isinstance(baselines, torch.Tensor):
                return self._baseline_tensor(baselines, embedding(ids), side)
            if isinstance(baselines, (int, float)) and not isinstance(baselines, bool) and baselines == 0:
                baselines = "zeros"
            if isinstance(baselines, str) or baselines is None:
                if baselines in (None, "unk"):
                    if self.unk_token_id is None:
                        raise ValueError("baselines: the tokenizer has no UNK token for the default baseline; "
                                         "pass baselines='zeros' or 'pad'")
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
        raise ValueError(f"Unknown baselines {baselines!r}; use None (UNK), 'unk', 'zeros' (or 0), 'pad', a tensor"
                         + (" or a (source, target) pair of those" if self.is_encoder_decoder else ""))

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
        logits, activations = self.forward_steps(rows, rows.last[:, None], source_embeds, target_embeds, layers, layer_patch)
        return logits[:, -1], activations

    def logits(self, rows: Rows, source_embeds: torch.Tensor | None = None, target_embeds: torch.Tensor | None = None) -> torch.Tensor:
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
        logits, activations = self._run(fr.full, owner[:, None], read[:, None], source_embeds, target_embeds, layers, fed=fed)
        return logits[:, 0], activations, fed[0]

    def _run(self, rows: Rows, head_rows, head_positions, source_embeds, target_embeds, layers, layer_patch=None, fed=None):
        patch = dict(layer_patch or {})
        patch.update(self._embedding_patch(source_embeds, target_embeds))
        kwargs = {"use_cache": False}
        if self.is_encoder_decoder:
            kwargs.update(input_ids=rows.source_ids, attention_mask=rows.source_mask,
                          decoder_input_ids=rows.target_ids, decoder_attention_mask=rows.target_mask)
        else:
            kwargs.update(input_ids=rows.target_ids, attention_mask=rows.target_mask)
        with trace(self.model, list(layers), detach=False, clone=False, patch=patch) as t, \
                _head_at(self.head, head_rows, head_positions, fed):
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

    # -- scoring --------------------------------------------------------------------------------

    def score(
        self,
        step: StepFunction,
        rows: Rows,
        logits: torch.Tensor,
        kwargs: dict[str, Any],
        source_embeds: torch.Tensor | None = None,
        target_embeds: torch.Tensor | None = None,
        is_attributed_fn: bool = False,
    ) -> torch.Tensor:
        """The step function's value for each row, differentiable where the logits are (and, for
        Inseq-style functions, the embeddings given)."""
        cache: dict[str, Any] = {}

        def contrast():
            if "value" not in cache:
                cache["value"] = self.contrast_logits(rows, source_embeds)
            return cache["value"]

        def rerun(train: bool = True):
            with train_mode(self.model) if train else contextlib.nullcontext():
                return self.forward(rows, source_embeds, target_embeds)[0]

        self.scored = step.identifier  # named by the gradient methods' errors (methods.base)
        args = StepFunctionArgs(logits=logits, target_ids=rows.token, contrast=contrast, rerun=rerun, extra=kwargs,
                                inputs=StepInputs(self, rows, source_embeds, target_embeds), is_attributed_fn=is_attributed_fn)
        scores = call_step_function(step, args, kwargs)
        if scores.shape != (len(rows),):
            raise ValueError(f"Step function {step.identifier!r} returned shape {tuple(scores.shape)}, expected ({len(rows)},)")
        return scores

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
        if parameter.is_floating_point() and not hasattr(parameter, "quant_state") and type(parameter).__name__ not in ("Int8Params", "Params4bit"):
            return parameter.dtype
    return None


def scatter(examples: Sequence[Example], rows: Rows, result: RowAttribution) -> list[dict[str, Any]]:
    """Splits row results into `[positions, steps, ...]` tensors per example; unseen positions are NaN."""
    out = []
    # On the CPU: they index results that may live on the CPU (perturbation methods) or on the model's device.
    example_of_row, positions = rows.example.cpu(), rows.position.cpu()
    for b, example in enumerate(examples):
        picked = (example_of_row == b).nonzero().squeeze(1)
        steps = positions[picked] - example.start
        n_steps = example.end - example.start
        pieces: dict[str, Any] = {}
        if result.source is not None and example.source_ids is not None:
            src = result.source[picked, : len(example.source_ids)]
            pieces["source"] = _columns(src, steps, n_steps, len(example.source_ids), None)
        if result.target is not None:
            tgt = result.target[picked]
            pieces["target"] = _columns(tgt, steps, n_steps, len(example.target_ids), positions[picked])
        if result.delta is not None:
            pieces["delta"] = torch.full((n_steps,), float("nan")).index_copy(0, steps, result.delta[picked].detach().float().cpu())
        out.append(pieces)
    return out


def _columns(values: torch.Tensor, steps: torch.Tensor, n_steps: int, length: int, visible: torch.Tensor | None):
    """`values [rows, positions, ...]` -> `[length, n_steps, ...]`, NaN past each row's prefix."""
    values = values.detach().float().cpu()
    extra = values.shape[2:]
    grid = torch.full((length, n_steps, *extra), float("nan"))
    for row, step in enumerate(steps.tolist()):
        seen = values.shape[1] if visible is None else int(visible[row])
        grid[: min(seen, length), step] = values[row, : min(seen, length)]
    return grid
