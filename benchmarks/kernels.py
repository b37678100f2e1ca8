"""Fused kernels of instrument.kernels against eager PyTorch doing the same work, with achieved bandwidth.

    python benchmarks/kernels.py                      # B=8, L=512, D=768 and 4096, K=50 (needs ~9 GB of RAM)
    python benchmarks/kernels.py --sizes small        # a quick run
    python benchmarks/kernels.py --ops accumulate --dtypes float32,bfloat16 --devices cpu

Each op is timed against the eager PyTorch sequence it replaces (what integrated gradients and the reductions
did before, or would do without the extension), on the CPU and, when there is one, on the GPU, with
torch's default thread count:

  interpolate   fused: kernels.interpolate(x, base, alphas)
                eager: (base.float() + alphas[:, None, None, None] * (x.float() - base.float())).to(dtype)
  accumulate    fused: kernels.accumulate(acc, grads, weights)           grads [K*B, L, D]
                eager: acc += torch.einsum("k,k...->...", weights, grads.float().unflatten(0, (K, -1)))
  finalize      fused: kernels.finalize(acc, x, base)
                eager: acc * (x - base).float()
  reduce_heads  fused: kernels.reduce_heads(attn, layers, heads, reduce)  attn [12, B, 12, L, L] (GPT-2 small)
                (also one layer as the attention method reduces it, against its former indexing)
                eager: attn[layers][:, :, heads].float().mean((0, 2)) (amax for max); without a selection
                       attn.float().mean((0, 2))

  alti_norms    fused: kernels.alti_norms(attn, values, residual, positions)  attn [B, 12, L, L], values
                [B, 12, L, D] (a GPT-2-small layer: 12 heads, D=768, causal; L=1024 in the full sizes)
                naive: the fallback with every query in one chunk, which forms t [B, L, L, D] at once;
                chunked: the fallback as it runs without the extension. A table of its own: time and the
                peak memory each adds (instrument.memory.measure: CUDA allocator peak, CPU resident peak).

"GB/s" is the traffic the op cannot avoid (every input read once, every output written once) divided by the
time, for both columns, so the two are comparable; "copy" relates it to the bandwidth of one big
`tensor.copy_` (read + write) on the same device, measured first; the read-only bandwidth of a big
`tensor.sum()` is printed next to it (ops that mostly read, like accumulate, can exceed the copy figure).
Times are medians of --repeats rounds, each running the fused op and then the eager sequence, after one
warm-up round.

Big outputs are fresh allocations in both columns; on Linux the fused ops ask for transparent huge pages
for outputs of 64 MiB or more (see csrc/bindings.cpp), eager PyTorch does so only with
THP_MEM_ALLOC_ENABLE=1 in the environment. Cases whose inputs and eager temporaries would take more than
60% of the available memory are skipped with a note (the full sizes need about 9 GB at most).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

# The repository root replaces this folder at the head of the path: benchmarks/kernels.py must not shadow
# the `kernels` package that transformers imports when it is installed.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from instrument import kernels, memory  # noqa: E402

SIZES = {  # B, L, hidden sizes, K; attention: layers, heads
    "full": dict(batch=8, length=512, hidden=(768, 4096), k=50, layers=12, heads=12, alti_length=1024),
    "small": dict(batch=2, length=128, hidden=(768,), k=10, layers=4, heads=12, alti_length=256),
}
OPS = ("interpolate", "accumulate", "finalize", "reduce_heads", "alti_norms")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timer(device: torch.device, repeats: int):
    """`run(*fns)`: the median seconds of each function over `repeats` rounds that call them in turn, after one
    warm-up round (which also lets glibc settle its mmap threshold for the sizes involved)."""

    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        del result
        return seconds

    def run(*fns):
        for fn in fns:
            once(fn)
        times = [[once(fn) for fn in fns] for _ in range(repeats)]
        medians = [statistics.median(column) for column in zip(*times)]
        return medians[0] if len(fns) == 1 else medians

    return run


def bandwidths(device: torch.device, repeats: int) -> tuple[float, float]:
    """Bytes per second of `dst.copy_(src)` (read + write counted) and of `src.sum()` (read only), 512 MiB."""
    src = torch.ones(128 * 1024 * 1024, device=device)
    dst = torch.empty_like(src)
    run = timer(device, repeats)
    copy = 2 * src.numel() * src.element_size() / run(lambda: dst.copy_(src))
    read = src.numel() * src.element_size() / run(lambda: src.sum())
    return copy, read


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def cases(op: str, size: dict, dtype: torch.dtype, device: torch.device):
    """(label, fused, eager, bytes) for one op, dtype and device; (label, None, None, why) when skipped."""
    gen = torch.Generator().manual_seed(0)
    batch, length, k = size["batch"], size["length"], size["k"]
    item = torch.finfo(dtype).bits // 8

    def too_big(label: str, need: int):
        """A skip note when inputs plus the eager sequence's temporaries (`need` bytes) would not fit."""
        have = available_bytes(device)
        if need > 0.6 * have:
            return (label, None, None, f"skipped: needs ~{need / 1e9:.1f} GB, {have / 1e9:.1f} GB available")
        return None

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    if op == "reduce_heads":
        layers, heads = size["layers"], size["heads"]
        skip = too_big(f"all {layers}x{heads}", layers * batch * heads * length * length * (item + 4))
        if skip:
            yield skip
            return
        attn = torch.rand(layers, batch, heads, length, length, generator=gen).to(device, dtype)
        plane = batch * length * length
        yield (
            f"all {layers}x{heads}, mean",
            lambda: kernels.reduce_heads(attn),
            lambda: attn.float().mean((0, 2)),
            layers * heads * plane * item + plane * 4,
        )
        yield (
            f"all {layers}x{heads}, max",
            lambda: kernels.reduce_heads(attn, reduce="max"),
            lambda: attn.float().amax((0, 2)),
            layers * heads * plane * item + plane * 4,
        )
        pick_layers, pick_heads = list(range(layers - 4, layers)), list(range(0, heads, 2))
        index_l, index_h = torch.tensor(pick_layers, device=device), torch.tensor(pick_heads, device=device)
        yield (
            f"{len(pick_layers)}x{len(pick_heads)} picked, mean",
            lambda: kernels.reduce_heads(attn, pick_layers, pick_heads),
            lambda: attn.index_select(0, index_l).index_select(2, index_h).float().mean((0, 2)),
            len(pick_layers) * len(pick_heads) * plane * item + plane * 4,
        )
        # As the attention method reduces one layer's weights in its hook: heads, then the query rows read
        # (every row here); eager: the rows first, then the heads (what the method did before).
        one, rows = attn[0], torch.arange(batch, device=device)[:, None]
        positions = torch.arange(length, device=device).expand(batch, length)
        yield (
            "one layer, as in attention",
            lambda: kernels.reduce_heads([one], heads=list(range(heads)))[rows, positions],
            lambda: one[rows, :, positions].float().sum(2),
            heads * plane * item + plane * 4,
        )
        return

    for hidden in size["hidden"]:
        n = batch * length * hidden
        shape = f"D={hidden}"
        need = {
            "interpolate": 2 * n * item + k * n * (8 + item),
            "accumulate": k * n * (item + 4) + 3 * n * 4,
            "finalize": 8 * n * 4,
        }[op]
        skip = too_big(f"{shape} K={k}", need)
        if skip:
            yield skip
            continue
        if op == "interpolate":
            x, base, alphas = randn(batch, length, hidden), randn(batch, length, hidden), torch.rand(k, device=device)

            def eager(x=x, base=base, alphas=alphas):
                low = base.float()
                return (low + alphas.view(-1, 1, 1, 1) * (x.float() - low)).to(dtype).flatten(0, 1)

            yield (
                f"{shape} K={k}",
                lambda x=x, base=base, alphas=alphas: kernels.interpolate(x, base, alphas),
                eager,
                2 * n * item + k * n * item,
            )
        elif op == "accumulate":
            grads, weights = randn(k * batch, length, hidden), torch.rand(k, device=device)
            acc = torch.zeros(batch, length, hidden, device=device)

            def eager(acc=acc, grads=grads, weights=weights):
                acc += torch.einsum("k,k...->...", weights, grads.float().unflatten(0, (k, -1)))

            yield (
                f"{shape} K={k}",
                lambda acc=acc, grads=grads, weights=weights: kernels.accumulate(acc, grads, weights),
                eager,
                k * n * item + 2 * n * 4,
            )
        elif op == "finalize":
            acc, x, base = (
                randn(batch, length, hidden, dtype=torch.float32),
                randn(batch, length, hidden),
                randn(batch, length, hidden),
            )
            yield (
                shape,
                lambda acc=acc, x=x, base=base: kernels.finalize(acc, x, base),
                lambda acc=acc, x=x, base=base: acc * (x - base).float(),
                2 * n * 4 + 2 * n * item,
            )


def alti_table(size: dict, dtypes: list, device: torch.device, repeats: int) -> None:
    """Time and peak memory of kernels.alti_norms against the naive version that forms [B, L, L, D]."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, length, hidden = 1, 12, size["alti_length"], 768
    print(f"\nalti_norms, B={batch}, H={heads}, L={length}, D={hidden} (GPT-2 small), {device.type}")
    header = f"{'dtype':<10}{'version':<10}{'ms':>10}{'peak MiB':>10}{'vs naive':>10}"
    print(header)
    print("-" * len(header))
    for dtype in dtypes:
        causal = torch.ones(length, length).triu(1).bool()  # a decoder layer's causal attention
        scores = torch.randn(batch, heads, length, length, generator=gen).masked_fill(causal, float("-inf"))
        attn = torch.softmax(scores, -1).to(device, dtype)
        values = torch.randn(batch, heads, length, hidden, generator=gen).to(device, dtype)
        residual = torch.randn(batch, length, hidden, generator=gen).to(device, dtype)
        positions = torch.arange(length, device=device).expand(batch, -1).contiguous()
        args = (attn, values, residual, positions)
        math = torch.float64 if dtype == torch.float64 else torch.float32
        need = 6 * batch * length * length * hidden * torch.finfo(math).bits // 8
        versions = {"fused": lambda: kernels.alti_norms(*args, use_extension=None if device.type == "cpu" else True)}
        versions["chunked"] = lambda: kernels.alti_norms(*args, use_extension=False)
        if need < 0.6 * available_bytes(device):

            def naive():
                resultant = torch.einsum("bhqk,bhkd->bqd", attn.to(math), values.to(math)) + residual.to(math)
                return kernels._alti_norms_torch(*args, None, None, True, resultant, chunk=length)

            versions["naive"] = naive
        else:
            print(f"{str(dtype)[6:]:<10}naive     skipped: needs ~{need / 1e9:.1f} GB")
        run = timer(device, repeats)
        figures = {}
        for name, fn in versions.items():  # interleaved: every version once per round
            gc.collect()
            with memory.measure([device]) as measured:
                fn()
            figures[name] = [None, measured.peak]
        times = run(*versions.values())
        for name, seconds in zip(versions, times if len(versions) > 1 else [times]):
            figures[name][0] = seconds
        naive_peak = figures.get("naive", [None, None])[1]
        for name, (seconds, peak) in figures.items():
            ratio = f"{peak / naive_peak:.3f}" if peak and naive_peak else "-"
            peak_text = f"{peak / 2**20:.0f}" if peak is not None else "?"
            print(f"{str(dtype)[6:]:<10}{name:<10}{seconds * 1e3:>10.1f}{peak_text:>10}{ratio:>10}", flush=True)
        versions.clear()
        gc.collect()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped without a GPU")
    parser.add_argument("--hidden", default=None, help="comma-separated hidden sizes D, instead of the --sizes ones")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--alti-length", type=int, default=None, help="L of alti_norms, instead of the --sizes one")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = [op for op in args.ops.split(",") if op]
    dtypes = [DTYPES[name] for name in args.dtypes.split(",") if name]
    devices = [
        torch.device(name) for name in args.devices.split(",") if name and (name != "cuda" or torch.cuda.is_available())
    ]
    # glibc raises its mmap threshold (up to 32 MiB) each time it frees an mmap-ed block: until then, every output
    # of a few MiB is a fresh mmap whose pages fault on first write, and which blocks are served that way depends
    # on what ran before. Freeing one 32 MiB tensor first puts both columns in the steady state of a long run.
    torch.empty(8 * 2**20).fill_(0)  # 32 MiB, freed at once
    size = dict(SIZES[args.sizes])
    if args.alti_length:
        size["alti_length"] = args.alti_length
    if args.hidden:
        size["hidden"] = tuple(int(d) for d in args.hidden.split(","))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; extension: "
        f"{'yes' if kernels.has_extension() else kernels.extension_error()}",
        end="",
    )
    if kernels.has_extension():
        from instrument import _C

        print(f" (CPU kernels: {'AVX2' if _C.cpu_simd() else 'scalar'}, CUDA kernels: {_C.with_cuda})", end="")
    print(
        f"\nsizes {args.sizes}: B={size['batch']}, L={size['length']}, D={'/'.join(map(str, size['hidden']))}, "
        f"K={size['k']}; attention [{size['layers']}, B, {size['heads']}, L, L]"
    )
    for device in devices:
        copy, read = bandwidths(device, args.repeats)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"\n{device.type} ({name}): copy bandwidth {copy / 1e9:.1f} GB/s (512 MiB float32 tensor.copy_, read + "
            f"write); read bandwidth {read / 1e9:.1f} GB/s (its .sum())"
        )
        header = (
            f"{'op':<13}{'dtype':<10}{'case':<24}{'fused ms':>10}{'eager ms':>10}{'speedup':>9}"
            f"{'fused GB/s':>12}{'eager GB/s':>12}{'fused/copy':>12}"
        )
        print(header)
        print("-" * len(header))
        run = timer(device, args.repeats)
        for op in ops:
            if op == "alti_norms":
                continue
            for dtype in dtypes:
                for label, fused, eager, nbytes in cases(op, size, dtype, device):
                    if fused is None:
                        print(f"{op:<13}{str(dtype)[6:]:<10}{label:<24}{nbytes}", flush=True)
                        continue
                    fused_s, eager_s = run(fused, eager)
                    print(
                        f"{op:<13}{str(dtype)[6:]:<10}{label:<24}{fused_s * 1e3:>10.2f}{eager_s * 1e3:>10.2f}"
                        f"{eager_s / fused_s:>8.2f}x{nbytes / fused_s / 1e9:>12.2f}{nbytes / eager_s / 1e9:>12.2f}"
                        f"{nbytes / fused_s / copy:>11.0%}",
                        flush=True,
                    )
                gc.collect()
        if "alti_norms" in ops:
            alti_table(size, dtypes, device, args.repeats)


if __name__ == "__main__":
    main()
