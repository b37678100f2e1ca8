"""Activation and attribution patching against patched forwards and autograd written out by hand,
the `logit_diff` step function, and the cost of each in forwards."""

import pytest
import torch

import instrument

from tiny_models import tiny_model

CLEAN = "The capital of France is"
CORRUPT = "The capital of Paris is"


def setup(arch="gpt2"):
    model, tokenizer = tiny_model(arch)
    if model.config.is_encoder_decoder:
        clean, corrupt = ("The capital of France is", "Le chat"), ("The capital of Paris is", "Le chat")
    else:
        clean, corrupt = CLEAN, CORRUPT
    am = instrument.load_model(model, tokenizer=tokenizer)
    return model, tokenizer, am, clean, corrupt


def batch_of(am, item):
    if am.engine.is_encoder_decoder:
        source = am.encode_sources([item[0]])[0]
        target = am.encode_targets([item[0]], [item[1]])[0][:-1]  # the prefix, without its EOS
        return {"input_ids": source[None], "decoder_input_ids": target[None]}
    return {"input_ids": am.encode_targets([item], [item])[0][None]}


def outputs_by_hand(model, batch, names, live=False):
    """Each module's first output, captured with plain forward hooks."""
    captured, handles = {}, []
    for name in names:

        def keep(module, args, output, name=name):
            captured[name] = output[0] if isinstance(output, tuple) else output

        handles.append(model.get_submodule(name).register_forward_hook(keep))
    try:
        with torch.enable_grad() if live else torch.no_grad():
            logits = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured


def logit_diff(logits, correct, wrong):
    return (logits[0, -1, correct] - logits[0, -1, wrong]).item()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_activation_patching_equals_patched_forwards_one_by_one(arch):
    model, tokenizer, am, clean, corrupt = setup(arch)
    names = instrument.selection.select_modules(model, "layers")
    clean_batch, corrupt_batch = batch_of(am, clean), batch_of(am, corrupt)
    clean_logits, clean_outputs = outputs_by_hand(model, clean_batch, names)
    correct, wrong = int(clean_logits[0, -1].argmax()), 5
    table = instrument.patching.activation(
        am, clean, corrupt, "logit_diff", metric_kwargs={"wrong_id": wrong}, positions=[0, 2, -1], batch_size=4
    )
    corrupt_value = logit_diff(model(**corrupt_batch).logits, correct, wrong)
    assert table.clean == pytest.approx(logit_diff(clean_logits, correct, wrong), abs=1e-5)
    assert table.corrupt == pytest.approx(corrupt_value, abs=1e-5)
    for li, name in enumerate(names):
        side = "input_ids" if am.engine.layer_side(name) == "source" else list(corrupt_batch)[-1]
        length = corrupt_batch[side].shape[1]
        for column, p in enumerate(table.positions):
            if p >= length:  # past this side's tokens (decoder layers of an encoder-decoder)
                assert table.patched[li, column].isnan()
                continue

            def put(module, args, output):
                hidden = (output[0] if isinstance(output, tuple) else output).clone()
                hidden[:, p] = clean_outputs[name][:, p]
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handle = model.get_submodule(name).register_forward_hook(put)
            try:
                with torch.no_grad():
                    by_hand = logit_diff(model(**corrupt_batch).logits, correct, wrong)
            finally:
                handle.remove()
            assert table.patched[li, column].item() == pytest.approx(by_hand, abs=1e-5)
            expected = (by_hand - corrupt_value) / (table.clean - corrupt_value)
            assert table.recovery[li, column].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_attribution_patching_equals_autograd_by_hand(arch):
    model, tokenizer, am, clean, corrupt = setup(arch)
    names = instrument.selection.select_modules(model, "layers")
    clean_batch, corrupt_batch = batch_of(am, clean), batch_of(am, corrupt)
    clean_logits, clean_outputs = outputs_by_hand(model, clean_batch, names)
    correct, wrong = int(clean_logits[0, -1].argmax()), 5
    logits, live = outputs_by_hand(model, corrupt_batch, names, live=True)
    metric = logits[0, -1, correct] - logits[0, -1, wrong]
    grads = torch.autograd.grad(metric, [live[name] for name in names])
    table = instrument.patching.attribution(am, clean, corrupt, "logit_diff", metric_kwargs={"wrong_id": wrong})
    for li, (name, grad) in enumerate(zip(names, grads)):
        effect = ((clean_outputs[name] - live[name].detach()) * grad)[0].sum(-1)
        estimate = table.patched[li, : len(effect)] - table.corrupt
        torch.testing.assert_close(estimate, effect, rtol=1e-4, atol=1e-5)
        assert table.patched[li, len(effect) :].isnan().all()


def test_both_agree_where_the_metric_is_linear_in_the_activation():
    # Without the final layer norm, the logits are linear in the last block's output.
    model, tokenizer, am, clean, corrupt = setup("gpt2")
    model.transformer.ln_f = torch.nn.Identity()
    options = dict(metric="logit_diff", metric_kwargs={"wrong_id": 7}, target_layers="transformer.h.1", target=11)
    exact = instrument.patching.activation(am, clean, corrupt, **options)
    approx = instrument.patching.attribution(am, clean, corrupt, **options)
    assert exact.recovery[0, -1].item() != 0
    torch.testing.assert_close(approx.patched, exact.patched, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(approx.recovery, exact.recovery, rtol=1e-4, atol=1e-5)


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return calls, handle


def test_cost_in_forwards():
    model, tokenizer, am, clean, corrupt = setup("gpt2")
    calls, handle = count_forwards(model)
    try:
        table = instrument.patching.activation(am, clean, corrupt, "logit", batch_size=5)
        sites = table.recovery.numel()
        assert sites == 2 * len(table.positions)
        assert calls == [1, 1] + [5] * (sites // 5) + ([sites % 5] if sites % 5 else [])
        assert table.forwards == len(calls)
        calls.clear()
        backwards = []
        hook = model.transformer.h[1].register_full_backward_hook(lambda *args: backwards.append(1))
        try:
            table = instrument.patching.attribution(am, clean, corrupt, "logit")
        finally:
            hook.remove()
        assert calls == [1, 1] and backwards == [1] and (table.forwards, table.backwards) == (2, 1)
    finally:
        handle.remove()


def test_bad_inputs():
    model, tokenizer, am, clean, corrupt = setup("gpt2")
    with pytest.raises(ValueError, match="corrupt"):
        instrument.patching.activation(am, clean, "The capital of Germany is not Berlin", "logit")
    with pytest.raises(ValueError, match="wrong_id"):
        instrument.patching.activation(am, clean, corrupt, "logit_diff")
    with pytest.raises(ValueError, match="positions"):
        instrument.patching.activation(am, clean, corrupt, "logit", positions=[99])
    with pytest.raises(ValueError, match="gap"):
        instrument.patching.activation(am, clean, clean, "logit")
    with pytest.raises(ValueError, match="tokenizer"):
        instrument.patching.activation(model, clean, corrupt, "logit")


def test_logit_diff_step_function():
    model, tokenizer = tiny_model("gpt2")
    am = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    text = "Hello world, this is"
    out = am.attribute("Hello world", text, step_scores=["logit_diff"], wrong_id=9, show_progress=False)[0]
    ids = tokenizer(text, return_tensors="pt").input_ids
    logits = model(ids).logits[0]
    start = len(tokenizer("Hello world").input_ids)
    expected = [logits[p - 1, ids[0, p]] - logits[p - 1, 9] for p in range(start, ids.shape[1])]
    torch.testing.assert_close(out.step_scores["logit_diff"], torch.stack(expected).detach(), rtol=1e-5, atol=1e-5)
    attributed = am.attribute("Hello world", text, attributed_fn="logit_diff", wrong_id=9, show_progress=False)
    assert attributed[0].target_attributions.nan_to_num().abs().sum() > 0
    with pytest.raises(ValueError, match="wrong_id"):
        am.attribute("Hello world", text, step_scores=["logit_diff"], show_progress=False)
