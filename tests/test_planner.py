"""The memory planner (instrument/planner.py): predicted peaks against the profiler's, budgets, the
out-of-memory fallback, and `instrument plan`."""

import subprocess
import sys

import pytest
import torch
import transformers

import instrument
from instrument import planner
from instrument.memory import tensor_peak

from helpers import small_gpt2, texts, word_tokenizer


def budget_for(model, length, slots, cotangents):
    """A max_memory for which the planner picks `cotangents` slots per backward."""
    peak = planner.predict_gradients(planner.model_shape(model), length, 1, slots, cotangents)[0]
    return peak + 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "attention,method,length,cotangents",
    [
        ("sdpa", "saliency", 48, 1),
        ("sdpa", "saliency", 48, 8),
        ("sdpa", "saliency", 112, 4),
        ("sdpa", "input_x_gradient", 112, 8),
        ("eager", "saliency", 112, 1),
        ("eager", "saliency", 112, 8),
        ("eager", "input_x_gradient", 48, 4),
    ],
)
def test_predicted_peak_within_20_percent(attention, method, length, cotangents):
    model, tokenizer = small_gpt2(attention), word_tokenizer()
    prompt, full = texts(length, 8)
    wrapped = instrument.load_model(model, method, tokenizer=tokenizer)
    limit = budget_for(model, length + 8, 8, cotangents)
    plan = planner.plan_gradients(model, length + 8, slots=8, max_memory=limit)
    assert plan.cotangents >= cotangents and plan.fits  # larger where that predicts the same peak
    measured = tensor_peak(lambda: wrapped.attribute(prompt, full, show_progress=False, max_memory=limit))
    assert abs(plan.peak - measured) <= 0.2 * measured, (plan.peak, measured)


def test_budget_below_peak_same_results():
    model, tokenizer = small_gpt2(), word_tokenizer()
    prompt, full = texts(40, 8)
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    unbounded = wrapped.attribute(prompt, full, show_progress=False, max_memory=10**12)
    whole = tensor_peak(lambda: wrapped.attribute(prompt, full, show_progress=False, max_memory=10**12))
    limit = budget_for(model, 48, 8, 1)
    assert limit < whole
    bounded = wrapped.attribute(prompt, full, show_progress=False, max_memory=limit)
    small = tensor_peak(lambda: wrapped.attribute(prompt, full, show_progress=False, max_memory=limit))
    assert small <= limit and small < whole
    a, b = unbounded[0].target_attributions, bounded[0].target_attributions
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert all(p.requires_grad for p in model.parameters())  # frozen inside the call only


def test_out_of_memory_halves_slots_for_the_rest_of_the_call(monkeypatch):
    model, tokenizer = small_gpt2(), word_tokenizer()
    prompt, full = texts(20, 8)
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    reference = wrapped.attribute(prompt, full, show_progress=False, max_memory=10**12)[0].target_attributions
    grad, sizes = torch.autograd.grad, []

    def failing(outputs, inputs, grad_outputs=None, **kwargs):
        if kwargs.get("is_grads_batched"):
            sizes.append(len(grad_outputs[0]))
            if len(grad_outputs[0]) > 2:
                raise torch.OutOfMemoryError("raised by the test")
        return grad(outputs, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", failing)
    got = wrapped.attribute(prompt, full, show_progress=False, max_memory=10**12)[0].target_attributions
    assert sizes == [8, 4, 2, 2, 2, 2]
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_parameters_restored_after_errors():
    model, tokenizer = small_gpt2(), word_tokenizer()
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    with pytest.raises(ValueError):
        wrapped.attribute("w1 w2", "w1 w2 w3", show_progress=False, attributed_fn="argmax")
    flags = [p.requires_grad for p in model.parameters()]
    assert flags.count(False) == 1 and not model.transformer.h[0].mlp.c_fc.weight.requires_grad


def test_max_memory_checked():
    model, tokenizer = small_gpt2(), word_tokenizer()
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    for bad in (0, -5, "lots", 1.5, True):
        with pytest.raises(ValueError, match="max_memory"):
            wrapped.attribute("w1 w2", "w1 w2 w3", show_progress=False, max_memory=bad)


def test_shape_and_plan_scale():
    shape = planner.model_shape(transformers.GPT2Config(), torch.float32)
    assert (shape.layers, shape.hidden, shape.heads, shape.intermediate, shape.bytes) == (12, 768, 12, 3072, 4)
    short, long = (planner.plan_gradients(shape, n, slots=32, max_memory=10**12) for n in (288, 4032))
    assert long.graph == pytest.approx(short.graph * 4032 / 288)  # linear in length under sdpa
    tight = planner.plan_gradients(shape, 4032, slots=32, max_memory=long.graph + long.fixed + 3 * long.per_slot)
    assert tight.cotangents < 32 and tight.peak <= tight.budget


def test_plan_command(tmp_path):
    transformers.GPT2Config().save_pretrained(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "instrument", "plan", "-m", str(tmp_path), "--length", "1000", "--max_memory", "1GiB"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "slots per batched backward" in done.stdout and "predicted peak" in done.stdout


def test_plan_command_reads_a_demo_model(capsys):
    from instrument.cli import main

    assert main(["plan", "-m", "demo-lm", "--length", "100", "--max_memory", "1GiB"]) == 0
    printed = capsys.readouterr().out
    assert "model demo-lm" in printed and "predicted peak" in printed
