"""Context attribution by ablation (`instrument.context.ablation`): the scores against forwards run one
by one by hand, the Lasso against scikit-learn and a closed form, determinism, the forward count, bad
input, and the ground truth of demo-lm's in-context lookup."""

import json
import math

import numpy as np
import pytest
import torch

import instrument
from instrument.context.ablation import attribute_context_ablation, fit_lasso, split_sources
from instrument.demo import lookup_examples

from tiny_models import tiny_model

SENTENCES = ["The capital of France is Paris.", "Hello world, this is a test.", "It may rain tomorrow."]
CURRENT = "What is the capital?"
RESPONSE = "Paris is nice."


@pytest.fixture(scope="module", params=["gpt2", "marian"])
def tiny(request):
    model, tokenizer = tiny_model(request.param)
    return instrument.load_model(model, "saliency", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def demo_lm():
    return instrument.load_model("demo-lm", "saliency")


class CountForwards:
    def __init__(self, module):
        self.module, self.count = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def score_by_hand(am, context: str, response: str) -> float:
    """Sum over the response's tokens of log p - log(1 - p), one plain forward of one text."""
    text = f"{context} {CURRENT}" if context else CURRENT
    tokenizer, model = am.tokenizer, am.model
    with torch.no_grad():
        if am.is_encoder_decoder:
            target = tokenizer(text_target=response)["input_ids"][:-1]  # without </s>
            decoder = torch.tensor([[model.config.decoder_start_token_id, *target]])
            logits = model(**tokenizer(text, return_tensors="pt"), decoder_input_ids=decoder).logits[0, :-1]
        else:
            prompt = tokenizer(text)["input_ids"]
            target = tokenizer(f"{text} {response}")["input_ids"][len(prompt) :]
            logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
    probs = logits.double().softmax(-1)[torch.arange(len(target)), torch.tensor(target)]
    return float((probs.log() - (1 - probs).log()).sum()), len(target)


def test_scores_and_weights_equal_a_computation_by_hand(tiny):
    out = attribute_context_ablation(
        tiny, CURRENT, " ".join(SENTENCES), RESPONSE, n_ablations=16, seed=3, lasso_alpha=0.001
    )
    assert out.sources == SENTENCES and out.masks.shape == (16, 3)
    expected, n_tokens = zip(
        *[score_by_hand(tiny, " ".join(s for s, k in zip(SENTENCES, m) if k), RESPONSE) for m in out.masks.tolist()]
    )
    torch.testing.assert_close(out.scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert out.full_score == pytest.approx(score_by_hand(tiny, " ".join(SENTENCES), RESPONSE)[0], rel=1e-4, abs=1e-4)
    # ContextCite's surrogate: scikit-learn's Lasso on standardised masks against the score per token.
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y, n = out.masks.numpy().astype(float), out.scores.numpy(), n_tokens[0]
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1
    lasso = sklearn.Lasso(alpha=0.001, tol=1e-12, max_iter=100_000).fit((x - mean) / scale, y / n)
    np.testing.assert_allclose(out.weights.numpy(), lasso.coef_ / scale * n, rtol=1e-5, atol=1e-7)
    assert out.intercept == pytest.approx((lasso.intercept_ - mean @ (lasso.coef_ / scale)) * n, rel=1e-5, abs=1e-7)


def test_lasso_against_sklearn_and_the_soft_threshold():
    rng = np.random.default_rng(0)
    x = (rng.random((40, 6)) < 0.5).astype(float)
    y = x @ np.array([2.0, 0.0, -1.0, 0.0, 0.5, 0.0]) + 0.1 * rng.standard_normal(40)
    sklearn = pytest.importorskip("sklearn.linear_model")
    for alpha in (0.0, 0.01, 0.1, 1.0):
        w, b = fit_lasso(x, y, alpha)
        reference = sklearn.Lasso(alpha=alpha, tol=1e-14, max_iter=100_000).fit(x, y) if alpha else None
        if reference is not None:
            np.testing.assert_allclose(w, reference.coef_, rtol=1e-6, atol=1e-8)
            assert b == pytest.approx(reference.intercept_, rel=1e-6, abs=1e-8)
    # Orthonormal centred columns (times sqrt(n)): the Lasso is the soft-thresholded least squares.
    q, _ = np.linalg.qr(np.c_[np.ones(40), rng.standard_normal((40, 3))])
    x = q[:, 1:] * math.sqrt(40)
    y = x @ np.array([1.0, -0.05, 0.3]) + 2.0
    w, b = fit_lasso(x, y, alpha=0.1)
    np.testing.assert_allclose(w, [0.9, 0.0, 0.2], atol=1e-10)
    assert b == pytest.approx(2.0)


def test_seeded_and_deterministic(tiny):
    def run(seed):
        return attribute_context_ablation(tiny, CURRENT, " ".join(SENTENCES), RESPONSE, n_ablations=8, seed=seed)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.masks, again.masks) and torch.equal(first.weights, again.weights)
    assert torch.equal(first.scores, again.scores)
    assert (first.r2, first.lds) == (again.r2, again.lds) or math.isnan(first.r2)
    assert not torch.equal(first.masks, other.masks)


def test_forward_count(tiny):
    with CountForwards(tiny.model) as counted:
        out = attribute_context_ablation(tiny, CURRENT, " ".join(SENTENCES), RESPONSE, n_ablations=10, batch_size=4)
    assert out.n_forwards == counted.count == 3  # 10 ablations and the full context, 4 rows per forward
    with CountForwards(tiny.model) as counted:
        out = attribute_context_ablation(
            tiny,
            CURRENT,
            " ".join(SENTENCES),
            n_ablations=8,
            generation_args={"max_new_tokens": 3, "min_new_tokens": 3},
        )
    # Marian forces </s> as its last token, which is not scored.
    assert out.info["generated"] and len(out.info["response_tokens"]) == (2 if tiny.is_encoder_decoder else 3)
    assert out.n_forwards == counted.count == 3 + 1  # one per generated token, then one scoring batch


def test_bad_input_fails_before_any_forward(tiny):
    context = " ".join(SENTENCES)
    cases = [
        ({"input_context_text": None}, "input_context_text is required"),
        ({"input_context_text": "  "}, "input_context_text is required"),
        ({"input_template": "{context}"}, r"must contain \{current\}"),
        ({"input_template": "{current} only"}, r"must contain \{context\}"),
        ({"input_template": "{context} {current} {other}"}, "may only use"),
        ({"input_context_text": "word " * 300}, "context window"),
        ({"sources": "words"}, "sources must be one of"),
        ({"n_ablations": 3}, "n_ablations"),
    ]
    for kwargs, message in cases:
        with CountForwards(tiny.model) as counted, pytest.raises(ValueError, match=message):
            attribute_context_ablation(
                tiny, CURRENT, **{"input_context_text": context, "output_current_text": RESPONSE, **kwargs}
            )
        assert counted.count == 0, kwargs
    with pytest.raises(TypeError, match="sources='documents'"):
        attribute_context_ablation(tiny, CURRENT, SENTENCES, RESPONSE)


def test_sources_split_and_documents(tiny):
    assert split_sources("A b. C d!  E f?\nG") == (["A b.", "C d!", "E f?", "G"], [" ", "  ", "\n", ""])
    assert split_sources("one doc.\n\n two. doc", "documents") == (["one doc.", "two. doc"], ["\n\n ", ""])
    out = attribute_context_ablation(tiny, CURRENT, SENTENCES[:2], RESPONSE, sources="documents", n_ablations=8)
    assert out.sources == SENTENCES[:2] and out.input_context == "\n\n".join(SENTENCES[:2])


def test_output_round_trips_and_shows(tiny, tmp_path):
    from rich.console import Console

    out = attribute_context_ablation(tiny, CURRENT, " ".join(SENTENCES), RESPONSE, n_ablations=8)
    out.save(tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["sources"] == SENTENCES and data["weights"] == out.weights.tolist()
    assert data["n_forwards"] == out.n_forwards == 1 and data["output_current"] == RESPONSE
    with pytest.raises(ValueError, match="exists"):
        out.save(tmp_path / "out.json")
    console = Console(record=True, width=120)
    out.show(console)
    text = console.export_text()
    assert SENTENCES[0] in text and "R^2" in text and f"{float(out.weights[0]):+.3f}" in text


@pytest.mark.slow  # ~5-10 s on 2 busy cores: 200 calls of one 65-row forward
def test_ground_truth_the_answering_sentence_has_the_largest_weight(demo_lm):
    cases = lookup_examples(200, seed=2024)
    hits = 0
    for sentences, question, answer, index in cases:
        out = attribute_context_ablation(demo_lm, question, " ".join(sentences), answer, n_ablations=64, seed=0)
        assert out.sources == sentences and out.n_forwards == 1
        hits += int(out.weights.argmax()) == index
    accuracy = hits / len(cases)
    print(f"demo-lm lookup: the answering sentence has the largest ablation weight in {accuracy:.3f} of cases")
    assert accuracy >= 0.9
