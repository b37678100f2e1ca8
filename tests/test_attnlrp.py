"""AttnLRP against an explicit relevance pass written out rule by rule from the weights (`lxt`, the
reference implementation, does not import under transformers 5), relevance conservation, every
fixture architecture, the model left as it was, and its cost in forwards.

The references propagate relevance messages `R` backwards layer by layer (no autograd): LRP-0 for
linear maps and sums (`R_x = x * ((R_z / z) @ W)`, biases absorb their share), the identity rule
through activations and the normalisations' statistics, the uniform rule for products of two
activations, Achtibat et al.'s softmax rule `R_S = S * (R_A - A * sum(R_A))` (CP-LRP: no relevance
into the softmax, nor into the gate of a gated MLP, as lxt's CP-LRP). `tests/lxt_compare.py` compared
the same fixtures with lxt 2.1 itself once (transformers 4.51, a separate environment).
"""

import pytest
import torch

import instrument
from methods.attnlrp import lrp_rules

from helpers import double_model
from tiny_models import ALL_ARCHS, tiny_model

TEXT = "Hello world, this is"
PROMPT = "Hello world"


# -- the rules, written as relevance messages -----------------------------------------------------


def linear_back(x, weight, z, relevance):
    """z = x @ weight.T (+ bias): R_x = x * ((R_z / z) @ weight)."""
    return x * ((relevance / z) @ weight)


def matmul_back(a, b, relevance, cp=False):
    """o = a @ b as products a_ts * b_sd summed over s; each product's share of R_o (LRP-0), halved
    between its factors (uniform rule); under CP-LRP `a` (the attention) is a constant."""
    message = relevance / (a @ b)
    r_a = a * (message @ b.transpose(-1, -2))
    r_b = b * (a.transpose(-1, -2) @ message)
    return (torch.zeros_like(a), r_b) if cp else (r_a / 2, r_b / 2)


def softmax_back(scores, probs, relevance, allowed):
    """R_S = S * (R_A - A * sum(R_A)) where the mask allows; the mask, a constant, takes nothing."""
    scores = torch.where(allowed, scores, torch.zeros_like(scores))
    return torch.where(
        allowed, scores * (relevance - probs * relevance.sum(-1, keepdim=True)), torch.zeros_like(scores)
    )


def layer_norm_back(x, norm, relevance):
    """y = (x - mean) * w / std + b, std constant: the bias absorbs its share, then the centring
    (a linear map, I - 1/D) passes R_c back by LRP-0."""
    centred = x - x.mean(-1, keepdim=True)
    std = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    scaled = centred * norm.weight / std
    r_centred = scaled / (scaled + norm.bias) * relevance
    d = x.shape[-1]
    centring = torch.eye(d, dtype=x.dtype) - 1.0 / d
    return linear_back(x, centring, centred, r_centred)


def attention_back(q, k, v, scale, relevance_out, cp):
    """Causal attention of one sequence, heads first: o = softmax(q k^T * scale + mask) v."""
    t = q.shape[-2]
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    r_probs, r_v = matmul_back(probs, v, relevance_out, cp)
    if cp:
        return torch.zeros_like(q), torch.zeros_like(k), r_v
    r_scores = softmax_back(scores, probs, r_probs, allowed)  # the scale is a constant factor: R unchanged
    r_q, r_kt = matmul_back(q, k.transpose(-1, -2), r_scores)
    return r_q, r_kt.transpose(-1, -2), r_v


def heads(x, n):
    return x.view(x.shape[0], n, -1).transpose(0, 1)


def merge(x):
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def gpt2_reference(model, ids, token, cp):
    """Relevance of the token embeddings of `ids` for the logit of `token` after the last position."""
    tr, n = model.transformer, model.config.n_head
    positions = torch.arange(len(ids))
    tokens = tr.wte(ids)
    x = tokens + tr.wpe(positions)
    saved = []
    for block in tr.h:
        h = block.ln_1(x)
        qkv = h @ block.attn.c_attn.weight + block.attn.c_attn.bias
        q, k, v = (heads(part, n) for part in qkv.split(x.shape[-1], -1))
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        allowed = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        o = merge(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v)
        attn = o @ block.attn.c_proj.weight + block.attn.c_proj.bias
        x1 = x + attn
        h2 = block.ln_2(x1)
        pre = h2 @ block.mlp.c_fc.weight + block.mlp.c_fc.bias
        act = block.mlp.act(pre)
        mlp = act @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
        saved.append((x, h, qkv, q, k, v, o, attn, x1, h2, pre, act, mlp))
        x = x1 + mlp
    final = tr.ln_f(x[-1])
    weight = model.lm_head.weight[token]
    relevance = torch.zeros_like(x)
    relevance[-1] = layer_norm_back(x[-1], tr.ln_f, final * weight)
    for block, (x, h, qkv, q, k, v, o, attn, x1, h2, pre, act, mlp) in zip(reversed(tr.h), reversed(saved)):
        out = x1 + mlp
        r_x1, r_mlp = x1 / out * relevance, mlp / out * relevance
        r_act = linear_back(act, block.mlp.c_proj.weight.T, mlp, r_mlp)
        r_h2 = linear_back(h2, block.mlp.c_fc.weight.T, pre, r_act)  # identity rule through the GELU
        r_x1 = r_x1 + layer_norm_back(x1, block.ln_2, r_h2)
        r_x, r_attn = x / x1 * r_x1, attn / x1 * r_x1
        r_o = linear_back(o, block.attn.c_proj.weight.T, attn, r_attn)
        r_q, r_k, r_v = attention_back(q, k, v, q.shape[-1] ** -0.5, heads(r_o, len(q)), cp)
        r_qkv = torch.cat([merge(r) for r in (r_q, r_k, r_v)], -1)
        r_h = linear_back(h, block.attn.c_attn.weight.T, qkv, r_qkv)
        relevance = r_x + layer_norm_back(x, block.ln_1, r_h)
    # The embedding sum: the position embeddings take their share.
    return tokens / (tokens + tr.wpe(positions)) * relevance


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def rotate_half_transposed(x):
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), -1)


def rotary_back(x, rotated, cos, sin, relevance):
    """rotated = x * cos + rotate_half(x) * sin, a linear map of x: LRP-0."""
    message = relevance / rotated
    return x * (message * cos + rotate_half_transposed(message * sin))


def llama_reference(model, ids, token, cp):
    inner, cfg = model.model, model.config
    n, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    x = inner.embed_tokens(ids)
    cos, sin = (t[0] for t in inner.rotary_emb(x[None], torch.arange(len(ids))[None]))
    saved = []
    for layer in inner.layers:
        at = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = (heads(proj(h), m) for proj, m in ((at.q_proj, n), (at.k_proj, n_kv), (at.v_proj, n_kv)))
        q_rot, k_rot = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k_rep, v_rep = (t.repeat_interleave(n // n_kv, 0) for t in (k_rot, v))
        scale = q.shape[-1] ** -0.5
        allowed = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        o = merge(((q_rot @ k_rep.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf")).softmax(-1) @ v_rep)
        attn = at.o_proj(o)
        x1 = x + attn
        h2 = layer.post_attention_layernorm(x1)
        mlp = layer.mlp
        gate, up = mlp.gate_proj(h2), mlp.up_proj(h2)
        act = mlp.act_fn(gate)
        down = mlp.down_proj(act * up)
        saved.append((x, h, q, k, v, q_rot, k_rep, v_rep, o, attn, x1, h2, gate, up, act, down))
        x = x1 + down
    final = inner.norm(x[-1])
    relevance = torch.zeros_like(x)
    relevance[-1] = final * model.lm_head.weight[token]  # the RMS norm (rms constant) passes R unchanged
    for layer, (x, h, q, k, v, q_rot, k_rep, v_rep, o, attn, x1, h2, gate, up, act, down) in zip(
        reversed(inner.layers), reversed(saved)
    ):
        at, mlp = layer.self_attn, layer.mlp
        out = x1 + down
        r_x1, r_down = x1 / out * relevance, down / out * relevance
        r_product = linear_back(act * up, mlp.down_proj.weight, down, r_down)
        # Uniform rule, then the identity rule through SiLU (r_gate unchanged); CP-LRP: the gate is a constant.
        r_gate, r_up = (torch.zeros_like(r_product), r_product) if cp else (r_product / 2, r_product / 2)
        r_h2 = linear_back(h2, mlp.gate_proj.weight, gate, r_gate) + linear_back(h2, mlp.up_proj.weight, up, r_up)
        r_x1 = r_x1 + r_h2
        r_x, r_attn = x / x1 * r_x1, attn / x1 * r_x1
        r_o = linear_back(o, at.o_proj.weight, attn, r_attn)
        r_q_rot, r_k_rep, r_v_rep = attention_back(q_rot, k_rep, v_rep, q.shape[-1] ** -0.5, heads(r_o, n), cp)
        r_k_rot, r_v = (r.view(n_kv, n // n_kv, *r.shape[1:]).sum(1) for r in (r_k_rep, r_v_rep))
        r_q = rotary_back(q, q_rot, cos, sin, r_q_rot)
        r_k = rotary_back(k, k_rep[:: n // n_kv], cos, sin, r_k_rot)
        r_h = sum(
            linear_back(h, proj.weight, proj(h), merge(r))
            for proj, r in ((at.q_proj, r_q), (at.k_proj, r_k), (at.v_proj, r_v))
        )
        relevance = r_x + r_h
    return relevance


REFERENCES = {"gpt2": gpt2_reference, "llama": llama_reference}


def last_step_relevance(arch, variant, attn_implementation="eager"):
    model, tokenizer = double_model(arch, attn_implementation)
    ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    am = instrument.load_model(model, "attnlrp", tokenizer=tokenizer)
    out = am.attribute(PROMPT, TEXT, attributed_fn="logit", variant=variant, show_progress=False)[0]
    ours = out.target_attributions[: len(ids) - 1, -1]  # [positions, hidden] of the last step
    with torch.no_grad():
        reference = REFERENCES[arch](model, ids[:-1], int(ids[-1]), cp=variant == "cp")
    logit = model(ids[None, :-1]).logits[0, -1, ids[-1]].item()
    return ours, reference, logit


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["attnlrp", "cp"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_equals_the_rules_written_out(arch, variant, attn_implementation):
    ours, reference, _ = last_step_relevance(arch, variant, attn_implementation)
    scale = reference.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours.double() / scale, reference / scale, rtol=0, atol=1e-4)
    # The rules matter: plain input x gradient is far from them.
    model, tokenizer = double_model(arch)
    plain = (
        instrument.load_model(model, "input_x_gradient", tokenizer=tokenizer)
        .attribute(PROMPT, TEXT, attributed_fn="logit", show_progress=False)[0]
        .target_attributions[: len(reference), -1]
    )
    assert (plain.double() - reference).abs().max() / scale > 1e-2


def test_cp_lrp_conserves_relevance_without_biases():
    # Llama's fixture has no biases and no position embeddings, and under CP-LRP no softmax (whose
    # rule does not conserve): the input relevance sums to the attributed logit.
    ours, reference, logit = last_step_relevance("llama", "cp")
    assert abs(ours.sum().item() - logit) <= 1e-3 * abs(logit)
    assert abs(reference.sum().item() - logit) <= 1e-3 * abs(logit)


def test_every_layer_conserves_in_the_same_pass():
    model, tokenizer = double_model("llama")
    am = instrument.load_model(model, "attnlrp", tokenizer=tokenizer)
    out = am.attribute(
        PROMPT,
        TEXT,
        attributed_fn="logit",
        variant="cp",
        target_layers="layers",
        step_scores=["logit"],
        show_progress=False,
    )[0]
    per_layer = out.target_attributions.nansum(dim=(0, 3))  # [steps, layers]
    logits = out.step_scores["logit"]
    torch.testing.assert_close(per_layer, logits[:, None].expand_as(per_layer).to(per_layer), rtol=1e-3, atol=0)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_architecture_runs_and_restores_the_model(arch):
    model, tokenizer = tiny_model(arch, attn_implementation="sdpa")
    enc_dec = model.config.is_encoder_decoder
    source, target = ("Hello world", "Le chat") if enc_dec else ("Hello world", TEXT)
    ids = tokenizer(source, return_tensors="pt")
    before = model(**ids, decoder_input_ids=ids.input_ids[:, :2]) if enc_dec else model(**ids)
    forwards = {name: module.__dict__.get("forward") for name, module in model.named_modules()}
    flags = [p.requires_grad for p in model.parameters()]
    out = instrument.load_model(model, "attnlrp", tokenizer=tokenizer).attribute(source, target, show_progress=False)
    seq = out[0]
    attributions = seq.source_attributions if enc_dec else seq.target_attributions
    assert attributions.isfinite().any() and attributions.nan_to_num().abs().sum() > 0
    assert {name: module.__dict__.get("forward") for name, module in model.named_modules()} == forwards
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation == "sdpa"
    after = model(**ids, decoder_input_ids=ids.input_ids[:, :2]) if enc_dec else model(**ids)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)


def test_forward_values_unchanged_and_restored_after_an_error():
    model, tokenizer = tiny_model("llama")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    plain = model(ids).logits
    with lrp_rules(model):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), lrp_rules(model):
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_one_forward_per_example():
    """Cost: one forward of each example (all its steps), batched, and one batched backward."""
    model, tokenizer = tiny_model("gpt2")
    calls = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        am = instrument.load_model(model, "attnlrp", tokenizer=tokenizer)
        am.attribute([TEXT, "Good morning!"], [TEXT + " a test", "Good morning! How are"], show_progress=False)
    finally:
        handle.remove()
    assert calls == [2]  # one forward, of one row per example


def test_unknown_normalisation_is_refused():
    class FancyNorm(torch.nn.Module):
        def forward(self, x):
            return x / x.norm(dim=-1, keepdim=True)

    model, tokenizer = tiny_model("gpt2")
    model.transformer.ln_f = FancyNorm()
    am = instrument.load_model(model, "attnlrp", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="transformer.ln_f .FancyNorm"):
        am.attribute("Hello", "Hello world", show_progress=False)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_bad_variant():
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ValueError, match="variant"):
        instrument.load_model(model, "attnlrp", tokenizer=tokenizer).attribute(
            "Hello", "Hello world", variant="lxt", show_progress=False
        )


def test_batched_examples_and_attention_implementations_agree():
    texts = [(PROMPT, TEXT), ("Good morning!", "Good morning! How are you")]
    model, tokenizer = tiny_model("qwen2", attn_implementation="sdpa")
    am = instrument.load_model(model, "attnlrp", tokenizer=tokenizer)
    batched = am.attribute([s for s, _ in texts], [t for _, t in texts], show_progress=False)
    eager = instrument.load_model(tiny_model("qwen2")[0], "attnlrp", tokenizer=tokenizer)
    for index, (source, target) in enumerate(texts):
        alone = eager.attribute(source, target, show_progress=False)[0].target_attributions
        together = batched[index].target_attributions
        assert torch.equal(alone.isnan(), together.isnan())
        torch.testing.assert_close(together.nan_to_num(), alone.nan_to_num(), rtol=1e-4, atol=1e-6)
