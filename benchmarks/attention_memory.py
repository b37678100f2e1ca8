"""Peak memory of the `attention` method on a 4,096-token sequence, GPT-2-small-shaped model, CPU.

    PYTHONPATH=. python benchmarks/attention_memory.py                 # 4096 tokens, last 4 steps
    PYTHONPATH=. python benchmarks/attention_memory.py --steps 16 --aggregate none --budget-gb 4

The model has GPT-2 small's shape (12 layers, 12 heads, 768 wide, 50257-token vocabulary) with
n_positions=4096 and seeded random weights, loaded with SDPA attention (the method switches it to
eager for the call, as eager is the only implementation returning weights). One example of
`--tokens` tokens is attributed at its last `--steps` positions: one forward over the whole sequence,
each layer's `[1, 12, 4096, 4096]` weights (805 MB in float32) cut down to the query rows read and
reduced in a hook as soon as the layer returns them. With `output_attentions=True` the model would
instead keep all 12 layers' weights (9.7 GB) to the end of the forward. Measured on 2 shared CPU
cores: 1.7 GB peak growth, about 80 s.

Memory: the peak resident set size (VmHWM of /proc/self/status) is reset (`/proc/self/clear_refs`)
after the model is built, so the printed growth is the peak during `attribute()` minus the resident
size just before it, in GB of 10^9 bytes; it includes what torch allocates outside Python's
allocator (tracemalloc would not see it). Exits with status 1 above `--budget-gb` (default 4).

No network: the tokenizer is a byte-level BPE trained at startup on a short text (each of its words
one token), and the text is those words repeated to exactly `--tokens` tokens.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch
import transformers

# The repository root replaces this folder at the head of the path: benchmarks/kernels.py must not shadow
# the `kernels` package that transformers imports when it is installed.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import instrument  # noqa: E402
from benchmarks.throughput import bpe_tokenizer  # noqa: E402

WORDS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from his porch and "
    "thinks about the long winter ahead"
).split()


def status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1))


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        return True
    except OSError:
        return False


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return bpe_tokenizer([" ".join(WORDS)] * 50, vocab_size=600)


def text_of(tokenizer, tokens: int) -> str:
    """Words repeated until the text is exactly `tokens` tokens long."""
    words = [WORDS[i % len(WORDS)] for i in range(tokens)]
    text = " ".join(words)
    length = len(tokenizer(text)["input_ids"])
    while length > tokens:
        words.pop()
        text = " ".join(words)
        length = len(tokenizer(text)["input_ids"])
    if length != tokens:
        raise SystemExit(f"Could not build a text of exactly {tokens} tokens (got {length})")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="attributed positions, at the end of the text")
    parser.add_argument("--aggregate", default="mean", choices=["mean", "max", "none"])
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = build_tokenizer()
    text = text_of(tokenizer, args.tokens)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=768,
        n_layer=12,
        n_head=12,
        vocab_size=50257,
        n_positions=max(4096, args.tokens),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    wrapped = instrument.load_model(model, "attention", tokenizer=tokenizer)
    aggregate = None if args.aggregate == "none" else args.aggregate

    exact = reset_peak()
    before = status_kb("VmRSS")
    started = time.perf_counter()
    out = wrapped.attribute(
        WORDS[0],
        text,
        attr_pos_start=args.tokens - args.steps,
        show_progress=False,
        aggregate_fn=aggregate,
        step_scores=["probability"],
    )
    seconds = time.perf_counter() - started
    peak = status_kb("VmHWM")
    growth_gb = (peak - before) * 1024 / 1e9

    seq = out[0]
    assert model.config._attn_implementation == "sdpa", "the attention implementation was not restored"
    columns = seq.target_attributions
    sums = columns.nansum(0) if aggregate != "max" else None
    per_layer = 4 * config.n_head * args.tokens**2 / 1e9
    print(
        f"attention over {args.tokens} tokens, {args.steps} steps, aggregate={args.aggregate}, "
        f"torch threads={torch.get_num_threads()}"
    )
    print(f"  output target_attributions {tuple(columns.shape)}; time {seconds:.1f} s")
    if sums is not None and aggregate == "mean":
        print(f"  each column sums to 1: max |sum - 1| = {float((sums - 1).abs().max()):.2e}")
    print(
        f"  one layer's weights: {per_layer:.2f} GB; all {config.n_layer} layers (output_attentions=True): "
        f"{per_layer * config.n_layer:.1f} GB"
    )
    print(
        f"  peak RSS growth during attribute(): {growth_gb:.2f} GB"
        f"{'' if exact else ' (peak not resettable here: upper bound from the process peak)'}"
        f"; budget {args.budget_gb} GB"
    )
    return 0 if growth_gb <= args.budget_gb else 1


if __name__ == "__main__":
    sys.exit(main())
