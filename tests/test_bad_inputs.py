"""Bad input gets one clear ValueError/TypeError naming the argument, raised by the library; models
that cannot be attributed correctly are refused; attributed positions as Inseq 0.7.1 reads them.

    pytest -q tests/test_bad_inputs.py
"""

import copy
import os
import warnings

import pytest
import torch
import transformers

import instrument
from instrument.models.base import attribute_reference

from tiny_models import ALL_ARCHS, tiny_model, tiny_tokenizer

TEXTS = {
    "gpt2": ("Hello world", "Hello world, this is a test.", "Hello world, this is a cat."),
    "marian": ("Hello world", "The capital of France is Paris.", "The capital of Germany is Paris."),
}
LIBRARY = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), pkg) for pkg in ("instrument", "methods")
)


@pytest.fixture(scope="module", params=["gpt2", "marian"])
def wrapped(request):
    model, tokenizer = tiny_model(request.param)
    return request.param, instrument.load_model(model, "saliency", tokenizer=tokenizer)


def raised_by_library(excinfo) -> bool:
    return str(excinfo.traceback[-1].path).startswith(LIBRARY)


BAD = [
    (dict(method="integrated_gradients", n_steps=2, internal_batch_size="big"), ValueError, "internal_batch_size"),
    (dict(method="integrated_gradients", n_steps=2, internal_batch_size=-3), ValueError, "internal_batch_size"),
    (dict(method="integrated_gradients", n_steps=2, internal_batch_size=0), ValueError, "internal_batch_size"),
    (dict(method="integrated_gradients", n_steps=2, internal_batch_size=2.5), ValueError, "internal_batch_size"),
    (dict(method="gradient_shap", internal_batch_size="big"), ValueError, "internal_batch_size"),
    (dict(method="integrated_gradients", n_steps="4"), TypeError, "n_steps"),
    (dict(method="integrated_gradients", n_steps=4.0), TypeError, "n_steps"),
    (dict(method="integrated_gradients", n_steps=0), ValueError, "n_steps"),
    (dict(method="gradient_shap", n_samples="3"), TypeError, "n_samples"),
    (dict(method="gradient_shap", stdevs="x"), TypeError, "stdevs"),
    (dict(method="gradient_shap", stdevs=-1.0), ValueError, "stdevs"),
    (dict(method="lime", n_samples=2.5), TypeError, "n_samples"),
    (dict(abs="yes"), TypeError, "abs"),
    (dict(attr_pos_start="2"), TypeError, "attr_pos_start"),
    (dict(attr_pos_start=2.0), TypeError, "attr_pos_start"),
    (dict(attr_pos_end=[3]), TypeError, "attr_pos_end"),
    (dict(batch_size="big"), ValueError, "batch_size"),
    (dict(batch_size=-1), ValueError, "batch_size"),
    (dict(step_scores=[3]), TypeError, "step_scores"),
    (
        dict(attributed_fn="contrast_prob_diff", contrast_targets_alignments=[(0, "a")]),
        TypeError,
        "contrast_targets_alignments",
    ),
    (
        dict(attributed_fn="contrast_prob_diff", contrast_targets_alignments=[0, 1]),
        TypeError,
        "contrast_targets_alignments",
    ),
    (
        dict(attributed_fn="contrast_prob_diff", contrast_targets_alignments=[(0, 1, 2)]),
        TypeError,
        "contrast_targets_alignments",
    ),
    (
        dict(attributed_fn="contrast_prob_diff", contrast_targets_alignments=[(True, 1)]),
        TypeError,
        "contrast_targets_alignments",
    ),
    (
        dict(attributed_fn="contrast_prob_diff", contrast_targets_alignments="pairs"),
        TypeError,
        "contrast_targets_alignments",
    ),
    (
        dict(attributed_fn="contrast_prob_diff", contrast_targets_alignments=[[(0, 0)], [(1, 1)]]),
        ValueError,
        "contrast_targets_alignments",
    ),
    (
        dict(attributed_fn="contrast_prob_diff", contrast_targets_alignments=[(-1, 0)]),
        ValueError,
        "contrast_targets_alignments",
    ),
    (
        dict(attributed_fn="contrast_prob_diff", contrast_targets_alignments=[(0, 0), (1, 99)]),
        ValueError,
        "contrast_targets_alignments",
    ),
    (
        dict(attributed_fn="contrast_prob_diff", contrast_targets_alignments=[(99, 1)]),
        ValueError,
        "contrast_targets_alignments",
    ),
    (dict(attributed_fn="kl_divergence"), ValueError, "contrast_force_inputs"),
]


@pytest.mark.parametrize("options, error, match", BAD, ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_argument_is_named(wrapped, options, error, match):
    arch, model = wrapped
    source, target, contrast = TEXTS[arch]
    options = dict(options)
    if "attributed_fn" in options:
        options["contrast_targets"] = contrast
    with pytest.raises(error, match=match) as excinfo:
        model.attribute(source, target, show_progress=False, **options)
    assert raised_by_library(excinfo), excinfo.traceback[-1]


def test_bad_method_option_at_load_time():
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(TypeError, match="n_steps"):
        instrument.load_model(model, "integrated_gradients", tokenizer=tokenizer, n_steps="20")
    with pytest.raises(ValueError, match="internal_batch_size"):
        instrument.load_model(model, "integrated_gradients", tokenizer=tokenizer, internal_batch_size="big")


def test_kl_divergence_attributed_with_forced_inputs(wrapped):
    arch, model = wrapped
    source, target, contrast = TEXTS[arch]
    seq = model.attribute(
        source,
        target,
        attributed_fn="kl_divergence",
        contrast_targets=contrast,
        contrast_force_inputs=True,
        step_scores=["kl_divergence"],
        show_progress=False,
    )[0]
    assert seq.step_scores["kl_divergence"].shape == (seq.attr_pos_end - seq.attr_pos_start,)
    # As a step score it needs no forcing, and gives the same values.
    plain = model.attribute(
        source, target, contrast_targets=contrast, step_scores=["kl_divergence"], show_progress=False
    )[0]
    torch.testing.assert_close(plain.step_scores["kl_divergence"], seq.step_scores["kl_divergence"])


def test_one_step_score_name_is_a_list_of_one(wrapped):
    arch, model = wrapped
    source, target, _ = TEXTS[arch]
    one = model.attribute(source, target, step_scores="probability", show_progress=False)
    listed = model.attribute(source, target, step_scores=["probability"], show_progress=False)
    torch.testing.assert_close(one[0].step_scores["probability"], listed[0].step_scores["probability"], rtol=0, atol=0)
    assert one.info["step_scores"] == ["probability"]


def test_decoder_only_texts():
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="nothing to attribute"):
        wrapped.attribute("Hello world", "Hello world", show_progress=False)
    with pytest.raises(ValueError, match="nothing to attribute"):  # one example of two
        wrapped.attribute(["Hello", "Hello world"], ["Hello world", "Hello world"], show_progress=False)
    with pytest.raises(ValueError, match="generated_texts must start with the input text"):
        wrapped.attribute("Hello world", "Goodbye world", show_progress=False)
    with pytest.raises(ValueError, match="must start with the input text"):  # leading space: not a continuation
        wrapped.attribute("Hello world", " Hello world, this", show_progress=False)


# -- models that cannot be attributed correctly ------------------------------------------------------


def _bert_like(cls_name: str, **config):
    tokenizer = tiny_tokenizer("gpt2")
    kind = {
        "Bert": transformers.BertConfig,
        "Roberta": transformers.RobertaConfig,
        "Electra": transformers.ElectraConfig,
    }
    config_cls = next(c for prefix, c in kind.items() if cls_name.startswith(prefix))
    options = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=260,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if cls_name.startswith("Electra"):
        options["embedding_size"] = 32
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls_name)(config_cls(**options, **config)).eval()
    return model, tokenizer


@pytest.mark.parametrize(
    "cls_name", ["BertForMaskedLM", "RobertaForMaskedLM", "ElectraForMaskedLM", "BertLMHeadModel", "RobertaForCausalLM"]
)
def test_bidirectional_models_are_refused(cls_name):
    model, tokenizer = _bert_like(cls_name)
    with pytest.raises(ValueError, match="bidirectional"):
        instrument.load_model(model, "saliency", tokenizer=tokenizer)


def test_bert_decoder_is_accepted_and_causal():
    model, tokenizer = _bert_like("BertLMHeadModel", is_decoder=True)
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    source, target, _ = TEXTS["gpt2"]
    batched = wrapped.attribute(source, target, show_progress=False)[0]
    stepwise = attribute_reference(wrapped, source, target, show_progress=False)[0]  # one prefix forward per step
    torch.testing.assert_close(
        batched.target_attributions, stepwise.target_attributions, rtol=1e-4, atol=1e-6, equal_nan=True
    )


def test_unknown_classes_are_probed():
    class Plain(transformers.GPT2LMHeadModel):  # causal, under a name no rule knows
        pass

    class Hidden(transformers.BertForMaskedLM):
        pass

    gpt2, tokenizer = tiny_model("gpt2")
    plain = Plain(gpt2.config).eval()
    plain.load_state_dict(gpt2.state_dict())
    instrument.load_model(plain, "saliency", tokenizer=tokenizer)
    bert, tokenizer = _bert_like("BertForMaskedLM")
    hidden = Hidden(bert.config).eval()
    with pytest.raises(ValueError, match="bidirectional"):
        instrument.load_model(hidden, "saliency", tokenizer=tokenizer)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_fixture_models_are_accepted(arch):
    model, tokenizer = tiny_model(arch)
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    assert wrapped.is_encoder_decoder == bool(model.config.is_encoder_decoder)


# -- attributed positions, against Inseq 0.7.1 -------------------------------------------------------


def _inseq(arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inseq = pytest.importorskip("inseq")
    model, tokenizer = tiny_model(arch)
    ours = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    theirs = inseq.load_model(model, "saliency", tokenizer=copy.deepcopy(tokenizer))
    return ours, theirs


# (attr_pos_start, attr_pos_end): the prompt "Hello world" has 6 tokens, the target 14.
DECODER_POSITIONS = [(None, None), (3, None), (0, None), (8, None), (None, 9), (None, -2), (7, -1), (None, 100), (6, 7)]


def test_decoder_only_positions_as_inseq():
    ours, theirs = _inseq("gpt2")
    source, target, _ = TEXTS["gpt2"]
    for start, end in DECODER_POSITIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = theirs.attribute(
                source, target, attr_pos_start=start, attr_pos_end=end, show_progress=False, step_scores=["probability"]
            )[0]
        got = ours.attribute(
            source, target, attr_pos_start=start, attr_pos_end=end, show_progress=False, step_scores=["probability"]
        )[0]
        where = f"attr_pos_start={start}, attr_pos_end={end}"
        assert (got.attr_pos_start, got.attr_pos_end) == (expected.attr_pos_start, expected.attr_pos_end), where
        # Inseq keeps every target token but cuts the attribution rows at attr_pos_end; here both stop there.
        assert [(t.token, t.id) for t in got.target] == [
            (t.token, t.id) for t in expected.target[: expected.attr_pos_end]
        ], where
        assert got.target_attributions.shape == expected.target_attributions.shape, where
        torch.testing.assert_close(
            got.target_attributions, expected.target_attributions, rtol=1e-4, atol=1e-7, equal_nan=True
        )
        torch.testing.assert_close(
            got.step_scores["probability"], expected.step_scores["probability"], rtol=1e-5, atol=1e-7
        )


def test_decoder_only_refused_positions():
    ours, theirs = _inseq("gpt2")
    source, target, _ = TEXTS["gpt2"]
    for start, end in [(None, 5), (6, 6), (20, None)]:  # refused by Inseq too
        with pytest.raises(ValueError, match="out of range"):
            ours.attribute(source, target, attr_pos_start=start, attr_pos_end=end, show_progress=False)
        with warnings.catch_warnings(), pytest.raises(ValueError):
            warnings.simplefilter("ignore")
            theirs.attribute(source, target, attr_pos_start=start, attr_pos_end=end, show_progress=False)
    with pytest.raises(ValueError, match="attr_pos_start=-3: negative starts are not supported on decoder-only"):
        ours.attribute(source, target, attr_pos_start=-3, show_progress=False)  # Inseq ignores it


# Encoder-decoder: the target "<pad> ... </s>" has 13 tokens.
ENCODER_DECODER_POSITIONS = [(None, None), (3, None), (-3, None), (None, 100), (None, 5), (3, 6), (-4, -1), (None, -2)]


@pytest.mark.parametrize("arch", ["marian", "bart"])
def test_encoder_decoder_positions_as_inseq(arch):
    ours, theirs = _inseq(arch)
    source, target, _ = TEXTS["marian"]
    for start, end in ENCODER_DECODER_POSITIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = theirs.attribute(source, target, attr_pos_start=start, attr_pos_end=end, show_progress=False)[0]
        got = ours.attribute(source, target, attr_pos_start=start, attr_pos_end=end, show_progress=False)[0]
        where = f"attr_pos_start={start}, attr_pos_end={end}"
        steps = got.attr_pos_end - got.attr_pos_start
        inside = got.attr_pos_end < len(expected.target)
        # Inside the target, Inseq attributes the step at attr_pos_end too and reports a start one lower.
        assert got.attr_pos_end == expected.attr_pos_end, where
        assert got.attr_pos_start == expected.attr_pos_start + inside, where
        assert expected.source_attributions.shape[1] == steps + inside, where
        assert [t.id for t in got.target] == [t.id for t in expected.target[: got.attr_pos_end]], where
        assert [t.id for t in got.source] == [t.id for t in expected.source], where
        # Values on BART only: on Marian, Inseq 0.7.1 under transformers 5 scales the decoder embeddings twice
        # (it passes them pre-scaled, and the decoder scales inputs_embeds too), so its steps after the first differ.
        if arch == "bart":
            torch.testing.assert_close(
                got.source_attributions, expected.source_attributions[:, :steps], rtol=1e-4, atol=1e-7
            )
        # The target attribution rows stop at attr_pos_end, one per target token.
        with_target = ours.attribute(
            source, target, attr_pos_start=start, attr_pos_end=end, attribute_target=True, show_progress=False
        )[0]
        assert with_target.target_attributions.shape[:2] == (len(got.target), steps), where
        torch.testing.assert_close(with_target.source_attributions, got.source_attributions)
        if arch == "bart":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = theirs.attribute(
                    source, target, attr_pos_start=start, attr_pos_end=end, attribute_target=True, show_progress=False
                )[0]
            torch.testing.assert_close(
                with_target.target_attributions,
                expected.target_attributions[: got.attr_pos_end, :steps],
                rtol=1e-4,
                atol=1e-7,
                equal_nan=True,
            )


def test_encoder_decoder_refused_positions():
    model, tokenizer = tiny_model("marian")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    source, target, _ = TEXTS["marian"]
    for start, end, match in [
        (0, None, "out of range"),
        (-100, None, "attr_pos_start=-100"),
        (None, 1, "out of range"),
        (None, -100, "attr_pos_end=-100"),
        (5, 3, "out of range"),
    ]:
        with pytest.raises(ValueError, match=match):
            wrapped.attribute(source, target, attr_pos_start=start, attr_pos_end=end, show_progress=False)
