"""Inseq's call options, prompt tokens of decoder-only outputs and contrastive options, against Inseq 0.7.

The comparisons run Inseq on the same tiny model; Inseq gets its own copy of the tokenizer.
"""

import copy
import inspect
import warnings

import pytest
import torch

import instrument
from instrument.models.inseq_options import fill_alignment

from tiny_models import inseq_comparable, tiny_model

TEXTS = {  # input, target, contrast target of another length
    "gpt2": ("Hello world", "Hello world, this is a test.", "Hello world, this is"),
    "llama": ("Hello world", "Hello world, this is a test.", "Hello world, this is"),
    "marian": ("Hello world", "Das Haus ist wunderbar.", "Das Haus ist"),
}


def _inseq():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("inseq")


@pytest.fixture(scope="module", params=["gpt2", "marian"])
def pair(request):
    """(instrument model, Inseq model, arch) on one tiny model."""
    inseq = _inseq()
    model, tokenizer = inseq_comparable(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = inseq.load_model(model, "saliency", tokenizer=copy.deepcopy(tokenizer))
    return instrument.load_model(model, "saliency", tokenizer=tokenizer), theirs, request.param


def _both(pair, **kwargs):
    ours, theirs, arch = pair
    source, target, _ = TEXTS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ours.attribute(source, target, show_progress=False, **kwargs)
        b = theirs.attribute(source, target, show_progress=False, **kwargs)
    return a, b


def _close(got, expected, rtol=1e-5):
    scale = float(expected.abs().nan_to_num().max())
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=rtol * scale + 1e-12, equal_nan=True)


def _attributions(seq):
    return seq.source_attributions if seq.source_attributions is not None else seq.target_attributions


# -- A: attribute() options ---------------------------------------------------------------------


def test_options_in_signature():
    parameters = inspect.signature(instrument.AttributionModel.attribute).parameters
    for name in (
        "device",
        "override_default_attribution",
        "pretty_progress",
        "output_step_attributions",
        "clean_special_chars",
    ):
        assert name in parameters


def test_output_step_attributions_as_inseq(pair):
    ours, theirs = _both(pair, output_step_attributions=True, step_scores=["probability"])
    assert ours.info["output_step_attributions"] is True
    assert len(ours.step_attributions) == len(theirs.step_attributions) == ours[0].attr_pos_end - ours[0].attr_pos_start
    seq = ours[0]
    for k, (a, b) in enumerate(zip(ours.step_attributions, theirs.step_attributions)):
        position = seq.attr_pos_start + k
        assert [t.token for t in a.prefix[0]] == [t.token for t in b.prefix[0]]
        assert [t.token for t in a.target[0]] == [t.token for t in b.target[0]]
        _close(a.step_scores["probability"], b.step_scores["probability"])
        if seq.source_attributions is not None:
            assert [t.token for t in a.source[0]] == [t.token for t in b.source[0]]
            _close(a.source_attributions, b.source_attributions)
        else:
            _close(a.target_attributions[0, :position], b.target_attributions[0, -position:])
        # and the same numbers as the sequence output's column
        _close(a.step_scores["probability"], seq.step_scores["probability"][k : k + 1])
    plain = _both(pair)[0]
    assert plain.step_attributions is None and plain.info["output_step_attributions"] is False


def test_step_attributions_of_examples_with_different_lengths():
    model, tokenizer = tiny_model("gpt2")
    am = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    out = am.attribute(
        ["Hello world", "The capital"],
        ["Hello world, this is", "The capital of France is Paris."],
        show_progress=False,
        output_step_attributions=True,
    )
    lengths = [s.attr_pos_end - s.attr_pos_start for s in out]
    assert len(out.step_attributions) == max(lengths)
    last = out.step_attributions[-1]
    short = lengths.index(min(lengths))
    assert last.target[short] == [] and torch.isnan(last.target_attributions[short]).all()
    for b, seq in enumerate(out):
        for k in range(lengths[b]):
            position = seq.attr_pos_start + k
            got = out.step_attributions[k].target_attributions[b, :position]
            torch.testing.assert_close(got, seq.target_attributions[:position, k], equal_nan=True)


def test_clean_special_chars_as_inseq(pair):
    ours, theirs = _both(pair, clean_special_chars=True)
    for name in ("source", "target"):
        assert [t.token for t in getattr(ours[0], name)] == [t.token for t in getattr(theirs[0], name)]
        assert [t.id for t in getattr(ours[0], name)] == [t.id for t in getattr(theirs[0], name)]
    raw = _both(pair)[0]
    assert [t.token for t in raw[0].target] != [t.token for t in ours[0].target]  # something was cleaned


def test_override_default_attribution_as_inseq(pair):
    ours, theirs, arch = pair
    source, target, _ = TEXTS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (ours, theirs):
            model.attribute(source, target, method="input_x_gradient", show_progress=False)
        assert ours.attribution_method == theirs.attribution_method.method_name == "saliency"
        for model in (ours, theirs):
            model.attribute(
                source, target, method="input_x_gradient", override_default_attribution=True, show_progress=False
            )
        assert ours.attribution_method == theirs.attribution_method.method_name == "input_x_gradient"
        with pytest.raises(ValueError):
            ours.attribute(
                source, target, method="no_such_method", override_default_attribution=True, show_progress=False
            )
        assert ours.attribution_method == "input_x_gradient"
        for model in (ours, theirs):
            model.attribute(source, target, method="saliency", override_default_attribution=True, show_progress=False)
    assert ours.attribution_method == "saliency"


def test_device_and_pretty_progress():
    model, tokenizer = tiny_model("gpt2")
    am = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    reference = am.attribute("Hello world", "Hello world, this is", show_progress=False)
    same = am.attribute("Hello world", "Hello world, this is", show_progress=False, device="cpu", pretty_progress=False)
    assert same.equals(reference, check_info=False)
    assert model.device.type == "cpu"
    with pytest.raises(ValueError, match="device"):
        am.attribute("Hello world", "Hello world, this is", show_progress=False, device="not a device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            am.attribute("Hello world", "Hello world, this is", show_progress=False, device="cuda")
    else:  # moved there for the call, back after it
        on_gpu = am.attribute("Hello world", "Hello world, this is", show_progress=False, device="cuda")
        assert model.device.type == "cpu"
        assert on_gpu.equals(reference, rtol=1e-4, atol=1e-6, check_info=False)


# -- C: the prompt is the source of a decoder-only output ---------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_only_source_is_the_prompt_as_inseq(arch, tmp_path):
    inseq = _inseq()
    model, tokenizer = tiny_model(arch)
    source, target, _ = TEXTS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = inseq.load_model(model, "saliency", tokenizer=copy.deepcopy(tokenizer)).attribute(
            source, target, show_progress=False
        )[0]
    seq = instrument.load_model(model, "saliency", tokenizer=tokenizer).attribute(source, target, show_progress=False)[
        0
    ]
    assert [t.token for t in seq.source] == [t.token for t in theirs.source]
    assert seq.source == seq.target[: seq.attr_pos_start] and len(seq.source) > 0
    for suffix in ("safetensors", "json"):
        path = tmp_path / f"out.{suffix}"
        seq.save(path)
        assert instrument.FeatureAttributionOutput.load(path)[0].source == seq.source
    # slicing a decoder-only output slices the prompt (target positions)
    sliced = seq[1:3]
    assert [t.token for t in sliced.target[: sliced.attr_pos_start]] == [t.token for t in seq.target[1:3]]
    assert sliced.source == sliced.target[: sliced.attr_pos_start]


# -- D: contrastive options -------------------------------------------------------------------------


def test_fill_alignment_rules():
    assert fill_alignment(None, 4, 7, 9) == {4: 6, 5: 7, 6: 8}
    assert fill_alignment([(5, 6)], 4, 7, 9) == {4: 6, 5: 6, 6: 8}
    assert fill_alignment([(4, 2), (4, 3), (5, 2)], 4, 6, 9) == {4: 2, 5: 2}  # first free pair, else first
    assert fill_alignment([(4, 2), (5, 2), (5, 3)], 4, 6, 9) == {4: 2, 5: 3}
    assert fill_alignment([(4, 20)], 4, 6, 3) == {4: 1, 5: 2}  # outside the contrast: filled
    assert fill_alignment(None, 1, 6, 3) == {1: 2, 2: 2, 3: 2, 4: 1, 5: 2}


@pytest.mark.parametrize("alignments", [None, "partial"])
@pytest.mark.parametrize("as_attributed_fn", [False, True])
def test_contrast_prob_diff_other_lengths_as_inseq(pair, alignments, as_attributed_fn):
    ours, _, arch = pair
    source, target, contrast = TEXTS[arch]
    kwargs = dict(contrast_targets=contrast, step_scores=["contrast_prob_diff"])
    if alignments == "partial":
        start = 6 if arch in ("gpt2", "llama") else 1
        kwargs["contrast_targets_alignments"] = [(start, start), (start + 1, start + 2), (start + 3, start + 1)]
    if as_attributed_fn:
        kwargs["attributed_fn"] = "contrast_prob_diff"
    if alignments is None or as_attributed_fn:  # a right-aligned fill, or contrast scored on the original inputs
        with pytest.warns(UserWarning, match="right to left" if not as_attributed_fn else "original inputs"):
            ours.attribute(source, target, show_progress=False, **kwargs)
    a, b = _both(pair, **kwargs)
    _close(a[0].step_scores["contrast_prob_diff"], b[0].step_scores["contrast_prob_diff"])
    _close(_attributions(a[0]), _attributions(b[0]))


def test_contrast_force_inputs_as_inseq(pair):
    _, _, arch = pair
    source, target, contrast = TEXTS[arch]
    a, b = _both(pair, contrast_targets=contrast, attributed_fn="contrast_prob_diff", contrast_force_inputs=True)
    _close(_attributions(a[0]), _attributions(b[0]))


def test_auto_alignments_need_an_aligner(pair):
    ours, _, arch = pair
    source, target, contrast = TEXTS[arch]
    with pytest.raises(ValueError, match="aligner"):
        ours.attribute(
            source,
            target,
            contrast_targets=contrast,
            contrast_targets_alignments="auto",
            step_scores=["contrast_prob_diff"],
            show_progress=False,
        )
    with pytest.raises(TypeError, match="contrast_targets_alignments"):
        ours.attribute(
            source,
            target,
            contrast_targets=contrast,
            contrast_targets_alignments=[(1, "x")],
            step_scores=["contrast_prob_diff"],
            show_progress=False,
        )
