"""Path methods through the memory planner (`instrument.planner.plan_points`, `predict_path`): the
interpolation points per forward chosen for `max_memory`, the predicted peak of a chunk against the
profiler's, and the same attributions under a small budget.

    pytest -q tests/test_path_planner.py
"""

import pytest
import torch

import instrument
from instrument import planner
from instrument.memory import tensor_peak

from helpers import small_gpt2, texts, word_tokenizer

GENERATED = 8


def layout(method, length):
    """(full rows per point, slots, width, shared prefix, extra rows) as the method runs its points
    for one example of `length` prompt tokens and GENERATED attributed tokens."""
    if method == "integrated_gradients":  # one full row per point, read at every slot
        return 1, GENERATED, length + GENERATED, True, 0
    if method == "gradient_shap":  # every row its own, padded to the longest; noise for each sample
        return GENERATED, 1, length + GENERATED - 1, False, GENERATED * (8 + 1)
    return 1, 1, length + GENERATED - 1, False, 0  # sequential IG: one row per point


def predicted(model, method, length, points, cotangents=1):
    rows, slots, width, shared, extra = layout(method, length)
    return planner.predict_path(
        planner.model_shape(model),
        width,
        points,
        rows,
        GENERATED,
        slots,
        cotangents,
        point_rows=GENERATED if shared else rows,
        shared_prefix=shared,
        extra_rows=extra,
    )


def chosen_points(model, method, length, total, limit):
    rows, slots, width, shared, extra = layout(method, length)
    return planner.plan_points(
        model,
        width,
        total,
        rows,
        GENERATED,
        slots,
        max_memory=limit,
        point_rows=GENERATED if shared else rows,
        shared_prefix=shared,
        extra_rows=extra,
    )


OPTIONS = {
    "integrated_gradients": {"n_steps": 8},
    "gradient_shap": {"n_samples": 8},
    "sequential_integrated_gradients": {"n_steps": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,attention,length,points",
    [
        ("integrated_gradients", "sdpa", 48, 1),
        ("integrated_gradients", "sdpa", 112, 4),
        ("integrated_gradients", "eager", 48, 2),
        ("integrated_gradients", "eager", 112, 4),
        ("gradient_shap", "sdpa", 48, 1),
        ("gradient_shap", "eager", 112, 4),
        ("sequential_integrated_gradients", "sdpa", 24, 4),
        ("sequential_integrated_gradients", "eager", 24, 16),
    ],
)
def test_path_peak_within_20_percent(method, attention, length, points):
    model, tokenizer = small_gpt2(attention), word_tokenizer()
    prompt, full = texts(length, GENERATED)
    wrapped = instrument.load_model(model, method, tokenizer=tokenizer)
    limit = predicted(model, method, length, points) + 1
    total = 8 if method != "sequential_integrated_gradients" else 10**6
    chosen = chosen_points(model, method, length, total, limit)
    assert chosen == points
    cotangents = 1
    if method == "integrated_gradients":  # the slots per backward the planner then picks, beside the path's tensors
        width = length + GENERATED
        held = planner.path_held(planner.model_shape(model), width, chosen, GENERATED, GENERATED)
        plan = planner.plan_gradients(model, width, GENERATED, rows=chosen, max_memory=limit, reserved=held)
        cotangents = plan.cotangents
    expected = predicted(model, method, length, chosen, cotangents)
    assert expected <= limit
    options = {**OPTIONS[method], "internal_batch_size": 10**6}  # the planner alone chunks
    measured = tensor_peak(
        lambda: wrapped.attribute(
            prompt, full, show_progress=False, max_memory=limit, checkpoint_layers=False, **options
        )
    )
    assert abs(expected - measured) <= 0.2 * measured, (expected, measured)


@pytest.mark.parametrize("method", ["integrated_gradients", "gradient_shap", "sequential_integrated_gradients"])
def test_small_budget_same_results(method, monkeypatch):
    model, tokenizer = small_gpt2(), word_tokenizer()
    prompt, full = texts(24, GENERATED)
    wrapped = instrument.load_model(model, method, tokenizer=tokenizer, **OPTIONS[method])
    options = {"show_progress": False, "internal_batch_size": 10**6}
    sizes, plan = [], planner.plan_points

    def recording(*args, **kwargs):
        sizes.append(plan(*args, **kwargs))
        return sizes[-1]

    monkeypatch.setattr(planner, "plan_points", recording)
    unbounded = wrapped.attribute(prompt, full, max_memory=10**12, **options)[0].target_attributions
    assert sizes and sizes[-1] > 1
    limit = predicted(model, method, 24, 1) + 1
    bounded = wrapped.attribute(prompt, full, max_memory=limit, **options)[0].target_attributions
    assert sizes[-1] == 1
    torch.testing.assert_close(bounded, unbounded, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_budget_caps_an_explicit_internal_batch_size():
    shape = planner.model_shape(small_gpt2())
    roomy = planner.plan_points(shape, 40, 50, 1, 8, 8, max_memory=10**12)
    tight = planner.plan_points(shape, 40, 50, 1, 8, 8, max_memory=planner.predict_path(shape, 40, 3, 1, 8, 8) + 1)
    assert (roomy, tight) == (50, 3)
    with pytest.raises(ValueError, match="checkpoint_layers"):
        planner.plan_points(shape, 40, 50, 1, 8, 8, checkpoint="sometimes")
