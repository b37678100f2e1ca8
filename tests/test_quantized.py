"""Attribution of 8-bit / 4-bit bitsandbytes models on the CPU ("auto" batching: tests/test_batching.py).

The quantized models are GPT-2- and Llama-shaped with random weights, hidden size 128 and 4 blocks (bitsandbytes
quantizes their linear layers; its CPU backend runs int8 matmuls by dequantizing unless the CPU has
AVX-512, and 4-bit through libbitsandbytes_cpu), saved and reloaded with a `quantization_config`, as
transformers quantizes only while loading. Their attributions are compared with the float32 model's.
"""

import logging

import pytest
import torch

import instrument

from tiny_models import tiny_tokenizer

torch.set_num_threads(1)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16", every call

INPUTS = ["The capital of France is", "Hello world"]
TARGETS = ["The capital of France is Paris.", "Hello world, this is a test."]
# (method, options): the acceptance set, compared with the float32 model at Pearson r >= 0.95 per example.
COMPARED = [
    ("saliency", {}),
    ("integrated_gradients", {"n_steps": 8}),
    ("layer_gradient_x_activation", {"target_layers": "layers"}),
]
MIN_R = 0.95


def _bnb():
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes loading needs accelerate")
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")


def float_model(arch: str, hidden: int = 128, layers: int = 4, seed: int = 0):
    """A random float32 model big enough for bitsandbytes' int8 layers to dominate its memory."""
    import transformers

    tokenizer = tiny_tokenizer(arch)
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_inner=4 * hidden, n_positions=256, **common
        )
    else:
        config = transformers.LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=4 * hidden,
            max_position_embeddings=256,
            unk_token_id=tokenizer.unk_token_id,
            **common,
        )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), tokenizer


def quantized(model, folder, **options):
    """`model` reloaded from `folder` with BitsAndBytesConfig(**options) on the CPU."""
    import transformers

    dtype = options.pop("dtype", None)
    model.save_pretrained(folder)
    config = transformers.BitsAndBytesConfig(**options)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", **kwargs
    ).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    """(float32 AttributionModel, 8-bit AttributionModel) of the same weights."""
    _bnb()
    model, tokenizer = float_model(request.param)
    q8 = quantized(model, tmp_path_factory.mktemp(request.param), load_in_8bit=True)
    return instrument.load_model(model, tokenizer=tokenizer), instrument.load_model(q8, tokenizer=tokenizer)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
    seen = ~a.isnan()
    return float(torch.corrcoef(torch.stack([a[seen].double(), b[seen].double()]))[0, 1])


def snapshot(model):
    """Everything a call must leave as it was: every state_dict entry (bitsandbytes' scales included)
    with its dtype and device, parameter classes, requires_grad and grads, training flags, hooks."""
    state = {name: (value.detach().clone(), value.dtype, value.device) for name, value in model.state_dict().items()}
    params = {name: (type(p), p.dtype, p.device, p.requires_grad, p.grad) for name, p in model.named_parameters()}
    modules = [
        (m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()
    ]
    return state, params, modules


def assert_unchanged(model, before):
    state, params, modules = snapshot(model)
    assert state.keys() == before[0].keys()
    for name, (value, dtype, device) in state.items():
        old, old_dtype, old_device = before[0][name]
        assert dtype == old_dtype and device == old_device and torch.equal(value, old), name
    assert params == before[1]
    assert modules == before[2]


# -- 8-bit: memory, attributions, contrastive layer tracing ---------------------------------------------


def test_8bit_weights_take_at_most_35_percent(pair):
    full, q8 = pair
    ratio = q8.model.get_memory_footprint() / full.model.get_memory_footprint()
    summed = sum(t.numel() * t.element_size() for t in list(q8.model.parameters()) + list(q8.model.buffers()))
    summed_full = sum(t.numel() * t.element_size() for t in list(full.model.parameters()) + list(full.model.buffers()))
    assert ratio <= 0.35, ratio
    assert summed / summed_full <= 0.35
    assert q8.model.is_loaded_in_8bit
    assert any(type(m).__name__ == "Linear8bitLt" for m in q8.model.modules())


@pytest.mark.parametrize("method, options", COMPARED, ids=[m for m, _ in COMPARED])
def test_8bit_attributions_correlate_with_float32(pair, method, options):
    full, q8 = pair
    before = snapshot(q8.model)
    expected = full.attribute(INPUTS, TARGETS, method=method, show_progress=False, **options)
    got = q8.attribute(INPUTS, TARGETS, method=method, show_progress=False, **options)
    for e, g in zip(expected, got):
        assert g.target_attributions.dtype == torch.float32
        assert g.target_attributions.shape == e.target_attributions.shape
        assert pearson(e.target_attributions, g.target_attributions) >= MIN_R
    assert_unchanged(q8.model, before)


def _contrast(tokenizer, target: str, contrast: str) -> dict:
    """Options attributing the first token where `contrast` differs from `target`, aligned."""
    a, b = tokenizer(target).input_ids, tokenizer(contrast).input_ids
    step = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return dict(
        contrast_targets=contrast,
        attr_pos_start=step,
        attr_pos_end=step + 1,
        contrast_targets_alignments=[(step, step)],
    )


def test_8bit_contrastive_layer_tracing_over_all_layers(pair):
    full, q8 = pair
    options = dict(
        method="layer_gradient_x_activation",
        target_layers="layers",
        attributed_fn="contrast_prob_diff",
        step_scores=["contrast_prob_diff"],
        show_progress=False,
        **_contrast(q8.tokenizer, "The capital of France is Paris.", "The capital of France is Berlin."),
    )
    before = snapshot(q8.model)
    expected = full.attribute(INPUTS[0], "The capital of France is Paris.", **options)[0]
    got = q8.attribute(INPUTS[0], "The capital of France is Paris.", **options)[0]
    n_layers = len(q8.engine.layer_names("layers"))
    assert got.target_attributions.shape == (len(got.target), 1, n_layers, 128)
    assert got.target_attributions.dtype == torch.float32
    assert pearson(expected.target_attributions, got.target_attributions) >= MIN_R
    per_layer = got.target_attributions.nan_to_num().sum(-1)  # [positions, 1, layers]: the tracing scores
    assert per_layer.abs().sum() > 0
    torch.testing.assert_close(
        got.step_scores["contrast_prob_diff"], expected.step_scores["contrast_prob_diff"], atol=2e-3, rtol=0.1
    )
    assert_unchanged(q8.model, before)


def test_other_methods_and_trace_run_on_8bit(pair):
    full, q8 = pair
    before = snapshot(q8.model)
    for method, options in [
        ("input_x_gradient", {}),
        ("deeplift", {}),
        ("gradient_shap", {"n_samples": 2}),
        ("layer_integrated_gradients", {"n_steps": 3, "target_layers": "mlp"}),
        ("occlusion", {}),
    ]:
        if method not in instrument.list_feature_attribution_methods():
            continue
        out = q8.attribute(INPUTS[1], TARGETS[1], method=method, show_progress=False, **options)[0]
        assert out.target_attributions.dtype == torch.float32
        assert (
            torch.isfinite(out.target_attributions.nan_to_num()).all()
            and out.target_attributions.nan_to_num().abs().sum() > 0
        ), method
    grads = {}
    for name, wrapped in (("full", full), ("q8", q8)):
        batch = wrapped.tokenizer([TARGETS[0]], return_tensors="pt")
        with instrument.trace(wrapped.model, "layers", grads=True) as t:
            logits = wrapped.model(**batch).logits
            torch.autograd.grad(
                logits[0, -1].log_softmax(-1).max(), [p for p in wrapped.model.parameters() if p.requires_grad][:1]
            )
        grads[name] = torch.stack([t.gradients[k].float() for k in t.names])
        assert len(t.names) == len(wrapped.engine.layer_names("layers"))
    assert pearson(grads["full"], grads["q8"]) >= MIN_R
    assert_unchanged(q8.model, before)


def test_load_model_does_not_move_or_recast_quantized_models(pair):
    _, q8 = pair
    before = snapshot(q8.model)
    again = instrument.load_model(q8.model, "saliency", tokenizer=q8.tokenizer, device="cpu")
    assert again.model is q8.model
    assert_unchanged(q8.model, before)
    with pytest.raises(ValueError, match="by name or path"):
        instrument.load_model(q8.model, tokenizer=q8.tokenizer, model_kwargs={"quantization_config": object()})


def test_load_by_path_with_quantization_config():
    _bnb()
    import transformers

    wrapped = instrument.load_model(
        "demo-lm",
        "saliency",
        device="cpu",
        model_kwargs={"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True)},
    )
    assert wrapped.model.is_loaded_in_8bit
    assert any(type(m).__name__ == "Linear8bitLt" for m in wrapped.model.modules())
    out = wrapped.attribute("the capital of", "the capital of the", show_progress=False)[0]
    assert out.target_attributions.dtype == torch.float32 and not out.target_attributions[:, -1].isnan().all()


def test_8bit_half_precision_builds_inputs_in_the_first_layers_dtype(tmp_path, monkeypatch):
    """Embeddings, baselines and path points in float16 (the model's compute dtype); results in float32."""
    _bnb()
    from instrument import kernels

    model, tokenizer = float_model("gpt2", layers=2)
    q8 = instrument.load_model(quantized(model, tmp_path, load_in_8bit=True, dtype=torch.float16), tokenizer=tokenizer)
    assert q8.engine.input_dtype == torch.float16
    seen = []
    real = kernels.interpolate
    monkeypatch.setattr(
        kernels,
        "interpolate",
        lambda x, base, alphas, **kw: seen.append((x.dtype, base.dtype)) or real(x, base, alphas, **kw),
    )
    full = instrument.load_model(model, tokenizer=tokenizer)
    for baselines in (None, "zeros", torch.zeros(128)):
        expected = full.attribute(
            INPUTS[1], TARGETS[1], method="integrated_gradients", n_steps=4, baselines=baselines, show_progress=False
        )[0]
        seen.clear()
        got = q8.attribute(
            INPUTS[1], TARGETS[1], method="integrated_gradients", n_steps=4, baselines=baselines, show_progress=False
        )[0]
        assert seen and all(dtypes == (torch.float16, torch.float16) for dtypes in seen)
        assert got.target_attributions.dtype == torch.float32
        assert pearson(expected.target_attributions, got.target_attributions) >= MIN_R
    assert all(p.dtype in (torch.float16, torch.int8) for p in q8.model.parameters())


# -- 4-bit ---------------------------------------------------------------------------------------------


def _four_bit_runs_on_cpu() -> str | None:
    """None if bitsandbytes runs a 4-bit linear layer forward and backward on the CPU, else why not."""
    bnb = _bnb()
    try:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        layer.load_state_dict(torch.nn.Linear(64, 64).state_dict())
        layer = layer.to("cpu")
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    except Exception as error:  # noqa: BLE001 (any failure means: not supported here)
        return f"bitsandbytes {bnb.__version__} cannot run 4-bit layers on this CPU: {type(error).__name__}: {error}"
    return None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_4bit_runs_the_same_methods(arch, tmp_path):
    reason = _four_bit_runs_on_cpu()
    if reason:
        pytest.skip(reason)
    model, tokenizer = float_model(arch, layers=2)
    q4 = quantized(model, tmp_path, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    assert q4.is_loaded_in_4bit
    for module in q4.modules():
        # On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights in place at no-grad forwards and back when the
        # state_dict is read (not exactly: the bfloat16 scales come back permuted); its own layout changes would
        # hide ours.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    wrapped = instrument.load_model(q4, tokenizer=tokenizer)
    before = snapshot(q4)
    for method, options in COMPARED + [
        (
            "layer_gradient_x_activation",
            {
                "target_layers": "layers",
                "attributed_fn": "contrast_prob_diff",
                **_contrast(tokenizer, TARGETS[0], "The capital of France is Berlin."),
            },
        )
    ]:
        out = wrapped.attribute(INPUTS[0], TARGETS[0], method=method, show_progress=False, **options)[0]
        values = out.target_attributions
        assert (
            values.dtype == torch.float32
            and torch.isfinite(values.nan_to_num()).all()
            and values.nan_to_num().abs().sum() > 0
        )
    assert_unchanged(q4, before)
