import pytest
import torch

import instrument
from instrument.models.base import attribute_reference

from helpers import DECODER_TARGETS, SOURCES, TRANSLATIONS, assert_same
from tiny_models import ALL_ARCHS, DECODER_ONLY, tiny_model

METHOD_OPTIONS = {
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"n_steps": 4, "internal_batch_size": 7},
    "deeplift": {},
    "gradient_shap": {"n_samples": 3, "stdevs": 0.01},
    "layer_gradient_x_activation": {"target_layers": "layers"},
    "layer_integrated_gradients": {"n_steps": 3, "target_layers": "layers"},
    "layer_deeplift": {"target_layers": "mlp"},
}


@pytest.fixture(scope="module", params=ALL_ARCHS)
def attribution_model(request):
    model, tokenizer = tiny_model(request.param)
    return instrument.load_model(model, tokenizer=tokenizer)


def texts_for(model):
    return (SOURCES, TRANSLATIONS) if model.is_encoder_decoder else (SOURCES, DECODER_TARGETS)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_batched_engine_equals_step_by_step_reference(attribution_model, method):
    inputs, targets = texts_for(attribution_model)
    options = METHOD_OPTIONS[method]
    common = dict(
        method=method,
        show_progress=False,
        step_scores=["probability"],
        attribute_target=attribution_model.is_encoder_decoder,
    )
    batched = attribution_model.attribute(inputs, targets, **common, **options)
    reference = attribute_reference(attribution_model, inputs, targets, **common, **options)
    assert len(batched) == len(inputs)
    for got, expected in zip(batched, reference):
        assert_same(got.source_attributions, expected.source_attributions)
        assert_same(got.target_attributions, expected.target_attributions)
        torch.testing.assert_close(
            got.step_scores["probability"], expected.step_scores["probability"], rtol=1e-5, atol=1e-7
        )
        assert not got.target_attributions[got.attr_pos_start - 1 :].isnan().all()


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_shapes_orientation_and_nan_pattern(arch):
    model, tokenizer = tiny_model(arch)
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    inputs, targets = texts_for(wrapped)
    out = wrapped.attribute(inputs[:2], targets[:2], show_progress=False, attribute_target=wrapped.is_encoder_decoder)
    for seq in out:
        n_steps = seq.attr_pos_end - seq.attr_pos_start
        assert seq.attr_pos_end == len(seq.target)
        assert seq.target_attributions.shape == (
            len(seq.target),
            n_steps,
            model.config.hidden_size if hasattr(model.config, "hidden_size") else 32,
        )
        for step in range(n_steps):
            position = seq.attr_pos_start + step
            assert not seq.target_attributions[:position, step].isnan().any()
            assert seq.target_attributions[position:, step].isnan().all()
        if wrapped.is_encoder_decoder:
            assert seq.source_attributions.shape[:2] == (len(seq.source), n_steps)
            assert not seq.source_attributions.isnan().any()
            assert seq.target[0].id == model.config.decoder_start_token_id
        else:
            assert seq.source_attributions is None
            assert [t.token for t in seq.target] == tokenizer.convert_ids_to_tokens(
                tokenizer(targets[out.sequence_attributions.index(seq)])["input_ids"]
            )


def test_layer_methods_add_a_layer_dimension_and_sides():
    model, tokenizer = tiny_model("bart")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    out = wrapped.attribute(
        SOURCES[:1],
        TRANSLATIONS[:1],
        method="layer_gradient_x_activation",
        target_layers="layers",
        attribute_target=True,
        show_progress=False,
    )
    seq = out[0]
    assert seq.source_attributions.shape[2:] == (2, 32)  # two encoder layers
    assert seq.target_attributions.shape[2:] == (2, 32)  # two decoder layers
    single = wrapped.attribute(
        SOURCES[:1],
        TRANSLATIONS[:1],
        method="layer_gradient_x_activation",
        target_layer="model.encoder.layers.1",
        show_progress=False,
    )[0]
    assert single.target_attributions is None
    assert_same(single.source_attributions, seq.source_attributions[:, :, 1])


def test_generation_when_no_target_is_given():
    model, tokenizer = tiny_model("llama")
    wrapped = instrument.load_model(model, "input_x_gradient", tokenizer=tokenizer)
    out = wrapped.attribute(SOURCES[:2], show_progress=False, generation_args={"max_new_tokens": 3, "do_sample": False})
    for text, seq in zip(out.info["generated_texts"], out):
        assert seq.attr_pos_end - seq.attr_pos_start <= 3
        assert seq.target_attributions.shape[1] == seq.attr_pos_end - seq.attr_pos_start
    prompt = tokenizer(SOURCES[0], return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0]
    assert [t.id for t in out[0].target] == expected.tolist()[: len(out[0].target)]


def test_attr_positions_restrict_steps():
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    full = wrapped.attribute(SOURCES[1], DECODER_TARGETS[1], show_progress=False)[0]
    part = wrapped.attribute(
        SOURCES[1],
        DECODER_TARGETS[1],
        attr_pos_start=full.attr_pos_start + 1,
        attr_pos_end=full.attr_pos_end - 1,
        show_progress=False,
    )[0]
    assert_same(
        part.target_attributions, full.target_attributions[: part.attr_pos_end, 1:-1]
    )  # target cut at attr_pos_end


def test_progress_bar_is_shown_and_can_be_silenced(capsys):
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], show_progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m.attribute("Hello world", "Bye world"), ValueError, "must start with the input text"),
        (lambda m: m.attribute("", "Hello"), ValueError, "non-empty"),
        (lambda m: m.attribute([], []), ValueError, "empty"),
        (lambda m: m.attribute(["Hello", "Hi"], ["Hello world"]), ValueError, "one per input"),
        (lambda m: m.attribute("Hello", "Hello world", method="salency"), ValueError, "Available: .*saliency"),
        (lambda m: m.attribute("Hello", "Hello world", attributed_fn="prob"), ValueError, "Available: .*probability"),
        (lambda m: m.attribute("Hello", "Hello world", step_scores=["entropyy"]), ValueError, "Unknown step function"),
        (lambda m: m.attribute("Hello", "Hello world", attr_pos_start=50), ValueError, "out of range"),
        (lambda m: m.attribute("Hello", "Hello world", attr_pos_end=0), ValueError, "out of range"),
        (lambda m: m.attribute("Hello", "Hello world " * 60), ValueError, "context"),
        (
            lambda m: m.attribute(
                "Hello", "Hello world", method="layer_gradient_x_activation", target_layer="transformer.h.9"
            ),
            ValueError,
            "Close matches",
        ),
        (lambda m: m.attribute("Hello", "Hello world", n_stepz=3), TypeError, "n_stepz"),
        (lambda m: m.attribute("Hello", "Hello world", batch_size=0), ValueError, "batch_size"),
        (
            lambda m: m.attribute("Hello", "Hello world", attributed_fn="contrast_prob_diff"),
            ValueError,
            "contrast_targets",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, match):
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    with pytest.raises(error, match=match):
        call(wrapped)


def test_attribute_target_on_decoder_only_warns():
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    with pytest.warns(UserWarning, match="attribute_target"):
        wrapped.attribute("Hello", "Hello world", attribute_target=True, show_progress=False)


def test_load_model_rejects_unknown_method_and_options():
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ValueError, match="Available"):
        instrument.load_model(model, "grad", tokenizer=tokenizer)
    with pytest.raises(TypeError, match="n_steps"):
        instrument.load_model(model, "saliency", tokenizer=tokenizer, n_steps=3)
    assert set(instrument.list_feature_attribution_methods()) >= set(METHOD_OPTIONS)


@pytest.mark.parametrize("arch", DECODER_ONLY[:2])
def test_model_unchanged_by_attribution(arch):
    model, tokenizer = tiny_model(arch)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    wrapped = instrument.load_model(model, "deeplift", tokenizer=tokenizer)
    wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], show_progress=False)
    with pytest.raises(ValueError):
        wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], attributed_fn="contrast_prob", show_progress=False)
    assert hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    assert not model.training
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None


def _count_forwards(model):
    """Batch sizes of the model's forwards, and the handle to remove."""
    sizes = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    return sizes, handle


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_gradient_methods_run_one_forward_per_example_and_path_point(arch):
    """Every step of an example reads its gradients off one full-row forward (per path point)."""
    model, tokenizer = tiny_model(arch)
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    inputs, targets = texts_for(wrapped)
    sizes, handle = _count_forwards(model)
    try:
        wrapped.attribute(inputs, targets, method="saliency", show_progress=False)
        assert sizes == [len(inputs)]
        sizes.clear()
        options = dict(method="integrated_gradients", n_steps=4, internal_batch_size=10**6, show_progress=False)
        wrapped.attribute(inputs, targets, **options)
        assert sizes == [4 * len(inputs)]
        sizes.clear()
        wrapped.attribute(inputs, targets, step_scores=["probability"], **options)
        assert sizes == [4 * len(inputs), len(inputs)]  # the path points, then the logits at the inputs
    finally:
        handle.remove()


def test_activation_slopes_keep_values_and_gradients():
    from methods.base import activation_slopes

    model, _ = tiny_model("gpt2")
    act = model.transformer.h[0].mlp.act
    assert type(act).__module__ == "transformers.activations"
    x = torch.randn(3, 5, 7, requires_grad=True)
    seeds = torch.randn(4, 3, 5, 7)
    expected = act(x)
    expected_grads = torch.stack([torch.autograd.grad(expected, x, seed, retain_graph=True)[0] for seed in seeds])
    with activation_slopes(model):
        got = act(x)
        got_grads = torch.autograd.grad(got, x, seeds, is_grads_batched=True)[0]
    assert torch.equal(got, expected)
    torch.testing.assert_close(got_grads, expected_grads, rtol=1e-5, atol=1e-7)
    assert not act._forward_hooks


def test_cpu_chunks_default_to_a_cache_sized_number_of_tokens():
    from instrument.rows import Example, Rows
    from methods.base import CPU_CHUNK_TOKENS, chunks

    rows = Rows.build(
        [Example(torch.arange(30), 20, 30)], [(0, p) for p in range(20, 30)], pad_id=0
    )  # 10 rows, width 29
    per_chunk = CPU_CHUNK_TOKENS // (10 * 29)
    assert [len(c) for c in chunks(50, rows, None)] == [per_chunk] * (50 // per_chunk) + (
        [50 % per_chunk] if 50 % per_chunk else []
    )
    assert [len(c) for c in chunks(50, rows, 200)] == [20, 20, 10]  # internal_batch_size counts rows
    assert [len(c) for c in chunks(50, rows, 10**6)] == [50]
