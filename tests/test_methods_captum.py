"""Every attribution method against Captum's implementation of it, on tiny random models.

For each attributed step `p` we build the quantity Captum attributes ourselves, straight from the
Hugging Face model: `f(embeds) = softmax(model(...).logits[:, -1])[:, target[p]]`, where `embeds`
replace the *outputs of the embedding modules* through a forward hook (so Bart's scaling, GPT-2's
position embeddings etc. still happen after them, as in the library). The library attributes all
steps of an example in one padded batch; Captum sees one unpadded prefix at a time.

Tolerances: float32, same computation => `rtol=1e-5` and `atol=1e-6 * max|reference|` (see `close`).
"""

import contextlib
import functools

import pytest
import torch
from captum.attr import (
    DeepLift,
    InputXGradient,
    IntegratedGradients,
    LayerDeepLift,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    Saliency,
)
from torch import nn

import instrument
from instrument.rows import Example, Rows
from methods.gradient import _row_samples

from helpers import TextCase
from tiny_models import tiny_model

# Captum warns that it sets requires_grad on inputs and hooks on nonlinearities: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")
ARCHS = ["gpt2", "llama", "bart", "t5", "marian"]


# (input text, generated text); for decoder-only models the generated text continues the input.
TEXTS = {
    "gpt2": ("Hello world", "Hello world, this is"),
    "llama": ("Hello world", "Hello world, this is"),
    "bart": ("Hello world", "Le chat"),
    "t5": ("Hello world", "Le chat"),
    "marian": ("Hello world", "Le chat"),
}


def close(actual, expected, rtol=1e-5, atol_scale=1e-6):
    """Same computation in float32: relative error below rtol, absolute slack tied to the magnitude."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(expected).all()
    atol = atol_scale * float(expected.abs().max())
    torch.testing.assert_close(actual, expected.float(), rtol=rtol, atol=atol)


def sharpen(model, factor):
    """Scales every weight matrix: the tiny random models are almost linear at init (IG's
    convergence delta is at float32 noise level there), scaled ones are clearly not."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(factor)
    return model


class Case(TextCase):
    """One tiny model, its wrapper, one example, and Captum-side forward functions per step."""

    def __init__(self, arch, source=None, target=None, factor=1.0):
        model, tokenizer = tiny_model(arch)
        sharpen(model, factor)
        super().__init__(model, tokenizer, source or TEXTS[arch][0], target or TEXTS[arch][1])

    # -- inputs and baselines (by hand) ---------------------------------------------------------

    def baseline_ids(self, ids, target=False):
        """Default baseline (Inseq's): UNK everywhere except EOS tokens and, on an encoder-decoder
        target, the decoder start token."""
        base = torch.where(ids == self.tok.eos_token_id, ids, torch.full_like(ids, self.tok.unk_token_id))
        if target and self.enc_dec:
            base[..., 0] = ids[..., 0]
        return base

    @torch.no_grad()
    def embeds(self, p, attribute_target):
        """`(inputs, baselines)` tuples of embedding-module outputs Captum attributes at step p."""
        prefix = self.target[:p][None]
        if not self.enc_dec:
            return (self.tgt_emb(prefix),), (self.tgt_emb(self.baseline_ids(prefix)),)
        src = self.source[None]
        inputs, baselines = [self.src_emb(src)], [self.src_emb(self.baseline_ids(src))]
        if attribute_target:
            inputs.append(self.tgt_emb(prefix))
            baselines.append(self.tgt_emb(self.baseline_ids(prefix, target=True)))
        return tuple(inputs), tuple(baselines)

    # -- forward functions for Captum ----------------------------------------------------------

    def logits(self, n, p, src_embeds=None, tgt_embeds=None, src_ids=None, tgt_ids=None):
        """Last-position logits for a batch of n copies of step p, embedding outputs replaced."""
        tgt_ids = self.target[:p].expand(n, -1) if tgt_ids is None else tgt_ids
        with contextlib.ExitStack() as stack:
            for module, value in ((self.src_emb, src_embeds), (self.tgt_emb, tgt_embeds)):
                if value is not None:
                    handle = module.register_forward_hook(lambda m, a, o, value=value: value)
                    stack.callback(handle.remove)
            if self.enc_dec:
                src_ids = self.source.expand(n, -1) if src_ids is None else src_ids
                out = self.model(
                    input_ids=src_ids,
                    attention_mask=torch.ones_like(src_ids),
                    decoder_input_ids=tgt_ids,
                    decoder_attention_mask=torch.ones_like(tgt_ids),
                )
            else:
                out = self.model(input_ids=tgt_ids, attention_mask=torch.ones_like(tgt_ids))
        return out.logits[:, -1]

    def prob_fn(self, p, attribute_target=False):
        """f(*embeds) = p(target[p] | prefix) with embeds = (target,) or (source[, target])."""
        token = int(self.target[p])

        def f(*embeds):
            n = embeds[0].shape[0]
            if self.enc_dec:
                logits = self.logits(n, p, src_embeds=embeds[0], tgt_embeds=embeds[1] if attribute_target else None)
            else:
                logits = self.logits(n, p, tgt_embeds=embeds[0])
            return logits.softmax(-1)[:, token]

        return f

    def ids_fn(self, p):
        """f(ids) for layer methods: ids are the target prefix (decoder-only) or the source."""
        token = int(self.target[p])

        def f(ids):
            if self.enc_dec:
                logits = self.logits(ids.shape[0], p, src_ids=ids)
            else:
                logits = self.logits(ids.shape[0], p, tgt_ids=ids)
            return logits.softmax(-1)[:, token]

        return f

    def ids(self, p):
        """Layer methods' input ids at step p, and their baseline ids."""
        ids = (self.source if self.enc_dec else self.target[:p])[None]
        return ids, self.baseline_ids(ids)

    # -- reading our output --------------------------------------------------------------------

    def ours(self, seq, j, p, side):
        """Column j (step p) of our attributions, without the NaN rows a step cannot see."""
        if side == "source":
            return seq.source_attributions[:, j]
        return seq.target_attributions[:p, j]

    def sides(self, attribute_target):
        if not self.enc_dec:
            return ["target"]
        return ["source", "target"] if attribute_target else ["source"]


class Module(nn.Module):
    """Captum's DeepLift wants an nn.Module: this one holds the HF model (whose nonlinearities
    Captum hooks) and calls a forward function of ours."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(*inputs)


@functools.lru_cache(maxsize=None)
def case(arch, factor=1.0):
    return Case(arch, factor=factor)


def check_against(case_, seq, make_captum, attribute_target=False):
    """Runs Captum at every step and compares with our columns, side by side."""
    for j, p in enumerate(case_.steps):
        inputs, baselines = case_.embeds(p, attribute_target)
        expected = make_captum(case_.prob_fn(p, attribute_target), inputs, baselines)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for side, ref in zip(case_.sides(attribute_target), expected):
            close(case_.ours(seq, j, p, side), ref[0].detach())
        if "target" in case_.sides(attribute_target):  # what step p cannot see is NaN
            assert seq.target_attributions[p:, j].isnan().all()


@pytest.mark.parametrize("arch", ARCHS)
def test_saliency(arch):
    c = case(arch)
    seq = c.attribute("saliency")
    check_against(c, seq, lambda f, x, b: Saliency(f).attribute(x, abs=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_input_x_gradient(arch):
    c = case(arch)
    seq = c.attribute("input_x_gradient", attribute_target=c.enc_dec)
    check_against(c, seq, lambda f, x, b: InputXGradient(f).attribute(x), attribute_target=c.enc_dec)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_right"])
@pytest.mark.parametrize(
    "arch,attribute_target", [("gpt2", False), ("llama", False), ("bart", False), ("bart", True), ("t5", True)]
)
def test_integrated_gradients_and_deltas(arch, attribute_target, rule):
    c = case(arch)
    # The integration rule is IG's option "method", which attribute() reserves for the method name:
    # it is given to load_model instead.
    am = instrument.load_model(c.model, "integrated_gradients", tokenizer=c.tok, method=rule, n_steps=8)
    seq = am.attribute(
        *c.texts,
        show_progress=False,
        attribute_target=attribute_target,
        return_convergence_delta=True,
        step_scores=["probability"],
    )[0]
    deltas = []
    for j, p in enumerate(c.steps):
        inputs, baselines = c.embeds(p, attribute_target)
        ig = IntegratedGradients(c.prob_fn(p, attribute_target))
        attributions, delta = ig.attribute(
            inputs, baselines=baselines, n_steps=8, method=rule, return_convergence_delta=True
        )
        for side, ref in zip(c.sides(attribute_target), attributions):
            close(c.ours(seq, j, p, side), ref[0].detach())
        deltas.append(float(delta))
    # A delta is sum(attributions) - (f(x) - f(baseline)), a difference of numbers of the size of
    # the probabilities: its float32 error is a few ulps of the probability, hence this atol.
    expected = torch.tensor(deltas)
    atol = 1e-5 * float(seq.step_scores["probability"].max())
    torch.testing.assert_close(seq.step_scores["deltas"], expected, rtol=1e-3, atol=atol)
    if rule == "riemann_right":  # 8 right-Riemann steps leave deltas above that tolerance
        assert expected.abs().max() > atol


def test_riemann_trapezoid_equals_captum():
    """Captum's "riemann_trapezoid" weighs its n points 1/n (1/2n at the ends), summing to (n-1)/n;
    we keep those weights so that results equal Captum's and Inseq's."""
    c = case("gpt2")
    am = instrument.load_model(c.model, "integrated_gradients", tokenizer=c.tok, method="riemann_trapezoid", n_steps=8)
    seq = am.attribute(*c.texts, show_progress=False)[0]
    for j, p in enumerate(c.steps):
        (x,), (b,) = c.embeds(p, attribute_target=False)
        ref = IntegratedGradients(c.prob_fn(p)).attribute(x, baselines=b, n_steps=8, method="riemann_trapezoid")
        close(seq.target_attributions[:p, j], ref[0].detach())


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_integrated_gradients_delta_shrinks_with_n_steps(arch):
    c = case(arch, factor=5.0)  # sharpened: clearly nonlinear along the path
    mean_abs_delta = {}
    for n_steps in (4, 32):
        am = instrument.load_model(c.model, "integrated_gradients", tokenizer=c.tok)  # Gauss-Legendre
        seq = am.attribute(*c.texts, show_progress=False, n_steps=n_steps, return_convergence_delta=True)[0]
        mean_abs_delta[n_steps] = float(seq.step_scores["deltas"].abs().mean())
    # Gauss-Legendre's error falls much faster than 1/n on a smooth path; ask for 10x from 4 to 32 steps.
    assert mean_abs_delta[4] > 10 * mean_abs_delta[32] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_deeplift(arch):
    c = case(arch)
    seq = c.attribute("deeplift", attribute_target=c.enc_dec)
    check_against(
        c, seq, lambda f, x, b: DeepLift(Module(c.model, f)).attribute(x, baselines=b), attribute_target=c.enc_dec
    )


def test_deeplift_rescale_rule_matters_on_t5():
    """T5's feed-forward has nn.ReLU modules: DeepLIFT must differ from gradient x (input - baseline)."""
    c = case("t5")
    seq = c.attribute("deeplift")
    p = c.steps[-1]
    (x,), (b,) = c.embeds(p, attribute_target=False)
    point = x.clone().requires_grad_()
    grad = torch.autograd.grad(c.prob_fn(p)(point).sum(), point)[0]
    plain = (grad * (x - b))[0]
    ours = seq.source_attributions[:, -1]
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()


def shap_expected(c, n_samples, stdevs, seed=42):
    """Gradient SHAP by its formula, with the path points a_k and input noise e_k the library drew:
    mean over k of grad f(b + a_k (x + e_k - b)) * (x + e_k - b), the target prefix of an
    encoder-decoder staying at its real embedding (it is no attributed input)."""
    example = Example(target_ids=c.target, start=c.steps[0], end=c.steps[-1] + 1, source_ids=c.source)
    rows = Rows.build([example], [(0, p) for p in c.steps], c.tok.pad_token_id)
    source, target = c.am.engine.embed(rows)
    sides = [(source, None), (target, None)] if source is not None else [(target, None)]
    alphas, noises = _row_samples(rows, sides, n_samples, stdevs, seed)
    expected = []
    for r, p in enumerate(c.steps):
        (x,), (b,) = c.embeds(p, attribute_target=False)
        total = torch.zeros_like(x[0])
        for k in range(n_samples):
            noisy = x + noises[0][k, r, : x.shape[1]]  # side 0: the source, or a decoder-only prefix
            point = (b + alphas[k, r] * (noisy - b)).requires_grad_()
            grad = torch.autograd.grad(c.prob_fn(p)(point).sum(), point)[0]
            total += (grad * (noisy - b))[0] / n_samples
        expected.append(total)
    return expected


@pytest.mark.parametrize("stdevs", [0.0, 0.5])
@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_gradient_shap_formula(arch, stdevs):
    c = case(arch)
    seq = c.attribute("gradient_shap", n_samples=2, stdevs=stdevs)
    for j, (p, ref) in enumerate(zip(c.steps, shap_expected(c, n_samples=2, stdevs=stdevs))):
        close(c.ours(seq, j, p, "source" if c.enc_dec else "target"), ref)


LAYERS = {  # an embedding module and a block (T5's blocks return tuples: its feed-forward sublayer)
    "gpt2": ["transformer.wte", "transformer.h.0"],
    "llama": ["model.layers.0"],
    "bart": ["model.encoder.embed_tokens", "model.encoder.layers.0"],
    "t5": ["encoder.block.0.layer.1"],
}
LAYER_CASES = [(arch, name) for arch, names in LAYERS.items() for name in names]


def check_layer(c, seq, make_captum, name):
    layer = c.model.get_submodule(name)
    for j, p in enumerate(c.steps):
        ids, base_ids = c.ids(p)
        expected = make_captum(c.ids_fn(p), layer, ids, base_ids)
        close(c.ours(seq, j, p, "source" if c.enc_dec else "target"), expected[0].detach())


@pytest.mark.parametrize("arch,name", LAYER_CASES)
def test_layer_integrated_gradients(arch, name):
    c = case(arch)
    seq = c.attribute("layer_integrated_gradients", target_layer=name, n_steps=8)
    # Captum's baseline for the layer is its output on the baseline ids: the same as ours, the
    # layer's output when the embedding outputs are the baseline (UNK / EOS) embeddings.
    check_layer(
        c,
        seq,
        lambda f, layer, x, b: LayerIntegratedGradients(f, layer).attribute(
            x, baselines=b, n_steps=8, method="gausslegendre"
        ),
        name,
    )


@pytest.mark.parametrize("arch,name", LAYER_CASES)
def test_layer_gradient_x_activation(arch, name):
    c = case(arch)
    seq = c.attribute("layer_gradient_x_activation", target_layer=name)
    check_layer(c, seq, lambda f, layer, x, b: LayerGradientXActivation(f, layer).attribute(x), name)


def test_layer_gradient_x_activation_all_layers_stack_on_dim_2():
    c = case("gpt2")
    seq = c.attribute("layer_gradient_x_activation", target_layers="layers")
    names = ["transformer.h.0", "transformer.h.1"]
    assert seq.target_attributions.shape == (len(c.target), len(c.steps), len(names), 32)
    for j, p in enumerate(c.steps):
        ids, _ = c.ids(p)
        expected = torch.stack(
            [
                LayerGradientXActivation(c.ids_fn(p), c.model.get_submodule(name)).attribute(ids)[0].detach()
                for name in names
            ],
            dim=1,
        )
        close(seq.target_attributions[:p, j], expected)


@pytest.mark.parametrize("arch,name", [("gpt2", "transformer.h.0"), ("t5", "encoder.block.0.layer.1")])
def test_layer_deeplift(arch, name):
    c = case(arch)
    seq = c.attribute("layer_deeplift", target_layer=name)
    check_layer(c, seq, lambda f, layer, x, b: LayerDeepLift(Module(c.model, f), layer).attribute(x, baselines=b), name)


CONTRAST = {  # (input, target, contrast target): same token lengths, so the alignment is the identity
    "gpt2": ("Hello world", "Hello world, this is", "Hello world, that is"),
    "bart": ("Hello world", "Le chat.", "Le chien"),
}


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_contrast_prob_diff_integrated_gradients(arch):
    source, target, contrast = CONTRAST[arch]
    c = Case(arch, source, target)
    contrast_ids = (
        torch.tensor([c.target[0].item(), *c.tok(text_target=contrast)["input_ids"]])
        if c.enc_dec
        else torch.tensor(c.tok(contrast)["input_ids"])
    )
    assert len(contrast_ids) == len(c.target)
    am = instrument.load_model(c.model, "integrated_gradients", tokenizer=c.tok, n_steps=8, method="riemann_right")
    seq = am.attribute(
        source,
        target,
        show_progress=False,
        attributed_fn="contrast_prob_diff",
        contrast_targets=contrast,
        contrast_force_inputs=True,
        return_convergence_delta=True,
    )[0]
    ours, expected = [], []
    for j, p in enumerate(c.steps):
        inputs, baselines = c.embeds(p, attribute_target=False)
        prob, token = c.prob_fn(p), int(contrast_ids[p])

        def f(embeds):
            n = embeds.shape[0]
            if c.enc_dec:  # the contrastive forward shares the (differentiable) source embeddings
                contrast_logits = c.logits(n, p, src_embeds=embeds, tgt_ids=contrast_ids[:p].expand(n, -1))
            else:  # decoder-only: a constant, computed from ids without gradient (as Inseq)
                with torch.no_grad():
                    contrast_logits = c.logits(n, p, tgt_ids=contrast_ids[:p].expand(n, -1))
            return prob(embeds) - contrast_logits.softmax(-1)[:, token]

        attributions, delta = IntegratedGradients(f).attribute(
            inputs, baselines=baselines, n_steps=8, method="riemann_right", return_convergence_delta=True
        )
        ours.append(c.ours(seq, j, p, "source" if c.enc_dec else "target"))
        expected.append(attributions[0][0].detach())
        # deltas: differences of O(1e-3) probabilities, float32 error ~1e-10 (see the IG test)
        torch.testing.assert_close(seq.step_scores["deltas"][j], delta[0].float(), rtol=1e-3, atol=1e-8)
    # Absolute slack from the whole sequence: a step whose contrast token is the target token has
    # exactly zero attributions in Captum, and float32 noise (both forwards' rounding) in ours.
    close(torch.cat(ours), torch.cat(expected))


# -- target-side baselines of encoder-decoders (Inseq's rule) ------------------------------------


@pytest.mark.parametrize("arch", ["marian", "t5", "bart"])
def test_target_baseline_keeps_the_decoder_start_token(arch):
    """With attribute_target, the baseline keeps the decoder start token as it is and replaces the
    real target tokens by UNK (EOS kept): Captum fed those baselines (`Case.embeds`) agrees, for
    integrated gradients, DeepLIFT and layer IG on the embeddings, and the start token gets zero."""
    c = case(arch)
    assert int(c.target[0]) == c.model.config.decoder_start_token_id != c.tok.unk_token_id
    ig = c.attribute("integrated_gradients", attribute_target=True, n_steps=8)
    check_against(
        c, ig, lambda f, x, b: IntegratedGradients(f).attribute(x, baselines=b, n_steps=8), attribute_target=True
    )
    assert (ig.target_attributions[0] == 0).all()
    deeplift = c.attribute("deeplift", attribute_target=True)
    check_against(
        c, deeplift, lambda f, x, b: DeepLift(Module(c.model, f)).attribute(x, baselines=b), attribute_target=True
    )
    # Layer IG on the embedding modules (its default layers with attribute_target) is IG on their outputs.
    layer_ig = c.attribute("layer_integrated_gradients", attribute_target=True, n_steps=8)
    check_against(
        c, layer_ig, lambda f, x, b: IntegratedGradients(f).attribute(x, baselines=b, n_steps=8), attribute_target=True
    )
    rows = Rows.build(
        [Example(target_ids=c.target, start=1, end=len(c.target), source_ids=c.source)],
        [(0, len(c.target) - 1)],
        c.tok.pad_token_id,
    )
    for baselines in (None, "pad"):
        _, target_base = c.am.engine.baseline(rows, baselines)
        torch.testing.assert_close(target_base[0, 0], c.tgt_emb(c.target[:1])[0])


@pytest.mark.parametrize("arch", ["marian", "t5", "bart"])
def test_gradient_shap_target_side_baselines(arch):
    """mean over k of grad f(b + a_k (x - b)) * (x - b), both sides moving, with the library's a_k."""
    c = case(arch)
    seq = c.attribute("gradient_shap", attribute_target=True, n_samples=4)
    example = Example(target_ids=c.target, start=c.steps[0], end=c.steps[-1] + 1, source_ids=c.source)
    rows = Rows.build([example], [(0, p) for p in c.steps], c.tok.pad_token_id)
    source, target = c.am.engine.embed(rows)
    alphas, _ = _row_samples(rows, [(source, None), (target, None)], 4, 0.0, 42)
    for r, p in enumerate(c.steps):
        inputs, baselines = c.embeds(p, attribute_target=True)
        totals = [torch.zeros_like(x[0]) for x in inputs]
        for k in range(4):
            points = [(b + alphas[k, r] * (x - b)).requires_grad_() for x, b in zip(inputs, baselines)]
            grads = torch.autograd.grad(c.prob_fn(p, True)(*points).sum(), points)
            for total, grad, x, b in zip(totals, grads, inputs, baselines):
                total += (grad * (x - b))[0] / 4
        for side, ref in zip(c.sides(True), totals):
            close(c.ours(seq, r, p, side), ref)


# -- baseline input checks -----------------------------------------------------------------------


def test_baseline_tensor_of_the_wrong_shape_raises():
    c = case("gpt2")
    for bad in (torch.zeros(31), torch.zeros(2, 32), torch.zeros(1, 100, 32)):
        with pytest.raises(ValueError, match=r"baselines.*\(32,\)"):
            c.attribute("integrated_gradients", n_steps=2, baselines=bad)
    with pytest.raises(ValueError, match="baselines"):
        c.attribute("deeplift", baselines=torch.zeros(32, dtype=torch.long))


def test_baseline_tensors_that_fit():
    """`(hidden,)` everywhere, or `(length, hidden)`: equal to Captum fed the same baseline."""
    c = case("gpt2")
    torch.manual_seed(0)
    per_position = torch.randn(len(c.target), 32)
    for baselines in (torch.full((32,), 0.1), per_position):
        seq = c.attribute("integrated_gradients", n_steps=4, baselines=baselines)
        for j, p in enumerate(c.steps):
            (x,), _ = c.embeds(p, False)
            b = (baselines.expand(p, 32) if baselines.dim() == 1 else baselines[:p])[None]
            ref = IntegratedGradients(c.prob_fn(p)).attribute(x, baselines=b, n_steps=4)
            close(seq.target_attributions[:p, j], ref[0].detach())


def test_baseline_pair_on_a_decoder_only_model_raises():
    c = case("gpt2")
    with pytest.raises(ValueError, match="baselines.*encoder-decoder"):
        c.attribute("integrated_gradients", n_steps=2, baselines=("zeros", "zeros"))
    with pytest.raises(ValueError, match="baselines.*pair"):
        case("bart").attribute("integrated_gradients", n_steps=2, baselines=("zeros", "zeros", "zeros"))


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_zero_baselines(arch):
    c = case(arch)
    zeros = c.attribute("integrated_gradients", n_steps=4, baselines="zeros", attribute_target=c.enc_dec)
    for spelling in (0, 0.0, ("zeros", 0.0) if c.enc_dec else 0):
        seq = c.attribute("integrated_gradients", n_steps=4, baselines=spelling, attribute_target=c.enc_dec)
        for name in ("source_attributions", "target_attributions"):
            ours, ref = getattr(seq, name), getattr(zeros, name)
            assert (ours is None) == (ref is None)
            if ref is not None:
                torch.testing.assert_close(ours, ref, equal_nan=True)
    p = c.steps[0]
    inputs, _ = c.embeds(p, c.enc_dec)
    refs = IntegratedGradients(c.prob_fn(p, c.enc_dec)).attribute(
        inputs, baselines=tuple(torch.zeros_like(x) for x in inputs), n_steps=4
    )  # Captum's zero baselines
    for side, ref in zip(c.sides(c.enc_dec), refs):
        close(c.ours(zeros, 0, p, side), ref[0].detach())
    with pytest.raises(ValueError, match="baselines"):
        c.attribute("integrated_gradients", n_steps=2, baselines=1.5)


# -- attributed functions without a gradient ------------------------------------------------------


GRADIENT_METHODS = {
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"n_steps": 2},
    "deeplift": {},
    "gradient_shap": {"n_samples": 2},
    "sequential_integrated_gradients": {"n_steps": 2},
    "discretized_integrated_gradients": {"n_steps": 2, "n_neighbors": 5},
    "layer_integrated_gradients": {"n_steps": 2},
    "layer_gradient_x_activation": {},
    "layer_deeplift": {},
}


@pytest.fixture
def step_functions():
    from instrument.steps import _REGISTRY

    def predicted_id(args):  # argmax: no gradient at all
        return args.logits.argmax(-1).float()

    def detached_top(args):  # differentiable (through a parameter-free leaf) but not in the inputs
        return args.logits.detach().max(-1).values * torch.ones((), requires_grad=True)

    instrument.register_step_function(predicted_id, "test_predicted_id")
    instrument.register_step_function(detached_top, "test_detached_top")
    yield ["test_predicted_id", "test_detached_top"]
    for name in ("test_predicted_id", "test_detached_top"):
        _REGISTRY.pop(name, None)


@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_non_differentiable_attributed_fn_raises(arch, method, step_functions):
    c = case(arch)
    for name in step_functions:
        with pytest.raises(ValueError, match=f"attributed_fn '{name}'.*(no gradient|does not depend)"):
            c.attribute(method, attributed_fn=name, **GRADIENT_METHODS[method])
    with pytest.raises(ValueError, match="attributed_fn 'top_p_size'"):
        c.attribute(method, attributed_fn="top_p_size", **GRADIENT_METHODS[method])


# -- the integration rule: approximation_method ---------------------------------------------------


def test_approximation_method_per_call_and_at_load():
    """Per call as `approximation_method` (attribute's `method` is the method name), at load time as
    `approximation_method` or Inseq's `method`; equal to Captum's rule of that name."""
    c = case("gpt2")
    per_call = c.attribute("integrated_gradients", n_steps=8, approximation_method="riemann_trapezoid")
    for options in ({"method": "riemann_trapezoid"}, {"approximation_method": "riemann_trapezoid"}):
        am = instrument.load_model(c.model, "integrated_gradients", tokenizer=c.tok, n_steps=8, **options)
        at_load = am.attribute(*c.texts, show_progress=False)[0]
        torch.testing.assert_close(at_load.target_attributions, per_call.target_attributions, equal_nan=True)
    # Given per call, it wins over the rule given at load time.
    am = instrument.load_model(c.model, "integrated_gradients", tokenizer=c.tok, n_steps=8, method="riemann_left")
    overridden = am.attribute(*c.texts, show_progress=False, approximation_method="riemann_trapezoid")[0]
    torch.testing.assert_close(overridden.target_attributions, per_call.target_attributions, equal_nan=True)
    for j, p in enumerate(c.steps):
        (x,), (b,) = c.embeds(p, attribute_target=False)
        ref = IntegratedGradients(c.prob_fn(p)).attribute(x, baselines=b, n_steps=8, method="riemann_trapezoid")
        close(per_call.target_attributions[:p, j], ref[0].detach())
    default = c.attribute("integrated_gradients", n_steps=8)
    assert not torch.allclose(default.target_attributions.nan_to_num(), per_call.target_attributions.nan_to_num())
    with pytest.raises(ValueError, match="approximation_method"):
        c.attribute("integrated_gradients", n_steps=8, approximation_method="simpson")


@pytest.mark.parametrize("arch,name", [("gpt2", "transformer.h.0"), ("bart", "model.encoder.layers.0")])
def test_layer_integrated_gradients_approximation_method(arch, name):
    c = case(arch)
    seq = c.attribute("layer_integrated_gradients", target_layer=name, n_steps=8, approximation_method="riemann_right")
    check_layer(
        c,
        seq,
        lambda f, layer, x, b: LayerIntegratedGradients(f, layer).attribute(
            x, baselines=b, n_steps=8, method="riemann_right"
        ),
        name,
    )


def test_approximation_method_from_the_cli(tmp_path):
    from instrument.cli import main

    c = case("gpt2")
    directory = tmp_path / "model"
    c.model.save_pretrained(directory)
    c.tok.save_pretrained(directory)
    out = tmp_path / "out.json"
    assert (
        main(
            [
                "attribute",
                "-m",
                str(directory),
                "-a",
                "integrated_gradients",
                "-i",
                c.texts[0],
                "-g",
                c.texts[1],
                "--approximation_method",
                "riemann_trapezoid",
                "--attribution_kwargs",
                '{"n_steps": 8}',
                "-o",
                str(out),
                "--hide",
            ]
        )
        == 0
    )
    loaded = instrument.FeatureAttributionOutput.load(out)[0]
    expected = c.attribute("integrated_gradients", n_steps=8, approximation_method="riemann_trapezoid")
    torch.testing.assert_close(
        loaded.target_attributions, expected.target_attributions, equal_nan=True, rtol=1e-5, atol=1e-9
    )
