"""`attribute-context` (PECoRe) of seq-instrument against Inseq 0.7.1's, on a GPT-2-small-shaped model.

    PYTHONPATH=. python benchmarks/context.py --repeats 3
    PYTHONPATH=. python benchmarks/context.py --method input_x_gradient --no-inseq

A 200-token input context, an 8-token current input and a forced 30-token output; CTI with
kl_divergence (default threshold: mean + 1 std), CCI with saliency of contrast_prob_diff. Both libraries
run the same model object (GPT-2 small's shape, seeded random weights) on the same texts, in the same
process, ours and Inseq's repeats alternating so that the load of a shared machine hits both alike; the
table has medians and the ratio. The separator between input and output is "" and the output starts with
a space, so that Inseq's re-tokenized texts are the tokens the model sees (see instrument/context/pecore.py):
then both select the same tokens and contrast tokens, which the script checks, with the largest score
difference relative to Inseq's largest score.

Ours: one forward of the 38- and 238-token sequences for CTI, one forward and one batched backward for
all selected tokens (CCI). Inseq: one forward per output token and per side for CTI (its "dummy"
attribution with a step score), then one `attribute` call per selected token.

No network: the tokenizer is a byte-level BPE trained at startup on the benchmark's words (each word
one token); the model's vocabulary is the tokenizer's, so that every token it predicts has a name.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shlex
import statistics
import sys
import time
import warnings

import torch
import transformers

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import instrument  # noqa: E402
from benchmarks.throughput import bpe_tokenizer, gpt2_small  # noqa: E402

WORDS = (
    "the code of lux is seven and the door was red while a small bird sang over green hills near old towns "
    "where people walk slowly to market every morning with bread milk fish apples"
).split()
CONTEXT_TOKENS, CURRENT, OUTPUT_TOKENS = 200, "so in the end the answer they gave was", 30


def texts(tokenizer) -> tuple[str, str]:
    """A context of as many random words as make 200 tokens with its final ".", and a 30-word output."""
    rng = random.Random(0)
    words = [rng.choice(WORDS) for _ in range(2 * CONTEXT_TOKENS)]
    count = next(
        k for k in range(1, len(words)) if len(tokenizer(" ".join(words[:k]) + ".")["input_ids"]) >= CONTEXT_TOKENS
    )
    output = " " + " ".join(rng.choice(WORDS) for _ in range(OUTPUT_TOKENS))
    return " ".join(words[:count]) + ".", output


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return bpe_tokenizer([" ".join(WORDS) + " " + CURRENT + " ."] * 50, vocab_size=600)


def build_model(tokenizer) -> transformers.GPT2LMHeadModel:
    return gpt2_small(tokenizer, vocab_size=len(tokenizer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="saliency")
    parser.add_argument("--no-inseq", action="store_true")
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    context, output = texts(tokenizer)
    n_context, n_output = len(tokenizer(context)["input_ids"]), len(tokenizer(output)["input_ids"])
    if (n_context, n_output) != (CONTEXT_TOKENS, OUTPUT_TOKENS):
        raise SystemExit(f"Tokenization changed: context {n_context} tokens, output {n_output}")
    kwargs = dict(
        input_context_text=context,
        input_current_text=CURRENT,
        output_current_text=output,
        attributed_fn="contrast_prob_diff",
        decoder_input_output_separator="",
    )
    ours_model = instrument.load_model(model, args.method, tokenizer=tokenizer)

    def ours():
        return instrument.attribute_context(ours_model, **kwargs).to_dict()

    inseq_run = None
    if not args.no_inseq:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import inseq
            from inseq.commands.attribute_context.attribute_context import attribute_context_with_model
            from inseq.commands.attribute_context.attribute_context_args import AttributeContextArgs
        inseq_model = inseq.load_model(model, args.method, tokenizer=copy.deepcopy(tokenizer))

        def inseq_run():
            settings = AttributeContextArgs(
                model_name_or_path="gpt2-small-random", attribution_method=args.method, show_viz=False, **kwargs
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return attribute_context_with_model(settings, inseq_model).to_dict()

    times = {"ours": [], "inseq": []}
    results = {}
    for _ in range(args.repeats):
        for name, run in (("ours", ours), ("inseq", inseq_run)):
            if run is None:
                continue
            started = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - started)
    print(f"$ {shlex.join(['python', *sys.argv])}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; context {CONTEXT_TOKENS} tokens, "
        f"output {OUTPUT_TOKENS}; method {args.method}; selected tokens: "
        f"{[c['cti_idx'] for c in results['ours']['cci_scores']]}"
    )
    ours_s = statistics.median(times["ours"])
    print(f"ours  median {ours_s:.3f} s  ({', '.join(f'{t:.3f}' for t in times['ours'])})")
    if inseq_run is not None:
        inseq_s = statistics.median(times["inseq"])
        print(f"inseq median {inseq_s:.3f} s  ({', '.join(f'{t:.3f}' for t in times['inseq'])})")
        print(f"inseq / ours: {inseq_s / ours_s:.1f}x")
        mine, theirs = results["ours"], results["inseq"]
        same = [c["cti_idx"] for c in mine["cci_scores"]] == [c["cti_idx"] for c in theirs["cci_scores"]] and [
            c["contrast_token"] for c in mine["cci_scores"]
        ] == [c["contrast_token"] for c in theirs["cci_scores"]]
        ours_scores = torch.tensor([s for c in mine["cci_scores"] for s in c["input_context_scores"]])
        their_scores = torch.tensor([s for c in theirs["cci_scores"] for s in c["input_context_scores"]])
        difference = float((ours_scores - their_scores).abs().max() / their_scores.abs().max())
        cti = float(
            (torch.tensor(mine["cti_scores"]) - torch.tensor(theirs["cti_scores"])).abs().max()
            / torch.tensor(theirs["cti_scores"]).abs().max()
        )
        print(
            f"same selected and contrast tokens: {same}; largest CCI score difference {difference:.1e}, "
            f"CTI {cti:.1e} (relative to Inseq's largest)"
        )


if __name__ == "__main__":
    main()
