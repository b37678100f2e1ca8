"""attention_rollout, alti, alti_plus, alti_logit, attention_x_norm and globenc against the decomposition
written out here from the model's own weights and hidden states (explicit `[queries, keys, hidden]`
tensors), per layer (a model cut to one block) and after rollout; batched against step by step; cost.

The tiny models get random biases and norm weights first, so that every bias and norm term matters.
"""

import pytest
import torch

import instrument
from instrument.models.base import attribute_reference

from helpers import DECODER_TARGETS, SOURCES, TRANSLATIONS, assert_same
from tiny_models import ALL_ARCHS, ENCODER_DECODER, tiny_model

ROLLED = ("attention_rollout", "alti", "globenc")
METHODS = ("attention_rollout", "alti", "alti_plus", "alti_logit", "attention_x_norm", "globenc")


def perturbed(arch, layers=None):
    """A tiny model with random biases and norm weights, optionally cut to its first `layers` blocks."""
    model, tokenizer = tiny_model(arch)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    if layers is not None:
        if arch == "gpt2":
            model.transformer.h = model.transformer.h[:layers]
        elif arch == "llama":
            model.model.layers = model.model.layers[:layers]
        else:
            model.model.encoder.layers = model.model.encoder.layers[:layers]
            model.model.decoder.layers = model.model.decoder.layers[:layers]
    return model, tokenizer


def attention_parts(arch, block, x, cross_input=None):
    """(values [K, H, d] as the model computes them, W_O [H * d, D], its bias) of a block's attention."""
    if arch == "gpt2":
        attn = block.attn
        v = attn.c_attn(block.ln_1(x))[..., 2 * x.shape[-1] :]
        return v, attn.c_proj.weight, attn.c_proj.bias
    if arch == "llama":
        attn = block.self_attn
        return attn.v_proj(block.input_layernorm(x)), attn.o_proj.weight.t(), None
    attn = block.encoder_attn if cross_input is not None else block.self_attn  # BART: post-norm
    return attn.v_proj(cross_input if cross_input is not None else x), attn.out_proj.weight.t(), attn.out_proj.bias


def decomposed(A, v, W):
    """Explicit `[Q, K, D]`: sum_h A[h, i, j] v[j, h] W_O^h."""
    heads = A.shape[0]
    size = W.shape[0] // heads
    v = v.reshape(v.shape[0], -1, size)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    return torch.einsum("hij,jhd,hde->ije", A.double(), v.double(), W.double().reshape(heads, size, -1))


def as_linear(norm, z, t):
    """A LayerNorm as a linear map with z's statistics, on t [Q, K, D]."""
    sigma = (z.double().var(-1, unbiased=False) + norm.eps).sqrt()
    return (t - t.mean(-1, keepdim=True)) / sigma[:, None, None] * norm.weight.double()


def contributions(kind, t, attention_only=None, A=None, extra_residual=False):
    """Per-layer rows of one method from the explicit decomposition t [Q, K, D]."""
    if kind == "attention_rollout":
        mean = A.double().mean(0)
        if extra_residual:
            return torch.cat([0.5 * mean, torch.full_like(mean[:, :1], 0.5)], dim=1)
        return 0.5 * mean + 0.5 * torch.eye(*mean.shape, dtype=torch.float64)
    if kind == "attention_x_norm":
        return attention_only.norm(dim=-1)
    y = t.sum(1, keepdim=True)
    if kind == "globenc":
        c = t.norm(dim=-1)
    else:
        c = (y.abs().sum(-1) - (y - t).abs().sum(-1)).clamp(min=0)
    return c / c.sum(-1, keepdim=True)


def run_model(model, source_ids, target_ids):
    with torch.no_grad():
        if source_ids is None:
            return model(input_ids=target_ids[None], output_hidden_states=True, output_attentions=True)
        return model(
            input_ids=source_ids[None],
            decoder_input_ids=target_ids[None],
            output_hidden_states=True,
            output_attentions=True,
        )


def decoder_only_expected(arch, kind, model, target_ids):
    """Rolled-out rows `[T, T]` (attention_x_norm: mean over layers) from the explicit decomposition."""
    out = run_model(model, None, target_ids)
    blocks = model.transformer.h if arch == "gpt2" else model.model.layers
    total = None
    for index, block in enumerate(blocks):
        x, A = out.hidden_states[index][0], out.attentions[index][0]
        v, W, b = attention_parts(arch, block, x)
        attention = decomposed(A, v, W)
        t = attention + torch.diag_embed(x.double().T).permute(1, 2, 0)  # + [i == j] x_i
        if index == 0 and arch == "gpt2":  # the decomposition adds up to the model's own sublayer output
            seen = {}
            handle = block.attn.register_forward_hook(lambda m, a, o: seen.update(out=o[0]))
            with torch.no_grad():
                model(input_ids=target_ids[None])
            handle.remove()
            torch.testing.assert_close(t.sum(1) + b.double(), (x + seen["out"][0]).double(), rtol=1e-5, atol=1e-5)
        c = contributions(kind, t, attention, A)
        if kind == "attention_x_norm":
            total = c if total is None else total + c
        else:
            total = c if total is None else c @ total
    return total / len(blocks) if kind == "attention_x_norm" else total


def bart_expected(kind, model, source_ids, target_ids):
    """(source rows [T, S], target rows [T, T]) of BART from the explicit post-norm decomposition."""
    out = run_model(model, source_ids, target_ids)
    encoder, decoder = model.model.encoder.layers, model.model.decoder.layers
    rollout = None
    for index, block in enumerate(encoder):
        x, A = out.encoder_hidden_states[index][0], out.encoder_attentions[index][0]
        v, W, b = attention_parts("bart", block, x)
        attention = decomposed(A, v, W)
        z = x.double() + attention.sum(1) + b.double()
        t = as_linear(block.self_attn_layer_norm, z, attention + torch.diag_embed(x.double().T).permute(1, 2, 0))
        c = contributions(kind, t, attention, A)
        rollout = c if rollout is None else c @ rollout
    memory = out.encoder_last_hidden_state[0]
    target = torch.eye(len(target_ids), dtype=torch.float64)
    source = torch.zeros(len(target_ids), len(source_ids), dtype=torch.float64)
    sums = {"source": 0, "target": 0}
    for index, block in enumerate(decoder):
        x, A = out.decoder_hidden_states[index][0], out.decoder_attentions[index][0]
        v, W, b = attention_parts("bart", block, x)
        attention = decomposed(A, v, W)
        z = x.double() + attention.sum(1) + b.double()
        t = as_linear(block.self_attn_layer_norm, z, attention + torch.diag_embed(x.double().T).permute(1, 2, 0))
        c = contributions(kind, t, attention, A)
        if kind == "attention_x_norm":
            sums["target"] = sums["target"] + c
        target, source = c @ target, c @ source
        h = block.self_attn_layer_norm(z.float()).double()  # the residual entering cross-attention
        A = out.cross_attentions[index][0]
        v, W, b = attention_parts("bart", block, x, cross_input=memory)
        attention = decomposed(A, v, W)  # [T, S, D]
        z = h + attention.sum(1) + b.double()
        t = as_linear(block.encoder_attn_layer_norm, z, torch.cat([attention, h[:, None]], dim=1))
        c = contributions(kind, t, attention, A, extra_residual=True)
        if kind == "attention_x_norm":
            sums["source"] = sums["source"] + c
            continue
        share, residual = c[:, :-1], c[:, -1:]
        source, target = share @ rollout + residual * source, residual * target
    if kind == "attention_x_norm":
        return sums["source"] / len(decoder), sums["target"] / len(decoder)
    return source, target


def check_columns(seq, expected, side):
    """Each step's column equals the expected row of its predicting position (over what it sees)."""
    got = seq.target_attributions if side == "target" else seq.source_attributions
    for step in range(got.shape[1]):
        p = seq.attr_pos_start + step
        row = expected[p - 1, :p] if side == "target" else expected[p - 1]
        torch.testing.assert_close(got[: len(row), step].double(), row, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layers", [1, None], ids=["one_layer", "rolled_out"])
@pytest.mark.parametrize("kind", ROLLED + ("attention_x_norm",))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_only_equals_explicit_decomposition(arch, kind, layers):
    model, tokenizer = perturbed(arch, layers)
    wrapped = instrument.load_model(model, kind, tokenizer=tokenizer)
    seq = wrapped.attribute(SOURCES[1], DECODER_TARGETS[1], show_progress=False)[0]
    ids = torch.tensor([token.id for token in seq.target])
    check_columns(seq, decoder_only_expected(arch, kind, model, ids), "target")


@pytest.mark.parametrize("layers", [1, None], ids=["one_layer", "rolled_out"])
@pytest.mark.parametrize("kind", ["attention_rollout", "alti_plus", "globenc", "attention_x_norm"])
def test_bart_equals_explicit_decomposition(kind, layers):
    model, tokenizer = perturbed("bart", layers)
    wrapped = instrument.load_model(model, kind, tokenizer=tokenizer)
    seq = wrapped.attribute(SOURCES[1], TRANSLATIONS[1], attribute_target=True, show_progress=False)[0]
    source_ids = torch.tensor([token.id for token in seq.source])
    target_ids = torch.tensor([token.id for token in seq.target])
    source, target = bart_expected("alti" if kind == "alti_plus" else kind, model, source_ids, target_ids)
    check_columns(seq, source, "source")
    check_columns(seq, target, "target")
    if kind != "attention_x_norm":  # source and target shares add up to 1 per step
        totals = seq.source_attributions.sum(0) + seq.target_attributions.nan_to_num().sum(0)
        torch.testing.assert_close(totals, torch.ones_like(totals))


def test_alti_logit_equals_explicit_decomposition_and_sums_to_the_logit():
    model, tokenizer = perturbed("gpt2")
    wrapped = instrument.load_model(model, "alti_logit", tokenizer=tokenizer)
    seq = wrapped.attribute(SOURCES[1], DECODER_TARGETS[1], show_progress=False, step_scores=["logit"])[0]
    ids = torch.tensor([token.id for token in seq.target])
    out = run_model(model, None, ids)
    final = {}
    handle = model.transformer.ln_f.register_forward_pre_hook(lambda m, a: final.update(r=a[0][0]))
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    handle.remove()
    blocks = model.transformer.h
    inputs = [out.hidden_states[i][0].double() for i in range(len(blocks))] + [final["r"].double()]
    ln_f, unembed = model.transformer.ln_f, model.lm_head.weight.double()
    for step in range(seq.target_attributions.shape[1]):
        p = seq.attr_pos_start + step
        i, token = p - 1, ids[p]
        g = ln_f.weight.double() * unembed[token]
        g = g - g.mean()
        scale = 1 / (inputs[-1][i].var(unbiased=False) + ln_f.eps).sqrt()
        expected = torch.zeros(len(ids), dtype=torch.float64)
        expected[i] = inputs[0][i] @ g
        rollout = torch.eye(len(ids), dtype=torch.float64)
        biases = 0.0
        for index, block in enumerate(blocks):
            x, A = out.hidden_states[index][0], out.attentions[index][0]
            v, W, b = attention_parts("gpt2", block, x)
            attention = decomposed(A, v, W)  # [T, T, D]
            expected += (attention[i] @ g) @ rollout  # key k's update to i, spread by the input's rollout
            t = attention + torch.diag_embed(x.double().T).permute(1, 2, 0)
            rollout = contributions("alti", t) @ rollout
            mlp = inputs[index + 1][i] - inputs[index][i] - (attention[i].sum(0) + b.double())
            expected += (mlp @ g) * rollout[i]
            biases += b.double() @ g
        expected *= scale
        got = seq.target_attributions[:p, step].double()
        torch.testing.assert_close(got, expected[:p], rtol=1e-4, atol=1e-6)
        # The contributions add up to the logit less the final norm's bias and the attention output biases.
        rest = logits[i, token].double() - ln_f.bias.double() @ unembed[token] - scale * biases
        torch.testing.assert_close(got.sum(), rest, rtol=1e-4, atol=1e-5)


def texts(arch):
    return (SOURCES, TRANSLATIONS) if arch in ENCODER_DECODER else (SOURCES, DECODER_TARGETS)


def applicable(arch, method):
    if arch in ENCODER_DECODER:
        return method not in ("alti", "alti_logit")
    return method != "alti_plus"


# Only the pairs a method accepts; the refused ones are test_refusals'.
@pytest.mark.parametrize(
    "arch, method", [(arch, method) for arch in ALL_ARCHS for method in METHODS if applicable(arch, method)]
)
def test_batched_equals_step_by_step_and_one_forward(arch, method):
    model, tokenizer = tiny_model(arch, attn_implementation="sdpa")
    wrapped = instrument.load_model(model, method, tokenizer=tokenizer)
    common = dict(show_progress=False, step_scores=["probability"], attribute_target=arch in ENCODER_DECODER)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    batched = wrapped.attribute(*texts(arch), **common)
    handle.remove()
    assert len(calls) == 1  # the docstrings' cost: one forward for every step of the batch, no backward
    reference = attribute_reference(wrapped, *texts(arch), **common)
    for got, expected in zip(batched, reference):
        assert_same(got.source_attributions, expected.source_attributions)
        assert_same(got.target_attributions, expected.target_attributions)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "arch, method, match",
    [
        ("bart", "alti", "alti_plus"),
        ("gpt2", "alti_plus", "use method='alti'"),
        ("t5", "alti_logit", "decoder-only"),
        ("gpt2", "attention_x_norm", "aggregate_fn"),
    ],
)
def test_refusals(arch, method, match):
    model, tokenizer = tiny_model(arch)
    wrapped = instrument.load_model(model, method, tokenizer=tokenizer)
    options = {"aggregate_fn": "sum"} if method == "attention_x_norm" else {}
    with pytest.raises(ValueError, match=match):
        wrapped.attribute(*[t[0] for t in texts(arch)], show_progress=False, **options)


def test_unknown_block_family_is_refused():
    from methods.mixing import _layout

    with pytest.raises(ValueError, match="does not know how Linear"):
        _layout(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), "alti")


def test_post_norm_opt_is_refused_by_alti_logit():
    model, tokenizer = tiny_model("opt")
    model.config.do_layer_norm_before = False
    for layer in model.model.decoder.layers:
        layer.do_layer_norm_before = False
    wrapped = instrument.load_model(model, "alti_logit", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pre-norm"):
        wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], show_progress=False)


def test_aggregation_and_save_load(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    out = instrument.load_model(model, "alti", tokenizer=tokenizer).attribute(
        SOURCES[:2], DECODER_TARGETS[:2], show_progress=False
    )
    out.save(tmp_path / "alti.json")
    loaded = instrument.FeatureAttributionOutput.load(tmp_path / "alti.json")
    assert_same(loaded[0].target_attributions, out[0].target_attributions)
    assert out.aggregate()[0].target_attributions is not None


@pytest.mark.parametrize("method", ["alti", "globenc", "attention_rollout"])
def test_bfloat16_model_rows_sum_to_one(method):
    model, tokenizer = tiny_model("llama")
    wrapped = instrument.load_model(model.to(torch.bfloat16), method, tokenizer=tokenizer)
    seq = wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], show_progress=False)[0]
    totals = seq.target_attributions.nan_to_num().sum(0)
    torch.testing.assert_close(totals, torch.ones_like(totals), rtol=0, atol=1e-5)
