"""Overhead of `instrument.trace` on a GPT-2-small-shaped model (random weights).

    python benchmarks/trace_overhead.py --batch 4 --length 128 --repeats 10

Times forward+backward bare and inside a trace of all 12 blocks' outputs with gradients, alternating
the two so that machine noise hits both alike, and prints medians and their ratio.
"""

import argparse
import os
import statistics
import sys
import time

# The repository root replaces this folder at the head of the path: benchmarks/kernels.py must not shadow
# the `kernels` package that transformers imports when it is installed.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import transformers  # noqa: E402

import instrument  # noqa: E402


def gpt2_small() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
    return transformers.GPT2LMHeadModel(config).eval()


def step(model, input_ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids).logits[:, -1].log_softmax(-1).max(-1).values.sum().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model = gpt2_small()
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length))
    bare, traced = [], []

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def with_trace():
        with instrument.trace(model, "layers", grads=True) as t:
            step(model, input_ids)
        assert len(t.gradients) == 12

    step(model, input_ids)
    with_trace()
    for _ in range(args.repeats):
        bare.append(timed(lambda: step(model, input_ids)))
        traced.append(timed(with_trace))
    bare_s, traced_s = statistics.median(bare), statistics.median(traced)
    print(f"GPT-2-small shape, batch {args.batch} x {args.length} tokens, {torch.get_num_threads()} threads")
    print(f"{'':24}{'median s':>10}")
    print(f"{'bare forward+backward':24}{bare_s:10.4f}")
    print(f"{'trace 12 blocks + grads':24}{traced_s:10.4f}")
    print(f"ratio traced / bare: {traced_s / bare_s:.3f}")


if __name__ == "__main__":
    main()
