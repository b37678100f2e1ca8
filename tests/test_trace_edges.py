"""`instrument.trace` at its edges: glob semantics, argument checks, model configs, stop_at inside
loops, gradients that never come, and what nested traces and user hooks see."""
import copy
import functools
import types
import warnings

import pytest
import torch
from torch import nn

import instrument
from instrument.selection import MODEL_CONFIGS, UnknownModuleError, glob_match, select_modules
from instrument.trace import StopForward

from tiny_models import tiny_model


def batch_for(tokenizer, texts=("The capital of France is Paris.", "Hello world")):
    return dict(tokenizer(list(texts), padding=True, return_tensors="pt"))


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]


# -- A. globs ---------------------------------------------------------------------------------------


def test_star_is_one_dotted_component_and_double_star_any_number():
    model, _ = tiny_model("gpt2")
    names = [name for name, _ in model.named_modules() if name]
    assert select_modules(model, "transformer.h.*") == ["transformer.h.0", "transformer.h.1"]
    assert select_modules(model, "transformer.h.*") == select_modules(model, "layers")
    assert select_modules(model, "transformer.h.*.mlp") == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert select_modules(model, "transformer.h.?.attn") == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert select_modules(model, "transformer.h.[1].mlp.c_*") == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert select_modules(model, "transformer.h.**") == [n for n in names if n.startswith("transformer.h.")]
    assert select_modules(model, "**.mlp") == [n for n in names if n.endswith(".mlp")]
    assert select_modules(model, "**.c_proj") == [n for n in names if n.endswith(".c_proj")]
    assert select_modules(model, "transformer.**.ln_f") == ["transformer.ln_f"]  # ** may stand for nothing
    assert select_modules(model, "transformer.h.**.c_fc") == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    with pytest.raises(UnknownModuleError):
        select_modules(model, "*.mlp")  # `*` never crosses a dot
    assert not glob_match("transformer.h", "transformer.h.**")
    assert glob_match("a.b", "a.*") and not glob_match("a.b.c", "a.*") and glob_match("a.b.c", "a.**")


def test_trace_of_blocks_glob_hooks_only_the_blocks():
    model, tokenizer = tiny_model("gpt2")
    before = [len(m._forward_hooks) for m in model.modules()]
    with instrument.trace(model, "transformer.h.*") as t:
        hooked = sum(len(m._forward_hooks) for m in model.modules()) - sum(before)
        model(**batch_for(tokenizer))
    assert hooked == 2
    assert list(t.activations) == ["transformer.h.0", "transformer.h.1"]


# -- B. bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize("call, error, match", [
    (lambda m: instrument.trace("gpt2", "layers"), TypeError, "model must be a torch.nn.Module, got str"),
    (lambda m: instrument.trace(m, "layers", grad=True), TypeError, "unknown option 'grad' .did you mean 'grads'"),
    (lambda m: instrument.trace(m, "layers", stopat="lm_head"), TypeError, "unknown option 'stopat'"),
    (lambda m: instrument.trace(m, 3), TypeError, "modules: .*not int"),
    (lambda m: instrument.trace(m, ["layers", 3.5]), TypeError, "modules: .*not float"),
    (lambda m: instrument.trace(m, "layers", reduce="nrm"), ValueError, "Unknown reduction 'nrm'"),
    (lambda m: instrument.trace(m, "layers", reduce=2), TypeError, "reduce must be"),
    (lambda m: instrument.trace(m, patch={"lm_haed": 0.0}), UnknownModuleError, "patch: No module matches 'lm_haed'"),
    (lambda m: instrument.trace(m, patch=["lm_head"]), TypeError, "patch must be a dict"),
    (lambda m: instrument.trace(m, patch={"lm_head": "zero"}), TypeError, r"patch\['lm_head'\] must be"),
    (lambda m: instrument.trace(m, stop_at="lm_haed"), UnknownModuleError, "stop_at: No module matches"),
    (lambda m: instrument.trace(m, stop_at="layers"), ValueError, "stop_at must select one module"),
    (lambda m: instrument.trace(m, stop_at=m), ValueError, "stop_at: the model itself"),
    (lambda m: instrument.trace(m, "layers", grads="yes"), TypeError, "grads must be True or False"),
    (lambda m: instrument.trace(m, "layers", output=1.5), TypeError, "output must be"),
    (lambda m: instrument.trace(m, "layers", dtype="float16"), TypeError, "dtype must be a torch.dtype"),
    (lambda m: instrument.trace(m, "layers", device="gpu7"), ValueError, "device: 'gpu7'"),
])
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


# -- C. register_model_config -----------------------------------------------------------------------


@pytest.fixture
def registry():
    saved = dict(MODEL_CONFIGS)
    yield MODEL_CONFIGS
    MODEL_CONFIGS.clear()
    MODEL_CONFIGS.update(saved)


@functools.lru_cache(maxsize=None)
def renamed_class(cls: type, old: str, new: str) -> type:
    return type(f"Renamed{cls.__name__}", (cls,), {old: property(lambda self: getattr(self, new))})


def renamed(module: nn.Module, old: str, new: str) -> None:
    """Registers `module.old` as `module.new`; the class's code still reaches it as `self.old`."""
    module._modules[new] = module._modules.pop(old)
    module.__class__ = renamed_class(type(module), old, new)


def renamed_llama():
    """A tiny llama whose blocks call their self-attention `mixer` and its value projection `values`:
    names the built-in rules do not know; the class name is `RenamedLlamaForCausalLM`."""
    model, tokenizer = tiny_model("llama")
    original = copy.deepcopy(model)
    for layer in model.model.layers:
        renamed(layer.self_attn, "v_proj", "values")
        renamed(layer, "self_attn", "mixer")
    model.__class__ = type("RenamedLlamaForCausalLM", (type(model),), {})
    return model, original, tokenizer


def test_registered_config_resolves_attention_and_value_zeroing(registry):
    model, original, tokenizer = renamed_llama()
    batch = batch_for(tokenizer)
    torch.testing.assert_close(model(**batch).logits, original(**batch).logits, rtol=0, atol=0)
    with pytest.raises(UnknownModuleError):
        select_modules(model, "attention")
    instrument.register_model_config(
        "RenamedLlamaForCausalLM", {"self_attention_module": "mixer", "value_vector": "values", "cross_attention_module": None}
    )
    assert select_modules(model, "attention") == ["model.layers.0.mixer", "model.layers.1.mixer"]
    assert select_modules(original, "attention") == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with instrument.trace(model, "attention") as t, instrument.trace(original, "attention") as reference:
        model(**batch)
        original(**batch)
    for index in range(2):
        torch.testing.assert_close(t.activations[f"model.layers.{index}.mixer"],
                                   reference.activations[f"model.layers.{index}.self_attn"], rtol=0, atol=0)
    texts = ("The capital of France is", "The capital of France is Paris.")
    ours = instrument.load_model(model, "value_zeroing", tokenizer=tokenizer).attribute(*texts, show_progress=False)
    expected = instrument.load_model(original, "value_zeroing", tokenizer=tokenizer).attribute(*texts, show_progress=False)
    a, b = ours.sequence_attributions[0].target_attributions, expected.sequence_attributions[0].target_attributions
    assert torch.equal(a.isnan(), b.isnan()) and b.nan_to_num().abs().max() > 0
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-7)


def test_registry_by_model_type_overwrite_and_partial_configs(registry):
    class ToyBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer, self.ff = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.ff(self.mixer(x))

    class ToyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="toy_lm", is_encoder_decoder=False)
            self.blocks = nn.ModuleList([ToyBlock(), ToyBlock()])

    model = ToyLM()
    with pytest.raises(ValueError, match="lacks value_vector, cross_attention_module.*allow_partial=True"):
        instrument.register_model_config("toy_lm", {"self_attention_module": "mixer"})
    assert "toy_lm" not in registry
    with pytest.raises(ValueError, match="unknown field.*'self_attention'"):
        instrument.register_model_config("toy_lm", {"self_attention": "mixer"}, allow_partial=True)
    with pytest.raises(ValueError, match="no globs"):
        instrument.register_model_config("toy_lm", {"self_attention_module": "mix*"}, allow_partial=True)
    with pytest.raises(TypeError, match="model_type"):
        instrument.register_model_config(None, {})
    instrument.register_model_config("toy_lm", {"self_attention_module": "mixer"}, allow_partial=True)
    assert registry["toy_lm"].value_vector is None and registry["toy_lm"].cross_attention_module is None
    assert select_modules(model, "attention") == ["blocks.0.mixer", "blocks.1.mixer"]
    with pytest.raises(ValueError, match="already registered for 'toy_lm'.*overwrite=True"):
        instrument.register_model_config("toy_lm", {"self_attention_module": "ff"}, allow_partial=True)
    assert select_modules(model, "attention") == ["blocks.0.mixer", "blocks.1.mixer"]
    instrument.register_model_config("toy_lm", {"self_attention_module": "ff"}, overwrite=True, allow_partial=True)
    assert select_modules(model, "attention") == ["blocks.0.ff", "blocks.1.ff"]
    with pytest.raises(UnknownModuleError):
        select_modules(model, "cross_attention")


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
    with instrument.trace(model, stop_at="transformer.h.0"), instrument.trace(model, stop_at="transformer.h.1") as inner:
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

    handles = [model.lm_head.register_forward_pre_hook(head_input),
               model.transformer.ln_f.register_forward_hook(lambda m, a, out: out * 3)]  # before the traces
    try:
        with instrument.trace(model, "transformer.ln_f", grads=True, patch={"transformer.ln_f": lambda x: x * 2}) as outer:
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
