"""The memory planner for no-grad forwards (`planner.predict_forward`, `plan_rows`): predicted peaks
of the attention and occlusion methods against the profiler's, a budget that bounds the perturbed
copies per forward, the out-of-memory fallback, and `instrument plan` for these methods."""

import pytest
import torch
import transformers

import instrument
from instrument import planner
from instrument.engine import Engine
from instrument.memory import tensor_peak

from helpers import small_gpt2, texts, word_tokenizer

GENERATED = 8


def predicted(model, method, length, rows, generated=GENERATED):
    """The planner's peak for `rows` rows per forward (perturbed copies, or examples for attention)."""
    shape, width = planner.model_shape(model), length + generated
    if method == "attention":  # eager, the mean map of each step kept
        return planner.predict_forward(shape, width, rows, reads=generated, kept=generated * width * 4, eager=True)
    return planner.predict_forward(shape, width, rows, reads=generated, embed_copies=generated)


def run(wrapped, method, length, rows, generated=GENERATED, **kwargs):
    prompt, full = texts(length, generated)
    if method == "attention":  # one forward of every example
        return wrapped.attribute([prompt] * rows, [full] * rows, show_progress=False, **kwargs)
    return wrapped.attribute(prompt, full, show_progress=False, perturbations_per_eval=rows, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "method,lengths,counts", [("occlusion", (48, 112), (4, 16)), ("attention", (48, 112, 240), (1, 3))]
)
def test_predicted_peak_within_20_percent(attention, method, lengths, counts):
    model = small_gpt2(attention)
    wrapped = instrument.load_model(model, method, tokenizer=word_tokenizer())
    for length in lengths:
        for rows in counts:
            run(wrapped, method, length, rows)  # warm-up
            measured = tensor_peak(lambda: run(wrapped, method, length, rows))
            peak = predicted(model, method, length, rows)
            assert abs(peak - measured) <= 0.2 * measured, (length, rows, peak, measured)


@pytest.mark.slow
def test_predicted_peak_at_the_lm_head():
    """A large vocabulary and many steps: the peak is at the LM head (logits, per-step embeddings)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=20000, bos_token_id=1, eos_token_id=1)
    config.pad_token_id = 1
    model = transformers.GPT2LMHeadModel(config).eval()
    wrapped = instrument.load_model(model, "occlusion", tokenizer=word_tokenizer())
    for rows in (4, 8):
        run(wrapped, "occlusion", 64, rows, generated=32)
        measured = tensor_peak(lambda: run(wrapped, "occlusion", 64, rows, generated=32))
        peak = predicted(model, "occlusion", 64, rows, generated=32)
        assert abs(peak - measured) <= 0.2 * measured, (rows, peak, measured)


def test_budget_bounds_the_copies_per_forward():
    model = small_gpt2()
    wrapped = instrument.load_model(model, "occlusion", tokenizer=word_tokenizer())
    unbounded = run(wrapped, "occlusion", 40, 32, max_memory=10**12)
    whole = tensor_peak(lambda: run(wrapped, "occlusion", 40, 32, max_memory=10**12))
    limit = int(predicted(model, "occlusion", 40, 4) * 1.1)
    assert planner.plan_rows(model, 48, 32, reads=GENERATED, embed_copies=GENERATED, max_memory=limit) == 4
    bounded = run(wrapped, "occlusion", 40, 32, max_memory=limit)
    small = tensor_peak(lambda: run(wrapped, "occlusion", 40, 32, max_memory=limit))
    assert small <= limit < whole
    a, b = unbounded[0].target_attributions, bounded[0].target_attributions
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_out_of_memory_halves_the_copies(monkeypatch):
    model = small_gpt2()
    wrapped = instrument.load_model(model, "occlusion", tokenizer=word_tokenizer())
    reference = run(wrapped, "occlusion", 12, 8, max_memory=10**12)[0].target_attributions
    forward_steps, sizes = Engine.forward_steps, []

    def failing(self, rows, *args, **kwargs):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("raised by the test")
        return forward_steps(self, rows, *args, **kwargs)

    monkeypatch.setattr(Engine, "forward_steps", failing)
    got = run(wrapped, "occlusion", 12, 8, max_memory=10**12)[0].target_attributions
    assert sizes[:4] == [1, 8, 4, 2] and set(sizes[4:]) <= {1, 2}  # the original, then halves for the rest
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_plan_rows_scales_and_bounds():
    shape = planner.model_shape(small_gpt2("eager"))
    one = planner.predict_forward(shape, 200, 1, reads=8)
    assert planner.predict_forward(shape, 200, 6, reads=8) == pytest.approx(6 * one, abs=6)
    assert planner.predict_forward(shape, 200, 1, reads=8, eager=False) < one  # no length² scores
    assert planner.plan_rows(shape, 200, 32, reads=8, max_memory=3 * one + 1) == 3
    assert planner.plan_rows(shape, 200, 32, reads=8, max_memory=1) == 1
    assert planner.plan_rows(shape, 200, 32, reads=8, max_memory=10**12) == 32


@pytest.mark.parametrize("method", ["occlusion", "attention"])
def test_plan_command_forward_methods(method, capsys):
    from instrument.cli import main

    assert main(["plan", "-m", "demo-lm", "-a", method, "--length", "1000", "--max_memory", "50MiB"]) == 0
    printed = capsys.readouterr().out
    assert "predicted peak" in printed and "per forward (no gradients)" in printed
    if method == "occlusion":
        assert "of 32 perturbed copies" in printed


@pytest.mark.parametrize("aggregate_fn", ["mean", None])
def test_attention_budget_runs_examples_in_chunks(aggregate_fn, monkeypatch):
    model = small_gpt2()
    wrapped = instrument.load_model(model, "attention", tokenizer=word_tokenizer())
    options = {"aggregate_fn": aggregate_fn}
    unbounded = run(wrapped, "attention", 40, 3, max_memory=10**12, **options)
    whole = tensor_peak(lambda: run(wrapped, "attention", 40, 3, max_memory=10**12, **options))
    limit = int(predicted(model, "attention", 40, 1) * 1.15)  # one example per forward
    forward_steps, sizes = Engine.forward_steps, []

    def counted(self, rows, *args, **kwargs):
        sizes.append(len(rows))
        return forward_steps(self, rows, *args, **kwargs)

    monkeypatch.setattr(Engine, "forward_steps", counted)
    bounded = run(wrapped, "attention", 40, 3, max_memory=limit, **options)
    assert sizes == [1, 1, 1]
    if aggregate_fn == "mean":
        small = tensor_peak(lambda: run(wrapped, "attention", 40, 3, max_memory=limit, **options))
        assert small <= limit < whole
    for a, b in zip(unbounded, bounded):
        torch.testing.assert_close(b.target_attributions, a.target_attributions, rtol=1e-6, atol=1e-6, equal_nan=True)
