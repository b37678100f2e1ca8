"""Inseq's public surface on outputs, checked against Inseq itself on the same tiny models: score dicts,
weighting, views, `explain`, Inseq's files in both directions, aggregation names, callable step scores.

    inseq_out, ours = both("gpt2");  ours.get_scores_dicts() ~ inseq_out.get_scores_dicts()
"""

import copy
import gzip
import io
import json
import math
import re
import warnings
from html import escape as html_escape

import numpy as np
import pytest
import torch
from rich.console import Console

import instrument
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId

from tiny_models import tiny_model

NAN = float("nan")
CASES = {  # name: (arch, input, target, attribute_target)
    "decoder_only": ("gpt2", "Hello world", "Hello world, this is", False),
    "encoder_decoder_target": ("bart", "Hello world", "Le chat.", True),
    "encoder_decoder_source": ("bart", "Hello world", "Le chat.", False),
}


def import_inseq():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("inseq")


@pytest.fixture(scope="module")
def both():
    """The same saliency attribution (with probability step scores) by Inseq and by us, per case."""
    inseq = import_inseq()
    results, models = {}, {}
    for name, (arch, source, target, attribute_target) in CASES.items():
        if arch not in models:
            model, tok = tiny_model(arch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                models[arch] = (
                    inseq.load_model(model, "saliency", tokenizer=copy.deepcopy(tok)),
                    instrument.load_model(model, "saliency", tokenizer=tok),
                )
        theirs, ours = models[arch]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[name] = (
                theirs.attribute(
                    source, target, step_scores=["probability"], attribute_target=attribute_target, show_progress=False
                ),
                ours.attribute(
                    source, target, step_scores=["probability"], attribute_target=attribute_target, show_progress=False
                ),
            )
    return results


def close(actual, expected, atol=1e-6):
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual.isnan(), expected.isnan())
    torch.testing.assert_close(actual.nan_to_num(), expected.nan_to_num(), rtol=1e-5, atol=atol)


def same_scores_dicts(ours, theirs):
    assert ours.keys() == theirs.keys()
    for field in ours:
        assert ours[field].keys() == theirs[field].keys(), field
        for step in ours[field]:
            assert ours[field][step].keys() == theirs[field][step].keys(), (field, step)
            for key, value in ours[field][step].items():
                other = theirs[field][step][key]
                assert (math.isnan(value) and math.isnan(other)) or math.isclose(
                    value, other, rel_tol=1e-5, abs_tol=1e-7
                ), (field, step, key, value, other)


def decoder_only_with_prompt(hidden=(3,), seed=0):
    """A decoder-only sequence as it comes from the model: prompt tokens in `source`, no source attributions."""
    torch.manual_seed(seed)
    target = [TokenWithId(t, i) for i, t in enumerate(["▁Hel", "lo", "▁world", ",", "▁this", "▁is"])]
    scores = torch.randn(6, 3, *hidden)
    for j, position in enumerate(range(3, 6)):
        scores[position:, j] = NAN
    return FeatureAttributionSequenceOutput(
        source=target[:3],
        target=target,
        source_attributions=None,
        target_attributions=scores,
        step_scores={"probability": torch.tensor([0.5, 0.25, 0.125])},
        attr_pos_start=3,
        attr_pos_end=6,
    )


def recorder():
    return Console(record=True, width=200, file=io.StringIO(), color_system="truecolor", force_terminal=True)


# -- A: surface ------------------------------------------------------------------------------------------


def test_inseq_top_level_names_exist():
    inseq = import_inseq()
    for name in [
        "show_attributions",
        "show_granular_attributions",
        "show_token_attributions",
        "explain",
        "merge_attributions",
        "list_aggregators",
        "list_aggregation_functions",
        "list_step_functions",
        "list_feature_attribution_methods",
        "load_model",
        "FeatureAttributionOutput",
        "register_step_function",
    ]:
        assert name in inseq.__all__ and name in instrument.__all__ and callable(getattr(instrument, name)), name
    for name in [
        "get_scores_dicts",
        "weight_attributions",
        "show_granular",
        "show_tokens",
        "show",
        "aggregate",
        "save",
    ]:
        assert callable(getattr(FeatureAttributionOutput, name)) and callable(
            getattr(inseq.FeatureAttributionOutput, name)
        )
    for name in ["to", "torch", "numpy", "get_scores_dicts", "weight_attributions", "show_granular", "show_tokens"]:
        assert callable(getattr(FeatureAttributionSequenceOutput, name))
    assert isinstance(FeatureAttributionSequenceOutput.minimum, property) and isinstance(
        FeatureAttributionSequenceOutput.maximum, property
    )


def test_explain(capsys):
    inseq = import_inseq()
    import methods

    for identifier, doc in [
        ("saliency", methods.get_method("saliency").__doc__),
        ("vnorm", instrument.reductions.vnorm.__doc__),
        ("subwords", instrument.aggregators.subwords.__doc__),
        ("probability", instrument.steps.probability.__doc__),
    ]:
        instrument.explain(identifier)
        printed = capsys.readouterr().out
        assert doc.strip().splitlines()[0] in printed and identifier in printed
        inseq.explain(identifier)  # Inseq knows the same identifiers
        assert capsys.readouterr().out.strip()
    for unknown in ["no_such_method", ""]:
        with pytest.raises(ValueError):
            inseq.explain(unknown)
        with pytest.raises(ValueError, match="Unknown identifier"):
            instrument.explain(unknown)


@pytest.mark.parametrize("case", list(CASES))
def test_get_scores_dicts_matches_inseq(both, case):
    theirs, ours = both[case]
    same_scores_dicts(ours.get_scores_dicts()[0], theirs.get_scores_dicts()[0])
    same_scores_dicts(ours[0].get_scores_dicts(), theirs[0].get_scores_dicts())
    for aggregator in ["sum", ["vnorm"]]:  # an explicit aggregator, as Inseq takes it
        same_scores_dicts(ours[0].get_scores_dicts(aggregator), theirs[0].get_scores_dicts(aggregator))
    with pytest.raises(ValueError, match="aggregate to 2-D"):
        ours[0].get_scores_dicts(do_aggregation=False)


@pytest.mark.parametrize("case", list(CASES))
def test_weight_attributions_matches_inseq(both, case, tmp_path):
    theirs, ours = both[case]
    theirs, ours = copy.deepcopy(theirs), copy.deepcopy(ours)
    before = ours[0].aggregate()
    theirs.weight_attributions("probability")
    assert ours.weight_attributions("probability") is ours  # in place, as Inseq
    for name in ("source_attributions", "target_attributions"):
        if getattr(theirs[0], name) is None:
            assert getattr(ours[0], name) is None
            continue
        close(getattr(ours[0], name), getattr(theirs[0], name), atol=1e-9)
        close(getattr(ours[0], name), getattr(before, name) * ours[0].step_scores["probability"], atol=1e-9)
    same_scores_dicts(ours.get_scores_dicts()[0], theirs.get_scores_dicts()[0])  # no renormalization afterwards
    assert ours[0].aggregate().equals(ours[0])
    assert "probability" in ours.show(return_html=True, display=False)
    for name in ("w.json", "w.safetensors"):  # saved with it: aggregate() still does nothing more after loading
        loaded = FeatureAttributionOutput.load(ours.save(tmp_path / name))
        assert loaded[0].aggregate().equals(ours[0]) and loaded[0]._aggregator == []
    with pytest.raises(ValueError, match="No step score 'entropy'"):
        ours[0].weight_attributions("entropy")


@pytest.mark.parametrize("case", list(CASES))
def test_minimum_maximum_numpy_torch_to_match_inseq(both, case):
    theirs, ours = both[case]
    seq, other = copy.deepcopy(ours[0]), copy.deepcopy(theirs[0])
    assert math.isclose(seq.minimum, other.minimum, abs_tol=1e-9) and math.isclose(
        seq.maximum, other.maximum, rel_tol=1e-5
    )
    assert seq.numpy() is seq
    other.numpy()
    field = "target_attributions" if seq.target_attributions is not None else "source_attributions"
    assert isinstance(getattr(seq, field), np.ndarray) and isinstance(seq.step_scores["probability"], np.ndarray)
    np.testing.assert_allclose(getattr(seq, field), getattr(other, field), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(seq.step_scores["probability"], other.step_scores["probability"], rtol=1e-5)
    assert math.isclose(seq.maximum, ours[0].maximum)  # also on numpy arrays (Inseq's raises there)
    assert seq.torch() is seq and isinstance(getattr(seq, field), torch.Tensor)
    assert seq.equals(ours[0])
    assert seq.to(torch.float64) is seq and getattr(seq, field).dtype == torch.float64
    assert seq.step_scores["probability"].dtype == torch.float64
    assert seq.to("cpu").step_scores["probability"].device.type == "cpu"


def test_minimum_maximum_by_hand():
    seq = decoder_only_with_prompt(hidden=())
    assert seq.minimum == min(0.0, float(seq.target_attributions.nan_to_num().min()))
    assert seq.maximum == float(seq.target_attributions.nan_to_num().max())
    positive = FeatureAttributionSequenceOutput(
        [],
        [TokenWithId("a", 1), TokenWithId("b", 2)],
        None,
        torch.tensor([[0.5], [NAN]]),
        attr_pos_start=1,
        attr_pos_end=2,
    )
    assert positive.minimum == 0.0 and positive.maximum == 0.5  # both bounded by 0, as Inseq


# -- A: views ------------------------------------------------------------------------------------------


TITLE = re.compile(r'title="([^"]*)"')


def test_show_tokens_values_and_options(both):
    _, ours = both["encoder_decoder_target"]
    seq = ours[0].aggregate()
    html = ours.show_tokens(return_html=True, display=False, step_score_highlight="probability", wrap_after=2)
    assert "with probability highlights" in html and html.count("<details>") == len(seq.generated)
    for j, token in enumerate(seq.generated):
        assert f'Source attributions for "{html_escape(token.token.strip())}"' in html
    first = html.split("<details>")[1]  # the first generated token: source scores, then its target prefix
    titles = [float(x) for x in TITLE.findall(first)[1:]]  # after the generated token's own label
    expected = seq.source_attributions[:, 0].tolist() + seq.target_attributions[: seq.attr_pos_start, 0].tolist()
    np.testing.assert_allclose(titles, expected, rtol=1e-6)
    assert first.count("<br>") >= len(seq.source) // 2
    cleaned = ours.show_tokens(return_html=True, display=False, replace_char={"Ġ": "_"})
    assert "_c" in cleaned and "Ġ" not in cleaned
    console = recorder()
    assert ours.show_tokens(console=console) is None
    assert "Source attributions for" in console.export_text()
    with pytest.raises(ValueError, match="No step score 'entropy'"):
        ours.show_tokens(return_html=True, display=False, step_score_highlight="entropy")
    with pytest.raises(ValueError, match="show_tokens needs one score per token"):
        ours.show_tokens(return_html=True, display=False, do_aggregation=False)
    same = instrument.show_token_attributions(ours.aggregate(), display=False, return_html=True)
    assert same == ours.show_tokens(return_html=True, display=False)


def test_show_granular_panels(both):
    _, ours = both["encoder_decoder_target"]
    seq = ours[0]
    html = seq.show_granular(slice_dims={2: (3, 6)}, display=False, return_html=True)
    assert html.count("<table") == 3 and "dim 2 = 2" in html
    # the first panel holds hidden unit 3: its first cell is source token 0 at step 0
    cells = [float(x) for x in re.findall(r'<td[^>]*title="([^"]*)"', html.split("<table")[1])]
    assert math.isclose(cells[0], float(seq.source_attributions[0, 0, 3]), rel_tol=1e-6)
    with pytest.raises(ValueError, match="more than max_show_size=20"):
        seq.show_granular(display=False, return_html=True)
    with pytest.raises(ValueError, match="slice_dims keys"):
        seq.show_granular(slice_dims={1: (0, 2)}, display=False, return_html=True)
    assert seq.show_granular(max_show_size=32, display=False, return_html=True).count("<table") == 32
    console = recorder()
    ours.show_granular(slice_dims={2: (0, 2)}, console=console)
    assert "dim 2 = 1" in console.export_text()
    assert (
        instrument.show_granular_attributions(seq, slice_dims={2: (0, 1)}, display=False, return_html=True).count(
            "<table"
        )
        == 1
    )
    layered = FeatureAttributionSequenceOutput(
        [], seq.target, None, torch.randn(len(seq.target), 7, 2, 3), attr_pos_start=1, attr_pos_end=8
    )
    assert (
        layered.show_granular(show_dim=2, slice_dims={3: (1, 2)}, display=False, return_html=True).count("<table") == 2
    )
    with pytest.raises(ValueError, match="slice the other extra dimensions"):
        layered.show_granular(show_dim=2, display=False, return_html=True)


def test_show_attributions_takes_aggregated_sequences(both):
    _, ours = both["encoder_decoder_target"]
    aggregated = ours.aggregate()
    html = instrument.show_attributions(aggregated[0], display=False, return_html=True)
    assert html == aggregated.show(return_html=True, display=False, aggregate=False)
    fixed = instrument.show_attributions([aggregated[0]], max_val=10.0, display=False, return_html=True)
    assert fixed != html  # the colour scale follows max_val
    with pytest.raises(ValueError, match="aggregate first"):
        instrument.show_attributions(ours[0], display=False, return_html=True)
    assert ours.show(aggregator="vnorm", return_html=True, display=False) == ours.aggregate("vnorm").show(
        aggregate=False, return_html=True, display=False
    )
    scaled = ours.show(min_val=-10.0, max_val=10.0, return_html=True, display=False)  # Inseq's colour bounds
    assert scaled == instrument.show_attributions(
        aggregated, min_val=-10.0, max_val=10.0, display=False, return_html=True
    )
    assert scaled != ours.show(return_html=True, display=False)


def test_decoder_only_prompt_in_source_without_source_attributions(tmp_path):
    seq = decoder_only_with_prompt()
    out = FeatureAttributionOutput([seq], info={"attribution_method": "saliency"})
    aggregated = out.aggregate()
    assert aggregated[0].source == seq.source and aggregated[0].source_attributions is None
    words = out.aggregate(["vnorm", "subwords"])
    assert [t.token for t in words[0].source] == ["▁Hello", "▁world"]
    assert [t.token for t in words[0].target] == ["▁Hello", "▁world,", "▁this", "▁is"]
    sliced = seq[1:3]  # the prompt (target rows and the prompt in source), as Inseq's slices
    assert sliced.source == seq.source[1:3] and sliced.target == seq.target[1:]
    assert (sliced.attr_pos_start, sliced.attr_pos_end) == (2, 5)
    close(sliced.target_attributions, seq.target_attributions[1:])
    with pytest.raises(ValueError, match="no source attributions"):
        seq.aggregate("slices", source_spans=(0, 2))
    scores = out.get_scores_dicts()[0]
    assert scores["source_attributions"] == {} and len(scores["target_attributions"]) == 3
    assert list(scores["target_attributions"][(3, ",")]) == [(i, t.token) for i, t in enumerate(seq.target)]
    html = out.show(return_html=True, display=False)
    assert html.count('<tbody class="source"') == 0 and '<tbody class="target"' in html
    assert "Source attributions" not in out.show_tokens(return_html=True, display=False)
    assert out.show_granular(display=False, return_html=True).count("<table") == 3
    for name, kwargs in [("a.safetensors", {}), ("a.json", {}), ("a.json.gz", {}), ("inseq.json", {"format": "inseq"})]:
        out.save(tmp_path / name, **kwargs)
        loaded = FeatureAttributionOutput.load(tmp_path / name)
        assert loaded.equals(out), name
    weighted = copy.deepcopy(seq).weight_attributions("probability")
    close(weighted.target_attributions, seq.aggregate().target_attributions * seq.step_scores["probability"])


# -- B: Inseq's files ---------------------------------------------------------------------------------


def same_as_inseq(ours, theirs):
    assert len(ours) == len(theirs)
    for seq, other in zip(ours, theirs):
        assert [(t.token, t.id) for t in seq.source] == [(t.token, t.id) for t in other.source]
        assert [(t.token, t.id) for t in seq.target] == [(t.token, t.id) for t in other.target]
        assert (seq.attr_pos_start, seq.attr_pos_end) == (other.attr_pos_start, other.attr_pos_end)
        for name in ("source_attributions", "target_attributions"):
            mine, theirs_ = getattr(seq, name), getattr(other, name)
            assert (mine is None) == (theirs_ is None), name
            if mine is not None:
                assert torch.equal(mine.isnan(), theirs_.isnan()) and torch.equal(
                    mine.nan_to_num(), theirs_.nan_to_num()
                )
        assert seq.step_scores.keys() == (other.step_scores or {}).keys()
        for key, value in seq.step_scores.items():
            assert torch.equal(value, other.step_scores[key])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("compress", [False, True])
def test_load_inseq_files(both, case, compress, tmp_path):
    inseq = import_inseq()
    theirs, _ = both[case]
    path = tmp_path / ("inseq.json" + (".gz" if compress else ""))
    theirs.save(str(path), compress=compress)
    loaded = FeatureAttributionOutput.load(path)
    reference = inseq.FeatureAttributionOutput.load(str(path), decompress=compress)
    same_as_inseq(loaded, reference)
    for key in (
        "attribution_method",
        "attribute_target",
        "step_scores",
        "input_texts",
        "generated_texts",
        "model_class",
    ):
        assert loaded.info[key] == theirs.info[key]
    other_name = tmp_path / "no_extension"
    other_name.write_bytes(path.read_bytes())  # found from the content, not the name
    assert FeatureAttributionOutput.load(other_name).equals(loaded)


@pytest.mark.parametrize("case", list(CASES))
def test_loaded_inseq_file_equals_our_attribution(both, case, tmp_path):
    """Inseq's saved attribution reads back as what we compute for the same model and texts."""
    theirs, ours = both[case]
    theirs.save(str(tmp_path / "inseq.json"))
    loaded = FeatureAttributionOutput.load(tmp_path / "inseq.json")
    if loaded[0].source and ours[0].source == []:  # decoder-only: this checkout may not carry the prompt in source yet
        loaded[0].source = []
    assert loaded[0].equals(ours[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["ours.json", "ours.json.gz"])
def test_save_for_inseq(both, case, name, tmp_path):
    inseq = import_inseq()
    theirs, ours = both[case]
    path = ours.save(tmp_path / name, format="inseq")
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    reloaded = inseq.FeatureAttributionOutput.load(str(path), decompress=name.endswith(".gz"))
    same_as_inseq(ours, reloaded)
    assert reloaded.info["step_scores"] == ["probability"] and reloaded.info["attribution_method"] == "saliency"
    # Inseq's own default aggregation of the reloaded file is ours
    close(
        reloaded[0].aggregate().target_attributions
        if ours[0].target_attributions is not None
        else reloaded[0].aggregate().source_attributions,
        ours[0].aggregate().target_attributions
        if ours[0].target_attributions is not None
        else ours[0].aggregate().source_attributions,
    )
    assert FeatureAttributionOutput.load(path).equals(ours)
    half = ours.save(tmp_path / ("half_" + name), format="inseq", scores_precision="float16")
    halved = inseq.FeatureAttributionOutput.load(str(half), decompress=name.endswith(".gz"))
    close(
        halved[0].target_attributions if ours[0].target_attributions is not None else halved[0].source_attributions,
        (ours[0].target_attributions if ours[0].target_attributions is not None else ours[0].source_attributions)
        .half()
        .float(),
    )


def test_broken_inseq_files(tmp_path, both):
    theirs, ours = both["encoder_decoder_target"]
    theirs.save(str(tmp_path / "good.json"))
    document = json.loads((tmp_path / "good.json").read_text())
    sequence = document["attributes"]["sequence_attributions"][0]["attributes"]
    for problem, change in [
        ("not a base64-encoded safetensors tensor", lambda d: d.__setitem__("source_attributions", "@@not base64@@")),
        ("expected an Inseq TokenWithId", lambda d: d["source"][0].__setitem__("__instance_type__", ["os", "system"])),
        ("source_attributions has shape", lambda d: d.__setitem__("source", d["source"][:2])),
    ]:
        broken = copy.deepcopy(document)
        change(broken["attributes"]["sequence_attributions"][0]["attributes"])
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=problem):
            FeatureAttributionOutput.load(path)
    assert sequence["source_attributions"]  # the original was fine
    (tmp_path / "bad.json.gz").write_bytes(gzip.compress(b"{not json"))
    with pytest.raises(ValueError, match="not valid JSON"):
        FeatureAttributionOutput.load(tmp_path / "bad.json.gz")
    with pytest.raises(ValueError, match="format must be one of"):
        ours.save(tmp_path / "x.json", format="pickle")
    with pytest.raises(ValueError, match="compress=True is for the JSON formats"):
        ours.save(tmp_path / "x.safetensors", compress=True)


# -- C: callable step scores ----------------------------------------------------------------------------


def my_probability(args):
    return args.logits.float().softmax(-1).gather(-1, args.target_ids.unsqueeze(-1)).squeeze(-1)


def test_callable_step_scores_are_named(tmp_path):
    model, tok = tiny_model("gpt2")
    attribution_model = instrument.load_model(model, "saliency", tokenizer=tok)
    out = attribution_model.attribute(
        "Hello world",
        "Hello world, this is",
        show_progress=False,
        step_scores=[my_probability, "probability", instrument.steps.entropy],
    )
    seq = out[0]
    assert list(seq.step_scores) == ["my_probability", "probability", "entropy"]
    assert out.info["step_scores"] == ["my_probability", "probability", "entropy"]
    close(seq.step_scores["my_probability"], seq.step_scores["probability"], atol=1e-9)
    html = out.show(return_html=True, display=False)
    console = recorder()
    out.show(console=console)
    for text in (html, console.export_text(), str(out.get_scores_dicts()[0]["step_scores"])):
        assert "my_probability" in text and "<function" not in text and "0x" not in text
    out.save(tmp_path / "a.json")
    assert "<function" not in (tmp_path / "a.json").read_text()
    assert FeatureAttributionOutput.load(tmp_path / "a.json").equals(out)
    with pytest.raises(ValueError, match="names 'my_probability' twice"):
        attribute_twice = [my_probability, my_probability]
        attribution_model.attribute(
            "Hello world", "Hello world, this", show_progress=False, step_scores=attribute_twice
        )


# -- D: aggregation names and merging ------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_aggregation_names_as_inseq(both, case):
    theirs, ours = both[case]
    field = "target_attributions" if ours[0].target_attributions is not None else "source_attributions"
    for aggregator, kwargs in [
        ("vnorm", {}),
        (["vnorm"], {}),
        ("sum", {}),
        ("mean", {"normalize": False}),
        (["vnorm"], {"rescale": True, "normalize": False}),
        ([("scores", "absmax")], {}),
        ("scores", {"aggregate_fn": "sum"}),
    ]:
        close(
            getattr(ours.aggregate(aggregator, **kwargs)[0], field),
            getattr(theirs.aggregate(aggregator, **kwargs)[0], field),
        )
    with pytest.raises(ValueError):
        theirs.aggregate("vnorm", aggregate_fn="sum")
    with pytest.raises(ValueError, match="do not pass aggregate_fn"):
        ours.aggregate("vnorm", aggregate_fn="sum")
    with pytest.raises(ValueError):
        theirs.aggregate("vnorm", normalize=True, rescale=True)
    with pytest.raises(ValueError, match="either normalize=True or rescale=True"):
        ours.aggregate("vnorm", normalize=True, rescale=True)
    with pytest.raises(ValueError, match="either normalize=True or rescale=True"):
        ours.aggregate(["vnorm", "subwords"], normalize=True, rescale=True)
    # rescale=True alone: Inseq refuses it (its normalize defaults to True); we take it as "rescale instead"
    close(
        getattr(ours.aggregate("vnorm", rescale=True)[0], field),
        getattr(theirs.aggregate("vnorm", rescale=True, normalize=False)[0], field),
    )


def test_mixed_pipeline_as_inseq(both):
    theirs, ours = both["decoder_only"]
    for pipeline in (["vnorm", "subwords"], [("scores", "vnorm"), ("subwords", "absmax")]):
        mine, other = ours.aggregate(pipeline, special_chars="Ġ")[0], theirs.aggregate(pipeline, special_chars="Ġ")[0]
        assert [t.token for t in mine.target] == [t.token for t in other.target] == ["Hello", "Ġworld,", "Ġthis", "Ġis"]
        assert (mine.attr_pos_start, mine.attr_pos_end) == (other.attr_pos_start, other.attr_pos_end)
        close(mine.target_attributions, other.target_attributions)
        if pipeline[1] == "subwords":  # with an explicit function Inseq merges step scores with it too; we keep prod
            close(mine.step_scores["probability"], other.step_scores["probability"])
    # normalize= reaches "scores" through a pipeline, and spans aggregators accept it as Inseq's do
    close(
        ours.aggregate(["vnorm", "subwords"], normalize=False)[0].target_attributions,
        theirs.aggregate(["vnorm", "subwords"], normalize=False, special_chars="Ġ")[0].target_attributions,
    )
    assert ours.aggregate("subwords", normalize=False)[0].equals(ours.aggregate("subwords")[0])


def test_merge_keeps_step_scores_per_output(both):
    _, ours = both["encoder_decoder_target"]
    first = copy.deepcopy(ours)
    second = FeatureAttributionOutput(
        [copy.deepcopy(ours[0])], info={**ours.info, "step_scores": ["entropy"], "exec_time": 1.0}
    )
    second[0].step_scores = {"entropy": torch.ones(7)}
    merged = instrument.merge_attributions([first, second])
    assert merged.info["step_scores"] == [["probability"], ["entropy"]]
    assert merged.info["input_texts"] == ours.info["input_texts"] * 2
    assert merged.info["exec_time"] == ours.info["exec_time"] + 1.0
    assert list(merged[0].step_scores) == ["probability"] and list(merged[1].step_scores) == ["entropy"]
    same = instrument.merge_attributions([first, copy.deepcopy(first)])
    assert same.info["step_scores"] == ["probability"]
    assert (first + first).info == same.info


def test_equals_ignores_run_time(both):
    _, ours = both["encoder_decoder_target"]
    again = copy.deepcopy(ours)
    again.info["exec_time"] = ours.info["exec_time"] + 5.0
    assert ours.equals(again)
    assert not ours.equals(again, ignore_info=())
    again.info["attribution_method"] = "other"
    assert not ours.equals(again)
