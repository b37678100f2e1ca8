"""Step functions written for Inseq (reading `args.attribution_model`, `args.forward_output`,
`args.decoder_input_ids`, ...) registered unchanged in both libraries give the same step scores and,
as the attributed function, the same attributions as Inseq's.

The functions reproduce in behaviour the custom step function of Inseq's documentation (a contrastive
probability difference from a second forward on `encoder_input_embeds` and a truncated `contrast_ids`)
and two more that use the other fields: a forward on the prefix embeddings, and a per-step mask.
"""

import copy
import warnings

import pytest
import torch

import instrument
from instrument.step_args import StepFunctionArgs, StepInputs
from instrument.steps import _REGISTRY, call_step_function, get_step_function

from tiny_models import inseq_comparable, tiny_model


@pytest.fixture(scope="module")
def inseq():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("inseq")


def target_prob(args):
    """Probability of `args.target_ids` from `args.forward_output`, as Inseq's probability function reads them."""
    logits = args.attribution_model.output2logits(args.forward_output)
    return logits.softmax(-1).gather(-1, args.target_ids.reshape(-1, 1).to(logits.device)).squeeze(-1)


def doc_prob_diff(args, contrast_ids, contrast_attention_mask):
    """Inseq's documented example: p(target) minus p(contrast token) under the contrastive prefix."""
    device = args.attribution_model.device
    n = args.decoder_input_ids.shape[1]
    output = args.attribution_model.model(
        inputs_embeds=args.encoder_input_embeds,
        attention_mask=args.encoder_attention_mask,
        decoder_input_ids=contrast_ids[:, :n].to(device),
        decoder_attention_mask=contrast_attention_mask[:, :n].to(device),
    )
    original = target_prob(args)
    args.forward_output = output
    args.target_ids = contrast_ids[:, n].to(device)
    return original - target_prob(args)


def prefix_rerun_logprob(args, **kwargs):
    """log p(target) from a second forward of the model on the prefix embeddings (decoder-only)."""
    output = args.attribution_model.model(
        inputs_embeds=args.decoder_input_embeds, attention_mask=args.decoder_attention_mask
    )
    logits = args.attribution_model.output2logits(output)
    return logits.log_softmax(-1).gather(-1, args.target_ids.reshape(-1, 1)).squeeze(-1) + 0.5 * target_prob(args)


def step_weighted_logit(args, weight: float = 1.0):
    """The target logit times `weight` and the number of prefix tokens (reads decoder_attention_mask)."""
    logits = args.attribution_model.output2logits(args.forward_output)
    length = args.decoder_attention_mask.sum(-1).to(logits)
    return weight * length * logits.gather(-1, args.target_ids.reshape(-1, 1)).squeeze(-1) + 0 * args.is_attributed_fn


@pytest.fixture
def registered(inseq):
    functions = {
        "t_doc_prob_diff": doc_prob_diff,
        "t_prefix_rerun": prefix_rerun_logprob,
        "t_step_logit": step_weighted_logit,
    }
    for name, fn in functions.items():
        inseq.register_step_function(fn, name, aggregate_map=None, overwrite=True)
        instrument.register_step_function(fn, name, aggregate_map=None, overwrite=True)
    yield
    for name in functions:
        _REGISTRY.pop(name, None)


def close(ours, theirs):
    """float32 relative error 1e-5 of the largest value (NaN where neither attributes)."""
    ours, theirs = ours.float(), theirs.float()
    scale = float(torch.nan_to_num(theirs).abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * scale, equal_nan=True)


def both(inseq, model, tokenizer, *args, **kwargs):
    theirs = inseq.load_model(model, "saliency", tokenizer=copy.deepcopy(tokenizer)).attribute(
        *args, show_progress=False, **kwargs
    )
    ours = instrument.load_model(model, "saliency", tokenizer=tokenizer).attribute(*args, show_progress=False, **kwargs)
    assert len(ours) == len(theirs)
    return ours, theirs


def test_documented_contrastive_function_on_marian(inseq, registered):
    model, tokenizer = inseq_comparable("marian")
    source, target, contrast_text = "Hello world", "Le chat est", "Le chien est"
    im = inseq.load_model(model, "saliency", tokenizer=copy.deepcopy(tokenizer))
    contrast = im.encode(contrast_text, as_targets=True)
    assert contrast.input_ids.shape[1] == im.encode(target, as_targets=True).input_ids.shape[1]
    ours, theirs = both(
        inseq,
        model,
        tokenizer,
        source,
        target,
        attributed_fn="t_doc_prob_diff",
        step_scores=["t_doc_prob_diff", "t_step_logit"],
        contrast_ids=contrast.input_ids,
        contrast_attention_mask=contrast.attention_mask,
        weight=0.5,
    )
    o, t = ours[0], theirs[0]
    for name in ("t_doc_prob_diff", "t_step_logit"):
        close(o.step_scores[name], t.step_scores[name])
    assert o.step_scores["t_doc_prob_diff"].abs().max() > 0
    close(o.source_attributions, t.source_attributions)


def test_step_functions_reading_prefix_fields_on_gpt2(inseq, registered):
    model, tokenizer = tiny_model("gpt2")
    inputs, targets = ["Hello world", "The capital"], ["Hello world, this is", "The capital of France"]
    for attributed in ("t_prefix_rerun", "t_step_logit"):
        ours, theirs = both(
            inseq,
            model,
            tokenizer,
            inputs,
            targets,
            attributed_fn=attributed,
            step_scores=["t_prefix_rerun", "t_step_logit"],
            weight=2.0,
        )
        for o, t in zip(ours, theirs):
            for name in ("t_prefix_rerun", "t_step_logit"):
                close(o.step_scores[name], t.step_scores[name])
            close(o.target_attributions, t.target_attributions)


def test_step_scores_on_marian_batch(inseq, registered):
    model, tokenizer = inseq_comparable("marian")
    inputs, targets = ["Hello world", "The capital of France"], ["Le chat est", "Das Haus ist wunderbar"]
    ours, theirs = both(
        inseq, model, tokenizer, inputs, targets, attributed_fn="t_step_logit", step_scores=["t_step_logit"]
    )
    for o, t in zip(ours, theirs):
        close(o.step_scores["t_step_logit"], t.step_scores["t_step_logit"])
        close(o.source_attributions, t.source_attributions)


def test_per_step_fields_call_the_function_once_per_step_and_builtins_once():
    """Rows at steps 3, 5, 3: a function reading decoder_input_ids runs on [3, 3] and then [5]; the
    values come back in row order. A built-in never leaves the single call."""
    from instrument.engine import Engine
    from instrument.rows import Example, Rows

    model, tokenizer = tiny_model("gpt2")
    engine = Engine(model, tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
    ids = torch.tensor(tokenizer("Hello world, this is")["input_ids"])
    rows = Rows.build([Example(ids, 3, 6)], [(0, 3), (0, 5), (0, 4)], engine.pad_token_id)
    logits = engine.forward(rows)[0]
    calls = []

    def per_step(args):
        calls.append(args.decoder_input_ids.clone())
        return args.decoder_input_ids.sum(-1).float() + args.target_ids

    args = StepFunctionArgs(logits, rows.token, None, None, inputs=StepInputs(engine, rows))
    scores = call_step_function(get_step_function(per_step), args, {})
    assert [c.shape for c in calls] == [(1, 3), (1, 4), (1, 5)]
    expected = torch.stack([ids[:p].sum() + ids[p] for p in (3, 5, 4)]).float()
    assert torch.equal(scores, expected)
    assert isinstance(args.attribution_model, instrument.step_args.ModelView)
    torch.testing.assert_close(args.attribution_model.output2logits(args.forward_output), logits)
    with pytest.raises(AttributeError, match="encoder-decoder"):
        args.encoder_input_ids


def test_attribution_model_and_is_attributed_fn_seen_by_a_step_function():
    model, tokenizer = tiny_model("gpt2")
    am = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    seen = []

    def record(args):
        seen.append((args.attribution_model, args.is_attributed_fn))
        return args.attribution_model.output2logits(args.forward_output).max(-1).values

    instrument.register_step_function(record, "t_record")
    try:
        am.attribute(
            "Hello world", "Hello world, this", attributed_fn="t_record", step_scores=["t_record"], show_progress=False
        )
    finally:
        _REGISTRY.pop("t_record", None)
    assert {flag for _, flag in seen} == {True, False}
    assert all(m is am for m, _ in seen) and am.tokenizer is tokenizer and am.model is model


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
@pytest.mark.parametrize(
    "method, options",
    [("integrated_gradients", {"n_steps": 3}), ("occlusion", {}), ("sequential_integrated_gradients", {"n_steps": 2})],
)
def test_per_step_function_through_other_methods_scales_the_logit_attributions(arch, method, options):
    """step_weighted_logit at step p is weight * p * logit, so its attributions are weight * p times those
    of the built-in logit, whatever rows (repeated, perturbed) the method scores."""
    model, tokenizer = tiny_model(arch)
    am = instrument.load_model(model, method, tokenizer=tokenizer, **options)
    instrument.register_step_function(step_weighted_logit, "t_step_logit", overwrite=True)
    try:
        text = ("Hello world", "Hello world, this is") if arch == "gpt2" else ("Hello world", "Le chat est")
        ours = am.attribute(
            *text, attributed_fn="t_step_logit", step_scores=["t_step_logit", "logit"], weight=0.5, show_progress=False
        )[0]
        plain = am.attribute(*text, attributed_fn="logit", show_progress=False)[0]
    finally:
        _REGISTRY.pop("t_step_logit", None)
    factor = 0.5 * torch.arange(ours.attr_pos_start, ours.attr_pos_end).float()
    torch.testing.assert_close(
        ours.step_scores["t_step_logit"], factor * ours.step_scores["logit"], rtol=1e-5, atol=1e-6
    )
    name = "target_attributions" if arch == "gpt2" else "source_attributions"
    scaled, reference = getattr(ours, name), getattr(plain, name)
    factor = factor.view(1, -1, *[1] * (reference.dim() - 2))
    assert torch.nan_to_num(reference).abs().max() > 0
    torch.testing.assert_close(
        scaled,
        factor * reference,
        rtol=1e-4,
        atol=1e-6 * float(torch.nan_to_num(reference).abs().max()),
        equal_nan=True,
    )
