"""Peak memory of integrated gradients against n_steps, for a fixed internal_batch_size.

    PYTHONPATH=. python benchmarks/memory.py                                # n_steps 20, 100, 300; batch 40
    PYTHONPATH=. python benchmarks/memory.py --n-steps 20,300 --internal-batch-size 80 --unchunked
    PYTHONPATH=. python benchmarks/memory.py --measure tensors --unchunked  # tensor memory, not RSS

Integrated gradients streams its path points in chunks of `internal_batch_size` rows: each chunk's
gradients are folded into a float32 accumulator (`instrument.kernels.accumulate`) and dropped before the
next chunk is built, so its peak memory should not depend on n_steps. This script checks that on a small
GPT-2-shaped model (4 blocks, 256 wide, 4 heads, seeded random weights, a byte-level BPE vocabulary of
~1000 tokens trained at startup) attributing a 13-token prompt's 10-token continuation.

What is measured: every setting runs in a fresh subprocess (same model, same texts). On the CPU, the peak
resident set size of that process during the one `attribute` call, minus its resident size just before
the call: Linux's VmHWM is reset to the current RSS first (`echo 5 > /proc/self/clear_refs`), and read
from /proc/self/status after the call. Without /proc/self/clear_refs a thread samples VmRSS every
millisecond instead. On CUDA (--device cuda), torch.cuda.max_memory_allocated() growth over the call
(the caching allocator's peak, reset before the call). glibc may serve part of a chunk from memory it
kept from model building, which the RSS growth does not count, alike for every setting.

`--measure tensors` (CPU) measures instead the peak of the bytes torch's allocator hands out during the call,
from the profiler's memory events: the tensors integrated gradients holds, without malloc's behaviour around
them (the CPU counterpart of max_memory_allocated; the profiler slows the call down).

`--unchunked` adds all path points in one pass (shown as internal_batch_size "all": a size above
n_steps x rows; None would chunk on the CPU, see `methods.base.CPU_CHUNK_TOKENS`) for contrast: there
peak memory does grow with n_steps.

glibc's malloc raises its mmap threshold each time it frees a large block, after which chunk-sized blocks
come from its heaps, whose fragmentation adds RSS over the first chunks and then levels off: with 40 rows
a chunk, 1.13x at n_steps=300 against 20 on one 2-core machine, 1.22-1.27x on another, and no more at
n_steps=1000 (1.21-1.31x). `--malloc-mmap-threshold 131072` fixes the threshold in the children
(MALLOC_MMAP_THRESHOLD_), which takes the allocator's drift out of the numbers (1.07x at 300, 1.08x at
1000 on the second machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

PROMPT = "The quick brown fox jumps over the lazy dog while the farmer watches"
CONTINUATION = " from his porch and thinks about the long winter ahead"
CORPUS = f"""{PROMPT}{CONTINUATION}.
A language model predicts the next token of a text from the tokens before it. Attribution methods
say which input tokens mattered for each prediction: integrated gradients averages gradients along a
straight path from a baseline to the input, in chunks of path points.
"""


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakTensors:
    """Peak growth (bytes) of what torch's CPU allocator hands out over a `with` block, from the profiler's
    memory events: tensor memory alone, whatever malloc does around it."""

    how = "torch profiler memory events (tensors only)"

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profile.__enter__()
        return self

    def __exit__(self, *exc):
        self.profile.__exit__(*exc)
        with tempfile.NamedTemporaryFile(suffix=".json") as trace:
            self.profile.export_chrome_trace(trace.name)
            with open(trace.name) as exported:
                events = json.load(exported)["traceEvents"]
        totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
        self.growth = max(totals, default=0)  # the running total starts at 0 with the profiler


class PeakRss:
    """Peak RSS growth (bytes) over a `with` block: VmHWM after a clear_refs reset, else 1 ms sampling."""

    def __enter__(self):
        self.sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current RSS
            self.how = "VmHWM after clear_refs"
        except OSError:
            self.how = "VmRSS sampled every 1 ms"
            self.peak, self.done = 0, threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.before = status_kib("VmRSS")
        if self.sampler is not None:
            self.sampler.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, status_kib("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.sampler is not None:
            self.done.set()
            self.sampler.join()
            peak = max(self.peak, status_kib("VmRSS"))
        else:
            peak = status_kib("VmHWM")
        self.growth = (peak - self.before) * 1024


def child(n_steps: int, internal_batch_size: int | None, device: str, threads: int | None, measure: str) -> dict:
    """One attribution in this process; returns what was measured."""
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    # The repository root replaces this folder at the head of the path: benchmarks/kernels.py must not shadow
    # the `kernels` package that transformers imports when it is installed.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import instrument
    from instrument import kernels

    if threads:
        torch.set_num_threads(threads)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [CORPUS] * 20, vocab_size=1000, min_frequency=1, show_progress=False, special_tokens=["<|endoftext|>", "<unk>"]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        unk_token="<unk>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=256,
        n_layer=4,
        n_head=4,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.GPT2LMHeadModel(config).eval().to(device)
    wrapped = instrument.load_model(model, "integrated_gradients", tokenizer=tokenizer)
    everything = 10**9  # one chunk: above n_steps x rows
    options = dict(n_steps=n_steps, internal_batch_size=internal_batch_size or everything, show_progress=False)

    start = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = wrapped.attribute(PROMPT, PROMPT + CONTINUATION, **options)[0]
        torch.cuda.synchronize()
        growth, how = torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    else:
        with PeakTensors() if measure == "tensors" else PeakRss() as peak:
            out = wrapped.attribute(PROMPT, PROMPT + CONTINUATION, **options)[0]
        growth, how = peak.growth, peak.how
    seconds = time.perf_counter() - start
    attributions = out.target_attributions
    return dict(
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        growth=growth,
        how=how,
        seconds=seconds,
        shape=list(attributions.shape),
        extension=kernels.has_extension(),
        checksum=float(attributions.nan_to_num().abs().sum()),
    )


def run_child(args, n_steps: int, internal_batch_size: int | None) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        str(n_steps),
        "none" if internal_batch_size is None else str(internal_batch_size),
        "--device",
        args.device,
        "--measure",
        args.measure,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        raise SystemExit(f"child {command} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-steps", default="20,100,300", help="comma-separated n_steps settings")
    parser.add_argument("--internal-batch-size", type=int, default=40, help="rows of path points per chunk")
    parser.add_argument("--unchunked", action="store_true", help="also all path points in one chunk, for contrast")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="MALLOC_MMAP_THRESHOLD_ for the children (glibc; default: glibc's dynamic threshold)",
    )
    parser.add_argument(
        "--measure",
        choices=["rss", "tensors"],
        default="rss",
        help="CPU: the process's peak RSS (default), or the peak of torch's tensor memory alone",
    )
    parser.add_argument("--child", nargs=2, metavar=("N_STEPS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        n_steps, batch = int(args.child[0]), None if args.child[1] == "none" else int(args.child[1])
        print(json.dumps(child(n_steps, batch, args.device, args.threads, args.measure)))
        return

    steps = [int(n) for n in args.n_steps.split(",") if n]
    settings = [(n, args.internal_batch_size) for n in steps]
    if args.unchunked:
        settings += [(n, None) for n in steps]
    print("$ python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    results = []
    for n_steps, batch in settings:
        results.append(run_child(args, n_steps, batch))
        r = results[-1]
        if len(results) == 1:
            malloc = (
                "glibc default"
                if args.malloc_mmap_threshold is None
                else f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
            )
            print(
                f"GPT-2-shaped model (4 blocks, 256 wide), 23 tokens, attributions {tuple(r['shape'])}, device "
                f"{args.device}, native kernels: {r['extension']}; measured: {r['how']}, growth over the "
                f"attribute call, one subprocess per row; malloc: {malloc}\n"
            )
            print(f"{'n_steps':>8}{'internal_batch_size':>21}{'peak growth MiB':>17}{'vs first':>10}{'seconds':>9}")
        first = next(x for x in results if x["internal_batch_size"] == batch)
        print(
            f"{n_steps:>8}{'all' if batch is None else str(batch):>21}{r['growth'] / 2**20:>17.1f}"
            f"{r['growth'] / max(first['growth'], 1):>9.2f}x"
            f"{r['seconds']:>9.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
