"""A real CUDA out-of-memory error in the middle of `internal_batch_size="auto"`, and the recovery.

    python scripts/oom_recovery.py          # on a CUDA machine (on the CPU the error is raised by hand)

Integrated gradients (300 steps) on the throughput benchmark's GPT-2-small-shaped model. After the one-point
probe has sized the next path chunk, a blocker tensor takes all free GPU memory but 256 MiB, so that chunk
runs out of memory for real; the attribution must halve its chunks, finish, and equal a run with fixed
chunks.
"""

import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import instrument  # noqa: E402
from benchmarks.throughput import CONTINUATION, PROMPT, build_model, build_tokenizer  # noqa: E402


def main():
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).to(device)
    wrapped = instrument.load_model(model, "integrated_gradients", tokenizer=tokenizer)
    texts, options = (PROMPT, PROMPT + CONTINUATION), dict(n_steps=300, show_progress=False)
    reference = wrapped.attribute(*texts, internal_batch_size=25, **options)[0].target_attributions
    blocker = []

    def take_memory(module, args):
        if args[0].shape[0] == 1 or blocker:  # the probe, or already taken
            return
        if device.type != "cuda":
            blocker.append(None)
            raise torch.OutOfMemoryError("raised by hand: no GPU")
        free, total = torch.cuda.mem_get_info()
        blocker.append(torch.empty(free - (256 << 20), dtype=torch.uint8, device=device))
        print(
            f"blocker: {free / 2**30:.1f} of {total / 2**30:.1f} GiB taken, 256 MiB left, "
            f"before a chunk of {args[0].shape[0]} path points",
            flush=True,
        )

    handle = model.transformer.h[0].register_forward_pre_hook(take_memory)
    try:
        start = time.perf_counter()
        got = wrapped.attribute(*texts, internal_batch_size="auto", **options)[0].target_attributions
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
        blocker.clear()
    difference = (got - reference).nan_to_num().abs().max() / reference.nan_to_num().abs().max()
    print(f"recovered in {seconds:.2f} s; max |auto - fixed chunks| / max |fixed chunks| = {float(difference):.2e}")


if __name__ == "__main__":
    main()
