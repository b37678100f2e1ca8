"""instrument.kernels: the native extension against its PyTorch fallback and a plain formula.

    $ INSTRUMENT_REQUIRE_EXT=1 python -m pytest -q tests/test_kernels.py  # a missing extension fails

Every op is checked on both paths: the fallback against the formula, the extension against the fallback
(bit for bit, except finalize's float64-accumulated sum, mean and l2: relative error below 1e-6), on odd
shapes, for float32, float16, bfloat16 and float64, through both the AVX2 and the scalar CPU kernels
(`simd` fixture), and on CUDA when there is a GPU (tests marked `gpu`).
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
SHAPES = [(3, 7, 13), (2, 5, 1), (1, 1, 1), (4, 3, 64), (2, 70, 33)]  # [B, L, D]; the last spans CPU chunks
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def native():
    """Skips (or with INSTRUMENT_REQUIRE_EXT=1 fails) a test when instrument._C is unavailable."""
    if not kernels.has_extension():
        reason = f"instrument._C unavailable: {kernels.extension_error()}"
        if REQUIRE_EXT:
            pytest.fail(f"INSTRUMENT_REQUIRE_EXT is set but {reason}")
        pytest.skip(reason)


@pytest.fixture(params=[True, False], ids=["simd", "scalar"])
def simd(request, native):
    """Runs a test through the AVX2 CPU kernels (where the machine has AVX2) and through the scalar ones."""
    from instrument import _C

    previous = _C._set_cpu_simd(request.param)
    yield request.param
    _C._set_cpu_simd(previous)


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
def test_extension_matches_fallback(simd, dtype, shape, k):
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
        (
            torch.zeros(2, 3, 4, dtype=torch.int64),
            torch.zeros(2, 3, 4, dtype=torch.int64),
            [0.5],
            TypeError,
            "floating point",
        ),
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


# ---- interpolate: mask ---------------------------------------------------------------------------------------


def random_mask(shape, seed=1, p=0.5):
    return torch.rand(shape[:2], generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_fallback_matches_formula(dtype, shape):
    inputs, baselines, alphas = random_case(shape, 5, dtype)
    mask = random_mask(shape)
    out = kernels.interpolate(inputs, baselines, alphas, mask, use_extension=False)
    expected = reference(inputs, baselines, alphas).to(dtype).view(5, *shape)
    expected = torch.where(mask[None, :, :, None], expected, inputs[None]).flatten(0, 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("pattern", ["random", "all", "none", "span"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_masked_extension_matches_fallback(simd, dtype, shape, pattern):
    inputs, baselines, alphas = random_case(shape, 7, dtype)
    inputs.view(-1)[0] = -0.0  # a kept input value keeps its sign bit
    mask = {
        "random": random_mask(shape),
        "all": torch.ones(shape[:2], dtype=torch.bool),
        "none": torch.zeros(shape[:2], dtype=torch.bool),
        "span": torch.arange(shape[1]).expand(shape[:2]) >= shape[1] // 2,
    }[pattern]
    out = kernels.interpolate(inputs, baselines, alphas, mask, use_extension=True)
    fallback = kernels.interpolate(inputs, baselines, alphas, mask, use_extension=False)
    assert torch.equal(out, fallback)
    kept = ~mask  # positions left at their input value, for every alpha
    assert torch.equal(out.view(7, *shape)[:, kept], inputs[kept].expand(7, *inputs[kept].shape))
    if pattern == "all":
        assert torch.equal(out, kernels.interpolate(inputs, baselines, alphas, use_extension=True))
    if pattern == "none":  # bit for bit: -0.0 stays -0.0
        assert torch.equal(out.signbit(), inputs.expand(7, *shape).reshape(out.shape).signbit())


@pytest.mark.parametrize("use_extension", [None, False])
def test_mask_forms_and_errors(use_extension):
    inputs, baselines, alphas = random_case((2, 3, 4), 2, torch.float32)
    as_bool = kernels.interpolate(
        inputs, baselines, alphas, torch.tensor([[1, 0, 1], [0, 0, 1]]).bool(), use_extension=use_extension
    )
    for mask in (
        torch.tensor([[1, 0, 1], [0, 0, 1]]),
        torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]),
        torch.tensor([[1, 0, 1], [0, 0, 1]]).t().contiguous().t(),
    ):
        assert torch.equal(kernels.interpolate(inputs, baselines, alphas, mask, use_extension=use_extension), as_bool)
    with pytest.raises(ValueError, match=r"mask must be \[B, L\] = \(2, 3\)"):
        kernels.interpolate(inputs, baselines, alphas, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask on meta"):
        kernels.interpolate(inputs, baselines, alphas, torch.ones(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        kernels.interpolate(inputs, baselines, alphas, [[True] * 3] * 2)


# ---- accumulate ----------------------------------------------------------------------------------------------


def accumulate_case(shape, k, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    acc = torch.randn(shape, generator=generator)
    grads = torch.randn((k * shape[0], *shape[1:]), generator=generator).to(dtype)
    weights = torch.rand(k, generator=generator)
    return acc, grads, weights


def accumulate_formula(acc, grads, weights):
    """The documented order, one element operation at a time: ((w0 g0 + w1 g1) + ...) then + acc."""
    k = len(weights)
    rows = grads.float().view(k, *acc.shape)
    total = rows[0] * weights[0]
    for j in range(1, k):
        total = total + rows[j] * weights[j]
    return acc + total


@pytest.mark.parametrize("k", [1, 3, 4, 9, 50])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_accumulate_fallback_matches_formula(dtype, shape, k):
    acc, grads, weights = accumulate_case(shape, k, dtype)
    expected = accumulate_formula(acc, grads, weights)
    out = kernels.accumulate(acc, grads, weights, use_extension=False)
    assert out is acc and torch.equal(acc, expected)
    # And near the exact value (float64): within the float32 rounding of k products and k + 1 sums.
    start, rows = accumulate_case(shape, k, dtype)[0].double(), grads.float().double().view(k, *shape)
    terms = weights.double().view(-1, *[1] * len(shape)) * rows
    exact, magnitude = start + terms.sum(0), start.abs() + terms.abs().sum(0)
    assert ((acc.double() - exact).abs() <= (2 * k + 1) * torch.finfo(torch.float32).eps * magnitude).all()


@pytest.mark.parametrize("layout", ["flat", "stacked"])
@pytest.mark.parametrize("k", [1, 3, 4, 9, 50])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_accumulate_extension_matches_fallback(simd, dtype, shape, k, layout):
    acc, grads, weights = accumulate_case(shape, k, dtype)
    if layout == "stacked":
        grads = grads.view(k, *shape)
    fallback = kernels.accumulate(acc.clone(), grads, weights, use_extension=False)
    out = kernels.accumulate(acc, grads, weights, use_extension=True)
    assert out is acc and torch.equal(acc, fallback)
    kernels.accumulate(acc, grads, weights, use_extension=True)  # accumulates again
    assert torch.equal(acc, kernels.accumulate(fallback, grads, weights, use_extension=False))


@pytest.mark.parametrize("use_extension", [None, False])
def test_accumulate_views_empty_and_weight_forms(use_extension):
    acc, grads, weights = accumulate_case((2, 3, 5), 4, torch.bfloat16)
    expected = kernels.accumulate(acc.clone(), grads, weights, use_extension=False)
    # A non-contiguous view of the gradients, weights as a list or as float64.
    strided = torch.empty(8, 5, 3, dtype=torch.bfloat16).transpose(1, 2).copy_(grads)
    assert not strided.is_contiguous()
    for w in (weights, weights.tolist(), weights.double()):
        out = kernels.accumulate(acc.clone(), strided, w, use_extension=use_extension)
        assert torch.equal(out, expected)
    before = acc.clone()
    assert torch.equal(kernels.accumulate(acc, grads[:0], [], use_extension=use_extension), before)  # K = 0
    empty = torch.zeros(0, 3, 5)
    assert kernels.accumulate(empty, torch.zeros(0, 3, 5), [0.5, 0.5], use_extension=use_extension).shape == (0, 3, 5)
    grads_in_graph = grads.float().requires_grad_()
    kernels.accumulate(acc, grads_in_graph * 2, weights, use_extension=use_extension)  # detached, no error


@pytest.mark.parametrize(
    "acc, grads, weights, error, match",
    [
        (torch.zeros(2, 3, 4, dtype=torch.float16), torch.zeros(4, 3, 4), [0.5, 0.5], TypeError, "acc must be float32"),
        (torch.zeros(3, 4), torch.zeros(6, 4), [0.5, 0.5], ValueError, r"acc must be \[B, L, D\]"),
        (torch.zeros(2, 4, 3).transpose(1, 2), torch.zeros(4, 3, 4), [0.5, 0.5], ValueError, "acc must be contiguous"),
        (torch.zeros(2, 3, 4, requires_grad=True), torch.zeros(4, 3, 4), [0.5, 0.5], ValueError, "requires grad"),
        (torch.zeros(2, 3, 4), torch.zeros(6, 3, 4), [0.5, 0.5], ValueError, r"grads shape \(6, 3, 4\) must be"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 2, 3, 5), [0.5, 0.5], ValueError, r"\[K, B, L, D\] = \(2, 2, 3, 4\)"),
        (torch.zeros(2, 3, 4), torch.zeros(4, 3, 4, dtype=torch.int32), [0.5, 0.5], TypeError, "floating point"),
        (torch.zeros(2, 3, 4), torch.zeros(4, 3, 4, device="meta"), [0.5, 0.5], ValueError, "grads on meta"),
        (torch.zeros(2, 3, 4), torch.zeros(4, 3, 4), [[0.5, 0.5]], ValueError, "weights must be 1-D"),
        (torch.zeros(2, 3, 4), torch.zeros(4, 3, 4), torch.tensor([1, 1]), TypeError, "weights must be floating"),
        (torch.zeros(2, 3, 4).numpy(), torch.zeros(4, 3, 4), [0.5, 0.5], TypeError, "acc must be a torch.Tensor"),
    ],
)
def test_accumulate_bad_inputs_raise_clear_errors(acc, grads, weights, error, match):
    with pytest.raises(error, match=match):
        kernels.accumulate(acc, grads, weights)


# ---- finalize ------------------------------------------------------------------------------------------------

REDUCE_SHAPES = SHAPES + [(2, 3, 4, 37), (3, 1, 2, 8)]  # [B, L, D] and [layers, B, L, D]


def finalize_case(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    acc = torch.randn(shape, generator=generator)
    inputs = torch.randn(shape, generator=generator).to(dtype)
    baselines = torch.randn(shape, generator=generator).to(dtype)
    return acc, inputs, baselines


def finalize_formula(acc, inputs, baselines):
    """The float32 products of acc and the difference in the inputs' math type."""
    wide = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    return acc * (inputs.to(wide) - baselines.to(wide)).float()


@pytest.mark.parametrize("shape", REDUCE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_finalize_fallback_matches_formula(dtype, shape):
    acc, inputs, baselines = finalize_case(shape, dtype)
    out = kernels.finalize(acc, inputs, baselines, use_extension=False)
    expected = finalize_formula(acc, inputs, baselines)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", REDUCE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_finalize_extension_matches_fallback(simd, dtype, shape):
    acc, inputs, baselines = finalize_case(shape, dtype)
    out = kernels.finalize(acc, inputs, baselines, use_extension=True)
    fallback = kernels.finalize(acc, inputs, baselines, use_extension=False)
    assert out.dtype == torch.float32 and out.shape == fallback.shape
    assert torch.equal(out, fallback)


def test_finalize_many_layers_equals_each_layer(simd):
    acc, inputs, baselines = finalize_case((3, 2, 5, 40), torch.bfloat16)
    together = kernels.finalize(acc, inputs, baselines)
    for layer in range(3):
        assert torch.equal(together[layer], kernels.finalize(acc[layer], inputs[layer], baselines[layer]))


def test_finalize_difference_in_float32_for_half_inputs(native):
    acc = torch.ones(1, 1, 2)
    inputs = torch.tensor([[[1.0, 256.0]]], dtype=torch.bfloat16)
    baselines = torch.tensor([[[1.0 - 2**-8, 255.0]]], dtype=torch.bfloat16)  # 1 - 2^-8 is a bfloat16 number
    out = kernels.finalize(acc, inputs, baselines)
    assert out.tolist() == [[[2**-8, 1.0]]]  # in bfloat16 arithmetic 256 - 255 would be exact, 1 - (1 - 2^-8) too
    assert torch.equal(out, kernels.finalize(acc, inputs, baselines, use_extension=False))


@pytest.mark.parametrize("use_extension", [None, False])
def test_finalize_views_and_empty(use_extension):
    acc, inputs, baselines = finalize_case((2, 6, 5), torch.float16)
    expected = kernels.finalize(acc, inputs, baselines, use_extension=False)
    got = kernels.finalize(
        acc.transpose(1, 2).contiguous().transpose(1, 2),
        inputs.transpose(1, 2).contiguous().transpose(1, 2),
        baselines,
        use_extension=use_extension,
    )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert kernels.finalize(acc[:0], inputs[:0], baselines[:0], use_extension=use_extension).shape == (0, 6, 5)
    assert kernels.finalize(acc[..., :0], inputs[..., :0], baselines[..., :0], use_extension=use_extension).shape == (
        2,
        6,
        0,
    )


@pytest.mark.parametrize(
    "acc, inputs, error, match",
    [
        (torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 4), TypeError, "acc must be float32"),
        (torch.zeros(3, 4), torch.zeros(3, 4), ValueError, r"\[layers, B, L, D\]"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), ValueError, r"inputs shape \(2, 3, 5\) != acc shape"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.int64), TypeError, "floating point"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, device="meta"), ValueError, "on meta"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4).numpy(), TypeError, "inputs must be a torch.Tensor"),
    ],
)
def test_finalize_bad_inputs_raise_clear_errors(acc, inputs, error, match):
    baselines = torch.zeros_like(inputs) if isinstance(inputs, torch.Tensor) else torch.zeros(2, 3, 4)
    with pytest.raises(error, match=match):
        kernels.finalize(acc, inputs, baselines)


# ---- reduce_heads --------------------------------------------------------------------------------------------

ATTENTION_SHAPES = [(3, 2, 4, 5, 7), (2, 1, 2, 1, 1), (2, 3, 6, 9, 33), (5, 1, 9, 40, 41)]  # [layers, B, H, T, S]
SELECTIONS = [(None, None), (-1, 0), ([0, -1, 0], [1, 0, -1]), (torch.tensor([0]), torch.tensor([-1, 0]))]


def attention_case(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator).to(dtype)


@pytest.mark.parametrize("selection", range(len(SELECTIONS)))
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_reduce_heads_fallback_matches_formula(dtype, shape, selection):
    attn = attention_case(shape, dtype)
    layers, heads = SELECTIONS[selection]
    pick_l = torch.arange(shape[0]) if layers is None else torch.as_tensor(layers).reshape(-1) % shape[0]
    pick_h = torch.arange(shape[2]) if heads is None else torch.as_tensor(heads).reshape(-1) % shape[2]
    picked = attn[pick_l][:, :, pick_h].double()
    mean = kernels.reduce_heads(attn, layers, heads, use_extension=False)
    biggest = kernels.reduce_heads(attn, layers, heads, "max", use_extension=False)
    math = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == biggest.dtype == math and mean.shape == (shape[1], shape[3], shape[4])
    torch.testing.assert_close(mean.double(), picked.mean((0, 2)), rtol=2e-6 * len(pick_l) * len(pick_h), atol=0)
    assert torch.equal(biggest.double(), picked.amax((0, 2)))


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("selection", range(len(SELECTIONS)))
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_reduce_heads_extension_matches_fallback(simd, dtype, shape, selection, reduce):
    attn = attention_case(shape, dtype)
    layers, heads = SELECTIONS[selection]
    out = kernels.reduce_heads(attn, layers, heads, reduce, use_extension=True)
    assert torch.equal(out, kernels.reduce_heads(attn, layers, heads, reduce, use_extension=False))
    assert torch.equal(out, kernels.reduce_heads(list(attn.unbind(0)), layers, heads, reduce))  # per-layer tensors


def test_reduce_heads_many_pairs_nan_and_views(simd):
    attn = attention_case((3, 2, 5, 6, 11), torch.float16)
    heads = list(range(5)) * 3 + [1, 2]  # 3 layers x 17 heads: groups of four pairs and a remainder
    for reduce in ("mean", "max"):
        assert torch.equal(
            kernels.reduce_heads(attn, None, heads, reduce),
            kernels.reduce_heads(attn, None, heads, reduce, use_extension=False),
        )
    attn[1, 0, 2, 3, 4] = float("nan")
    for use_extension in (True, False):
        assert kernels.reduce_heads(attn, reduce="max", use_extension=use_extension)[0, 3, 4].isnan()
        assert kernels.reduce_heads(attn, reduce="mean", use_extension=use_extension)[0, 3, 4].isnan()
    permuted = attn.permute(0, 1, 2, 4, 3)  # a non-contiguous view: copied
    assert torch.equal(
        kernels.reduce_heads(permuted, [0, 2], [4]), kernels.reduce_heads(permuted.contiguous(), [0, 2], [4])
    )


@pytest.mark.parametrize(
    "attn, layers, heads, reduce, error, match",
    [
        (torch.zeros(2, 1, 3, 4, 4), None, None, "sum", ValueError, "reduce must be 'mean' or 'max'"),
        (torch.zeros(2, 1, 3, 4, 4), [], None, "mean", ValueError, "layers selects nothing"),
        (torch.zeros(2, 1, 3, 4, 4), None, [3], "mean", ValueError, "heads index 3 is out of range for 3 heads"),
        (torch.zeros(2, 1, 3, 4, 4), [-3], None, "mean", ValueError, "layers index -3 is out of range"),
        (torch.zeros(2, 1, 3, 4, 4), [True], None, "mean", TypeError, "layers must be integers"),
        (torch.zeros(2, 1, 3, 4, 4), None, torch.tensor([0.5]), "mean", TypeError, "heads as a tensor"),
        (torch.zeros(2, 1, 3, 4, 4), "0", None, "mean", TypeError, "layers must be None, an index"),
        (torch.zeros(1, 3, 4, 4), None, None, "mean", ValueError, r"\[layers, B, H, T, S\]"),
        (torch.zeros(0, 1, 3, 4, 4), None, None, "mean", ValueError, "no layers"),
        ([], None, None, "mean", ValueError, "no layers"),
        ([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5)], None, None, "mean", ValueError, r"attn\[1\] shape"),
        ([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4).half()], None, None, "mean", TypeError, r"attn\[1\] dtype"),
        ([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4, device="meta")], None, None, "mean", ValueError, "on meta"),
        ([torch.zeros(3, 4, 4)], None, None, "mean", ValueError, r"attn\[0\] must be \[B, H, T, S\]"),
        (torch.zeros(2, 1, 3, 4, 4, dtype=torch.int64), None, None, "mean", TypeError, "floating point"),
        ("attn", None, None, "mean", TypeError, "attn must be a tensor or a sequence"),
    ],
)
def test_reduce_heads_bad_inputs_raise_clear_errors(attn, layers, heads, reduce, error, match):
    with pytest.raises(error, match=match):
        kernels.reduce_heads(attn, layers, heads, reduce)


def test_direct_calls_to_the_extension_fail_cleanly(native):
    """Arguments that skip the front-end's checks raise RuntimeError in C++, never crash."""
    from instrument import _C

    with pytest.raises(RuntimeError, match="tensors must be contiguous"):
        _C.accumulate(torch.zeros(2, 4, 3).transpose(1, 2), torch.zeros(2, 3, 4), torch.ones(1))
    with pytest.raises(RuntimeError, match="grads"):
        _C.accumulate(torch.zeros(2, 3, 4), torch.zeros(5, 3, 4), torch.ones(2))
    with pytest.raises(RuntimeError, match="must have the shape of acc"):
        _C.finalize(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="head index 7 out of range"):
        _C.reduce_heads([torch.zeros(1, 3, 4, 4)], [7], "mean")
    with pytest.raises(RuntimeError, match="at least one layer"):
        _C.reduce_heads([], [0], "mean")
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        _C.interpolate(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(1), torch.ones(2, 3))


# ---- integrated gradients streams its path points ------------------------------------------------------------


def test_integrated_gradients_streams_chunks_through_accumulate(monkeypatch):
    """Every chunk's gradients go through accumulate (at most internal_batch_size rows at a time), and the
    result does not depend on the chunking."""
    import instrument

    from tiny_models import tiny_model

    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    rows_seen = []
    real = kernels.accumulate
    monkeypatch.setattr(
        kernels,
        "accumulate",
        lambda acc, grads, weights, **kw: rows_seen.append(grads.shape[0]) or real(acc, grads, weights, **kw),
    )
    common = dict(method="integrated_gradients", n_steps=12, show_progress=False)
    chunked = wrapped.attribute("Hello world", "Hello world, this", internal_batch_size=8, **common)[0]
    assert rows_seen and max(rows_seen) <= 8
    seen_chunked = len(rows_seen)
    whole = wrapped.attribute("Hello world", "Hello world, this", **common)[0]
    assert len(rows_seen) > seen_chunked
    torch.testing.assert_close(
        chunked.target_attributions, whole.target_attributions, rtol=1e-5, atol=1e-7, equal_nan=True
    )


NO_EXT_SCRIPT = """
import torch
from instrument import kernels
x, base = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
out = kernels.interpolate(x, base, [0.0, 0.5, 1.0])
out = kernels.interpolate(x, base, [0.0, 0.5, 1.0])
assert not kernels.has_extension() and kernels.extension_error() == "disabled by INSTRUMENT_NO_EXT=1"
assert torch.equal(out, torch.cat([base + a * (x - base) for a in (0.0, 0.5, 1.0)]))
acc = torch.zeros(2, 3, 5)
kernels.accumulate(acc, out, [0.25, 0.5, 0.25])
assert torch.equal(kernels.finalize(acc, x, base), acc * (x - base))
assert kernels.reduce_heads(torch.rand(2, 2, 3, 4, 4), heads=[0], reduce="max").shape == (2, 4, 4)
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
    run = subprocess.run(
        [sys.executable, "-c", NO_EXT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    lines = run.stderr.splitlines()
    notices = [i for i, line in enumerate(lines) if "ExtensionNotice" in line]
    assert len(notices) == 1, run.stderr
    assert "INSTRUMENT_NO_EXT=1" in lines[notices[0]] and "fallback" in lines[notices[0]]
    assert not lines[notices[0] + 1 : notices[0] + 2] or not lines[notices[0] + 1].startswith(" "), "notice spans lines"


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


STALE_SCRIPT = """
import sys, types, warnings
stale = types.ModuleType("instrument._C")
stale.interpolate, stale.with_cuda = (lambda *args: None), False
sys.modules["instrument._C"] = stale
from instrument import kernels
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert not kernels.has_extension()
error = kernels.extension_error()
assert "out of date (no accumulate, finalize, reduce_heads, alti_norms)" in error and "pip install" in error, error
assert len([w for w in caught if issubclass(w.category, kernels.ExtensionNotice)]) == 1
print("ok")
"""


def test_extension_built_from_older_sources_is_not_used():
    run = subprocess.run([sys.executable, "-c", STALE_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def cuda_native():
    if not kernels.has_extension("cuda"):
        reason = f"instrument._C has no CUDA kernels: {kernels.extension_error() or 'built without CUDA'}"
        if REQUIRE_EXT:
            pytest.fail(reason)
        pytest.skip(reason)


def misaligned(tensor):
    """A contiguous copy of `tensor` whose storage starts one element past a 16-byte boundary."""
    flat = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
    view = flat[1:].view(tensor.shape)
    view.copy_(tensor)
    assert view.is_contiguous() and view.storage_offset() == 1
    return view


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cuda_masked_interpolate_matches_cpu(dtype):
    cuda_native()
    for shape, k in zip([(3, 7, 13), (2, 16, 64), (5, 33, 128), (2, 9, 8)], [1, 50, 7, 3]):
        inputs, baselines, alphas = random_case(shape, k, dtype)
        mask = random_mask(shape)
        expected = kernels.interpolate(inputs, baselines, alphas, mask)
        gpu = [t.cuda() for t in (inputs, baselines, alphas, mask)]
        out = kernels.interpolate(*gpu, use_extension=True)
        assert torch.equal(out, kernels.interpolate(*gpu, use_extension=False))
        assert torch.equal(out.cpu(), expected)
        out = kernels.interpolate(misaligned(gpu[0]), misaligned(gpu[1]), gpu[2], gpu[3])
        assert torch.equal(out.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cuda_accumulate_matches_cpu(dtype):
    cuda_native()
    for shape, k in zip([(3, 7, 13), (2, 16, 64), (1, 1, 1), (4, 33, 128)], [1, 50, 7, 5]):
        acc, grads, weights = accumulate_case(shape, k, dtype)
        expected = kernels.accumulate(acc.clone(), grads, weights)
        for prepare in (lambda t: t, misaligned):
            gpu_acc = prepare(acc.cuda())
            out = kernels.accumulate(gpu_acc, prepare(grads.cuda()), weights.cuda(), use_extension=True)
            assert out is gpu_acc and torch.equal(out.cpu(), expected)
        fallback = kernels.accumulate(acc.cuda(), grads.cuda(), weights.cuda(), use_extension=False)
        assert torch.equal(fallback.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cuda_finalize_matches_cpu(dtype):
    cuda_native()
    for shape in [(3, 7, 13), (2, 16, 64), (1, 1, 1), (2, 3, 5, 4096), (2, 4, 33)]:
        acc, inputs, baselines = finalize_case(shape, dtype)
        expected = kernels.finalize(acc, inputs, baselines)
        for prepare in (lambda t: t, misaligned):
            out = kernels.finalize(*(prepare(t.cuda()) for t in (acc, inputs, baselines)), use_extension=True)
            fallback = kernels.finalize(acc.cuda(), inputs.cuda(), baselines.cuda(), use_extension=False)
            assert torch.equal(out.cpu(), expected) and torch.equal(fallback.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cuda_reduce_heads_matches_cpu(dtype, reduce):
    cuda_native()
    for shape, (layers, heads) in zip(ATTENTION_SHAPES, SELECTIONS):
        attn = attention_case(shape, dtype)
        expected = kernels.reduce_heads(attn, layers, heads, reduce)
        gpu = attn.cuda()
        out = kernels.reduce_heads(gpu, layers, heads, reduce, use_extension=True)
        assert torch.equal(out.cpu(), expected)
        assert torch.equal(kernels.reduce_heads(gpu, layers, heads, reduce, use_extension=False).cpu(), expected)
        assert torch.equal(
            kernels.reduce_heads([misaligned(layer) for layer in gpu], layers, heads, reduce).cpu(), expected
        )
    # More (layer, head) pairs than one launch takes (256): launches continue each other's partial results.
    attn = attention_case((3, 2, 4, 6, 16), dtype)
    heads = list(range(4)) * 25  # 3 layers x 100 heads = 300 pairs
    expected = kernels.reduce_heads(attn, None, heads, reduce)
    assert torch.equal(kernels.reduce_heads(attn.cuda(), None, heads, reduce).cpu(), expected)
