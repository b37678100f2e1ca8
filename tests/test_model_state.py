"""`load_model` leaves the model's train/eval mode alone; `attribute` runs in eval mode and restores
every module's own flag after, errors included.

    pytest -q tests/test_model_state.py
"""

import pytest
import torch

import instrument

from tiny_models import tiny_model

TEXTS = {
    "gpt2": ("Hello world", "Hello world, this is a test."),
    "marian": ("Hello world", "The capital of France is Paris."),
}


def flags(model):
    return [(name, module.training) for name, module in model.named_modules()]


def mixed_train_mode(arch):
    """A model in train mode with some submodules in eval mode (a mix attribute must give back as is)."""
    model, tokenizer = tiny_model(arch)
    model.train()
    for index, module in enumerate(model.modules()):
        if index % 3 == 1:
            module.eval()
    before = flags(model)
    assert any(flag for _, flag in before) and not all(flag for _, flag in before)
    return model, tokenizer, before


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_mode_is_kept_by_load_model_and_attribute(arch):
    model, tokenizer, before = mixed_train_mode(arch)
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer, device="cpu")
    assert flags(model) == before
    seen = []

    def spy(args):  # an attributed function that records the mode it runs in
        seen.append(any(module.training for module in model.modules()))
        return args.logits.float().log_softmax(-1).gather(-1, args.target_ids[:, None])[:, 0]

    wrapped.attribute(*TEXTS[arch], attributed_fn=spy, show_progress=False)
    assert seen and not any(seen)  # dropout off during the call
    assert flags(model) == before
    wrapped.attribute(TEXTS[arch][0], show_progress=False, generation_args={"max_new_tokens": 3})  # generation too
    assert flags(model) == before


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_mode_is_restored_when_attribute_raises(arch):
    model, tokenizer, before = mixed_train_mode(arch)
    wrapped = instrument.load_model(model, "integrated_gradients", tokenizer=tokenizer, n_steps=4)

    def boom(args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        wrapped.attribute(*TEXTS[arch], attributed_fn=boom, show_progress=False)
    assert flags(model) == before
    with pytest.raises(ValueError, match="internal_batch_size"):  # refused before running
        wrapped.attribute(*TEXTS[arch], internal_batch_size="big", show_progress=False)
    assert flags(model) == before


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_train_mode_attributions_equal_eval_mode(arch):
    model, tokenizer = tiny_model(arch)
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    ids = tokenizer(TEXTS[arch][0], return_tensors="pt").input_ids
    with torch.no_grad():  # the model has dropout: two train-mode forwards differ
        extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        model.train()
        first, second = (model(input_ids=ids, **extra).logits for _ in range(2))
        model.eval()
    assert not torch.equal(first, second)
    expected = wrapped.attribute(*TEXTS[arch], step_scores=["probability"], show_progress=False)[0]
    model.train()
    got = wrapped.attribute(*TEXTS[arch], step_scores=["probability"], show_progress=False)[0]
    assert model.training
    for name in ("source_attributions", "target_attributions"):
        if getattr(expected, name) is not None:
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got.step_scores["probability"], expected.step_scores["probability"], rtol=0, atol=0)


def test_mc_dropout_in_train_mode_equals_eval_mode():
    """mc_dropout_prob_avg turns dropout on for its own forwards (engine.train_mode) inside the eval-mode call."""
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    torch.manual_seed(0)
    expected = wrapped.attribute(
        *TEXTS["gpt2"], step_scores=["mc_dropout_prob_avg", "probability"], show_progress=False
    )[0]
    model.train()
    model.transformer.h[0].eval()
    before = flags(model)
    torch.manual_seed(0)
    got = wrapped.attribute(*TEXTS["gpt2"], step_scores=["mc_dropout_prob_avg", "probability"], show_progress=False)[0]
    assert flags(model) == before
    torch.testing.assert_close(
        got.step_scores["mc_dropout_prob_avg"], expected.step_scores["mc_dropout_prob_avg"], rtol=0, atol=0
    )
    # Dropout really ran in its forwards: the score is not the deterministic probability's.
    assert not torch.allclose(got.step_scores["mc_dropout_prob_avg"], got.step_scores["probability"])
