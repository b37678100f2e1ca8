"""Attribution on a CUDA device equals attribution on the CPU (same weights, float32), and half-precision models run.

python -m pytest -q tests/test_gpu.py      # every test here is marked gpu: skipped without CUDA
"""

import copy

import pytest
import torch

import instrument

from helpers import DECODER_TARGETS, SOURCES, TRANSLATIONS, assert_same
from tiny_models import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TEXTS = {"gpt2": (SOURCES[:2], DECODER_TARGETS[:2]), "bart": (SOURCES[:2], TRANSLATIONS[:2])}  # arch: (inputs, targets)
METHODS = {
    "saliency": {},
    "integrated_gradients": {"n_steps": 8, "internal_batch_size": 5},
    "deeplift": {},
    "gradient_shap": {"n_samples": 3, "stdevs": 0.01},
    "layer_gradient_x_activation": {"target_layers": "layers"},
    "layer_integrated_gradients": {"n_steps": 4, "target_layers": "layers"},
    "attention": {},
    "occlusion": {},
    # raw distances: float32 rounding moves small ones across the 1e-5 threshold and through the normalization
    "value_zeroing": {"normalize": False, "min_score_threshold": 0},
    "sequential_integrated_gradients": {"n_steps": 4},
    "discretized_integrated_gradients": {"n_steps": 4},
}


@pytest.fixture(scope="module", params=list(TEXTS))
def cpu_and_cuda(request):
    model, tokenizer = tiny_model(request.param)
    on_cpu = instrument.load_model(model, tokenizer=tokenizer)
    on_cuda = instrument.load_model(copy.deepcopy(model), tokenizer=tokenizer, device="cuda")
    return request.param, on_cpu, on_cuda


@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_attribution_equals_cpu(cpu_and_cuda, method):
    arch, on_cpu, on_cuda = cpu_and_cuda
    inputs, targets = TEXTS[arch]
    options = dict(
        method=method,
        show_progress=False,
        step_scores=["probability"],
        attribute_target=on_cpu.is_encoder_decoder,
        **METHODS[method],
    )
    torch.manual_seed(0)
    expected = on_cpu.attribute(inputs, targets, **options)
    torch.manual_seed(0)
    got = on_cuda.attribute(inputs, targets, **options)
    assert next(on_cuda.model.parameters()).device.type == "cuda"
    for g, e in zip(got, expected):
        assert [t.id for t in g.target] == [t.id for t in e.target]
        # Occlusion scores are differences of probabilities: their rounding error scales with the probabilities
        # (in a random tiny model, occluding a source token moves p by ~1e-3 of itself).
        # Tolerance 1e-4 rather than 1e-5: cuBLAS and the CPU sum in other orders.
        scale = e.step_scores["probability"].max() if method == "occlusion" else None
        assert all(a is None or a.device.type == "cpu" for a in (g.source_attributions, g.target_attributions))
        assert_same(g.source_attributions, e.source_attributions, 1e-4, scale)
        assert_same(g.target_attributions, e.target_attributions, 1e-4, scale)
        torch.testing.assert_close(g.step_scores["probability"], e.step_scores["probability"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_model_on_cuda(dtype):
    model, tokenizer = tiny_model("gpt2")
    reference = instrument.load_model(copy.deepcopy(model), tokenizer=tokenizer, device="cuda")
    half = instrument.load_model(model.to(dtype), tokenizer=tokenizer, device="cuda")
    inputs, targets = TEXTS["gpt2"]
    for method, options in [("saliency", {}), ("integrated_gradients", {"n_steps": 8})]:
        expected = reference.attribute(inputs, targets, method=method, show_progress=False, **options)
        got = half.attribute(inputs, targets, method=method, show_progress=False, **options)
        for g, e in zip(got, expected):
            assert g.target_attributions.dtype == torch.float32
            assert torch.equal(g.target_attributions.isnan(), e.target_attributions.isnan())
            # Token-level scores (L2 over the hidden size) agree to the half type's rounding, amplified by depth.
            assert_same(
                g.target_attributions.nan_to_num().norm(dim=-1), e.target_attributions.nan_to_num().norm(dim=-1), 0.05
            )
