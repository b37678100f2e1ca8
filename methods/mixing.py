"""Context mixing read off one forward: attention rollout, ALTI, ALTI+, ALTI-logit, attention x norm, GlobEnc.

    out = model.attribute(text, method="attention_rollout")    # Abnar & Zuidema 2020
    out = model.attribute(text, method="alti")                 # decoder-only; "alti_plus" on encoder-decoders
    out = model.attribute(text, method="alti_logit")           # logit contributions (decoder-only, pre-LN)
    out = model.attribute(text, method="attention_x_norm", layers=[-1])
    out = model.attribute(text, method="globenc")

Every method runs one forward of each example's longest row (`full_rows`) with eager attention and
hooks, and no backward. Each attention sublayer of each block is decomposed per key token j at each
query i, from what the model computes:

    t_ij = sum_h A^h_ij v^h_j W_O^h  +  [j == i] x_i        (attention through values and output
                                                              projection, plus the residual)

where `v^h_j` are the value vectors as the model computes them (value bias and, in pre-norm blocks,
the norm before attention included: both depend on token j alone), `W_O^h` head h's rows of the
output projection (its bias belongs to no token and is left out) and `x_i` the residual entering the
sublayer. In post-norm blocks (BART, Marian, OPT with `do_layer_norm_before=False`) the norm after the
sum is applied to every `t_ij` as a linear map with query i's fixed statistics:
`(t_ij - mean t_ij) / sigma_i * gamma` (its bias left out). The vectors add up to the resultant
`y_i = sum_j t_ij`. `instrument.kernels.alti_norms` gives `||y_i||_1 - ||y_i - t_ij||_1` and `||t_ij||_2` without
holding `[queries, keys, hidden]`.

Per-layer contributions, each row normalised to sum 1 over the keys:
- attention_rollout: `0.5 * mean_h A^h + 0.5 * I`;
- alti: `max(0, ||y_i||_1 - ||y_i - t_ij||_1)` (Ferrando et al. 2022a);
- globenc: `||t_ij||_2` (Modarressi et al. 2022: attention, residual and the first norm);
and rolled out: `R = C^L ... C^1`. On encoder-decoders (attention_rollout, alti_plus, globenc) the
decoder's cross-attention sublayer mixes the encoder's rolled-out source tokens with the decoder
token's residual: its keys are the source tokens plus one for the residual `x_i`, normalised
together; with `s` the source share and `r` the residual's, the decoder's contributions go
`S <- s R_enc + r S` (source side) and `P <- r P` (target side) (Ferrando et al. 2022b). For
attention_rollout the cross sublayer is `0.5 * mean_h A_cross` over the source and 0.5 residual.

attention_x_norm (Kobayashi et al. 2020) is not rolled out: per layer `||sum_h A^h_ij v^h_j W_O^h||_2`
(no residual, no norm), of decoder self-attention (target side) and cross-attention (source side),
aggregated over the picked `layers` like the `attention` method (`aggregate_fn="mean"`, "max" or None
to keep a `layers` dimension).

Streamed: each sublayer's weights, values and contributions are reduced into the running rollout
(`[F, tokens, tokens]` per stack, one matrix) as the forward goes, and in the last decoder layer only
the query rows read (the attributed positions) are decomposed.

Cost of every method here: 1 forward per batch of rows (one per example for all its steps), 0 backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from instrument.hooks import HookHandles
from instrument.indices import pick_indices
from instrument.kernels import alti_norms
from instrument.rows import RowAttribution, full_rows
from instrument.selection import resolve_alias
from methods.attention import attention_modules, attention_weights, eager_attention
from methods.base import AttributionMethod, Request
from methods.registry import register

# Block classes whose layout is known: (post-norm sublayers?, norm after self-attention, norm after
# cross-attention). A block of another family is refused rather than decomposed by a guess.
_PRE = (False, None, None)
FAMILIES = {
    "GPT2Block": _PRE,
    "GPTNeoXLayer": _PRE,
    "LlamaDecoderLayer": _PRE,
    "Qwen2DecoderLayer": _PRE,
    "MistralDecoderLayer": _PRE,
    "T5Block": _PRE,
    "OPTDecoderLayer": _PRE,  # post-norm when config.do_layer_norm_before is False (see _layout)
    "BartEncoderLayer": (True, "self_attn_layer_norm", None),
    "BartDecoderLayer": (True, "self_attn_layer_norm", "encoder_attn_layer_norm"),
    "MarianEncoderLayer": (True, "self_attn_layer_norm", None),
    "MarianDecoderLayer": (True, "self_attn_layer_norm", "encoder_attn_layer_norm"),
}


def _layout(model: nn.Module, block: nn.Module, method: str) -> tuple:
    name = type(block).__name__
    if name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(
            f"{method} does not know how {name} ({type(model).__name__}) lays out its residual and norms, so it "
            f"cannot decompose its blocks; supported blocks: {known}"
        )
    if name == "OPTDecoderLayer" and not getattr(model.config, "do_layer_norm_before", True):
        return (True, "self_attn_layer_norm", None)
    return FAMILIES[name]


def _first(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _hidden_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Projection:
    """Where an attention module computes its value vectors and its output projection, read as
    `values(v_output) -> [B, K, H_kv, d]` and `weight [H * d, D]` (z @ weight + bias)."""

    def __init__(self, attention: nn.Module, name: str, method: str):
        children = dict(attention.named_children())
        out = next((children[k] for k in ("o_proj", "out_proj", "o", "dense", "c_proj") if k in children), None)
        if out is None or not hasattr(out, "weight"):
            raise ValueError(f"{method}: found no output projection in {name} ({type(attention).__name__})")
        self.weight = out.weight if type(out).__name__ == "Conv1D" else out.weight.t()
        self.value_module, self._take = None, None
        for key in ("v_proj", "v", "value", "value_proj"):
            if key in children:
                self.value_module, self._take = children[key], lambda o: o
                break
        if self.value_module is None and "c_attn" in children and hasattr(attention, "split_size"):
            split = attention.split_size  # GPT-2: [q | k | v] (or [k | v] in cross-attention)
            self.value_module, self._take = children["c_attn"], lambda o: o[..., o.shape[-1] - split :]
        if self.value_module is None and "query_key_value" in children:  # GPT-NeoX: per head [q | k | v]
            size = attention.head_size
            self.value_module = children["query_key_value"]
            self._take = lambda o: o.reshape(*o.shape[:-1], -1, 3 * size)[..., 2 * size :].flatten(-2)
        if self.value_module is None:
            raise ValueError(
                f"{method}: found no value projection in {name} ({type(attention).__name__}); looked for v_proj, v, "
                "value, GPT-2's c_attn and GPT-NeoX's query_key_value"
            )

    def per_head(self, v_output: torch.Tensor, heads: int) -> torch.Tensor:
        """`[B, H, K, D]`: each key's value vector of each head through that head's rows of W_O."""
        weight = self.weight.detach()
        size = weight.shape[0] // heads
        values = self._take(v_output.detach())
        values = values.reshape(*values.shape[:2], -1, size)  # [B, K, H_kv, d]
        if values.shape[2] != heads:  # grouped-query attention: each key/value head serves H / H_kv heads
            values = values.repeat_interleave(heads // values.shape[2], dim=2)
        return torch.einsum("bkhd,hdo->bhko", values.to(weight.dtype), weight.reshape(heads, size, -1))


def _norm_parts(norm: nn.Module) -> tuple[torch.Tensor | None, float, bool]:
    """A norm module's weight (gamma, or None), epsilon and whether it centres (LayerNorm) or not (RMS norms)."""
    weight = getattr(norm, "weight", None)
    weight = None if weight is None else weight.detach().float()
    if isinstance(norm, nn.LayerNorm):
        return weight, norm.eps, True
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None or not any(kind in type(norm).__name__ for kind in ("RMS", "T5LayerNorm")):
        raise ValueError(f"Cannot read {type(norm).__name__} as a layer norm or an RMS norm")
    return weight, eps, False


def _norm_scale(norm: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """A norm module as a linear map with the fixed statistics of its input `z [B, Q, D]`:
    (1 / sigma [B, Q], gamma [D], centred?)."""
    weight, eps, center = _norm_parts(norm)
    z = z.detach().float()
    weight = torch.ones(z.shape[-1], device=z.device) if weight is None else weight
    spread = z.var(-1, unbiased=False) if center else z.pow(2).mean(-1)
    return torch.rsqrt(spread + eps), weight, center


def _rows(tensor: torch.Tensor, positions: torch.Tensor | None, dim: int) -> torch.Tensor:
    """`tensor`'s rows at `positions [B, K]` along `dim` (1 or 2), per batch element; all rows for None."""
    if positions is None:
        return tensor
    b = torch.arange(tensor.shape[0], device=tensor.device)[:, None]
    if dim == 1:
        return tensor[b, positions]
    return tensor[b, :, positions].transpose(1, 2)  # [B, H, Q, K] -> [B, K_read, H, K] -> [B, H, K_read, K]


def _normalise(c: torch.Tensor) -> torch.Tensor:
    total = c.sum(-1, keepdim=True)
    return c / torch.where(total == 0, torch.ones_like(total), total)


class _Mixing:
    """Turns one decomposed sublayer into its contribution rows `[B, Q, K]` (rows summing to 1), for
    one method ("rollout", "alti", "globenc", "norm": attention x norm, unnormalised)."""

    def __init__(self, kind: str):
        self.kind = kind

    def contributions(self, weights, values_fn, residual, positions, norm) -> torch.Tensor:
        """weights `[B, H, Q, K]` (rows already read), `values_fn()` -> `[B, H, K, D]`, residual
        `[B, Q, D]` or None with `positions` `[B, Q]` (the key of query i's own token; K: an extra
        key for it), `norm` (1 / sigma, gamma, centred) or None."""
        weights = weights.detach()
        if self.kind == "rollout":
            mixed = weights.float().mean(1)
            if residual is None:
                return mixed
            if positions.max() >= weights.shape[-1]:  # cross-attention: the residual is an extra key
                mixed = torch.cat([0.5 * mixed, torch.full_like(mixed[..., :1], 0.5)], dim=-1)
            else:
                mixed = 0.5 * mixed
                mixed.scatter_add_(-1, positions[..., None], torch.full_like(mixed[..., :1], 0.5))
            return _normalise(mixed)
        values = values_fn()
        if residual is not None and positions.max() >= weights.shape[-1]:
            weights = torch.cat([weights, weights.new_zeros(*weights.shape[:3], 1)], dim=-1)
            values = torch.cat([values, values.new_zeros(*values.shape[:2], 1, values.shape[-1])], dim=2)
        values = values.to(weights.dtype)
        if residual is not None:
            residual = residual.detach().to(weights.dtype).contiguous()
        scale, gamma, center = norm if norm is not None else (None, None, True)
        gain, length = alti_norms(weights.contiguous(), values.contiguous(), residual, positions, scale, gamma, center)
        if self.kind == "norm":
            return length
        if self.kind == "globenc":
            return _normalise(length)
        return _normalise(gain.clamp(min=0))


class _Sublayer:
    """One attention sublayer of one block, hooked: what it needs arrives from several hooks, and
    `done()` runs once the last piece has come (`on_done(contributions)`)."""

    def __init__(self, model, block_name, attention_name, mixing, method, *, cross=False, post_norm=None):
        self.model, self.mixing, self.cross = model, mixing, cross
        self.attention = model.get_submodule(attention_name)
        self.projection = _Projection(self.attention, attention_name, method) if mixing.kind != "rollout" else None
        self.post_norm = model.get_submodule(f"{block_name}.{post_norm}") if post_norm else None
        self.parts: dict[str, Any] = {}
        self.rows: torch.Tensor | None = None  # query rows decomposed (None: all)
        self.residual_from: Any = None  # a callable giving the residual entering the sublayer
        self.with_residual = mixing.kind != "norm"
        self.on_done = None

    def hooks(self, handles: HookHandles, name: str):
        if self.projection is not None:
            handles.forward(self.projection.value_module, lambda m, a, o: self.parts.__setitem__("v", o))

        def attention_hook(module, args, output):
            weights = attention_weights(output)
            if weights is None:
                raise RuntimeError(f"{name} returned no attention weights under eager attention")
            self.parts["weights"], self.parts["out"] = weights, _first(output)
            if self.post_norm is None:
                self.done()

        handles.forward(self.attention, attention_hook)
        if self.post_norm is not None:

            def norm_hook(module, args, output):
                self.parts["z"], self.parts["normed"] = args[0], output
                self.done()

            handles.forward(self.post_norm, norm_hook)

    def done(self):
        weights = self.parts["weights"]
        rows = self.rows
        heads = weights.shape[1]
        read = _rows(weights, rows, 2)
        residual = positions = norm = None
        if self.with_residual:
            residual = _rows(self.residual_from(), rows, 1)
            batch, queries = read.shape[0], read.shape[2]
            if self.cross:
                positions = torch.full((batch, queries), weights.shape[-1], dtype=torch.long, device=weights.device)
            elif rows is None:
                positions = torch.arange(queries, device=weights.device)[None].expand(batch, -1).contiguous()
            else:
                positions = rows.to(weights.device).contiguous()
            if self.post_norm is not None:
                scale, gamma, center = _norm_scale(self.post_norm, self.parts["z"])
                norm = (_rows(scale, rows, 1), gamma, center)
        contributions = self.mixing.contributions(
            read, lambda: self.projection.per_head(self.parts["v"], heads), residual, positions, norm
        )
        self.on_done(contributions)
        # Streamed: this layer's weights and values go now; only [B, T, D] residuals stay for the next sublayer.
        self.parts.pop("weights")
        self.parts.pop("v", None)


class _Stack:
    """The blocks of one stack with their hooked sublayers, and the rolled-out contributions."""

    def __init__(self, model, scope, mixing, method, cross=False):
        self.model = model
        self.blocks = resolve_alias(model, "layers", scope)
        if not self.blocks:
            raise ValueError(f"{method}: found no transformer blocks in {type(model).__name__}")
        selves = attention_modules(model, "self", scope == "decoder") if scope != "encoder" else None
        selves = selves if selves is not None else attention_modules(model, "encoder", True)
        crosses = attention_modules(model, "cross", True) if cross else []
        self.inputs: dict[int, torch.Tensor] = {}
        self.sublayers: list[tuple[int, _Sublayer]] = []
        for index, block in enumerate(self.blocks):
            post, self_norm, cross_norm = _layout(model, model.get_submodule(block), method)
            inside = [n for n in selves if n.startswith(block + ".")]
            if len(inside) != 1:
                raise ValueError(f"{method}: expected one self-attention module in {block}, found {inside}")
            sub = _Sublayer(model, block, inside[0], mixing, method, post_norm=self_norm if post else None)
            sub.residual_from = lambda index=index: self.inputs[index]
            self.sublayers.append((index, sub))
            if cross:
                inside_cross = [n for n in crosses if n.startswith(block + ".")]
                if len(inside_cross) != 1:
                    raise ValueError(f"{method}: expected one cross-attention module in {block}, found {inside_cross}")
                xsub = _Sublayer(
                    model, block, inside_cross[0], mixing, method, cross=True, post_norm=cross_norm if post else None
                )
                # The residual entering cross-attention: the self-attention sublayer's output.
                if post:
                    xsub.residual_from = lambda sub=sub: sub.parts["normed"]
                else:
                    xsub.residual_from = lambda sub=sub, index=index: self.inputs[index] + sub.parts["out"]
                self.sublayers.append((index, xsub))

    def hooks(self, handles: HookHandles):
        for index, block in enumerate(self.blocks):

            def pre(module, args, kwargs, index=index):
                self.inputs[index] = _hidden_input(args, kwargs).detach()

            handles.forward_pre(self.model.get_submodule(block), pre, with_kwargs=True)
        for _, sub in self.sublayers:
            sub.hooks(handles, sub.attention.__class__.__name__)


class _Rollout:
    """The running product of one stack's contributions; with `source`, the decoder's two sides
    (target prefix `P`, source `S`) mixed through cross-attention with the encoder's rollout."""

    def __init__(self, encoder: _Rollout | None = None):
        self.matrix: torch.Tensor | None = None  # [B, Q, T]
        self.source: torch.Tensor | None = None  # [B, Q, S]
        self.encoder = encoder

    def self_step(self, c: torch.Tensor):
        c = c.double()
        if self.matrix is None:
            self.matrix = c
            if self.encoder is not None:
                self.source = c.new_zeros(*c.shape[:2], self.encoder.matrix.shape[-1])
            return
        self.matrix = c @ self.matrix
        if self.source is not None:
            self.source = c @ self.source

    def cross_step(self, c: torch.Tensor):
        """`c [B, Q, S + 1]`: the source keys, then the residual."""
        c = c.double()
        share, residual = c[..., :-1], c[..., -1:]
        self.source = share @ self.encoder.matrix + residual * self.source
        self.matrix = residual * self.matrix


def _rollout_attribute(request: Request, kind: str, method: str) -> RowAttribution:
    engine, model = request.engine, request.engine.model
    enc_dec = engine.is_encoder_decoder
    fr = full_rows(request.rows)
    mixing = _Mixing(kind)
    stacks, rollouts = [], {}
    if enc_dec:
        encoder = _Stack(model, "encoder", mixing, method)
        rollouts["encoder"] = _Rollout()
        for _, sub in encoder.sublayers:
            sub.on_done = rollouts["encoder"].self_step
        stacks.append(encoder)
    decoder = _Stack(model, "decoder" if enc_dec else None, mixing, method, cross=enc_dec)
    rollout = _Rollout(rollouts.get("encoder"))
    last = len(decoder.blocks) - 1
    positions = fr.positions
    for index, sub in decoder.sublayers:
        if index == last:
            sub.rows = positions  # only the query rows read are decomposed in the last layer
        # In the last layer c holds only the rows read (over every key), and so does the rollout after it.
        sub.on_done = rollout.cross_step if sub.cross else rollout.self_step
    stacks.append(decoder)
    logits = _forward(request, fr, stacks)
    target = fr.gather(rollout.matrix.float())
    source = fr.gather(rollout.source.float()) if rollout.source is not None else None
    if enc_dec and not request.attribute_target:
        target = None
    return RowAttribution(source=source, target=target, logits=logits)


def _forward(request: Request, fr, stacks: list[_Stack]):
    engine = request.engine
    with torch.no_grad(), eager_attention(engine.model), HookHandles() as handles:
        for stack in stacks:
            stack.hooks(handles)
        logits = engine.forward_steps(fr.full, fr.positions if request.needs_logits else None)[0]
    return fr.gather(logits) if logits is not None else None


@register("attention_rollout")
class AttentionRollout(AttributionMethod):
    """Attention rollout (Abnar & Zuidema 2020): head-averaged attention plus the residual,
    `0.5 * A + 0.5 * I` with rows renormalised, multiplied across layers; on encoder-decoders the
    decoder's cross-attention mixes in the encoder's rollout (see `methods.mixing`). Cost: 1 forward
    per batch of rows, 0 backward."""

    def attribute(self, request: Request) -> RowAttribution:
        return _rollout_attribute(request, "rollout", "attention_rollout")


@register("alti")
class Alti(AttributionMethod):
    """ALTI (Ferrando et al. 2022a): each block's attention sublayer decomposed per input token
    (values through the output projection, residual, post-norm as a linear map), contributions
    `max(0, ||y_i||_1 - ||y_i - t_ij||_1)` normalised per row and rolled out across layers. For
    decoder-only models; on encoder-decoders use `alti_plus`. Cost: 1 forward per batch of rows,
    0 backward."""

    def attribute(self, request: Request) -> RowAttribution:
        if request.engine.is_encoder_decoder:
            raise ValueError(
                f"alti decomposes one stack; {type(request.engine.model).__name__} is an encoder-decoder, whose "
                "extension to cross-attention is method='alti_plus'"
            )
        return _rollout_attribute(request, "alti", "alti")


@register("alti_plus")
class AltiPlus(AttributionMethod):
    """ALTI+ (Ferrando et al. 2022b): ALTI through the encoder, the decoder's self-attention and its
    cross-attention (source tokens and the decoder residual as the keys), giving source and target
    contributions that sum to 1 per step. For encoder-decoders; decoder-only models use `alti`.
    Cost: 1 forward per batch of rows, 0 backward."""

    def attribute(self, request: Request) -> RowAttribution:
        if not request.engine.is_encoder_decoder:
            raise ValueError(
                f"alti_plus adds the cross-attention of encoder-decoders; {type(request.engine.model).__name__} is "
                "decoder-only: use method='alti'"
            )
        return _rollout_attribute(request, "alti", "alti_plus")


@register("globenc")
class GlobEnc(AttributionMethod):
    """GlobEnc (Modarressi et al. 2022): the norms `||t_ij||_2` of the decomposition through attention,
    residual and the first norm (post-norm blocks), normalised per row and rolled out across
    layers (encoder-decoders: through cross-attention as ALTI+). Cost: 1 forward per batch of rows,
    0 backward."""

    def attribute(self, request: Request) -> RowAttribution:
        return _rollout_attribute(request, "globenc", "globenc")


@register("attention_x_norm")
class AttentionXNorm(AttributionMethod):
    """Attention x norm (Kobayashi et al. 2020): `||sum_h A^h_ij f^h(x_j)||_2`, the norm of what key j
    adds to query i through the values and output projection, per layer; decoder self-attention on
    the target side, cross-attention on the source side. `layers` picks layers (indices, negative
    from the end); `aggregate_fn` "mean" (default) or "max" over them, None keeps a `layers`
    dimension. Cost: 1 forward per batch of rows, 0 backward."""

    def attribute(self, request: Request, layers=None, aggregate_fn="mean") -> RowAttribution:
        if aggregate_fn not in ("mean", "max", None):
            raise ValueError(f"aggregate_fn must be 'mean', 'max' or None (keep layers), got {aggregate_fn!r}")
        engine, model = request.engine, request.engine.model
        enc_dec = engine.is_encoder_decoder
        fr = full_rows(request.rows)
        mixing = _Mixing("norm")
        sides = {}
        if request.attribute_target or not enc_dec:
            sides["target"] = attention_modules(model, "self", enc_dec)
        if enc_dec:
            sides["source"] = attention_modules(model, "cross", enc_dec)
        kept: dict[str, list] = {side: [] for side in sides}
        subs = []
        for side, names in sides.items():
            if not names:
                raise ValueError(f"attention_x_norm: found no attention modules in {type(model).__name__}")
            for index in pick_indices(layers, len(names), "layers", distinct=True):
                sub = _Sublayer(model, "", names[index], mixing, "attention_x_norm")
                sub.rows = fr.positions
                sub.on_done = kept[side].append
                subs.append((names[index], sub))

        class _Hooks:
            def hooks(self, handles):
                for name, sub in subs:
                    sub.hooks(handles, name)

        logits = _forward(request, fr, [_Hooks()])
        out = {}
        for side, values in kept.items():
            stacked = torch.stack(values, dim=-1).float()  # [F, K_read, keys, layers]
            if aggregate_fn == "mean":
                stacked = stacked.mean(-1)
            elif aggregate_fn == "max":
                stacked = stacked.amax(-1)
            out[side] = fr.gather(stacked)
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)


def _final_norm(model: nn.Module, blocks: list[str]) -> nn.Module:
    """The norm the stack applies after its last block (ln_f, norm, final_layer_norm)."""
    stack = model.get_submodule(blocks[0].rsplit(".", 1)[0].rsplit(".", 1)[0])
    norms = [child for child in stack.children() if "Norm" in type(child).__name__]
    if len(norms) != 1:
        raise ValueError(f"alti_logit: expected one final norm in {type(stack).__name__}, found {len(norms)}")
    return norms[0]


@register("alti_logit")
class AltiLogit(AttributionMethod):
    """ALTI-logit (Ferrando et al. 2023): each input token's contribution to the logit of the target
    token, for decoder-only models with pre-norm blocks. The logit is read as a sum of residual
    updates through the final norm (a linear map with the fixed statistics of the predicting
    position i) and the target's unembedding row `u`: `w = (gamma * u - mean(gamma * u)) / sigma_i`
    (RMS norms: `gamma * u / rms_i`). Token j gets:
    - its embedding's `x^0_i . w` when j = i;
    - per layer l, each key k's attention update to position i, `sum_h A^h_ik v^h_k W_O^h . w`,
      spread over the inputs by the ALTI rollout of the layer's input at k, `R^{l-1}[k, j]`;
    - per layer l, the MLP's update to position i (`x^{l+1}_i - x^l_i - attention output_i`) `. w`,
      spread by the ALTI rollout at i after the layer's attention (`R^l[i, j]`; before it, `R^{l-1}`,
      for GPT-NeoX's parallel residual, whose MLP reads the block input).
    The contributions sum to the logit less the final norm's bias, the LM head's bias and the
    attention output biases' share. Cost: 1 forward per batch of rows, 0 backward.
    """

    def attribute(self, request: Request) -> RowAttribution:
        engine, model = request.engine, request.engine.model
        name = type(model).__name__
        if engine.is_encoder_decoder:
            raise ValueError(
                f"alti_logit is defined for decoder-only language models (Ferrando et al. 2023); {name} is an "
                "encoder-decoder: use method='alti_plus'"
            )
        rows, fr = request.rows, full_rows(request.rows)
        stack = _Stack(model, None, _Mixing("alti"), "alti_logit")
        for index, block in enumerate(stack.blocks):
            if _layout(model, model.get_submodule(block), "alti_logit")[0]:
                raise ValueError(
                    f"alti_logit needs pre-norm blocks (a residual stream summed into the logit); {name}'s "
                    f"{type(model.get_submodule(block)).__name__} normalises after attention"
                )
        parallel = bool(getattr(model.config, "use_parallel_residual", False))
        final = _final_norm(model, stack.blocks)
        head = model.get_output_embeddings()
        device = rows.target_ids.device
        owner, read = fr.owner.to(device), fr.positions[fr.owner, fr.slot].to(device)  # [R]
        unembed = head.weight.detach()[rows.token.to(head.weight.device)].float()  # [R, D]
        gamma, _, center = _norm_parts(final)
        g = unembed if gamma is None else gamma.to(unembed.device) * unembed
        if center:
            g = g - g.mean(-1, keepdim=True)
        state: dict[str, Any] = {"total": None, "matrix": None, "pending": None}

        def at_rows(tensor):  # [F, T, ...] -> [R, ...] at each row's read position
            return tensor[owner, read].float()

        def spread_mlp(x_next):
            pending = state["pending"]
            if pending is None:
                return
            x_prev, attn_out, spread = pending
            mlp = at_rows(x_next) - x_prev - attn_out
            state["total"] += (mlp * g).sum(-1, keepdim=True).double() * spread

        def block_input(index):
            def hook(module, args, kwargs):
                x = _hidden_input(args, kwargs).detach()
                stack.inputs[index] = x
                if index == 0:
                    total = torch.zeros(len(owner), x.shape[1], dtype=torch.float64, device=x.device)
                    total[torch.arange(len(owner)), read] = (at_rows(x) * g).sum(-1).double()
                    state["total"] = total
                else:
                    spread_mlp(x)

            return hook

        def layer_done(index, sub):
            def done(c):
                weights, heads = sub.parts["weights"].detach(), sub.parts["weights"].shape[1]
                values = sub.projection.per_head(sub.parts["v"], heads).float()  # [F, H, T, D]
                projected = torch.einsum("fhkd,rd->fhkr", values, g)
                projected = projected.permute(0, 3, 1, 2)[owner, torch.arange(len(owner))]  # [R, H, T]
                delta = (weights[owner, :, read].float() * projected).sum(1).double()  # [R, T]: per key k
                before = state["matrix"]  # the ALTI rollout of the layer's input (None: identity)
                state["total"] += delta if before is None else (delta[:, None] @ before[owner]).squeeze(1)
                state["matrix"] = c.double() if before is None else c.double() @ before
                if not parallel:
                    spread = state["matrix"][owner, read]
                else:
                    spread = _one_hot(read, c.shape[-1]) if before is None else before[owner, read]
                state["pending"] = (at_rows(stack.inputs[index]), at_rows(_first(sub.parts["out"])), spread)

            return done

        for index, sub in stack.sublayers:
            sub.on_done = layer_done(index, sub)
        logits = None
        with torch.no_grad(), eager_attention(model), HookHandles() as handles:
            for index, block in enumerate(stack.blocks):
                handles.forward_pre(model.get_submodule(block), block_input(index), with_kwargs=True)
            for _, sub in stack.sublayers:
                sub.hooks(handles, type(sub.attention).__name__)
            handles.forward_pre(final, lambda m, args: state.__setitem__("last", args[0].detach()))
            logits = engine.forward_steps(fr.full, fr.positions if request.needs_logits else None)[0]
        last = state["last"]
        spread_mlp(last)
        scale = _norm_scale(final, last)[0][owner, read].double()  # 1 / sigma_i
        target = (state["total"] * scale[:, None]).float()
        return RowAttribution(target=target, logits=fr.gather(logits) if logits is not None else None)


def _one_hot(index: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, width).double()
