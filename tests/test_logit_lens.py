"""The logit lens against the hidden states written out by hand (`output_hidden_states=True`, the
final norm and unembedding applied by hand), its views, the `lens_depth` step score and its cost."""

import pytest
import torch

import instrument

from tiny_models import ALL_ARCHS, tiny_model

PROMPT, TEXT = "Hello world", "Hello world, this is a test"


def by_hand(model, ids):
    """[layers + 1, T, V]: hidden_states[l] through the final norm and the unembedding; the last
    hidden state, already normed by the model, only through the unembedding (the real logits)."""
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
        states = out.hidden_states
        norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
        lens = [model.lm_head(norm(h))[0] for h in states[:-1]] + [model.lm_head(states[-1])[0]]
    torch.testing.assert_close(lens[-1], out.logits[0])
    return torch.stack(lens)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_equals_hidden_states_by_hand(arch):
    model, tokenizer = tiny_model(arch)
    am = instrument.load_model(model, tokenizer=tokenizer)
    ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    start = len(tokenizer(PROMPT)["input_ids"])
    result = instrument.logit_lens(am, PROMPT, TEXT, top_k=3)
    probs = by_hand(model, ids).softmax(-1)  # [layers, T, V]
    steps = list(range(start, len(ids)))
    expected = torch.stack([probs[:, p - 1, ids[p]] for p in steps], dim=1)
    assert result.positions == steps and len(result.layers) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(result.probabilities, expected, rtol=1e-5, atol=1e-6)
    for li in range(len(result.layers)):
        for s, p in enumerate(steps):
            row = probs[li, p - 1]
            assert result.ranks[li, s] == int((row > row[ids[p]]).sum())
            top = row.topk(3)
            assert result.top_ids[li, s].tolist() == top.indices.tolist()
            torch.testing.assert_close(result.top_probabilities[li, s], top.values, rtol=1e-5, atol=1e-6)
    assert result.targets == tokenizer.convert_ids_to_tokens(ids[steps].tolist())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_last_layer_is_the_models_prediction(arch):
    model, tokenizer = tiny_model(arch)
    am = instrument.load_model(model, tokenizer=tokenizer)
    target = "Le chat est" if model.config.is_encoder_decoder else TEXT
    result = instrument.logit_lens(am, PROMPT, target)
    out = am.attribute(PROMPT, target, method="saliency", step_scores=["probability"], show_progress=False)[0]
    torch.testing.assert_close(result.probabilities[-1], out.step_scores["probability"], rtol=1e-5, atol=1e-6)
    assert result.probabilities.shape[0] == len(result.layers)


def test_one_forward():
    model, tokenizer = tiny_model("gpt2")
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        instrument.logit_lens(model, PROMPT, TEXT, tokenizer=tokenizer)
    finally:
        handle.remove()
    assert calls == [1]


def test_views():
    from rich.console import Console

    model, tokenizer = tiny_model("gpt2")
    result = instrument.logit_lens(model, PROMPT, TEXT, tokenizer=tokenizer)
    console = Console(record=True, width=200)
    result.show(console)
    text = console.export_text()
    assert "embeddings" in text and "transformer.h.1" in text
    html = result.to_html()
    assert html.count("<tr>") == len(result.layers) + 1
    assert html.count("<td ") == len(result.layers) * len(result.positions)


def test_lens_depth_step_score():
    model, tokenizer = tiny_model("llama")
    am = instrument.load_model(model, tokenizer=tokenizer)
    out = am.attribute(PROMPT, TEXT, method="saliency", step_scores=["lens_depth"], show_progress=False)[0]
    ranks = instrument.logit_lens(am, PROMPT, TEXT).ranks  # [layers, steps]
    expected = []
    for s in range(ranks.shape[1]):
        top = (ranks[:, s] == 0).tolist()
        depth = len(top)
        while depth > 0 and top[depth - 1]:
            depth -= 1
        expected.append(float(depth))
    assert out.step_scores["lens_depth"].tolist() == expected


def test_bad_inputs():
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ValueError, match="top_k"):
        instrument.logit_lens(model, PROMPT, TEXT, top_k=0, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        instrument.logit_lens(model, PROMPT, TEXT)
    t5, t5_tokenizer = tiny_model("t5")
    with pytest.raises(ValueError, match="generated_text"):
        instrument.logit_lens(t5, PROMPT, tokenizer=t5_tokenizer)
