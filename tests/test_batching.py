"""Memory-aware "auto" batching: `batch_size="auto"` / `internal_batch_size="auto"` chunks sized from the
measured free memory, halved and run again on out-of-memory errors.

    pytest tests/test_batching.py -q
"""

import math

import pytest
import torch

import instrument
from instrument import batching

from tiny_models import tiny_model

# -- "auto" batching -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    model, tokenizer = tiny_model("gpt2")
    return instrument.load_model(model, tokenizer=tokenizer)


TEXTS = (
    ["The capital of France is", "Hello world", "Good morning!"],
    ["The capital of France is Paris.", "Hello world, this is a test.", "Good morning! How are you today?"],
)


def _failing_above(
    wrapped,
    monkeypatch,
    limit: int,
    error=lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
):
    """Makes every forward serving more than `limit` rows raise `error()`; returns the row counts seen.
    (A forward serves one row per distinct position it reads: full rows serve several.)"""
    sizes = []
    real = wrapped.engine._run  # every forward of the engine

    def run(rows, head_rows, head_positions, *args, **kwargs):
        sizes.append(len(set(zip(head_rows.flatten().tolist(), head_positions.flatten().tolist()))))
        if sizes[-1] > limit:
            raise error()
        return real(rows, head_rows, head_positions, *args, **kwargs)

    monkeypatch.setattr(wrapped.engine, "_run", run)
    return sizes


def assert_same(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.target_attributions, e.target_attributions, equal_nan=True, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8000000000 bytes"),
        lambda: MemoryError(),
    ],
    ids=["torch-oom", "cpu-allocator", "MemoryError"],
)
def test_auto_batch_size_recovers_from_out_of_memory(small, monkeypatch, error):
    expected = small.attribute(*TEXTS, method="saliency", show_progress=False)
    sizes = _failing_above(small, monkeypatch, 5, error)
    got = small.attribute(*TEXTS, method="saliency", batch_size="auto", show_progress=False)
    assert_same(got, expected)
    assert max(sizes) > 5  # it did run out of memory, and went on with smaller chunks
    assert sum(size for size in sizes if size <= 5) == sum(
        e.attr_pos_end - e.attr_pos_start for e in got
    )  # one forward per row
    assert len(sizes) < 40


def test_auto_internal_batch_size_recovers_from_out_of_memory(small, monkeypatch):
    options = dict(method="integrated_gradients", n_steps=16, show_progress=False)
    expected = small.attribute(*TEXTS, **options)
    rows = sum(e.attr_pos_end - e.attr_pos_start for e in expected)
    sizes = _failing_above(small, monkeypatch, 3 * rows)  # at most 3 path points of all the rows at once
    got = small.attribute(*TEXTS, internal_batch_size="auto", **options)  # batch_size fixed (all examples)
    assert_same(got, expected)
    assert max(sizes) > 3 * rows and max(s for s in sizes if s <= 3 * rows) > rows  # shrank, not to 1 point at once
    both = small.attribute(*TEXTS, internal_batch_size="auto", batch_size="auto", **options)
    assert_same(both, expected)


def test_auto_stops_at_one_with_a_clear_error(small, monkeypatch):
    sizes = _failing_above(small, monkeypatch, 0)
    with pytest.raises(
        batching.OutOfMemoryError, match="smallest chunk .*1 row.*Original error: OutOfMemoryError"
    ) as info:
        small.attribute(
            *TEXTS,
            method="integrated_gradients",
            n_steps=8,
            internal_batch_size="auto",
            batch_size="auto",
            show_progress=False,
        )
    assert isinstance(info.value, torch.OutOfMemoryError) and isinstance(info.value, MemoryError)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert len(sizes) <= 2 + math.ceil(math.log2(64))
    monkeypatch.undo()
    with pytest.raises(batching.OutOfMemoryError, match="batch_size='auto'"):  # fixed rows: no splitting, a hint
        _failing_above(small, monkeypatch, 0)
        small.attribute(
            *TEXTS, method="integrated_gradients", n_steps=8, internal_batch_size="auto", show_progress=False
        )


def test_auto_sizes_chunks_to_the_measured_free_memory(small, monkeypatch):
    """With little free memory, chunks are small; with plenty, one chunk does it all."""
    options = dict(
        method="integrated_gradients", n_steps=12, show_progress=False, internal_batch_size="auto", batch_size="auto"
    )
    expected = small.attribute(*TEXTS, method="integrated_gradients", n_steps=12, show_progress=False)
    sizes = _failing_above(small, monkeypatch, 10**9)
    assert_same(small.attribute(*TEXTS, **options), expected)
    roomy = list(sizes)
    sizes.clear()
    probe = batching.measure([torch.device("cpu")])
    with probe:
        small.attribute(*TEXTS, method="integrated_gradients", n_steps=1, show_progress=False, batch_size=1)
    monkeypatch.setattr(batching, "available_memory", lambda devices: max(probe.peak or 0, 1) * 3)
    assert_same(small.attribute(*TEXTS, **options), expected)
    assert max(sizes) < max(roomy) and len(sizes) > len(roomy)


def test_sizes_are_checked_and_memory_is_measured(small):
    for bad in (0, -1, "autox", 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            small.attribute(*TEXTS, method="saliency", batch_size=bad, show_progress=False)
    assert batching.is_out_of_memory(torch.OutOfMemoryError("x")) and batching.is_out_of_memory(MemoryError())
    assert batching.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not batching.is_out_of_memory(RuntimeError("shape mismatch")) and not batching.is_out_of_memory(
        ValueError("out of memory")
    )
    free = batching.available_memory([torch.device("cpu")])
    assert free is None or free > 0
    with batching.measure([torch.device("cpu")]) as m:
        x = torch.ones(2 * 10**7)  # 80 MB
        del x
    assert m.peak is None or m.peak >= 60 * 10**6
    assert batching.model_devices(small.model) == [torch.device("cpu")]
