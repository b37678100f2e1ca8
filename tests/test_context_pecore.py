"""`instrument.attribute_context` (PECoRe): the same JSON as Inseq 0.7.1's `attribute-context`, its bad
input, its views and its cost (one forward per sequence, one batched backward for all selected tokens).

Inseq re-tokenizes the texts it builds; the cases below are ones where that gives back the tokens the model
saw (see instrument/context/pecore.py for where it does not: the output tokenized alone differing from the
output after the input, the first contextless token generated after a trailing separator).
"""

import copy
import json
import warnings

import pytest
import torch

import instrument
from instrument.context.pecore_output import AttributeContextOutput

from tiny_models import inseq_comparable, tiny_model

CONTEXT = "The capital of France is Paris."


@pytest.fixture(scope="module")
def inseq():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("inseq")


def fixture(arch: str):
    """The Inseq-comparable tiny model; the Marian's cross-attention weights scaled by 16 and its last layer's
    output by 4, as at random initialisation its output hardly reads the source (CTI scores ~1e-7, float32
    noise, where two correct implementations differ by their rounding: nothing to compare)."""
    model, tokenizer = inseq_comparable(arch, seed=2 if arch == "marian" else 0)
    if arch == "marian":
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "encoder_attn" in name and name.endswith("weight"):
                    parameter.mul_(16)
            model.model.decoder.layers[-1].final_layer_norm.weight.mul_(4)
    return model, tokenizer


def run_inseq(inseq, model, tokenizer, method, **kwargs):
    from inseq.commands.attribute_context.attribute_context import attribute_context_with_model
    from inseq.commands.attribute_context.attribute_context_args import AttributeContextArgs

    wrapped = inseq.load_model(model, method, tokenizer=copy.deepcopy(tokenizer))
    args = AttributeContextArgs(model_name_or_path="tiny", attribution_method=method, show_viz=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attribute_context_with_model(args, wrapped).to_dict()


def assert_same(ours: dict, theirs: dict):
    """Same tokens, selections, contrast tokens and texts; scores within 1e-4 relative error."""
    for key in ("input_context", "input_context_tokens", "output_context", "output_context_tokens", "output_current"):
        assert ours[key] == theirs[key], key
    assert ours["output_current_tokens"] == theirs["output_current_tokens"]
    close(ours["cti_scores"], theirs["cti_scores"])
    assert [c["cti_idx"] for c in ours["cci_scores"]] == [c["cti_idx"] for c in theirs["cci_scores"]]
    for mine, their in zip(ours["cci_scores"], theirs["cci_scores"]):
        for key in ("cti_token", "contrast_token", "contextual_output", "contextless_output"):
            assert mine[key] == their[key], key
        close([mine["cti_score"]], [their["cti_score"]])
        for key in ("input_context_scores", "output_context_scores"):
            assert (mine[key] is None) == (their[key] is None), key
            if mine[key] is not None:
                close(mine[key], their[key])
    assert set(ours) == set(theirs)
    assert set(ours["info"]) >= set(theirs["info"])


def close(ours, theirs, rtol=1e-4):
    ours, theirs = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    assert ours.shape == theirs.shape
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=rtol * scale)


# Decoder-only: the output after a separator "" and starting with a space, or with the default separator
# and a first token that is not selected; encoder-decoder: as it comes.
CASES = {
    "gpt2": [
        dict(
            input_current_text="The weather is nice today",
            output_current_text=" it may rain tomorrow.",
            decoder_input_output_separator="",
        ),
        dict(input_current_text="The weather is nice today", output_current_text="but it may rain tomorrow."),
        dict(
            input_current_text="The weather is nice today",
            output_context_text=" I am fine,",
            output_current_text=" thank you.",
            output_template="{context}{current}",
            decoder_input_output_separator="",
        ),
    ],
    "marian": [
        dict(input_current_text="The weather is nice today", output_current_text="Le chat est sur la table."),
    ],
}


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
@pytest.mark.parametrize("fn", ["kl_divergence", "contrast_prob_diff"])
@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_same_json_as_inseq(inseq, arch, fn, method):
    model, tokenizer = fixture(arch)
    ours_model = instrument.load_model(model, method, tokenizer=tokenizer)
    for case in CASES[arch]:
        kwargs = dict(case, input_context_text=CONTEXT, attributed_fn=fn, context_sensitivity_metric=fn)
        theirs = run_inseq(inseq, model, tokenizer, method, **kwargs)
        ours = instrument.attribute_context(ours_model, **kwargs).to_dict()
        assert theirs["cci_scores"], "the case selects no token: it tests nothing"
        assert_same(ours, theirs)


def test_encoder_decoder_output_context_scores(inseq):
    """Output context cues on an encoder-decoder: the rows of the output context in `attribute()`'s target
    attributions (the attribution Inseq's CCI runs). Inseq's own are one row early (from the decoder start
    token on), so they are checked shifted."""
    model, tokenizer = fixture("marian")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    kwargs = dict(
        input_current_text="The weather is nice today",
        input_context_text=CONTEXT,
        output_context_text="Das Haus ist wunderbar.",
        output_current_text="Le chat est sur la table.",
        attributed_fn="contrast_prob_diff",
    )
    out = instrument.attribute_context(wrapped, **kwargs)
    theirs = run_inseq(inseq, model, tokenizer, "saliency", **kwargs)
    assert out.cci_scores and len(out.cci_scores) == len(theirs["cci_scores"])
    n_context = len(out.output_context_tokens)
    warnings.simplefilter("ignore")  # the contrast is shorter: aligned from the right, as Inseq does
    for cci, their in zip(out.cci_scores, theirs["cci_scores"]):
        target = tokenizer.convert_tokens_to_string(tokenizer.tokenize(cci.contextual_output))
        reference = wrapped.attribute(
            f"{CONTEXT} The weather is nice today",
            target,
            attr_pos_start=n_context + cci.cti_idx + 1,
            attributed_fn="contrast_prob_diff",
            contrast_sources="The weather is nice today",
            contrast_targets=cci.contextless_output,
            contrast_force_inputs=cci.contrast_token == cci.cti_token,
            attribute_target=True,
            show_progress=False,
        ).aggregate(normalize=False)[0]
        close(cci.output_context_scores, reference.target_attributions[1 : 1 + n_context, 0].tolist())
        close(cci.input_context_scores, reference.source_attributions[: len(out.input_context_tokens), 0].tolist())
        close(cci.output_context_scores[:-1], their["output_context_scores"][1:])


# -- bad input: one clear error each, before any forward ---------------------------------------------


@pytest.fixture
def gpt2_no_forward():
    """A tiny GPT-2 whose forward fails: an error raised first was raised before any forward."""
    model, tokenizer = tiny_model("gpt2")
    handle = model.register_forward_pre_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("forward ran")))
    yield instrument.load_model(model, "saliency", tokenizer=tokenizer)
    handle.remove()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "No context given"),
        (dict(input_context_text=CONTEXT, input_template="{context}"), "input_template must contain the {current}"),
        (dict(input_context_text=CONTEXT, input_template="{ctx} {current}"), "unknown placeholder {ctx}"),
        (dict(input_template="{context} {current}"), "input_template .* has {context} but no input_context_text"),
        (
            dict(input_context_text=CONTEXT, output_template="{current} {context}", output_context_text="x"),
            "must come before",
        ),
        (dict(input_context_text=CONTEXT, context_sensitivity_metric="probability"), "contrastive step function"),
        (
            dict(
                input_context_text=CONTEXT, output_template="{context} {current}", handle_output_context_strategy="pre"
            ),
            "needs output_context_text",
        ),
        # after "ca" the output "pital" is one token with "ca", after "today" it is not
        (
            dict(
                input_context_text="ca",
                input_template="{current} {context}",
                output_current_text="pital",
                decoder_input_output_separator="",
            ),
            "does not tokenize the same way with context",
        ),
        (
            dict(input_context_text=" ".join(["The capital of France is Paris."] * 40)),
            "more than the model's context of 256",
        ),
    ],
)
def test_bad_input_fails_before_any_forward(gpt2_no_forward, kwargs, message):
    kwargs = {"output_current_text": "but it may rain tomorrow.", **kwargs}
    with pytest.raises(ValueError, match=message):
        instrument.attribute_context(gpt2_no_forward, input_current_text="The weather is nice today", **kwargs)


def test_bad_input_of_other_arguments(gpt2_no_forward):
    with pytest.raises(ValueError, match="method must be"):
        instrument.attribute_context(gpt2_no_forward, "Hi", CONTEXT, method="magic")
    with pytest.raises(ValueError, match="input_current_text must be a non-empty string"):
        instrument.attribute_context(gpt2_no_forward, " ", CONTEXT)
    with pytest.raises(ValueError, match="2 entries for 3 examples"):
        instrument.attribute_context(gpt2_no_forward, ["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="context_sensitivity_topk must be a positive integer"):
        instrument.attribute_context(
            gpt2_no_forward, "Hi", CONTEXT, output_current_text="x", context_sensitivity_topk=0
        )


# -- batching, cost, outputs ----------------------------------------------------------------------


def test_two_forwards_and_one_backward_for_all_tokens_and_examples():
    """CTI: one forward (with and without context, all examples); CCI: one forward, one batched backward."""
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        kwargs = dict(input_context_text=[CONTEXT, "Hello world, this is a test."], attributed_fn="contrast_prob_diff")
        outs = instrument.attribute_context(
            wrapped,
            ["The weather is nice today"] * 2,
            output_current_text=["but it may rain tomorrow."] * 2,
            context_sensitivity_std_threshold=0.0,
            **kwargs,
        )
    finally:
        handle.remove()
    assert sum(len(out.cci_scores) for out in outs) >= 6  # several selected tokens in each example
    assert len(calls) == 2
    for b, out in enumerate(outs):  # each example as if alone
        alone = instrument.attribute_context(
            wrapped,
            "The weather is nice today",
            kwargs["input_context_text"][b],
            output_current_text="but it may rain tomorrow.",
            context_sensitivity_std_threshold=0.0,
            attributed_fn="contrast_prob_diff",
        )
        close(out.cti_scores, alone.cti_scores, rtol=1e-5)
        assert out.selected() == alone.selected()
        for mine, theirs in zip(out.cci_scores, alone.cci_scores):
            assert mine.contrast_token == theirs.contrast_token
            close(mine.input_context_scores, theirs.input_context_scores, rtol=1e-5)


def test_save_load_show_html(tmp_path, capsys):
    model, tokenizer = tiny_model("gpt2")
    out = instrument.attribute_context(
        instrument.load_model(model, "saliency", tokenizer=tokenizer),
        "The weather is nice today",
        CONTEXT,
        output_current_text="but it may rain tomorrow.",
        attributed_fn="contrast_prob_diff",
    )
    assert out.cci_scores
    out.save(tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert list(data)[:8] == [
        "input_context",
        "input_context_tokens",
        "output_context",
        "output_context_tokens",
        "output_current",
        "output_current_tokens",
        "cti_scores",
        "cci_scores",
    ]
    assert set(data["cci_scores"][0]) == {
        "cti_idx",
        "cti_token",
        "cti_score",
        "contextual_output",
        "contrast_token",
        "contextless_output",
        "input_context_scores",
        "output_context_scores",
    }
    assert AttributeContextOutput.load(tmp_path / "out.json").to_dict() == data
    with pytest.raises(ValueError, match="exists"):
        out.save(tmp_path / "out.json")
    out.show()
    shown = capsys.readouterr().out
    token = out.output_current_tokens[out.cci_scores[0].cti_idx].replace("Ġ", " ")
    assert f"{token}({out.cci_scores[0].cti_score:.3f})" in shown and "Input context (CCI >" in shown
    cue = out.top_cues(out.cci_scores[0], k=1)[0]
    assert cue[3] == max(out.cci_scores[0].input_context_scores)
    html = out.to_html()
    assert html.startswith("<!DOCTYPE html>") and "Input context" in html


def test_ablation_method_delegates(monkeypatch):
    import sys
    import types

    seen = {}
    fake = types.ModuleType("instrument.context.ablation")
    fake.attribute_context_ablation = lambda model, **kwargs: seen.update(kwargs, model=model) or "ablated"
    monkeypatch.setitem(sys.modules, "instrument.context.ablation", fake)
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    result = instrument.attribute_context(
        wrapped,
        "The weather is nice today",
        CONTEXT,
        output_current_text="x",
        method="ablation",
        sources="documents",
        n_ablations=8,
        seed=3,
    )
    assert result == "ablated" and seen["model"] is wrapped and seen["decoder_input_output_separator"] == " "
    assert {
        k: seen[k]
        for k in (
            "input_current_text",
            "input_context_text",
            "output_current_text",
            "input_template",
            "sources",
            "n_ablations",
            "seed",
        )
    } == dict(
        input_current_text="The weather is nice today",
        input_context_text=CONTEXT,
        output_current_text="x",
        input_template=None,
        sources="documents",
        n_ablations=8,
        seed=3,
    )


def test_cli(tmp_path, capsys):
    from instrument.cli import main

    model, tokenizer = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    args = [
        "attribute-context",
        "-m",
        str(tmp_path / "m"),
        "--input_current_text",
        "The weather is nice today",
        "--input_context_text",
        CONTEXT,
        "--output_current_text",
        "but it may rain tomorrow.",
        "-fn",
        "contrast_prob_diff",
        "-o",
        str(tmp_path / "o.json"),
        "--viz_path",
        str(tmp_path / "o.html"),
    ]
    assert main(args) == 0
    saved = json.loads((tmp_path / "o.json").read_text())
    expected = instrument.attribute_context(
        instrument.load_model(model, "saliency", tokenizer=tokenizer),
        "The weather is nice today",
        CONTEXT,
        output_current_text="but it may rain tomorrow.",
        attributed_fn="contrast_prob_diff",
    ).to_dict()
    assert [c["cti_idx"] for c in saved["cci_scores"]] == [c["cti_idx"] for c in expected["cci_scores"]]
    close(saved["cti_scores"], expected["cti_scores"])  # loaded from disk: sdpa attention, not eager
    assert (
        saved["info"]["save_path"] == str(tmp_path / "o.json") and "Input context" in (tmp_path / "o.html").read_text()
    )
    assert "Output current:" in capsys.readouterr().out
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert main([*args[:-4], "--step_scores", "probability", "--no-show_viz"]) == 2
    assert "--step_scores does not apply" in capsys.readouterr().err
    assert main(args[:5] + ["--output_current_text", "x"]) == 2  # no context
    assert "No context given" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method, options", [("integrated_gradients", {"n_steps": 4}), ("occlusion", {}), ("attention", {})]
)
def test_other_methods_and_model_mode(method, options):
    """Path, perturbation and attention methods run CCI the same way (one method call); CTI does not
    depend on the method; the model's training mode is restored."""
    model, tokenizer = tiny_model("llama")  # a BOS token before the context
    model.train()
    kwargs = dict(output_current_text="but it may rain tomorrow.", attributed_fn="contrast_prob_diff")
    out = instrument.attribute_context(
        instrument.load_model(model, method, tokenizer=tokenizer, **options), "The weather is nice", CONTEXT, **kwargs
    )
    reference = instrument.attribute_context(
        instrument.load_model(model, "saliency", tokenizer=tokenizer), "The weather is nice", CONTEXT, **kwargs
    )
    assert model.training
    assert out.cci_scores and out.selected() == reference.selected()
    for cci in out.cci_scores:
        assert len(cci.input_context_scores) == len(out.input_context_tokens) == 11
        assert all(torch.isfinite(torch.tensor(cci.input_context_scores)))
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    warnings.simplefilter("ignore")  # the contrast is shorter: aligned from the right, as Inseq does
    for cci in reference.cci_scores:  # the context's rows come after the BOS token
        n_tokens = len(tokenizer(cci.contextual_output)["input_ids"])
        expected = wrapped.attribute(
            f"{CONTEXT} The weather is nice",
            cci.contextual_output,
            attr_pos_start=n_tokens - 1,
            attributed_fn="contrast_prob_diff",
            contrast_targets=cci.contextless_output,
            contrast_force_inputs=cci.contrast_token == cci.cti_token,
            show_progress=False,
        ).aggregate(normalize=False)[0]
        assert expected.target[0].token == "<s>"
        close(cci.input_context_scores, expected.target_attributions[1:12, 0].tolist())


def test_generated_output_and_manual_strategy_without_terminal():
    model, tokenizer = tiny_model("gpt2", seed=3)  # seed 0 generates only spaces here
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    generation = {"max_new_tokens": 4, "do_sample": False}
    out = instrument.attribute_context(wrapped, "The weather is nice today", CONTEXT, generation_kwargs=generation)
    prompt = tokenizer(f"{CONTEXT} The weather is nice today ", return_tensors="pt")
    generated = model.generate(**prompt, **generation, pad_token_id=tokenizer.pad_token_id)[
        0, prompt.input_ids.shape[1] :
    ]
    assert out.output_current == tokenizer.decode(generated).strip()
    with pytest.raises(ValueError, match="no terminal to ask on"):
        instrument.attribute_context(
            wrapped,
            "The weather is nice today",
            CONTEXT,
            output_template="{context} {current}",
            generation_kwargs=generation,
        )


@pytest.mark.slow
def test_pecore_finds_the_answering_sentence_of_demo_lm_lookups():
    """Ground truth: demo-lm takes the code of a name from its context ("the code of kelo is ba47 . ...
    the code of kelo is" -> "ba47"), codes drawn at random per case, so only one sentence can give it.
    On 200 fresh cases, CTI selects the answer token (and not the EOS after it) and CCI's top cue for it
    is in the answering sentence, in at least 80% of the cases.

    The output is the answer and the EOS the model ends it with: with one token CTI's selection would be
    trivial, and with two, mean + 1 std is above both scores, so the threshold is the mean (std 0)."""
    model = instrument.load_model("demo-lm", "saliency")
    eos = model.tokenizer.eos_token
    cases = instrument.demo.lookup_examples(200, seed=11)
    outs = instrument.attribute_context(
        model,
        [question for _, question, _, _ in cases],
        [" ".join(sentences) for sentences, _, _, _ in cases],
        output_current_text=[f"{answer} {eos}" for _, _, answer, _ in cases],
        special_tokens_to_keep=[eos],
        context_sensitivity_std_threshold=0.0,
        attributed_fn="contrast_prob_diff",
    )
    cti_hits = cci_hits = 0
    for (sentences, _, answer, index), out in zip(cases, outs):
        assert out.output_current_tokens == [answer, eos]
        if out.selected() != [0]:
            continue
        cti_hits += 1
        lengths = [len(model.tokenizer.tokenize(sentence)) for sentence in sentences]
        assert sum(lengths) == len(out.input_context_tokens)
        scores = out.cci_scores[0].input_context_scores
        top = max(range(len(scores)), key=scores.__getitem__)
        start = sum(lengths[:index])
        cci_hits += start <= top < start + lengths[index]
    print(f"demo-lm lookup: CTI selects the answer in {cti_hits}/200, CCI's top cue in its sentence {cci_hits}/200")
    assert cti_hits >= 0.8 * len(cases) and cci_hits >= 0.8 * len(cases), (cti_hits, cci_hits)
