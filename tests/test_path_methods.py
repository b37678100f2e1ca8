"""Discretized (DIG) and sequential (SIG) integrated gradients, against their papers' definitions
written out by hand here, on the tiny fixture models (float64 for the by-hand checks).

DIG (Sanyal and Ren 2021): the anchor search and monotonization are re-implemented below with plain
Python loops over a brute-force neighbour list, following the paper (and its authors' code), and the
attribution is `sum_k grad f(c_k) * (c_{k+1} - c_k)` with autograd on one unpadded step at a time.
SIG (Enguehard 2023): for each token i, integrated gradients along the path on which only token i
moves from its baseline to its embedding, summed with the Gauss-Legendre weights, by autograd.
"""

import pytest
import torch

import instrument
from instrument.models.base import attribute_reference
from methods.approximation import approximation
from methods.path import Vocabulary

from helpers import DECODER_TARGETS, SOURCES, TRANSLATIONS, Case, assert_same, close
from tiny_models import ALL_ARCHS, tiny_model

METHOD_OPTIONS = {
    "sequential_integrated_gradients": {"n_steps": 3, "internal_batch_size": 50},
    "discretized_integrated_gradients": {"n_steps": 4, "n_neighbors": 20, "internal_batch_size": 7},
}


@pytest.fixture(scope="module", params=ALL_ARCHS)
def wrapped(request):
    model, tokenizer = tiny_model(request.param)
    return instrument.load_model(model, tokenizer=tokenizer)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_batched_equals_step_by_step(wrapped, method):
    inputs, targets = (SOURCES, TRANSLATIONS) if wrapped.is_encoder_decoder else (SOURCES, DECODER_TARGETS)
    common = dict(
        method=method,
        show_progress=False,
        step_scores=["probability"],
        attribute_target=wrapped.is_encoder_decoder,
        **METHOD_OPTIONS[method],
    )
    batched = wrapped.attribute(inputs, targets, **common)
    reference = attribute_reference(wrapped, inputs, targets, **common)
    for got, expected in zip(batched, reference):
        assert_same(got.source_attributions, expected.source_attributions)
        assert_same(got.target_attributions, expected.target_attributions)
        torch.testing.assert_close(
            got.step_scores["probability"], expected.step_scores["probability"], rtol=1e-5, atol=1e-7
        )
        assert not got.target_attributions[got.attr_pos_start - 1 :].isnan().all()


def grad_at(c, p, attribute_target, points):
    """Gradient of f at step p w.r.t. each input of the tuple `points` (each [1, length, H])."""
    points = tuple(x.detach().clone().requires_grad_() for x in points)
    value = c.prob_fn(p, attribute_target)(*points).sum()
    return torch.autograd.grad(value, points)


def baseline_ids(c, ids, target=False):
    """UNK, EOS kept, and the decoder start token of an encoder-decoder target kept (Inseq's rule)."""
    base = torch.where(ids == c.tok.eos_token_id, ids, torch.full_like(ids, c.tok.unk_token_id))
    if target and c.enc_dec:
        base[0] = ids[0]
    return base


def unk_embeds(c, p, attribute_target):
    """`c.embeds` with UNK baselines, the decoder start token kept as it is on the target side."""
    inputs, baselines = c.embeds(p, attribute_target, c.tok.unk_token_id)
    if c.enc_dec and attribute_target:
        target_base = baselines[1].clone()
        target_base[:, 0] = inputs[1][:, 0]
        baselines = (baselines[0], target_base)
    return inputs, baselines


# -- SIG -----------------------------------------------------------------------------------------


def sig_by_hand(c, p, attribute_target, n_steps, rule="gausslegendre"):
    alphas, weights = approximation(rule, n_steps)
    inputs, baselines = unk_embeds(c, p, attribute_target)
    result = []
    for side, (x, b) in enumerate(zip(inputs, baselines)):
        attribution = torch.zeros_like(x[0])
        for i in range(x.shape[1]):
            for alpha, weight in zip(alphas, weights):
                moved = x.clone()
                moved[0, i] = b[0, i] + alpha * (x[0, i] - b[0, i])
                point = list(inputs)
                point[side] = moved
                attribution[i] += weight * grad_at(c, p, attribute_target, point)[side][0, i]
            attribution[i] *= x[0, i] - b[0, i]
        result.append(attribution)
    return result


@pytest.mark.parametrize(
    "arch, attribute_target", [("gpt2", False), ("llama", False), ("bart", True), ("t5", False), ("t5", True)]
)
def test_sig_equals_definition(arch, attribute_target):
    c = Case(arch)
    seq = c.attribute("sequential_integrated_gradients", n_steps=4, attribute_target=attribute_target)
    for j, p in enumerate(c.steps):
        for side, expected in zip(c.sides(attribute_target), sig_by_hand(c, p, attribute_target, 4)):
            close(c.ours(seq, j, p, side), expected)


def test_sig_approximation_method():
    """The integration rule per call (`approximation_method`) and at load time (`method`)."""
    c = Case("gpt2")
    seq = c.attribute("sequential_integrated_gradients", n_steps=4, approximation_method="riemann_right")
    for j, p in enumerate(c.steps):
        (expected,) = sig_by_hand(c, p, False, 4, rule="riemann_right")
        close(c.ours(seq, j, p, "target"), expected)
    wrapped = instrument.load_model(c.model, "sequential_integrated_gradients", tokenizer=c.tok, method="riemann_right")
    at_load = wrapped.attribute(*c.texts, n_steps=4, show_progress=False)[0]
    torch.testing.assert_close(at_load.target_attributions, seq.target_attributions, equal_nan=True)


def test_sig_completeness_per_token():
    """SIG's axiom: token i's attributions sum to f(x) - f(x with token i at its baseline)."""
    c = Case("gpt2")
    seq = c.attribute("sequential_integrated_gradients", n_steps=16)
    for j, p in enumerate(c.steps):
        (x,), (b,) = c.embeds(p, False, c.tok.unk_token_id)
        f = c.prob_fn(p)
        with torch.no_grad():
            at_input = f(x)
            for i in range(p):
                removed = x.clone()
                removed[0, i] = b[0, i]
                expected = at_input - f(removed)
                torch.testing.assert_close(
                    seq.target_attributions[i, j].sum().double(),
                    expected[0].double(),
                    rtol=1e-4,
                    atol=1e-6 * float(at_input),
                )


# -- DIG -----------------------------------------------------------------------------------------


def dig_monotonic(baseline, current, anchor):
    """Per dimension, as in the paper: anchor between baseline and current (equal if they are)."""
    out = []
    for b, x, a in zip(baseline.tolist(), current.tolist(), anchor.tolist()):
        if b > x:
            out.append(x <= a <= b)
        elif b < x:
            out.append(b <= a <= x)
        else:
            out.append(a == b == x)
    return out


def dig_monotonize(baseline, current, anchor, steps):
    ok = dig_monotonic(baseline, current, anchor)
    return torch.tensor(
        [
            a if good else x - (x - b) / steps
            for good, b, x, a in zip(ok, baseline.tolist(), current.tolist(), anchor.tolist())
        ],
        dtype=torch.float64,
    )


def dig_path_by_hand(features, word, ref, steps, strategy, k, special=False):
    """Anchor words (DIG's find_word_path), then monotonized points reversed (make_monotonic_path):
    `steps` points. A special token (Inseq's rule) sits at its baseline, then at itself."""
    if special:
        return torch.stack([features[ref]] + [features[word]] * (steps - 1))
    distances = torch.cdist(features, features)
    path, current = [word], word
    for _ in range(steps - 2):
        if current == ref:
            path.append(ref)
            continue
        order = [j for j in torch.argsort(distances[current], stable=True).tolist() if j != current][:k]
        scores = {}
        for j in order:
            if j == ref:
                continue
            if strategy == "greedy":
                moved = dig_monotonize(features[ref], features[current], features[j], steps)
                scores[j] = float(torch.sqrt(((features[j] - moved) ** 2).sum()))
            else:
                scores[j] = 10000 - sum(dig_monotonic(features[ref], features[current], features[j]))
        ranked = [j for j in sorted(scores, key=lambda j: scores[j]) if j not in path]
        current = ranked[0] if ranked else ref
        path.append(current)
    points = [features[path[0]]]
    for nxt in path[1:]:
        points.append(dig_monotonize(features[ref], points[-1], features[nxt], steps))
    points.append(features[ref])
    return torch.stack(points[::-1])


def upscale(points):
    out = []
    for a, b in zip(points[:-1], points[1:]):
        out += [a, 0.5 * (a + b)]
    return torch.stack(out + [points[-1]])


@pytest.mark.parametrize(
    "arch, attribute_target, strategy, factor",
    [
        ("gpt2", False, "greedy", 0),
        ("llama", False, "maxcount", 1),
        ("bart", True, "greedy", 0),
        ("t5", False, "maxcount", 0),
        ("t5", True, "greedy", 0),
    ],
)
def test_dig_equals_definition(arch, attribute_target, strategy, factor):
    c = Case(arch)
    steps, k = 5, 12
    seq = c.attribute(
        "discretized_integrated_gradients",
        n_steps=steps,
        n_neighbors=k,
        strategy=strategy,
        factor=factor,
        attribute_target=attribute_target,
        return_convergence_delta=True,
    )
    embeddings = [c.src_emb, c.tgt_emb] if c.enc_dec else [c.tgt_emb]
    vocab = c.tgt_emb.weight.shape[0]
    features = [emb(torch.arange(vocab)[None])[0].detach().double() for emb in embeddings]
    deltas = []
    for j, p in enumerate(c.steps):
        inputs, _ = c.embeds(p, attribute_target)
        ids = [c.source, c.target[:p]] if c.enc_dec else [c.target[:p]]
        paths = []
        for side, (side_ids, feats) in enumerate(zip(ids, features)):
            if side >= len(inputs):
                continue
            refs = baseline_ids(c, side_ids, target=side == 1)
            per_token = []
            for word, ref in zip(side_ids.tolist(), refs.tolist()):
                length = 2**factor * (steps - 1) + 1
                if word == ref:
                    per_token.append(feats[word].expand(length, -1))
                    continue
                points = dig_path_by_hand(feats, word, ref, steps, strategy, k, word in c.tok.all_special_ids)
                for _ in range(factor):
                    points = upscale(points)
                for a, b in zip(points[:-1], points[1:]):  # monotonic towards the input, as DIG checks
                    assert all(dig_monotonic(points[-1], a, b))
                per_token.append(points)
            paths.append(torch.stack(per_token, dim=1))  # [points, tokens, H]
        expected = [torch.zeros_like(path[0]) for path in paths]
        for point in range(len(paths[0]) - 1):
            grads = grad_at(c, p, attribute_target, tuple(path[point][None] for path in paths))
            for side, path in enumerate(paths):
                expected[side] += grads[side][0] * (path[point + 1] - path[point])
        for side, ref in zip(c.sides(attribute_target), expected):
            close(c.ours(seq, j, p, side), ref)
        with torch.no_grad():
            f = c.prob_fn(p, attribute_target)
            change = f(*(path[-1][None] for path in paths)) - f(*(path[0][None] for path in paths))
        deltas.append(float(sum(e.sum() for e in expected) - change))
    torch.testing.assert_close(
        seq.step_scores["deltas"].double(), torch.tensor(deltas, dtype=torch.float64), rtol=1e-4, atol=1e-9
    )


def test_dig_neighbours_cached_per_model_and_refreshed_when_weights_change():
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(
        model, "discretized_integrated_gradients", tokenizer=tokenizer, n_steps=3, n_neighbors=8
    )
    first = wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], show_progress=False)[0]
    vocab = Vocabulary.of(model.get_input_embeddings(), model.get_input_embeddings().weight.shape[0])
    assert vocab.neighbours and vocab.paths
    again = wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], show_progress=False)[0]
    assert Vocabulary.of(model.get_input_embeddings(), vocab.features.shape[0]) is vocab
    assert_same(again.target_attributions, first.target_attributions)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(2.0)
    assert Vocabulary.of(model.get_input_embeddings(), vocab.features.shape[0]) is not vocab
    features = 2 * vocab.features.double()
    distances = torch.cdist(features, features)[5]
    expected = [j for j in torch.argsort(distances, stable=True).tolist() if j != 5][:8]
    assert Vocabulary.of(model.get_input_embeddings(), vocab.features.shape[0]).knn(5, 8).tolist() == expected


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("discretized_integrated_gradients", {"strategy": "random"}, "strategy"),
        ("discretized_integrated_gradients", {"n_steps": 0}, "n_steps"),
        ("discretized_integrated_gradients", {"baselines": "zeros"}, "vocabulary tokens"),
        ("discretized_integrated_gradients", {"baselines": 10**6}, "outside the vocabulary"),
        ("sequential_integrated_gradients", {"n_steps": 0}, "n_steps"),
        ("sequential_integrated_gradients", {"internal_batch_size": 0}, "internal_batch_size"),
        ("sequential_integrated_gradients", {"baselines": "mask"}, "Unknown baselines"),
    ],
)
def test_bad_options(method, options, match):
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=match):
        wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], method=method, show_progress=False, **options)
