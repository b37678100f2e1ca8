"""Activation checkpointing inside the attribution forward (`checkpoint_layers`,
`instrument.engine.checkpointed_layers`): the same attributions, the model untouched, the planner's
prediction of the checkpointed peak, and "auto" choosing it where only it fits the budget.

    pytest -q tests/test_checkpointing.py
"""

import warnings

import pytest
import torch
import torch.utils.checkpoint
import transformers

import instrument
from instrument import planner
from instrument.engine import checkpointed_layers, layer_blocks
from instrument.memory import tensor_peak

from helpers import WORDS, small_gpt2, texts, word_tokenizer
from tiny_models import tiny_model

TEXTS = {
    "opt": ("The capital of France is Paris.", "The capital of France is Paris. Berlin is the largest in Germany."),
    "gpt2": ("The capital of France is Paris.", "The capital of France is Paris. Berlin is the largest in Germany."),
    "llama": ("The capital of France is Paris.", "The capital of France is Paris. Berlin is the largest in Germany."),
    "marian": ("The capital of France is Paris.", "Das Haus ist wunderbar."),
}
OPTIONS = {"integrated_gradients": {"n_steps": 3}, "sequential_integrated_gradients": {"n_steps": 2}}


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """How many layer calls ran under torch.utils.checkpoint.checkpoint."""
    calls, original = [], torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


def state(model):
    """Everything a call could leave changed: weights, instance attributes of modules, hooks, flags."""
    return (
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
        [
            (name, sorted(module.__dict__), dict(module._forward_hooks), dict(module._forward_pre_hooks))
            for name, module in model.named_modules()
        ],
        [p.requires_grad for p in model.parameters()],
    )


def assert_same_state(model, before):
    weights, modules, flags = state(model)
    assert weights.keys() == before[0].keys()
    assert all(torch.equal(weights[name], before[0][name]) for name in weights)
    assert modules == before[1] and flags == before[2]
    assert all("forward" not in block.__dict__ for block in layer_blocks(model))


def attributions(out):
    return [t for t in (out[0].source_attributions, out[0].target_attributions) if t is not None]


@pytest.mark.parametrize(
    "arch,method",
    [
        ("gpt2", "saliency"),
        ("gpt2", "integrated_gradients"),
        ("llama", "input_x_gradient"),
        ("llama", "deeplift"),
        ("opt", "deeplift"),  # ReLU: the rescale rule's hooks inside the layers, run again in the recompute
        ("marian", "saliency"),
        ("marian", "sequential_integrated_gradients"),
    ],
)
def test_checkpointed_results_equal(arch, method, checkpoint_calls):
    model, tokenizer = tiny_model(arch)
    wrapped = instrument.load_model(model, method, tokenizer=tokenizer, **OPTIONS.get(method, {}))
    before = state(model)
    kwargs = {"show_progress": False, "attribute_target": arch == "marian"}
    plain = wrapped.attribute(*TEXTS[arch], checkpoint_layers=False, **kwargs)
    assert not checkpoint_calls
    checkpointed = wrapped.attribute(*TEXTS[arch], checkpoint_layers=True, **kwargs)
    assert checkpoint_calls and set(checkpoint_calls) == {False}  # every layer, non-reentrant
    assert len(checkpoint_calls) % len(layer_blocks(model)) == 0
    for a, b in zip(attributions(plain), attributions(checkpointed), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert_same_state(model, before)


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_model_untouched_after_an_error_inside(arch, checkpoint_calls):
    model, tokenizer = tiny_model(arch)
    model.get_submodule(instrument.selection.select_modules(model, "layers")[0]).register_forward_hook(
        lambda *args: None
    )
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    before = state(model)

    def boom(args):  # raised inside the checkpointed forward, after the layers ran
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        wrapped.attribute(*TEXTS[arch], attributed_fn=boom, checkpoint_layers=True, show_progress=False)
    assert checkpoint_calls
    assert_same_state(model, before)


def test_an_instance_forward_is_given_back():
    """A block whose forward is already an instance attribute (accelerate's device hooks) keeps it."""
    model, _ = tiny_model("gpt2")
    block = layer_blocks(model)[0]
    own = block.forward
    block.forward = own
    with pytest.raises(KeyError), checkpointed_layers(model):
        assert block.forward is not own
        raise KeyError("inside")
    assert block.__dict__["forward"] is own
    assert "forward" not in layer_blocks(model)[1].__dict__


def test_checkpoint_layers_checked():
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    for bad in ("yes", 1, None, "True"):
        with pytest.raises(ValueError, match="checkpoint_layers"):
            wrapped.attribute(*TEXTS["gpt2"], checkpoint_layers=bad, show_progress=False)
    for method in ("attention", "layer_integrated_gradients", "occlusion"):
        with pytest.raises(ValueError, match="checkpoint_layers=True"):
            wrapped.attribute(*TEXTS["gpt2"], method=method, checkpoint_layers=True, show_progress=False)
    with pytest.raises(ValueError, match="checkpoint_layers"):
        planner.plan_gradients(model, 10, slots=2, checkpoint="always")


def deep_gpt2(layers=6):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=layers, n_head=4, vocab_size=WORDS + 2, n_positions=512, bos_token_id=1, eos_token_id=1
    )
    config.pad_token_id = 1
    return transformers.GPT2LMHeadModel(config).eval()


def test_layer_methods_never_checkpoint(checkpoint_calls):
    """Methods capturing layer internals would capture them again in the recompute: "auto" leaves
    them alone, even under a budget nothing fits."""
    model, tokenizer = deep_gpt2(), word_tokenizer()
    prompt, full = texts(16, 4)
    wrapped = instrument.load_model(model, "layer_integrated_gradients", tokenizer=tokenizer, n_steps=2)
    wrapped.attribute(prompt, full, show_progress=False, max_memory=1024)
    wrapped.attribute(prompt, full, method="layer_gradient_x_activation", show_progress=False, max_memory=1024)
    assert not checkpoint_calls
    wrapped.attribute(prompt, full, method="saliency", show_progress=False, max_memory=1024)
    assert checkpoint_calls


def test_a_budget_only_checkpointing_fits_picks_it(checkpoint_calls):
    model, tokenizer = deep_gpt2(), word_tokenizer()
    prompt, full = texts(40, 8)
    shape = planner.model_shape(model)
    plain, recomputed = (planner.predict_gradients(shape, 48, 1, 8, 1, checkpoint=c)[0] for c in (False, True))
    assert recomputed < plain
    limit = (plain + recomputed) // 2
    plan = planner.plan_gradients(model, 48, slots=8, max_memory=limit, checkpoint="auto")
    assert plan.checkpoint and plan.fits and plan.peak <= limit and "layers checkpointed" in plan.describe()
    assert not planner.plan_gradients(model, 48, slots=8, max_memory=plain, checkpoint="auto").checkpoint
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    reference = wrapped.attribute(prompt, full, show_progress=False, max_memory=10**12)
    assert not checkpoint_calls
    bounded = wrapped.attribute(prompt, full, show_progress=False, max_memory=limit)
    assert checkpoint_calls
    torch.testing.assert_close(
        bounded[0].target_attributions, reference[0].target_attributions, rtol=1e-6, atol=1e-6, equal_nan=True
    )
    measured = tensor_peak(lambda: wrapped.attribute(prompt, full, show_progress=False, max_memory=limit))
    assert measured <= limit


@pytest.mark.slow
@pytest.mark.parametrize(
    "attention,length,cotangents",
    [("sdpa", 48, 1), ("sdpa", 112, 8), ("eager", 48, 1), ("eager", 112, 1), ("eager", 112, 8)],
)
def test_checkpointed_peak_within_20_percent(attention, length, cotangents):
    model, tokenizer = small_gpt2(attention), word_tokenizer()
    prompt, full = texts(length, 8)
    shape = planner.model_shape(model)
    limit = planner.predict_gradients(shape, length + 8, 1, 8, cotangents, checkpoint=True)[0] + 1
    plan = planner.plan_gradients(model, length + 8, slots=8, max_memory=limit, checkpoint=True)
    assert plan.checkpoint and plan.cotangents >= cotangents and plan.fits
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    measured = tensor_peak(
        lambda: wrapped.attribute(prompt, full, show_progress=False, max_memory=limit, checkpoint_layers=True)
    )
    assert abs(plan.peak - measured) <= 0.2 * measured, (plan.peak, measured)


def test_plan_command_shows_checkpointing(capsys):
    from instrument.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["plan", "-m", "demo-lm", "--length", "100", "--max_memory", "1GiB"]) == 0
        assert "no checkpointing" in capsys.readouterr().out
        assert main(["plan", "-m", "demo-lm", "--length", "100", "--checkpoint_layers", "true"]) == 0
        assert "layers checkpointed" in capsys.readouterr().out
