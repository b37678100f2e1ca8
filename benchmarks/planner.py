"""The memory planner's predicted peaks against measured ones on a GPT-2-small-shaped model.

    PYTHONPATH=. python benchmarks/planner.py
    PYTHONPATH=. python benchmarks/planner.py --lengths 256 --cotangents 1,8 --attention eager

transformers' `GPT2Config` defaults, seeded random weights, float32, saliency of 8 forced tokens after
a prompt of each length (the model and texts of `long_context.py`: N words are N tokens). For each (length, cotangents
per batched backward) the budget is set so that the planner picks that many
(`max_memory` = its predicted peak + 1 byte); the measured peak is torch's CPU tensor memory during
the call (`instrument.memory.tensor_peak`, the profiler's memory events). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import instrument  # noqa: E402
from benchmarks.long_context import build  # noqa: E402
from instrument import planner  # noqa: E402
from instrument.memory import tensor_peak  # noqa: E402

GENERATED = 8
SETTING = {"model": "gpt2-small", "device": "cpu", "dtype": "float32", "quantization": "none"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,256,512")
    parser.add_argument("--cotangents", default="1,4,8", help="slots per batched backward (of 8)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args(argv)
    print(f"    PYTHONPATH=. python benchmarks/planner.py {' '.join(sys.argv[1:])}")
    print(
        f"GPT-2 small shape, {args.attention}, saliency of {GENERATED} tokens, torch threads {torch.get_num_threads()}"
    )
    print("| prompt tokens | slots per backward | predicted MiB | measured MiB | predicted / measured |")
    print("|---|---|---|---|---|")
    for length in map(int, args.lengths.split(",")):
        model, tokenizer, prompt, full = build(length, SETTING, generated=GENERATED)
        model.set_attn_implementation(args.attention)
        wrapped = instrument.load_model(model, "saliency", tokenizer=tokenizer)
        for cotangents in map(int, args.cotangents.split(",")):
            shape = planner.model_shape(model)
            limit = planner.predict_gradients(shape, length + GENERATED, 1, GENERATED, cotangents)[0] + 1
            plan = planner.plan_gradients(model, length + GENERATED, slots=GENERATED, max_memory=limit)
            measured = tensor_peak(lambda: wrapped.attribute(prompt, full, show_progress=False, max_memory=limit))
            mib = 2**20
            print(
                f"| {length} | {plan.cotangents} | {plan.peak / mib:.0f} | {measured / mib:.0f} "
                f"| {plan.peak / measured:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
