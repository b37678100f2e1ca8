"""Memory-aware batching: `batch_size="auto"` and `internal_batch_size="auto"`.

    >>> out = model.attribute(texts, method="integrated_gradients", batch_size="auto", internal_batch_size="auto")

How a size is chosen. The first chunk is a small probe; its peak memory gives a cost per unit of work
(per token of the attributed rows for `batch_size`, per row and path point for `internal_batch_size`),
and every later chunk is as large as fits in the memory free on the model's device(s) at that moment,
less `SAFETY_MARGIN`. Both are measured:

- CUDA: free memory is `torch.cuda.mem_get_info` plus what torch's own cache holds unused; the peak is
  the allocator's peak during the chunk (`torch.cuda.max_memory_allocated`, whose peak statistics are
  reset for that). With a `device_map` over several GPUs: the least free memory and the largest peak.
- CPU: free memory is `MemAvailable` of /proc/meminfo (bounded by the cgroup's limit, else psutil's
  figure); the peak is the process's peak resident memory (`VmHWM`, reset through
  /proc/self/clear_refs, after giving freed heap back with glibc's `malloc_trim`). Where that peak
  cannot be measured, chunks do not grow past the probe's size.

If a chunk still runs out of memory (`torch.OutOfMemoryError` / `torch.cuda.OutOfMemoryError`, a
`RuntimeError` that says "out of memory" or "can't allocate memory", `MemoryError`), it is halved and run
again. Sizes never grow back after that, so the retries end: a chunk of one that runs out of memory
raises `OutOfMemoryError` (a `torch.OutOfMemoryError` and a `MemoryError`) from the original error.

Who retries. `AttributionModel.attribute` runs its rows through `run_rows`, which catches the error and
attributes the same rows again: with a smaller path chunk when `internal_batch_size="auto"` chunks
were in use, else (with `batch_size="auto"`) with half the rows. `chunks(..., "auto")` in
`methods.base` sizes path chunks through `auto_chunks`; called directly (outside `attribute`) a method
gets the sizing but no retry. On CPU a real shortage often ends in the kernel's OOM killer rather than in
an error, so there the safety margin is what protects the run.
"""
from __future__ import annotations

import contextvars
import ctypes
import gc
import logging
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = [
    "AUTO", "SAFETY_MARGIN", "OutOfMemoryError", "auto_chunks", "available_memory", "check_size", "is_auto",
    "is_out_of_memory", "measure", "model_devices", "run_rows",
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


# -- where memory is, and how much is free -----------------------------------------------------------


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices holding `model`'s parameters and buffers (not "meta"), CPU when there are none."""
    found = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type != "meta":
            device = tensor.device
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            found[str(device)] = device
    return list(found.values()) or [torch.device("cpu")]


def available_memory(devices: Sequence[torch.device | str]) -> int | None:
    """Bytes free on the tightest of `devices`, or None where that cannot be told (e.g. MPS)."""
    free = [_free(torch.device(device)) for device in devices]
    known = [value for value in free if value is not None]
    return min(known) if known else None


def _free(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    if device.type == "cpu":
        return _cpu_available()
    return None


def _cpu_available() -> int | None:
    _trim()
    values = []
    try:
        with open("/proc/meminfo") as f:
            found = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE)
        if found:
            values.append(int(found.group(1)) * 1024)
    except OSError:
        pass
    cgroup = _cgroup_available()
    if cgroup is not None:
        values.append(cgroup)
    if not values:
        try:
            import psutil

            values.append(int(psutil.virtual_memory().available))
        except Exception:  # not installed, or no figure on this platform
            return None
    return min(values)


def _cgroup_available() -> int | None:
    """Limit minus usage (reclaimable page cache not counted) of this process's memory cgroup, if limited."""
    for limit_file, usage_file, stat_file, cache_key in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
         "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                return None
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        cache = 0
        try:
            with open(stat_file) as f:
                found = re.search(rf"^{cache_key} (\d+)$", f.read(), re.MULTILINE)
            cache = int(found.group(1)) if found else 0
        except OSError:
            pass
        return max(int(limit) - usage + cache, 0)
    return None


def free_memory() -> None:
    """Lets go of what an out-of-memory error left behind: cycles, torch's CUDA cache, freed heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim()


_libc: Any = None


def _trim() -> None:
    """glibc's malloc_trim(0): freed heap pages go back to the system (so that RSS shows new use)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


# -- measuring a block's peak -------------------------------------------------------------------------


def _read_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(found.group(1)) * 1024 if found else None
    except OSError:
        return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _Peaks:
    """One peak counter (a CUDA device's allocator peak, or the process's VmHWM) shared by nested
    measurements: before each reset, every open measurement takes the reading in, so an inner
    measurement does not hide the outer one's peak."""

    def __init__(self, read: Callable[[], int | None], reset: Callable[[], bool]):
        self.read, self.reset = read, reset
        self.open: "weakref.WeakSet[_Reading]" = weakref.WeakSet()

    def start(self, reading: "_Reading") -> None:
        self._take_in()
        reading.resettable = self.reset()
        reading.seen = self.read() or 0
        self.open.add(reading)

    def stop(self, reading: "_Reading") -> int:
        self._take_in()
        self.open.discard(reading)
        return reading.seen

    def _take_in(self) -> None:
        value = self.read()
        if value is not None:
            for reading in list(self.open):
                reading.seen = max(reading.seen, value)


@dataclass(eq=False)
class _Reading:
    base: int
    seen: int = 0
    resettable: bool = True


_cpu_peaks = _Peaks(lambda: _read_status("VmHWM"), _reset_cpu_peak)
_cuda_peaks: dict[int, _Peaks] = {}


def _cuda(index: int) -> _Peaks:
    if index not in _cuda_peaks:
        def reset(index=index) -> bool:
            torch.cuda.reset_peak_memory_stats(index)
            return True

        _cuda_peaks[index] = _Peaks(lambda index=index: torch.cuda.max_memory_allocated(index), reset)
    return _cuda_peaks[index]


class measure:
    """Peak memory a block adds on `devices`: `peak` (bytes, the largest over the devices) after the
    block, None when it could not be measured. Use as a context manager, or `start()` / `stop()`.

        >>> with measure([torch.device("cpu")]) as m:
        ...     torch.ones(10**7).sum()
        >>> m.peak > 0
    """

    def __init__(self, devices: Sequence[torch.device]):
        self.devices = [torch.device(d) for d in devices]
        self.peak: int | None = None
        self._readings: list[tuple[_Peaks, _Reading]] = []
        self._synced: list[int] = []

    def start(self) -> "measure":
        for device in self.devices:
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                torch.cuda.synchronize(index)
                peaks, base = _cuda(index), torch.cuda.memory_allocated(index)
                self._synced.append(index)
            elif device.type == "cpu" and not any(p is _cpu_peaks for p, _ in self._readings):
                _trim()
                peaks, base = _cpu_peaks, _read_status("VmRSS")
                if base is None:
                    continue
            else:
                continue
            reading = _Reading(base=base)
            peaks.start(reading)
            self._readings.append((peaks, reading))
        return self

    def stop(self) -> int | None:
        peaks_seen = []
        for index in self._synced:
            torch.cuda.synchronize(index)
        for peaks, reading in self._readings:
            top = peaks.stop(reading)
            if reading.resettable:
                peaks_seen.append(max(top - reading.base, 0))
        self._readings.clear()
        self._synced.clear()
        self.peak = max(peaks_seen) if peaks_seen else None
        return self.peak

    def __enter__(self) -> "measure":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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
    """What the driver and the path chunks of one `attribute` call share."""

    devices: list[torch.device]
    point_cap: int | None = None  # path points per chunk at most, after an out-of-memory error
    point_cost: float | None = None  # bytes per row and path point
    points_run: int = 0  # the largest path chunk of the rows being attributed now
    unmeasured: bool = False
    log: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        self.log.append(message)
        log.info(message)


_state: contextvars.ContextVar[AutoState | None] = contextvars.ContextVar("instrument_batching", default=None)


def current_state() -> AutoState | None:
    return _state.get()


def _default_devices() -> list[torch.device]:
    if torch.cuda.is_available():
        return [torch.device("cuda", torch.cuda.current_device())]
    return [torch.device("cpu")]


def auto_chunks(total: int, rows: int) -> Iterator[range]:
    """Chunks of `total` path points for `rows` rows, as large as the free memory allows.

    The first is a probe of `PROBE_POINTS` points (unless an earlier call of the same run already
    measured the cost); each chunk is measured while the caller's loop body runs (until it asks for the
    next chunk), which updates the cost. Outside `AttributionModel.attribute` the devices are the
    current CUDA device, else the CPU.
    """
    state = _state.get() or AutoState(devices=_default_devices())
    rows = max(int(rows), 1)
    start = 0
    while start < total:
        if state.point_cost is None or state.unmeasured:
            size = PROBE_POINTS
        else:
            budget = fit(state.point_cost * rows, available_memory(state.devices))
            size = total if budget >= total else int(budget)
        size = max(1, min(size, total - start, state.point_cap or total))
        state.points_run = max(state.points_run, size)
        probe = measure(state.devices).start()
        yield range(start, start + size)
        peak = probe.stop()
        if peak is None:
            if not state.unmeasured:
                state.note(f"internal_batch_size='auto': no peak memory measurement on {state.devices}; "
                           f"path chunks stay at {PROBE_POINTS} point(s)")
            state.unmeasured = True
            state.point_cost = 0.0
        else:
            state.point_cost = _lower(state.point_cost, peak / (size * rows))
        start += size


def run_rows(
    examples: Sequence[Any],
    attribute: Callable[[list[tuple[int, int]]], None],
    *,
    devices: Sequence[torch.device],
    batch_size: int | str | None,
    internal_auto: bool = False,
    progress: Callable[[int], None] | None = None,
) -> AutoState:
    """Attributes every (example, position) row of `examples` with `attribute(pairs)`, in chunks.

    `batch_size`: "auto" (chunks of rows sized from measured memory, whole examples where they fit,
    halved on out-of-memory errors down to a single row), or a number of examples per chunk (None:
    all), which only `internal_batch_size="auto"` path chunks then shrink. `attribute` must be safe to
    call again on the same rows. `progress(n)` is told of each chunk of n rows done.
    """
    state = AutoState(devices=list(devices))
    token = _state.set(state)
    try:
        _run(state, examples, attribute, batch_size, internal_auto, progress)
    finally:
        _state.reset(token)
    return state


def _run(state, examples, attribute, batch_size, internal_auto, progress) -> None:
    pairs = [(b, p) for b, example in enumerate(examples) for p in example.positions]
    # Tokens a row sends through the model: its prefix and, on encoder-decoders, its source.
    weights = [p + (len(examples[b].source_ids) if getattr(examples[b], "source_ids", None) is not None else 0) for b, p in pairs]
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
        state.points_run = 0
        probe = measure(state.devices).start()
        try:
            attribute(chunk)
        except BaseException as error:
            probe.stop()
            if not is_out_of_memory(error):
                raise
            if internal_auto and state.points_run > 1:
                state.point_cap = state.points_run // 2
                state.note(f"out of memory with {count} rows x {state.points_run} path points: "
                           f"retrying with path chunks of {state.point_cap}")
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
                        state.note(f"batch_size='auto': no peak memory measurement on {state.devices}; "
                                   f"chunks stay at {count} rows")
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
    return (f"Out of memory even at the smallest chunk ({smallest}) on {where} (free now: {free_text}).{hint} "
            f"Shorten the inputs, attribute fewer positions or layers, or use a larger device. "
            f"Original error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
