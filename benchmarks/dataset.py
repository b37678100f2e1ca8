"""Whole-data-set attribution: `attribute_dataset` against Inseq's attribute-dataset path, and peak memory.

    PYTHONPATH=. python benchmarks/dataset.py                                   # the issue's sizes
    PYTHONPATH=. python benchmarks/dataset.py --examples 32 --ig-examples 8 --memory-examples 64,256 --memory-layers 2
    PYTHONPATH=. python benchmarks/dataset.py --device cuda --batch-size 32 --dtype bfloat16
    PYTHONPATH=. python benchmarks/dataset.py --examples 64 --methods saliency --batch-size auto --memory-examples ""

Model: GPT-2 small's shape (12 layers, 768 wide, vocabulary 50257) with seeded random weights. Data:
`--examples` prompts of 8 to 64 words (uniform, seeded) drawn from a small word list, each with a
forced continuation of `--continuation-words` words; the tokenizer is a byte-level BPE trained at
startup on the word list (every word one token). No download.

Speed: for saliency and integrated gradients (`--n-steps`, default 20), ours (`model.attribute_dataset`
into a temporary directory of shards, `--batch-size` examples per batch, length-sorted within shards
of `--shard-size`) and Inseq's attribute-dataset path (what `inseq attribute-dataset` runs once the
data set is loaded: one `inseq.load_model(...).attribute(inputs, targets, batch_size=...)` call on
all examples), alternating (`--repeats` runs each, medians), on the same model object; examples/s
and the ratio, of wall time and of this process's CPU time (on a shared machine the CPU-time ratio
is the steadier one). Then the FLOPs of the matrix multiplications (linear layers and LM head) each
side runs, counted from the token lengths and ours' batches: their ratio is what the speed ratio
tends to where both run their matrix multiplications equally fast (a compute-bound CPU).

Memory: for each size in `--memory-examples`, a fresh process of this script attributes that many
examples with ours (saliency) and reports its peak resident memory during the run (VmHWM, reset at
the start; on CUDA the allocator's peak), also as the growth over what it held once the model was
loaded: flat in the number of examples means the data set never sits in memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import transformers

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import instrument  # noqa: E402
from benchmarks.throughput import bpe_tokenizer, gpt2_small  # noqa: E402

WORDS = (
    "the quick brown fox jumps over lazy dog while farmer watches from his porch and thinks about long winter "
    "ahead a language model predicts next token of text tokens before it attribution methods say which input "
    "mattered for each prediction river morning forest city house garden road light water stone tree bird"
).split()


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return bpe_tokenizer([" ".join(WORDS)] * 50 + [" " + w for w in WORDS] * 20, vocab_size=600)


def build_model(tokenizer, device, dtype, layers: int = 12) -> transformers.GPT2LMHeadModel:
    return gpt2_small(tokenizer, layers=layers).to(device=device, dtype=dtype)


def make_rows(count: int, continuation: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 64)))
        rows.append(
            {"input": prompt, "target": prompt + " " + " ".join(rng.choice(WORDS) for _ in range(continuation))}
        )
    return rows


def load_inseq():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import inseq
    except Exception as error:
        return None, f"{type(error).__name__}: {error}".splitlines()[0][:160]
    from importlib.metadata import version

    return inseq, f"inseq {version('inseq')}"


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(started: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `clocks()`."""
    now = clocks()
    return now[0] - started[0], now[1] - started[1]


def flops(model, tokenizer, rows, args, points: int) -> tuple[float, float]:
    """(ours, Inseq) FLOPs of the matrix multiplications, with gradients w.r.t. the inputs only (a
    backward through a linear layer costs what its forward does). Inseq, per attributed step of a
    prefix of n tokens: `points` forwards and backwards of n tokens through the layers and the LM
    head (which runs at every position). Ours, per batch: `points` forwards of its full rows (padded
    to the longest), the LM head at the attributed positions only, and a backward of the full rows
    per attributed position (slot)."""
    from instrument.models.dataset import CPU_AUTO_PADDING, plan_batches

    config = model.config
    body = 2 * sum(p.numel() for p in model.transformer.h.parameters() if p.dim() == 2)  # per token
    head = 2 * config.n_embd * config.vocab_size
    ours = theirs = 0.0
    for start in range(0, len(rows), args.shard_size):
        shard = rows[start : start + args.shard_size]
        prompts = [len(tokenizer(r["input"])["input_ids"]) for r in shard]
        targets = [len(tokenizer(r["target"])["input_ids"]) for r in shard]
        for prompt, target in zip(prompts, targets):
            theirs += points * sum(2 * (body + head) * n for n in range(prompt, target))
        lengths = [p + t for p, t in zip(prompts, targets)]  # as ShardAttributor sorts them
        padding = CPU_AUTO_PADDING if args.batch_size == "auto" and args.device == "cpu" else None
        for batch in plan_batches(lengths, [0] * len(shard), args.batch_size, None, padding):
            width = max(targets[i] for i in batch) - 1
            slots = max(targets[i] - prompts[i] for i in batch)
            attributed = sum(targets[i] - prompts[i] for i in batch)
            ours += points * (len(batch) * width * body * (1 + slots) + 2 * head * attributed)
    return ours, theirs


def ours(model, tokenizer, rows, method, args) -> tuple[float, float]:
    wrapped = instrument.load_model(model, method, tokenizer=tokenizer)
    options = {"n_steps": args.n_steps} if method == "integrated_gradients" else {}
    with tempfile.TemporaryDirectory() as directory:
        started = clocks()
        wrapped.attribute_dataset(
            rows,
            os.path.join(directory, "out"),
            input_text_field="input",
            generated_text_field="target",
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            show_progress=False,
            **options,
        )
        return since(started)


def theirs(inseq, model, tokenizer, rows, method, args) -> tuple[float, float]:
    wrapped = inseq.load_model(model, method, tokenizer=copy.deepcopy(tokenizer))
    options = {"n_steps": args.n_steps} if method == "integrated_gradients" else {}
    started = clocks()
    wrapped.attribute(
        [r["input"] for r in rows],
        [r["target"] for r in rows],
        batch_size=8 if args.batch_size == "auto" else args.batch_size,  # Inseq has no "auto"
        show_progress=False,
        **options,
    )
    return since(started)


def peak_memory_run(args) -> None:
    """One size of the memory test, in this (fresh) process: prints a JSON line."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.device, getattr(torch, args.dtype), args.memory_layers)
    rows = make_rows(args.memory_run, args.continuation_words, seed=1)
    wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
    from instrument.memory import _read_status, measure

    device = torch.device(args.device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else _read_status("VmRSS")
    with tempfile.TemporaryDirectory() as directory, measure([device]) as grown:
        started = time.perf_counter()
        wrapped.attribute_dataset(
            rows,
            os.path.join(directory, "out"),
            input_text_field="input",
            generated_text_field="target",
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            show_progress=False,
        )
        seconds = time.perf_counter() - started
    peak = base + grown.peak  # VmHWM (CPU) or the allocator's peak (CUDA) during the run
    print(json.dumps({"examples": args.memory_run, "base": base, "peak": peak, "seconds": seconds}))


def median(times: list[tuple[float, float]]) -> tuple[float, float]:
    """The median wall and the median CPU seconds of some runs."""
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def _batch_size(text: str):
    return text if text == "auto" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument(
        "--ig-examples", type=int, default=None, help="examples for integrated gradients (default: --examples)"
    )
    parser.add_argument("--memory-layers", type=int, default=12, help="layers of the model of the memory runs")
    parser.add_argument("--memory-examples", default="256,1024", help="comma-separated sizes ('' to skip)")
    parser.add_argument("--methods", default="saliency,integrated_gradients")
    parser.add_argument("--n-steps", type=int, default=20)
    parser.add_argument("--continuation-words", type=int, default=8)
    parser.add_argument("--batch-size", type=_batch_size, default=8, help="examples per batch, or 'auto' (ours)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating; medians reported")
    parser.add_argument("--no-inseq", action="store_true")
    parser.add_argument("--memory-run", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    if args.memory_run is not None:
        peak_memory_run(args)
        return
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.device, getattr(torch, args.dtype))
    rows = make_rows(args.examples, args.continuation_words)
    tokens = sum(len(tokenizer(r["target"])["input_ids"]) for r in rows)
    print(f"{len(rows)} examples, {tokens} target tokens, {args.continuation_words} attributed positions each")
    inseq, about = (None, "skipped (--no-inseq)") if args.no_inseq else load_inseq()
    print("Inseq:", about)
    print(
        f"{'method':<26}{'ours ex/s':>10}{'Inseq ex/s':>11}{'ratio':>7}{'ours CPU s/ex':>15}{'Inseq CPU s/ex':>16}"
        f"{'CPU ratio':>10}{'FLOP ratio':>11}"
    )
    for method in filter(None, args.methods.split(",")):
        some = rows[: args.ig_examples] if method == "integrated_gradients" and args.ig_examples else rows
        runs: dict[str, list] = {"ours": [], "theirs": []}
        for repeat in range(args.repeats):  # alternating which goes first: ours, Inseq, Inseq, ours, ...
            for side in ("ours", "theirs") if repeat % 2 == 0 else ("theirs", "ours"):
                if side == "ours":
                    runs["ours"].append(ours(model, tokenizer, some, method, args))
                elif inseq is not None:
                    runs["theirs"].append(theirs(inseq, model, tokenizer, some, method, args))
        wall, cpu = median(runs["ours"])
        theirs_s = median(runs["theirs"]) if runs["theirs"] else None
        points = args.n_steps if method == "integrated_gradients" else 1
        ours_flops, inseq_flops = flops(model, tokenizer, some, args, points)
        n = len(some)
        line = f"{method + f' ({n})':<26}{n / wall:10.3f}"
        if theirs_s:
            line += f"{n / theirs_s[0]:11.3f}{theirs_s[0] / wall:6.2f}x{cpu / n:15.2f}{theirs_s[1] / n:16.2f}"
            line += f"{theirs_s[1] / cpu:9.2f}x"
        else:
            line += f"{'-':>11}{'-':>7}{cpu / n:15.2f}{'-':>16}{'-':>10}"
        print(line + f"{inseq_flops / ours_flops:10.2f}x", flush=True)
        print(f"  matrix-multiply FLOPs: ours {ours_flops / 1e12:.2f} T, Inseq {inseq_flops / 1e12:.2f} T", flush=True)
    sizes = [int(x) for x in args.memory_examples.split(",") if x]
    if sizes:
        print("peak memory of ours (saliency), one fresh process per size:")
        results = []
        for size in sizes:
            command = [sys.executable, os.path.abspath(__file__), "--memory-run", str(size)]
            command += ["--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size)]
            command += ["--shard-size", str(args.shard_size), "--continuation-words", str(args.continuation_words)]
            command += ["--memory-layers", str(args.memory_layers)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            grown = (result["peak"] - result["base"]) / 2**20
            print(
                f"  {size:>6} examples: peak {result['peak'] / 2**20:8.1f} MiB, {grown:7.1f} MiB above the loaded "
                f"model, {size / result['seconds']:.2f} examples/s",
                flush=True,
            )
        if len(results) > 1:
            first, last = results[0], results[-1]
            print(
                f"  peak ratio {last['examples']} vs {first['examples']} examples: {last['peak'] / first['peak']:.3f}"
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
