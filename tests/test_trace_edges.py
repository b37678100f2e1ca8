"""`instrument.trace` at its edges: argument checks, stop_at inside loops, gradients that never come,
and what nested traces and user hooks see (globs and model configs: test_selection.py)."""

import warnings

import pytest
import torch
from torch import nn

import instrument
from instrument.selection import UnknownModuleError
from instrument.trace import StopForward

from tiny_models import tiny_model


def batch_for(tokenizer, texts=("The capital of France is Paris.", "Hello world")):
    return dict(tokenizer(list(texts), padding=True, return_tensors="pt"))


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]


# -- B. bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: instrument.trace("gpt2", "layers"), TypeError, "model must be a torch.nn.Module, got str"),
        (lambda m: instrument.trace(m, "layers", grad=True), TypeError, "unknown option 'grad' .did you mean 'grads'"),
        (lambda m: instrument.trace(m, "layers", stopat="lm_head"), TypeError, "unknown option 'stopat'"),
        (lambda m: instrument.trace(m, 3), TypeError, "modules: .*not int"),
        (lambda m: instrument.trace(m, ["layers", 3.5]), TypeError, "modules: .*not float"),
        (lambda m: instrument.trace(m, "layers", reduce="nrm"), ValueError, "Unknown reduction 'nrm'"),
        (lambda m: instrument.trace(m, "layers", reduce=2), TypeError, "reduce must be"),
        (
            lambda m: instrument.trace(m, patch={"lm_haed": 0.0}),
            UnknownModuleError,
            "patch: No module matches 'lm_haed'",
        ),
        (lambda m: instrument.trace(m, patch=["lm_head"]), TypeError, "patch must be a dict"),
        (lambda m: instrument.trace(m, patch={"lm_head": "zero"}), TypeError, r"patch\['lm_head'\] must be"),
        (lambda m: instrument.trace(m, stop_at="lm_haed"), UnknownModuleError, "stop_at: No module matches"),
        (lambda m: instrument.trace(m, stop_at="layers"), ValueError, "stop_at must select one module"),
        (lambda m: instrument.trace(m, stop_at=m), ValueError, "stop_at: the model itself"),
        (lambda m: instrument.trace(m, "layers", grads="yes"), TypeError, "grads must be True or False"),
        (lambda m: instrument.trace(m, "layers", output=1.5), TypeError, "output must be"),
        (lambda m: instrument.trace(m, "layers", dtype="float16"), TypeError, "dtype must be a torch.dtype"),
        (lambda m: instrument.trace(m, "layers", device="gpu7"), ValueError, "device: 'gpu7'"),
    ],
)
def test_bad_arguments_raise_clear_errors_and_touch_nothing(call, error, match):
    model, _ = tiny_model("gpt2")
    before = hook_counts(model)
    with pytest.raises(error, match=match):
        call(model)
    assert hook_counts(model) == before and "forward" not in model.__dict__


def test_patch_of_wrong_shape_fails_in_the_forward_naming_the_patch():
    model, tokenizer = tiny_model("gpt2")
    before = hook_counts(model)
    with pytest.raises(ValueError, match=r"patch\['transformer.ln_f'\]: a tensor of shape \(3,\) cannot replace"):
        with instrument.trace(model, patch={"transformer.ln_f": torch.zeros(3)}):
            model(**batch_for(tokenizer))
    with pytest.raises(TypeError, match=r"patch\['transformer.ln_f'\]: the function must return a tensor"):
        with instrument.trace(model, patch={"transformer.ln_f": lambda out: None}):
            model(**batch_for(tokenizer))
    assert hook_counts(model) == before


# -- D. stop_at, missing gradients, nesting ---------------------------------------------------------


def test_stop_at_ends_each_forward_but_not_the_block():
    model, tokenizer = tiny_model("llama")
    batches = [batch_for(tokenizer, [text]) for text in ("Hello world", "The capital of France is Paris.")]
    head_calls, returned, after = [], [], []
    handle = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        with instrument.trace(model, "layers", stop_at="model.layers.0") as t:
            for batch in batches:
                returned.append(model(**batch))
                after.append(t.activations["model.layers.0"].shape[1])
    finally:
        handle.remove()
    assert returned == [None, None] and not head_calls
    assert after == [batch["input_ids"].shape[1] for batch in batches]
    assert list(t.activations) == ["model.layers.0"]
    assert "forward" not in model.__dict__
    assert model(**batches[0]).logits.shape[-1] == model.config.vocab_size


def test_stop_at_restores_a_patched_forward_exceptions_included():
    model, tokenizer = tiny_model("gpt2")
    batch = batch_for(tokenizer)
    class_forward = model.forward

    def users_forward(*args, **kwargs):
        return class_forward(*args, **kwargs)

    model.forward = users_forward
    with pytest.raises(ZeroDivisionError):
        with instrument.trace(model, stop_at="transformer.h.0"):
            assert model(**batch) is None
            1 / 0
    assert model.__dict__["forward"] is users_forward
    with (
        instrument.trace(model, stop_at="transformer.h.0"),
        instrument.trace(model, stop_at="transformer.h.1") as inner,
    ):
        assert model(**batch) is None
    assert "transformer.h.1" not in inner.activations  # the outer trace stopped first
    assert model.__dict__["forward"] is users_forward
    with instrument.trace(model, stop_at="transformer.h.0"):  # a submodule called directly raises
        with pytest.raises(StopForward):
            model.transformer(**batch)
    assert model.__dict__["forward"] is users_forward


def test_stop_at_is_caught_only_by_the_outermost_call_of_the_model():
    class Recursive(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x, depth=0):
            y = self.inner(x) if depth else self(x, depth=1)
            return y + 1

    model, x = Recursive(), torch.randn(2, 3)
    with instrument.trace(model, "inner", stop_at="inner") as t:
        assert model(x) is None
    torch.testing.assert_close(t.activations["inner"], model.inner(x).detach())
    assert torch.equal(model(x), model.inner(x) + 2)


def test_grads_without_gradients_warn_and_with_backward_do_not():
    model, tokenizer = tiny_model("gpt2")
    batch = batch_for(tokenizer)
    with pytest.warns(UserWarning, match="no backward through them ran inside the `with` block"):
        with instrument.trace(model, "layers", grads=True) as t:
            loss = model(**batch).logits.sum()
    loss.backward()
    assert not t.gradients
    with pytest.warns(UserWarning, match="received no gradient"):
        with torch.inference_mode(), instrument.trace(model, "layers", reduce="grad_x_act_norm"):
            model(**batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with instrument.trace(model, "layers", grads=True) as t:
            model(**batch).logits.sum().backward()
        with instrument.trace(model, "layers", grads=True):  # nothing ran: nothing to warn about
            pass
    assert set(t.gradients) == {"transformer.h.0", "transformer.h.1"}


def test_norm_reduction_needs_no_backward_even_with_grads():
    model, tokenizer = tiny_model("gpt2")
    batch = batch_for(tokenizer)
    with instrument.trace(model, "layers", store=True) as reference:
        model(**batch)
    expected = {name: act.norm(dim=-1).mean() for name, act in reference.activations.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with instrument.trace(model, "layers", reduce="norm") as t:
            model(**batch)
    with instrument.trace(model, "layers", reduce="norm", grads=True) as with_grads:
        model(**batch).logits.sum().backward()
    for stats in (t.stats, with_grads.stats):
        assert set(stats) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(stats[name], value, rtol=1e-6, atol=0)
    assert with_grads.calls == {name: 1 for name in expected}


def test_nested_traces_and_user_hooks_capture_what_the_next_module_receives():
    model, tokenizer = tiny_model("gpt2")
    batch = batch_for(tokenizer)
    plain = {}
    handle = model.transformer.ln_f.register_forward_hook(lambda m, a, out: plain.setdefault("out", out.detach()))
    model(**batch)
    handle.remove()
    received = {}

    def head_input(module, args):
        received["in"] = args[0]
        logits = nn.functional.linear(args[0], model.lm_head.weight, model.lm_head.bias)
        received["grad"] = torch.autograd.grad(logits.sum(), args[0], retain_graph=True)[0]

    handles = [
        model.lm_head.register_forward_pre_hook(head_input),
        model.transformer.ln_f.register_forward_hook(lambda m, a, out: out * 3),
    ]  # before the traces
    try:
        with instrument.trace(
            model, "transformer.ln_f", grads=True, patch={"transformer.ln_f": lambda x: x * 2}
        ) as outer:
            with instrument.trace(model, "transformer.ln_f", patch={"transformer.ln_f": lambda x: x + 1}) as inner:
                # A user hook registered after both traces still runs before they capture.
                handles.append(model.transformer.ln_f.register_forward_hook(lambda m, a, out: out - 5))
                model(**batch).logits.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    expected = (plain["out"] * 3 * 2 + 1) - 5  # patches in the order the traces were entered
    torch.testing.assert_close(received["in"].detach(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(outer.activations["transformer.ln_f"], received["in"].detach())
    assert torch.equal(inner.activations["transformer.ln_f"], received["in"].detach())
    torch.testing.assert_close(outer.gradients["transformer.ln_f"], received["grad"], rtol=1e-6, atol=0)
