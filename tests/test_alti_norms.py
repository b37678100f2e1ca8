"""instrument.kernels.alti_norms: the native kernel against its PyTorch fallback and a formula over the
materialised decomposition `[B, Q, K, D]`, in every dtype (CUDA too when there is a GPU)."""

import os

import pytest
import torch

from instrument import kernels

REQUIRE_EXT = os.environ.get("INSTRUMENT_REQUIRE_EXT", "") not in ("", "0")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(2, 3, 5, 5, 8), (1, 4, 2, 7, 33), (3, 1, 1, 1, 1)]  # B, H, Q, K, D


def case(shape, dtype, residual=True, ln=False, device="cpu", seed=0):
    b, h, q, k, d = shape
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, q, k, generator=g)
    if q == k:  # causal: the kernels skip keys no head attends to
        scores = scores.masked_fill(torch.ones(q, k).triu(1).bool(), float("-inf"))
    attn = torch.softmax(scores, -1).to(dtype)
    values = torch.randn(b, h, k, d, generator=g).to(dtype)
    kw = {}
    if residual:
        kw["residual"] = torch.randn(b, q, d, generator=g).to(dtype)
        positions = torch.randint(-1, k, (b, q), generator=g)
        kw["positions"] = positions
    if ln:
        kw["ln_scale"] = torch.rand(b, q, generator=g) + 0.5
        kw["ln_weight"] = torch.randn(d, generator=g)
    return attn.to(device), values.to(device), {key: v.to(device) for key, v in kw.items()}


def formula(attn, values, residual=None, positions=None, ln_scale=None, ln_weight=None, center=True):
    math = torch.float64
    t = torch.einsum("bhqk,bhkd->bqkd", attn.to(math), values.to(math))
    if residual is not None:
        for b in range(t.shape[0]):
            for i in range(t.shape[1]):
                if positions[b, i] >= 0:
                    t[b, i, positions[b, i]] += residual[b, i].to(math)
    if ln_scale is not None:
        if center:
            t = t - t.mean(-1, keepdim=True)
        t = t * ln_scale.to(math)[:, :, None, None] * ln_weight.to(math)
    y = t.sum(2, keepdim=True)
    return (y.abs() - (y - t).abs()).sum(-1), t.norm(dim=-1)


def close(a, b, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("ln", [False, True, "rms"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_fallback_equals_formula(shape, residual, ln):
    attn, values, kw = case(shape, torch.float32, residual, bool(ln))
    center = ln != "rms"
    got = kernels.alti_norms(attn, values, **kw, center=center, use_extension=False)
    want = formula(attn, values, **kw, center=center)
    for g, w in zip(got, want):
        close(g, w, torch.float32)
        assert g.dtype == torch.float32


def devices():
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return found


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("ln", [False, True, "rms"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_equals_fallback(dtype, shape, ln, device):
    if not kernels.has_extension(device):
        if REQUIRE_EXT and device == "cpu":
            pytest.fail(f"INSTRUMENT_REQUIRE_EXT is set but {kernels.extension_error()}")
        pytest.skip(f"instrument._C cannot run on {device}")
    attn, values, kw = case(shape, dtype, True, bool(ln), device=device)
    center = ln != "rms"
    native = kernels.alti_norms(attn, values, **kw, center=center, use_extension=True)
    fallback = kernels.alti_norms(attn, values, **kw, center=center, use_extension=False)
    for n, f in zip(native, fallback):
        assert n.dtype == f.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        close(n, f, dtype)


def test_fallback_chunks_agree_with_one_chunk():
    attn, values, kw = case((2, 3, 9, 9, 16), torch.float32, ln=True)
    one = kernels.alti_norms(attn, values, **kw, use_extension=False)
    resultant = torch.einsum("bhqk,bhkd->bqd", attn, values)
    own = (kw["positions"] >= 0).float()[..., None]
    resultant = kernels._alti_layer_norm(resultant + own * kw["residual"], kw["ln_scale"], kw["ln_weight"], True)
    chunked = kernels._alti_norms_torch(attn, values, chunk=2, center=True, resultant=resultant, **kw)
    for a, b in zip(one, chunked):
        close(a, b, torch.float32)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(attn=torch.zeros(2, 3, 4)), ValueError, "attn must be 4-D"),
        (dict(values=torch.zeros(2, 3, 6, 8)), ValueError, "values must be"),
        (dict(positions=None), ValueError, "go together"),
        (dict(attn=torch.zeros(2, 3, 5, 5, dtype=torch.long)), TypeError, "floating point"),
        (dict(ln_scale=torch.ones(2, 5)), ValueError, "go together"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    attn, values, kw = case((2, 3, 5, 5, 8), torch.float32)
    args = dict(attn=attn, values=values, **kw)
    args.update(change)
    with pytest.raises(error, match=match):
        kernels.alti_norms(**args)
