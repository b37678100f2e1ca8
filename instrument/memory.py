"""Memory on the model's devices: how much is free, and the peak a block of code adds.

    free = available_memory(model_devices(model))          # bytes, None where unknown (e.g. MPS)
    with measure([torch.device("cpu")]) as m:
        torch.ones(10**7).sum()
    m.peak > 0

- CUDA: free memory is `torch.cuda.mem_get_info` plus what torch's own cache holds unused; the peak is
  the allocator's peak during the block (`torch.cuda.max_memory_allocated`, whose peak statistics are
  reset for that). With a `device_map` over several GPUs: the least free memory and the largest peak.
- CPU: free memory is `MemAvailable` of /proc/meminfo (bounded by the cgroup's limit, else psutil's
  figure); the peak is the process's peak resident memory (`VmHWM`, reset through
  /proc/self/clear_refs, after giving freed heap back with glibc's `malloc_trim`). None where that
  peak cannot be measured.

`instrument.batching` sizes chunks from these figures. `tensor_peak(fn)` is the peak of torch's own
CPU tensors during `fn()` (the profiler's memory events): what the planner predicts.
"""

from __future__ import annotations

import ctypes
import gc
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = ["available_memory", "free_memory", "measure", "model_devices", "tensor_peak"]


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
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "/sys/fs/cgroup/memory/memory.stat",
            "total_inactive_file",
        ),
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

        with measure([torch.device("cpu")]) as m:
            torch.ones(10**7).sum()
        m.peak > 0
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


def tensor_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes torch's CPU allocator hands out during `fn()`, from the profiler's memory events
    (the CPU counterpart of CUDA's `max_memory_allocated`).

        tensor_peak(lambda: torch.ones(10**6).sum()) >= 4 * 10**6
    """
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        with open(trace.name) as f:
            events = json.load(f)["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)
