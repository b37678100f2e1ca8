"""AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al. 2022): layer-wise relevance propagation
for transformers, as input x gradient of a forward whose backward follows the LRP rules.

    out = model.attribute(text, method="attnlrp")                          # relevance of the inputs
    out = model.attribute(text, method="attnlrp", variant="cp")            # attention held constant
    out = model.attribute(text, method="attnlrp", target_layers="layers")  # every block's output, one pass

Inside `lrp_rules(model)` (everything undone on exit, errors included):
- element-wise nonlinearities (activation modules): identity rule, the gradient is `f(x) / x`;
- normalisation layers are linear: LayerNorm as `(x - mean(x)) * w / std` with `std` constant (the
  centring is a linear map, so it keeps its gradient), RMS norms as `x * w / rms` with `rms` constant;
- products of two activations (`q @ k^T`, `softmax @ v`, the gate of a gated MLP): uniform rule, each
  factor gets half the relevance (half the gradient);
- softmax: the paper's rule `R_in = x (R_out - s sum(R_out))`, which as input x gradient is the
  softmax's own gradient, so it is left alone; with `variant="cp"` the attention probabilities are
  constants instead (CP-LRP), so no relevance flows through queries and keys, and so are the gates of
  gated MLPs (outputs of `gate_proj`, T5's `wi_0`, Mixtral's `w1`), as in lxt's CP-LRP;
- linear layers and sums: LRP-0 (epsilon = 0), i.e. their own gradient.
Eager attention gets the rules op by op, PyTorch's `scaled_dot_product_attention` as a whole; other
implementations (flash attention...) are switched to eager inside the call. The model's parameters
do not require grad meanwhile, so that "requires grad" means "depends on the inputs".
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from instrument.engine import frozen_parameters
from instrument.hooks import HookHandles
from instrument.rows import RowAttribution
from methods.attention import eager_attention
from methods.base import AttributionMethod, Request, gradients, leaf
from methods.layer import by_side, resolve_layers
from methods.registry import register
from methods.slopes import _Slope

VARIANTS = ("attnlrp", "cp")

# Element-wise nonlinearities given the identity rule (plus every parameter-free module of transformers.activations).
ACTIVATIONS = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.SELU,
    nn.CELU,
)

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm}
_MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_SOFTMAX = {torch.softmax, torch.Tensor.softmax, nn.functional.softmax}
_FUSED = {nn.functional.scaled_dot_product_attention}


def _half(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s value, half its gradient (the uniform rule for one factor of a product of two)."""
    half = tensor * 0.5
    return half + half.detach()


def _both_live(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _ProductRules(TorchFunctionMode):
    """While `depth > 0` (inside a forward of the model): the uniform rule on products of two tensors
    that depend on the inputs, constant softmax outputs under CP-LRP, and no fused attention."""

    def __init__(self, cp: bool):
        super().__init__()
        self.cp, self.depth = cp, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth <= 0 or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func in _MATMULS or func in _MULS:
            if len(args) >= 2 and _both_live(args[0], args[1]):
                args = (_half(args[0]), _half(args[1]), *args[2:])
        elif func in _BADDBMM:
            if len(args) >= 3 and _both_live(args[1], args[2]):
                args = (args[0], _half(args[1]), _half(args[2]), *args[3:])
        elif func is torch.einsum:
            operands = args[1:] if len(args) > 2 else tuple(args[1]) if len(args) == 2 else ()
            if len(operands) == 2 and _both_live(*operands):
                args = (args[0], _half(operands[0]), _half(operands[1]))
        elif func in _SOFTMAX and self.cp:
            return func(*args, **kwargs).detach()
        elif func in _FUSED and len(args) >= 3:
            # softmax(q k^T) v in one kernel: the uniform rule at softmax . v halves the gradients of the
            # attention (so of q and k) and of v, the one at q k^T halves those of q and k again;
            # CP-LRP: q and k are constants.
            query, key, value = args[:3]
            if self.cp:
                query, key = query.detach(), key.detach()
            else:
                at_qk = _both_live(query, key)
                if (query.requires_grad or key.requires_grad) and value.requires_grad:
                    query, key, value = _half(query), _half(key), _half(value)
                if at_qk:
                    query, key = _half(query), _half(key)
            args = (query, key, value, *args[3:])
        return func(*args, **kwargs)


def _identity_rule(original: Callable, x: torch.Tensor, *args, **kwargs):
    """`f(x)` forward, `f(x) / x` as its (element-wise) gradient: the identity rule, and also the rule
    of an RMS norm with its statistic held constant (`x * w / rms`)."""
    with torch.no_grad():
        out = original(x, *args, **kwargs)
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
        return out
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise ValueError(f"attnlrp: expected an element-wise module, got output {type(out).__name__} for {x.shape}")
    ratio = torch.where(x == 0, torch.zeros_like(out), out / torch.where(x == 0, torch.ones_like(x), x).to(out))
    return _Slope.apply(x, out, ratio)


def _layer_norm_rule(module: nn.LayerNorm):
    def forward(original: Callable, x: torch.Tensor):
        with torch.no_grad():
            out = original(x)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return out
        dims = tuple(range(-len(module.normalized_shape), 0))
        with torch.no_grad():
            scale = (x.float().var(dims, unbiased=False, keepdim=True) + module.eps).rsqrt()
            if module.weight is not None:
                scale = scale * module.weight.float()
        linear = (x - x.mean(dims, keepdim=True)) * scale.to(x.dtype)
        return out + (linear - linear.detach()).to(out.dtype)

    return forward


def _norm_rule(name: str, module: nn.Module):
    """The rule of a normalisation module, None for other modules; ValueError for unknown norms."""
    if isinstance(module, nn.LayerNorm):
        return _layer_norm_rule(module)
    kind = type(module).__name__
    if kind.endswith(("RMSNorm", "T5LayerNorm")):
        return _identity_rule
    if "Norm" in kind:
        raise ValueError(
            f"attnlrp does not know how to treat the normalisation layer {name} ({kind}) as linear; "
            "it handles torch.nn.LayerNorm and RMS norms (classes named *RMSNorm, T5LayerNorm)"
        )
    return None


def _is_activation(module: nn.Module) -> bool:
    if isinstance(module, ACTIVATIONS):
        return True
    return type(module).__module__ == "transformers.activations" and not any(True for _ in module.parameters())


# (gate, up) projections of gated MLPs: Llama & co., T5's gated-GELU, Mixtral's experts.
GATED = (("gate_proj", "up_proj"), ("wi_0", "wi_1"), ("w1", "w3"))


def _gates(model: nn.Module) -> list[nn.Module]:
    """The gate projections of the model's gated MLPs (held constant by CP-LRP, as lxt does)."""
    found = []
    for module in model.modules():
        children = dict(module.named_children())
        found += [children[gate] for gate, up in GATED if gate in children and up in children]
    return found


@contextlib.contextmanager
def _patched_forward(module: nn.Module, rule: Callable):
    """`module.forward` replaced by `rule(original_forward, *args)` inside the block, as it was after."""
    had, previous = "forward" in module.__dict__, module.__dict__.get("forward")
    original = module.forward
    module.forward = lambda *args, **kwargs: rule(original, *args, **kwargs)
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


@contextlib.contextmanager
def lrp_rules(model: nn.Module, variant: str = "attnlrp"):
    """Inside the block, gradients of `model`'s forwards follow AttnLRP's rules (`variant="cp"`:
    CP-LRP's), so that input x gradient is the relevance; forward values are unchanged. The model is
    as it was after the block, errors included.

        with lrp_rules(model):
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            model(inputs_embeds=embeds).logits[0, -1, token].backward()
        relevance = (embeds * embeds.grad).sum(-1)
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    rules: list[tuple[nn.Module, Callable]] = []
    for name, module in model.named_modules():
        if _is_activation(module):
            rules.append((module, _identity_rule))
        else:
            rule = _norm_rule(name, module)
            if rule is not None:
                rules.append((module, rule))
    if not any(rule is _identity_rule and _is_activation(module) for module, rule in rules):
        raise ValueError(
            f"attnlrp found no activation module in {type(model).__name__} (modules of torch.nn or "
            "transformers.activations); a model applying its nonlinearities as functions cannot get the identity rule"
        )
    mode = _ProductRules(cp=variant == "cp")
    gates = _gates(model) if variant == "cp" else []

    def enter(module, args):
        mode.depth += 1

    def leave(module, args, output):
        mode.depth -= 1

    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_parameters(model))
        if getattr(model.config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
            stack.enter_context(eager_attention(model))
        for module, rule in rules:
            stack.enter_context(_patched_forward(module, rule))
        hooks = stack.enter_context(HookHandles())
        hooks.forward_pre(model, enter)
        hooks.forward(model, leave, always_call=True)
        for gate in gates:  # CP-LRP: constant gates
            hooks.forward(gate, lambda module, args, output: output.detach())
        stack.enter_context(mode)
        yield


@register("attnlrp")
class AttnLRP(AttributionMethod):
    """AttnLRP (Achtibat et al. 2024): input x gradient under the LRP rules of `lrp_rules`; with
    `variant="cp"`, CP-LRP (Ali et al. 2022: attention probabilities held constant, and gated MLPs'
    gates, as lxt does). Both equal lxt 2.1 on GPT-2 and Llama (`tests/lxt_compare.py`). `target_layers`
    (or `target_layer`) gives the relevance of inner modules' outputs, every layer in the same pass
    (a layer dimension after the step dimension, as `layer_gradient_x_activation`).

    Cost: one forward per example (all its attributed steps) and one batched backward.
    """

    def attribute(self, request: Request, variant="attnlrp", target_layer=None, target_layers=None) -> RowAttribution:
        if variant not in VARIANTS:
            raise ValueError(f"attnlrp: variant must be one of {VARIANTS}, got {variant!r}")
        names, stacked = resolve_layers(request, target_layer, target_layers)
        source, target = (leaf(t) for t in request.engine.embed(request.rows))
        with lrp_rules(request.engine.model, variant):
            grads, logits, acts = gradients(request, request.rows, [], source, target, layers=names, shared_prefix=True)
        per_layer = {name: grad * acts[name] for name, grad in zip(names, grads)}
        return by_side(request, names, per_layer, stacked, logits)

    @property
    def attributes_inputs(self) -> bool:
        return self.defaults.get("target_layer") is None and self.defaults.get("target_layers") is None
