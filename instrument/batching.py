"""Memory-aware batching: `batch_size="auto"` and `internal_batch_size="auto"`.

    out = model.attribute(texts, method="integrated_gradients", batch_size="auto", internal_batch_size="auto")

How a size is chosen. The first chunk is a small probe; its peak memory gives a cost per unit of work
(per token of the attributed rows for `batch_size`, per row and path point for `internal_batch_size`),
and every later chunk is as large as fits in the memory free on the model's device(s) at that moment,
less `SAFETY_MARGIN`. Both are measured by `instrument.memory` (CUDA's allocator, or /proc on the
CPU); where the peak cannot be measured, chunks do not grow past the probe's size.

If a chunk still runs out of memory (`torch.OutOfMemoryError` / `torch.cuda.OutOfMemoryError`, a
`RuntimeError` that says "out of memory" or "can't allocate memory", `MemoryError`), it is halved and run
again. Sizes never grow back after that, so the retries end: a chunk of one that runs out of memory
raises `OutOfMemoryError` (a `torch.OutOfMemoryError` and a `MemoryError`) from the original error.

Who retries. `AttributionModel.attribute` runs its rows through `run_rows`, which calls
`attribute(pairs, state)`, catches the error and attributes the same rows again: with a smaller path
chunk when `internal_batch_size="auto"` chunks were in use, else (with `batch_size="auto"`) with half
the rows. `state` (an `AutoState`) travels to the method as `Request.auto`, and
`methods.base.chunks(..., auto=request.auto)` sizes path chunks with `state.path_chunks`; called
directly (outside `attribute`) a method gets the sizing of a fresh state but no retry. On CPU a real shortage often
ends in the kernel's OOM killer rather than in
an error, so there the safety margin is what protects the run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from instrument.memory import available_memory, free_memory, measure, model_devices

__all__ = [
    "AUTO",
    "SAFETY_MARGIN",
    "AutoState",
    "OutOfMemoryError",
    "auto_chunks",
    "available_memory",
    "check_size",
    "free_memory",
    "is_auto",
    "is_out_of_memory",
    "measure",
    "model_devices",
    "run_rows",
]

AUTO = "auto"
SAFETY_MARGIN = 0.25  # fraction of the free memory left alone
PROBE_ROWS = 8  # rows in the first chunk of `run_rows`
PROBE_POINTS = 1  # path points in the first chunk of `auto_chunks`

log = logging.getLogger(__name__)


class OutOfMemoryError(torch.OutOfMemoryError, MemoryError):
    """Even a chunk of one did not fit; raised from that chunk's out-of-memory error."""


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def check_size(name: str, value: Any) -> None:
    """`None`, a positive int or "auto", else ValueError."""
    if value is None or is_auto(value) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    raise ValueError(f"{name} must be a positive integer or 'auto', got {value!r}")


_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "cublas_status_alloc_failed")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says that memory ran out (CUDA, CPU allocator or Python)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in _OOM_TEXT)


def fit(cost: float | None, free: int | None, margin: float | None = None) -> float:
    """How many units of `cost` bytes fit in `free` bytes less the safety margin (inf when unknown)."""
    if cost is None or free is None or cost <= 0:
        return math.inf
    margin = SAFETY_MARGIN if margin is None else margin
    return free * (1.0 - margin) / cost


def _lower(old: float | None, measured: float) -> float:
    """A new cost estimate: the measurement, but falling at most by half per chunk."""
    return measured if old is None else max(measured, old / 2)


# -- the state of one attribution run -----------------------------------------------------------------


@dataclass
class AutoState:
    """What the driver and the path chunks of one `attribute` call share: `run_rows` makes it and
    hands it to each call of `attribute(pairs, state)`, which hands it to the method (`Request.auto`)."""

    devices: list[torch.device]
    point_cap: int | None = None  # path points per chunk at most, after an out-of-memory error
    point_cost: float | None = None  # bytes per row and path point
    points_run: int = 0  # the largest path chunk of the rows being attributed now
    cotangent_cap: int | None = None  # slots per batched backward at most, after an out-of-memory error
    cotangents_run: int = 0  # the largest slot chunk of the rows being attributed now
    unmeasured: bool = False
    log: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        self.log.append(message)
        log.info(message)

    def path_chunks(self, total: int, rows: int) -> Iterator[range]:
        """Chunks of `total` path points for `rows` rows, as large as the free memory allows.

            for chunk in state.path_chunks(50, len(rows)): ...

        The first is a probe of `PROBE_POINTS` points (unless an earlier call with this state already
        measured the cost); each chunk is measured while the caller's loop body runs (until it asks
        for the next chunk), which updates the cost.
        """
        rows = max(int(rows), 1)
        start = 0
        while start < total:
            if self.point_cost is None or self.unmeasured:
                size = PROBE_POINTS
            else:
                budget = fit(self.point_cost * rows, available_memory(self.devices))
                size = total if budget >= total else int(budget)
            size = max(1, min(size, total - start, self.point_cap or total))
            self.points_run = max(self.points_run, size)
            probe = measure(self.devices).start()
            yield range(start, start + size)
            peak = probe.stop()
            if peak is None:
                if not self.unmeasured:
                    self.note(
                        f"internal_batch_size='auto': no peak memory measurement on {self.devices}; "
                        f"path chunks stay at {PROBE_POINTS} point(s)"
                    )
                self.unmeasured = True
                self.point_cost = 0.0
            else:
                self.point_cost = _lower(self.point_cost, peak / (size * rows))
            start += size


def default_devices() -> list[torch.device]:
    """The current CUDA device, else the CPU: where a method called outside `attribute` measures."""
    if torch.cuda.is_available():
        return [torch.device("cuda", torch.cuda.current_device())]
    return [torch.device("cpu")]


def auto_chunks(total: int, rows: int, state: AutoState | None = None) -> Iterator[range]:
    """`state.path_chunks(total, rows)`; without a state, a fresh one on `default_devices()`."""
    return (state or AutoState(devices=default_devices())).path_chunks(total, rows)


def run_rows(
    examples: Sequence[Any],
    attribute: Callable[[list[tuple[int, int]], AutoState], None],
    *,
    devices: Sequence[torch.device],
    batch_size: int | str | None,
    internal_auto: bool = False,
    progress: Callable[[int], None] | None = None,
) -> AutoState:
    """Attributes every (example, position) row of `examples` with `attribute(pairs, state)`, in chunks.

        run_rows(examples, run.attribute_rows, devices=model_devices(model), batch_size="auto")

    `batch_size`: "auto" (chunks of rows sized from measured memory, whole examples where they fit,
    halved on out-of-memory errors down to a single row), or a number of examples per chunk (None:
    all), which only `internal_batch_size="auto"` path chunks then shrink. `attribute` must be safe to
    call again on the same rows, and to size its path chunks with `state.path_chunks`, which records
    the largest for the retry. `progress(n)` is told of each chunk of n rows done.
    """
    state = AutoState(devices=list(devices))
    _run(state, examples, attribute, batch_size, internal_auto, progress)
    return state


def _run(state, examples, attribute, batch_size, internal_auto, progress) -> None:
    pairs = [(b, p) for b, example in enumerate(examples) for p in example.positions]
    # Tokens a row sends through the model: its prefix and, on encoder-decoders, its source.
    weights = [
        p + (len(examples[b].source_ids) if getattr(examples[b], "source_ids", None) is not None else 0)
        for b, p in pairs
    ]
    ends = {i + 1 for i in range(len(pairs)) if i + 1 == len(pairs) or pairs[i + 1][0] != pairs[i][0]}
    rows_auto = is_auto(batch_size)
    fixed = None if rows_auto else (batch_size or len(examples))
    row_cap: int | None = None
    row_cost: float | None = None
    start = 0
    while start < len(pairs):
        if fixed is not None:
            first = pairs[start][0]
            count = sum(1 for b, _ in pairs[start:] if b < first + fixed)
        elif row_cost is None:
            count = min(PROBE_ROWS, next(end for end in sorted(ends) if end > start) - start)
        else:
            budget = fit(row_cost, available_memory(state.devices))
            count, used = 0, 0.0
            while start + count < len(pairs) and (count == 0 or used + weights[start + count] <= budget):
                used += weights[start + count]
                count += 1
            whole = [end - start for end in ends if start < end <= start + count]
            if whole:  # keep examples together where at least one fits whole
                count = max(whole)
        if row_cap is not None:
            count = min(count, row_cap)
        chunk = pairs[start : start + count]
        state.points_run = state.cotangents_run = 0
        probe = measure(state.devices).start()
        try:
            attribute(chunk, state)
        except BaseException as error:
            probe.stop()
            if not is_out_of_memory(error):
                raise
            if state.cotangents_run > 1:  # the planner's slot chunks were too large: halve them from now on
                state.cotangent_cap = state.cotangents_run // 2
                state.note(
                    f"out of memory with {state.cotangents_run} slots per batched backward: "
                    f"retrying with {state.cotangent_cap}"
                )
            elif internal_auto and state.points_run > 1:
                state.point_cap = state.points_run // 2
                state.note(
                    f"out of memory with {count} rows x {state.points_run} path points: "
                    f"retrying with path chunks of {state.point_cap}"
                )
            elif rows_auto and count > 1:
                row_cap = count // 2
                state.note(f"out of memory with {count} rows: retrying with {row_cap}")
            else:
                raise OutOfMemoryError(_message(state, count, internal_auto, rows_auto, error)) from error
        else:
            peak = probe.stop()
            if rows_auto:
                if peak is None:
                    if row_cost is None:
                        state.note(
                            f"batch_size='auto': no peak memory measurement on {state.devices}; "
                            f"chunks stay at {count} rows"
                        )
                    row_cap = count if row_cap is None else min(row_cap, count)
                    row_cost = 0.0
                else:
                    row_cost = _lower(row_cost, peak / max(sum(weights[start : start + count]), 1))
            start += count
            if progress is not None:
                progress(count)
            continue
        free_memory()  # after the except block: the error and its frames are gone by now


def _message(state: AutoState, count: int, internal_auto: bool, rows_auto: bool, error: BaseException) -> str:
    free = available_memory(state.devices)
    where = ", ".join(map(str, state.devices))
    free_text = "unknown" if free is None else f"{free / 2**30:.2f} GiB"
    smallest = f"{count} row(s)" + (f" x {max(state.points_run, 1)} path point(s)" if internal_auto else "")
    hint = "" if rows_auto else " Try batch_size='auto' (it can split the rows further)."
    return (
        f"Out of memory even at the smallest chunk ({smallest}) on {where} (free now: {free_text}).{hint} "
        f"Shorten the inputs, attribute fewer positions or layers, or use a larger device. "
        f"Original error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    )
