"""Module selection (`instrument.selection`): globs by dotted component, architecture aliases, and
model configs registered for families the built-in rules do not know."""

import copy
import functools
import types

import pytest
import torch
from torch import nn

import instrument
from instrument.selection import MODEL_CONFIGS, UnknownModuleError, glob_match, select_modules

from tiny_models import DECODER_ONLY, ENCODER_DECODER, tiny_model


def batch_for(tokenizer, texts=("The capital of France is Paris.", "Hello world")):
    return dict(tokenizer(list(texts), padding=True, return_tensors="pt"))


@pytest.mark.parametrize("arch", ENCODER_DECODER)
def test_encoder_decoder_aliases(arch):
    model, _ = tiny_model(arch)
    encoder_layers = select_modules(model, "encoder.layers")
    decoder_layers = select_modules(model, "decoder.layers")
    assert len(encoder_layers) == len(decoder_layers) == 2
    assert sorted(select_modules(model, "layers")) == sorted(encoder_layers + decoder_layers)
    assert len(select_modules(model, "decoder.cross_attention")) == 2
    with pytest.raises(UnknownModuleError):
        select_modules(model, "encoder.cross_attention")
    assert len(select_modules(model, "embeddings")) == 2
    assert len(select_modules(model, "mlp")) == 4


@pytest.mark.parametrize("arch", DECODER_ONLY)
def test_decoder_only_aliases(arch):
    model, _ = tiny_model(arch)
    for alias in ("layers", "attention", "mlp"):
        assert len(select_modules(model, alias)) == 2, alias
    assert select_modules(model, "lm_head") == [select_modules(model, model.get_output_embeddings())[0]]
    assert select_modules(model, "embeddings") == select_modules(model, model.get_input_embeddings())


def test_star_is_one_dotted_component_and_double_star_any_number():
    model, _ = tiny_model("gpt2")
    names = [name for name, _ in model.named_modules() if name]
    assert select_modules(model, "transformer.h.*") == ["transformer.h.0", "transformer.h.1"]
    assert select_modules(model, "transformer.h.*") == select_modules(model, "layers")
    assert select_modules(model, "transformer.h.*.mlp") == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert select_modules(model, "transformer.h.?.attn") == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert select_modules(model, "transformer.h.[1].mlp.c_*") == [
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
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
        "RenamedLlamaForCausalLM",
        {"self_attention_module": "mixer", "value_vector": "values", "cross_attention_module": None},
    )
    assert select_modules(model, "attention") == ["model.layers.0.mixer", "model.layers.1.mixer"]
    assert select_modules(original, "attention") == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with instrument.trace(model, "attention") as t, instrument.trace(original, "attention") as reference:
        model(**batch)
        original(**batch)
    for index in range(2):
        torch.testing.assert_close(
            t.activations[f"model.layers.{index}.mixer"],
            reference.activations[f"model.layers.{index}.self_attn"],
            rtol=0,
            atol=0,
        )
    texts = ("The capital of France is", "The capital of France is Paris.")
    ours = instrument.load_model(model, "value_zeroing", tokenizer=tokenizer).attribute(*texts, show_progress=False)
    expected = instrument.load_model(original, "value_zeroing", tokenizer=tokenizer).attribute(
        *texts, show_progress=False
    )
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
