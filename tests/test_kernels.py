"""instrument.kernels: the native extension against its PyTorch fallback and a plain formula.

    $ INSTRUMENT_REQUIRE_EXT=1 python -m pytest -q tests/test_kernels.py  # a missing extension fails
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instrument import kernels

REQUIRE_EXT = os.environ.get("INSTRUMENT_REQUIRE_EXT", "") not in ("", "0")
ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(3, 7, 13), (2, 5, 1), (1, 1, 1), (4, 3, 64)]  # [B, L, D]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def native():
    """Skips (or with INSTRUMENT_REQUIRE_EXT=1 fails) a test when instrument._C is unavailable."""
    if not kernels.has_extension():
        reason = f"instrument._C unavailable: {kernels.extension_error()}"
        if REQUIRE_EXT:
            pytest.fail(f"INSTRUMENT_REQUIRE_EXT is set but {reason}")
        pytest.skip(reason)


def reference(inputs, baselines, alphas):
    """The path in float32, one alpha at a time."""
    x, base = inputs.float(), baselines.float()
    return torch.cat([base + float(alpha) * (x - base) for alpha in alphas])


def random_case(shape, k, dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(shape, generator=generator).to(device, dtype)
    baselines = torch.randn(shape, generator=generator).to(device, dtype)
    alphas = torch.rand(k, generator=generator).to(device)
    return inputs, baselines, alphas


def check_against_reference(out, inputs, baselines, alphas):
    expected = reference(inputs.cpu(), baselines.cpu(), alphas.cpu())
    assert out.dtype == inputs.dtype and out.shape == expected.shape
    finfo = torch.finfo(inputs.dtype)
    torch.testing.assert_close(out.cpu().float(), expected, rtol=finfo.eps, atol=finfo.tiny)
    assert torch.equal(out.cpu(), expected.to(inputs.dtype)), "not the float32 result rounded once"


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fallback_matches_formula(dtype, shape, k):
    inputs, baselines, alphas = random_case(shape, k, dtype)
    out = kernels.interpolate(inputs, baselines, alphas, use_extension=False)
    check_against_reference(out, inputs, baselines, alphas)


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_extension_matches_fallback(native, dtype, shape, k):
    inputs, baselines, alphas = random_case(shape, k, dtype)
    out = kernels.interpolate(inputs, baselines, alphas, use_extension=True)
    assert torch.equal(out, kernels.interpolate(inputs, baselines, alphas, use_extension=False))
    if dtype != torch.float64:
        check_against_reference(out, inputs, baselines, alphas)


def test_extension_handles_views_and_long_rows(native):
    inputs, _, alphas = random_case((3, 2100, 5), 4, torch.bfloat16)  # rows of 10500 span several CPU chunks
    padded = torch.randn(3, 2101, 5).to(torch.bfloat16)
    inputs, baselines = inputs.transpose(1, 2), padded[:, 1:].transpose(1, 2)  # non-contiguous views
    out = kernels.interpolate(inputs, baselines, alphas)
    assert torch.equal(out, kernels.interpolate(inputs, baselines, alphas, use_extension=False))
    check_against_reference(out, inputs, baselines, alphas)


@pytest.mark.parametrize("use_extension", [None, False])
def test_alphas_forms_and_empty(use_extension):
    inputs, baselines, _ = random_case((2, 3, 4), 0, torch.float32)
    as_tensor = kernels.interpolate(inputs, baselines, torch.tensor([0.0, 0.25, 1.0]), use_extension=use_extension)
    for alphas in ([0.0, 0.25, 1.0], (0, 0.25, 1), torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)):
        assert torch.equal(kernels.interpolate(inputs, baselines, alphas, use_extension=use_extension), as_tensor)
    assert torch.equal(as_tensor[:2], baselines)
    torch.testing.assert_close(as_tensor[4:], inputs)
    for empty in ([], torch.empty(0)):
        assert kernels.interpolate(inputs, baselines, empty, use_extension=use_extension).shape == (0, 3, 4)
    assert kernels.interpolate(inputs[:0], baselines[:0], [0.5], use_extension=use_extension).shape == (0, 3, 4)


@pytest.mark.parametrize("use_extension", [None, False])
def test_result_has_no_grad_history(use_extension):
    inputs, baselines, alphas = random_case((2, 3, 4), 3, torch.float32)
    out = kernels.interpolate(inputs.requires_grad_(), baselines.requires_grad_(), alphas, use_extension=use_extension)
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize(
    "inputs, baselines, alphas, error, match",
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), [0.5], ValueError, "baselines shape"),
        (torch.zeros(3, 4), torch.zeros(3, 4), [0.5], ValueError, r"must be \[B, L, D\]"),
        (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), [0.5], ValueError, r"must be \[B, L, D\]"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float16), [0.5], TypeError, "dtype"),
        (torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 3, 4, dtype=torch.int64), [0.5], TypeError,
         "floating point"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.tensor([[0.5]]), ValueError, "alphas must be 1-D"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.tensor([1, 2]), TypeError, "alphas must be floating"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), ["a"], TypeError, "alphas must be"),
        (torch.zeros(2, 3, 4).numpy(), torch.zeros(2, 3, 4), [0.5], TypeError, "inputs must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(inputs, baselines, alphas, error, match):
    with pytest.raises(error, match=match):
        kernels.interpolate(inputs, baselines, alphas)


def test_forcing_the_extension_where_it_cannot_run_raises(native):
    meta = torch.zeros(1, 1, 1, device="meta")
    with pytest.raises(RuntimeError, match="use_extension=True, but instrument._C cannot run on meta"):
        kernels.interpolate(meta, meta, [0.5], use_extension=True)


NO_EXT_SCRIPT = """
import torch
from instrument import kernels
x, base = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
out = kernels.interpolate(x, base, [0.0, 0.5, 1.0])
out = kernels.interpolate(x, base, [0.0, 0.5, 1.0])
assert not kernels.has_extension() and kernels.extension_error() == "disabled by INSTRUMENT_NO_EXT=1"
assert torch.equal(out, torch.cat([base + a * (x - base) for a in (0.0, 0.5, 1.0)]))
try:
    kernels.interpolate(x, base, [0.5], use_extension=True)
except RuntimeError as error:
    assert "INSTRUMENT_NO_EXT=1" in str(error)
else:
    raise AssertionError("use_extension=True ran without the extension")
print("ok")
"""


def test_no_ext_env_gives_fallback_and_one_notice():
    env = dict(os.environ, INSTRUMENT_NO_EXT="1", PYTHONWARNINGS="default")
    run = subprocess.run([sys.executable, "-c", NO_EXT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    lines = run.stderr.splitlines()
    notices = [i for i, line in enumerate(lines) if "ExtensionNotice" in line]
    assert len(notices) == 1, run.stderr
    assert "INSTRUMENT_NO_EXT=1" in lines[notices[0]] and "fallback" in lines[notices[0]]
    assert not lines[notices[0] + 1:notices[0] + 2] or not lines[notices[0] + 1].startswith(" "), "notice spans lines"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cuda_extension_matches_fallback(dtype):
    if not kernels.has_extension("cuda"):
        reason = f"instrument._C has no CUDA kernels: {kernels.extension_error() or 'built without CUDA'}"
        if REQUIRE_EXT:
            pytest.fail(reason)
        pytest.skip(reason)
    for shape, k in zip([(3, 7, 13), (2, 16, 64), (5, 33, 128), (1, 1, 1)], [1, 50, 7, 3]):
        inputs, baselines, alphas = random_case(shape, k, dtype, device="cuda")
        out = kernels.interpolate(inputs, baselines, alphas, use_extension=True)
        assert out.device == inputs.device
        assert torch.equal(out, kernels.interpolate(inputs, baselines, alphas, use_extension=False))
        assert torch.equal(out.cpu(), kernels.interpolate(inputs.cpu(), baselines.cpu(), alphas.cpu()))
    # Contiguous but 16-byte misaligned storage takes the unvectorized kernel.
    inputs, baselines, alphas = random_case((1 + 2 * 4 * 64,), 5, dtype, device="cuda")
    inputs, baselines = inputs[1:].view(2, 4, 64), baselines[1:].view(2, 4, 64)
    assert inputs.is_contiguous() and inputs.storage_offset() == 1
    out = kernels.interpolate(inputs, baselines, alphas)
    assert torch.equal(out, kernels.interpolate(inputs, baselines, alphas, use_extension=False))
