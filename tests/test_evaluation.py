"""Faithfulness and plausibility evaluation (`instrument.evaluation`): every metric against explicit masked
forwards run one by one on fixture models, the bootstrap, bad input, the CLI, and a sanity check on demo-mt.
"""

import copy
import json
import math
import types
from collections import defaultdict

import numpy as np
import pytest
import torch

import instrument
from instrument.evaluation import token_seed
from instrument.evaluation_table import summarize

from tiny_models import tiny_model

TEXTS = {
    "marian": (["The capital of France is Paris.", "Hello world"], ["Paris is the capital.", "Good morning to you"]),
    "gpt2": (
        ["The capital of France is", "Hello world, this"],
        ["The capital of France is Paris.", "Hello world, this is a test."],
    ),
}


@pytest.fixture(scope="module", params=["marian", "gpt2"])
def case(request):
    hf, tokenizer = tiny_model(request.param, seed=0)
    model = instrument.load_model(hf, "saliency", tokenizer=tokenizer)
    inputs, targets = TEXTS[request.param]
    out = model.attribute(inputs, targets, attribute_target=request.param == "marian", show_progress=False)
    return model, out


def one_prob(model, source, prefix, token, soft=None):
    """The probability of `token` after one forward of one input; `soft`: {embedding module: (keep mask
    [length, hidden], baseline embedding [hidden])} replaces masked embedding elements."""
    hf = model.model
    handles = []
    for module, (keep, base) in (soft or {}).items():
        handles.append(module.register_forward_hook(lambda m, a, out, k=keep, b=base: torch.where(k, out, b)))
    try:
        with torch.no_grad():
            if source is None:
                logits = hf(input_ids=torch.tensor([prefix])).logits
            else:
                logits = hf(input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([prefix])).logits
    finally:
        for handle in handles:
            handle.remove()
    return float(logits[0, -1].float().softmax(-1)[token])


def reference(model, out, side, removal, cutoffs, seed, random=False):
    """Every metric's per-token values, written out: explicit masked forwards, one by one."""
    hf, tok = model.model, model.tokenizer
    enc_dec = model.is_encoder_decoder
    special = {tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id}
    special |= {getattr(hf.config, "decoder_start_token_id", None), getattr(hf.config, "bos_token_id", None)}
    values = defaultdict(list)
    for b, seq in enumerate(out):
        agg = seq.aggregate()
        src = [t.id for t in seq.source] if enc_dec else None
        tgt = [t.id for t in seq.target]
        start = seq.attr_pos_start
        for j, p in enumerate(range(start, seq.attr_pos_end)):
            cands = []  # (side, index, score), in position order
            if enc_dec:
                if side in ("source", "both"):
                    cands += [("source", i, float(agg.source_attributions[i, j])) for i in range(len(src))]
                if side in ("target", "both"):
                    cands += [("target", i, float(agg.target_attributions[i, j])) for i in range(1, p)]
            else:
                if side in ("source", "both"):
                    cands += [("target", i, float(agg.target_attributions[i, j])) for i in range(0, min(start, p))]
                if side in ("target", "both"):
                    cands += [("target", i, float(agg.target_attributions[i, j])) for i in range(start, p)]
            cands = [c for c in cands if (src if c[0] == "source" else tgt)[c[1]] not in special]
            n = len(cands)
            if n == 0:
                continue
            if random:
                g = torch.Generator().manual_seed(token_seed(seed, b, p, salt=1))
                scores = torch.rand(n, generator=g, dtype=torch.float64).tolist()
            else:
                scores = [c[2] for c in cands]
            order = sorted(range(n), key=lambda k: -scores[k])
            ranked = [cands[k][:2] for k in order]

            def prob(removed):
                def cut(ids, name):
                    if removal == "delete":
                        return [t for i, t in enumerate(ids) if (name, i) not in removed]
                    return [tok.unk_token_id if (name, i) in removed else t for i, t in enumerate(ids)]

                prefix = cut(tgt[:p], "target")
                if not prefix:
                    return math.nan
                return one_prob(model, cut(src, "source") if enc_dec else None, prefix, tgt[p])

            p0, p_null = prob(set()), prob(set(ranked))
            comp = [p0 - prob(set(ranked[: max(1, math.ceil(k * n / 100))])) for k in cutoffs]
            suff = [p0 - prob(set(ranked[max(1, math.ceil(k * n / 100)) :])) for k in cutoffs]
            for k, c, s in zip(cutoffs, comp, suff):
                values[f"comprehensiveness@{k:g}"].append(c)
                values[f"sufficiency@{k:g}"].append(s)
            values["comprehensiveness_aopc"].append(sum(comp) / len(comp))
            values["sufficiency_aopc"].append(sum(suff) / len(suff))
            deletion = [prob(set(ranked[:i])) for i in range(n + 1)]
            insertion = [prob(set(ranked[i:])) for i in range(n + 1)]
            values["deletion_auc"].append(float(np.trapezoid(deletion, dx=1 / n)) if n else deletion[0])
            values["insertion_auc"].append(float(np.trapezoid(insertion, dx=1 / n)) if n else insertion[0])
            # soft: min-max normalised scores; element kept where u >= s (comp) or u < s (suff)
            s = torch.tensor(scores, dtype=torch.float64)
            s = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else torch.full_like(s, 0.5)
            embed_modules = {"source": hf.get_encoder().get_input_embeddings(), "target": hf.get_input_embeddings()}
            if enc_dec:
                embed_modules["target"] = hf.get_decoder().get_input_embeddings()
            hidden = embed_modules["target"].weight.shape[1]
            u = torch.rand(
                n, hidden, generator=torch.Generator().manual_seed(token_seed(seed, b, p)), dtype=torch.float64
            )
            soft_probs = []
            for keep in (u >= s[:, None], u < s[:, None]):
                masks = {}
                for k, (name, i) in enumerate(c[:2] for c in cands):
                    length = len(src) if name == "source" else p
                    module = embed_modules[name]
                    masks.setdefault(name, torch.ones(1, length, hidden, dtype=torch.bool))[0, i] = keep[k]
                soft = {}
                for name, mask in masks.items():
                    module = embed_modules[name]
                    soft[module] = (mask, module(torch.tensor([tok.unk_token_id]))[0].detach())
                soft_probs.append(one_prob(model, src, tgt[:p], tgt[p], soft))
            d = max(0.0, p0 - p_null)
            values["soft_denominator"].append(d)
            values["soft_comprehensiveness"].append(max(0.0, p0 - soft_probs[0]) / d if d > 0 else math.nan)
            suff_soft = 1 - max(0.0, p0 - soft_probs[1])
            values["soft_sufficiency"].append((suff_soft - (1 - d)) / d if d > 0 else math.nan)
    return values


def assert_close(actual, expected, what, scale=None):
    """Equal to 1e-6 (times `scale`), NaN where expected is NaN."""
    assert len(actual) == len(expected), what
    a, e = np.array(actual, dtype=float), np.array(expected, dtype=float)
    assert np.array_equal(np.isnan(a), np.isnan(e)), what
    tolerance = 1e-6 * (np.ones_like(e) if scale is None else np.asarray(scale, dtype=float))
    finite = ~np.isnan(e)
    assert (np.abs(a - e)[finite] <= tolerance[finite]).all(), (what, a, e)


@pytest.mark.parametrize("side,removal", [(None, "baseline"), ("both", "delete"), ("target", "baseline")])
def test_every_metric_equals_explicit_masked_forwards(case, side, removal):
    model, out = case
    cutoffs = (10, 50, 100)
    table = out.evaluate(model, cutoffs=cutoffs, side=side, removal=removal, seed=3, n_bootstrap=50, batch_size=7)
    effective = side or ("both" if model.is_encoder_decoder else "both")
    for label, random in (("saliency", False), ("random", True)):
        expected = reference(model, out, effective, removal, cutoffs, seed=3, random=random)
        assert set(expected) - {"soft_denominator"} == set(table.values[label])
        for column, values in expected.items():
            if column == "soft_denominator":
                continue
            # soft metrics divide by d = max(0, p0 - p_null), often tiny on a random model: 1e-6 before dividing
            scale = [max(1.0, 1 / d) if d > 0 else 1.0 for d in expected["soft_denominator"]]
            assert_close(table.values[label][column], values, (label, column), scale if "soft" in column else None)
            stat = table.rows[label][column]
            finite = [v for v in table.values[label][column] if math.isfinite(v)]
            assert stat["n"] == len(finite)
            assert stat["mean"] == pytest.approx(np.mean(finite), abs=1e-12) if finite else math.isnan(stat["mean"])


def test_batching_does_not_change_the_values(case):
    model, out = case
    one = out.evaluate(model, ["comprehensiveness", "insertion"], cutoffs=(20,), batch_size=1, n_bootstrap=10)
    many = out.evaluate(model, ["comprehensiveness", "insertion"], cutoffs=(20,), batch_size=1000, n_bootstrap=10)
    for column in one.metrics:
        assert_close(one.values["saliency"][column], many.values["saliency"][column], column)


def test_inputs_are_shared_not_one_forward_per_token_and_cutoff(case, monkeypatch):
    """All cut-offs, tokens and examples share forwards: with a large batch, one forward in all."""
    model, out = case
    calls = []
    original = model.engine.forward_steps
    monkeypatch.setattr(model.engine, "forward_steps", lambda *a, **k: calls.append(1) or original(*a, **k))
    out.evaluate(model, ["comprehensiveness", "sufficiency", "deletion"], batch_size=10_000, n_bootstrap=10)
    assert len(calls) == 1


def test_plausibility_against_reference_alignments(case):
    model, out = case
    if not model.is_encoder_decoder:
        alignments = [[(0, 1), (1, 2), (1, 3)], [(0, 0)]]
    else:
        alignments = [[(0, 1), (1, 2), (2, 0), (2, 1)], [(1, 0)]]
    table = out.evaluate(model, ["plausibility"], alignments=alignments, n_bootstrap=10)
    aer, top1 = [], []
    for seq, pairs in zip(out, alignments):
        agg = seq.aggregate()
        scores = agg.source_attributions if model.is_encoder_decoder else agg.target_attributions
        tokens = seq.source if model.is_encoder_decoder else seq.target[: seq.attr_pos_start]
        allowed = [i for i, t in enumerate(tokens) if t.token not in ("</s>", "<pad>", "<unk>", "<s>")]
        gold = set(pairs)
        predicted = {(j, max(allowed, key=lambda i: float(scores[i, j]))) for j in sorted({j for j, _ in pairs})}
        top1 += [float(any((j, i) in gold for (jj, i) in predicted if jj == j)) for j in sorted({j for j, _ in pairs})]
        aer.append(1 - 2 * len(predicted & gold) / (len(predicted) + len(gold)))
    assert_close(table.values["saliency"]["aer"], aer, "aer")
    assert_close(table.values["saliency"]["top1_accuracy"], top1, "top1")
    assert len(table.values["random"]["aer"]) == 2


def test_summarize_is_the_mean_with_a_percentile_bootstrap_ci():
    values = [0.1, 0.5, 0.2, float("nan"), 0.9, 0.4]
    stat = summarize(values, n_bootstrap=2000, seed=1)
    finite = np.array([0.1, 0.5, 0.2, 0.9, 0.4])
    rng = np.random.default_rng(1)
    means = finite[rng.integers(0, 5, size=(2000, 5))].mean(1)
    assert stat == {"mean": finite.mean(), "low": np.percentile(means, 2.5), "high": np.percentile(means, 97.5), "n": 5}
    assert math.isnan(summarize([float("nan")])["mean"])


def test_table_views(case, tmp_path):
    model, out = case
    table = out.evaluate(model, ["comprehensiveness", "deletion"], cutoffs=(50,), n_bootstrap=10)
    assert table.metrics == ["comprehensiveness@50", "comprehensiveness_aopc", "deletion_auc"]
    assert list(table.rows) == ["saliency", "random"]
    data = table.to_dict()
    json.dumps(data)
    assert data["rows"]["saliency"]["deletion_auc"]["n"] == len(table.values["saliency"]["deletion_auc"])
    assert len(data["curves"]["saliency"]["deletion"]) == 11
    pandas = pytest.importorskip("pandas")
    frame = table.to_pandas()
    assert isinstance(frame, pandas.DataFrame) and list(frame.index) == ["saliency", "random"]
    assert frame.loc["saliency", "deletion_auc"] == data["rows"]["saliency"]["deletion_auc"]["mean"]
    from rich.console import Console

    console = Console(record=True, width=200)
    table.show(console=console)
    text = console.export_text()
    assert "deletion_auc ↓" in text and "saliency" in text
    merged = table + out.evaluate(model, ["comprehensiveness", "deletion"], cutoffs=(50,), method="again")
    assert list(merged.rows) == ["saliency", "again", "random"]
    single = out[0].evaluate(model, ["deletion"], method="first")  # one sequence works too
    assert isinstance(single, instrument.EvaluationTable) and list(single.rows) == ["first", "random"]
    n_first = len(single.values["first"]["deletion_auc"])
    assert_close(single.values["first"]["deletion_auc"], table.values["saliency"]["deletion_auc"][:n_first], "one")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cutoffs": (0, 10)}, "cutoffs"),
        ({"cutoffs": (101,)}, "cutoffs"),
        ({"cutoffs": ("10",)}, "cutoffs"),
        ({"metrics": ["nope"]}, "metrics"),
        ({"metrics": ["plausibility"]}, "alignments"),
        ({"removal": "zero"}, "removal"),
        ({"baseline": "mask"}, "baseline"),
        ({"side": "middle"}, "side"),
        ({"batch_size": 0}, "batch_size"),
        ({"alignments": [[(0, 0)]]}, "alignments"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(case, kwargs, message):
    model, out = case
    with pytest.raises(ValueError, match=message):
        out.evaluate(model, **kwargs)


def test_tokens_not_of_the_models_tokenizer_are_refused(case):
    model, out = case
    broken = copy.deepcopy(out)
    first = broken[0].target[1]
    broken[0].target[1] = type(first)(first.token + "x", first.id)
    with pytest.raises(ValueError, match="do not match the model's tokenizer"):
        broken.evaluate(model)
    with pytest.raises(TypeError, match="model"):
        out.evaluate(model.model)


def test_a_missing_baseline_token_is_a_clear_error(case):
    model, out = case
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.unk_token = None
    assert tokenizer.unk_token_id is None
    fake = types.SimpleNamespace(engine=model.engine, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="baseline: the tokenizer has no UNK token"):
        out.evaluate(fake, ["comprehensiveness"])
    with pytest.raises(ValueError, match="baseline: the tokenizer has no UNK token"):
        out.evaluate(fake, ["soft_sufficiency"], removal="delete")
    assert out.evaluate(fake, ["comprehensiveness"], removal="delete").rows["saliency"]


def test_cli_evaluate_prints_writes_json_and_plot(tmp_path, capsys):
    from instrument.cli import main
    from instrument.demo import alignment_examples

    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"input": s, "target": t, "alignment": a}) for s, t, a in alignment_examples(3, seed=1))
    )
    argv = ["evaluate", "-m", "demo-mt", "-a", "saliency", "-a", "attention", "-f", str(data)]
    argv += ["--metrics", "comprehensiveness", "deletion", "plausibility", "--cutoffs", "10", "50"]
    argv += ["--json", str(tmp_path / "e.json")]
    plots = True
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(tmp_path / "e.png")]
    except ImportError:
        plots = False
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "saliency" in printed and "attention" in printed and "random" in printed
    saved = json.loads((tmp_path / "e.json").read_text())
    assert list(saved["rows"]) == ["saliency", "attention", "random"]
    assert {"comprehensiveness@10", "deletion_auc", "aer", "top1_accuracy"} <= set(saved["rows"]["saliency"])
    assert saved["seconds"]["saliency"] > 0
    if plots:
        assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv[:9] + ["--cutoffs", "0"]) == 2
    assert "cutoffs" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_mt_methods_beat_random_outside_both_confidence_intervals():
    """200 fresh (held-out) demo-mt examples: integrated gradients, saliency and attention each beat
    random attributions on comprehensiveness AOPC and deletion AUC, the CIs apart."""
    from instrument.demo import alignment_examples, model_path

    mt = instrument.load_model(model_path("demo-mt"), "integrated_gradients", n_steps=6)
    examples = alignment_examples(200, seed=99)
    sources, targets = [s for s, _, _ in examples], [t for _, t, _ in examples]
    for method in ("integrated_gradients", "saliency", "attention"):
        out = mt.attribute(sources, targets, method=method, show_progress=False)
        table = out.evaluate(mt, ["comprehensiveness", "deletion"], cutoffs=(10, 20, 50), n_bootstrap=300)
        ours, chance = table.rows[method], table.rows["random"]
        assert ours["comprehensiveness_aopc"]["low"] > chance["comprehensiveness_aopc"]["high"], method
        assert ours["deletion_auc"]["high"] < chance["deletion_auc"]["low"], method


def test_chunks_bound_the_logits_and_the_batch():
    from instrument.evaluation import _chunks

    hosts = [(None, (1,), None, [0] * reads) for reads in (1, 3, 2, 5, 1, 1)]
    chunks = list(_chunks(hosts, batch_size=3, vocab=10, budget=60))
    assert [len(h[3]) for chunk in chunks for h in chunk] == [1, 3, 2, 5, 1, 1]  # all, in order
    for chunk in chunks:
        assert len(chunk) <= 3 and (len(chunk) == 1 or len(chunk) * max(len(h[3]) for h in chunk) * 10 <= 60)
