"""Contrastive attribution tracing in 8-bit: where a GPT-2 keeps a fact, in float32 and in 8-bit.

    python benchmarks/contrastive_tracing.py                    # demo-lm (trained GPT-2, 2 blocks), 24 facts
    python benchmarks/contrastive_tracing.py --model random --hidden 256 --layers 6 --n 8

The factual knowledge localisation study of the Inseq paper (Sarti et al. 2023, "contrastive
attribution tracing", after ROME's causal tracing): for each fact "the capital of X is" -> Y, the true
answer Y is contrasted with a false one Y' (another country's capital), and
`layer_gradient_x_activation` over the output of every block (`target_layers="layers"`, one
forward and backward for all of them) attributes `contrast_prob_diff` = p(Y) - p(Y') at the answer
step. A token's score at a layer is the sum of gradient x activation over the hidden dimension.

Printed, for float32 and for the same weights loaded in 8-bit (bitsandbytes `load_in_8bit`, through
`load_model(..., model_kwargs={"quantization_config": ...})`): the mean score per layer at the last
subject token, the other subject tokens and the rest of the prompt; the Pearson correlation of the
8-bit scores with the float32 ones; the share of facts with p(Y) > p(Y'); the weights' memory
(`get_memory_footprint`) and the process's peak memory during the attribution
(`instrument.batching.measure`). Needs bitsandbytes and accelerate. `--model random` is a random
GPT-2 of the given shape on demo-lm's vocabulary (no knowledge to find; for memory and agreement).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import torch
import transformers

# The repository root replaces this folder at the head of the path: benchmarks/kernels.py must not shadow
# the `kernels` package that transformers imports when it is installed.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import instrument  # noqa: E402
from instrument import batching  # noqa: E402
from instrument.demo import fact_examples, model_path  # noqa: E402


def load(kind: str, quantize: bool, hidden: int, layers: int, folder: str):
    """An AttributionModel of demo-lm or of a random GPT-2, in float32 or 8-bit."""
    kwargs = {"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True)} if quantize else {}
    if kind == "demo-lm":
        return instrument.load_model("demo-lm", device="cpu", model_kwargs=kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path("demo-lm"))
    if not quantize:
        config = transformers.GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=max(1, hidden // 64),
            n_positions=64,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return instrument.load_model(folder, tokenizer=tokenizer, device="cpu", model_kwargs=kwargs)


def facts(tokenizer, n: int, seed: int):
    """(prompt, true answer, false answer, subject positions) for n facts; the false answer is the
    next fact's capital."""
    chosen = fact_examples(n + 1, seed=seed)
    out = []
    for (prompt, answer, subject), (_, other, _) in zip(chosen, chosen[1:] + chosen[:1]):
        if other == answer:
            continue
        words = prompt.split()
        first = words.index(subject.split()[0])
        out.append((prompt, answer, other, list(range(first, first + len(subject.split())))))
        assert len(tokenizer(prompt).input_ids) == len(words), "demo-lm's tokenizer has one token per word"
    return out


def trace_facts(wrapped, items, batch_size, logprob=False):
    """Per fact: scores [prompt tokens, layers] and p(Y) - p(Y')."""
    prompts = [prompt for prompt, *_ in items]
    targets = [f"{prompt} {answer}" for prompt, answer, *_ in items]
    contrasts = [f"{prompt} {other}" for prompt, _, other, _ in items]
    results = []
    # One answer step per fact; prompts differ in length when a subject is two words, so attribute by length.
    for length in sorted({len(p.split()) for p in prompts}):
        index = [i for i, p in enumerate(prompts) if len(p.split()) == length]
        out = wrapped.attribute(
            [prompts[i] for i in index],
            [targets[i] for i in index],
            method="layer_gradient_x_activation",
            target_layers="layers",
            attributed_fn="contrast_prob_diff",
            contrast_targets=[contrasts[i] for i in index],
            attr_pos_start=length,
            attr_pos_end=length + 1,
            step_scores=["contrast_prob_diff"],
            batch_size=batch_size,
            logprob=logprob,
            show_progress=False,
        )
        for i, seq in zip(index, out):
            scores = seq.target_attributions[:length, 0].sum(-1)  # [prompt tokens, layers]
            results.append((i, scores, float(seq.step_scores["contrast_prob_diff"][0])))
    return [(scores, diff) for _, scores, diff in sorted(results, key=lambda r: r[0])]


GROUPS = ("last subj", "other subj", "last token", "other")


def summary(items, traced) -> torch.Tensor:
    """[groups, layers]: mean score at the last subject token, the other subject tokens, the prompt's
    last token (where the answer is predicted) and the other prompt tokens."""
    groups = [[] for _ in GROUPS]
    for (_, _, _, subject), (scores, _) in zip(items, traced):
        for position in range(scores.shape[0]):
            last = scores.shape[0] - 1
            group = 0 if position == subject[-1] else 1 if position in subject else 2 if position == last else 3
            groups[group].append(scores[position])
    return torch.stack(
        [torch.stack(g).mean(0) if g else torch.full_like(traced[0][0][0], float("nan")) for g in groups]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["demo-lm", "random"], default="demo-lm")
    parser.add_argument("--hidden", type=int, default=256, help="--model random: n_embd")
    parser.add_argument("--layers", type=int, default=6, help="--model random: n_layer")
    parser.add_argument("--n", type=int, default=24, help="facts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", default="auto", help="examples per chunk, or 'auto'")
    parser.add_argument(
        "--logprob", action="store_true", help="log p(Y) - log p(Y') (does not saturate on confident facts)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)

    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, quantize in (("float32", False), ("8-bit", True)):
            wrapped = load(args.model, quantize, args.hidden, args.layers, folder)
            items = facts(wrapped.tokenizer, args.n, args.seed)
            trace_facts(wrapped, items[:1], batch_size, args.logprob)  # warm-up
            started = time.perf_counter()
            with batching.measure(batching.model_devices(wrapped.model)) as peak:
                traced = trace_facts(wrapped, items, batch_size, args.logprob)
            runs[name] = dict(
                wrapped=wrapped,
                items=items,
                traced=traced,
                seconds=time.perf_counter() - started,
                peak=peak.peak,
                memory=wrapped.model.get_memory_footprint(),
                layers=wrapped.engine.layer_names("layers"),
            )

    full, q8 = runs["float32"], runs["8-bit"]
    layers = full["layers"]
    print(
        f"{args.model}: {type(full['wrapped'].model).__name__}, {len(layers)} blocks, "
        f"hidden {full['wrapped'].model.config.n_embd}, {len(full['items'])} facts, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"layer gradient x activation over all blocks, attributed_fn=contrast_prob_diff"
        f"{' (logprob=True)' if args.logprob else ''}, true vs false capital,"
    )
    print("score = sum over hidden of grad x act at the block's output, mean over facts\n")
    header = f"{'layer':<22}" + "".join(f"{col:>12}" for col in GROUPS)
    for name, run in runs.items():
        table = summary(run["items"], run["traced"])
        print(f"{name}\n{header}")
        for index, layer in enumerate(layers):
            print(f"{layer:<22}" + "".join(f"{float(value):12.3e}" for value in table[:, index]))
        correct = sum(diff > 0 for _, diff in run["traced"])
        print(f"p(true) > p(false): {correct}/{len(run['traced'])}\n")

    per_fact = []
    for (a, _), (b, _) in zip(full["traced"], q8["traced"]):
        per_fact.append(float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1]))
    per_layer = []
    for index in range(len(layers)):
        a = torch.cat([s[:, index] for s, _ in full["traced"]]).double()
        b = torch.cat([s[:, index] for s, _ in q8["traced"]]).double()
        per_layer.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    diffs = torch.tensor([[d for _, d in full["traced"]], [d for _, d in q8["traced"]]], dtype=torch.float64)
    print("8-bit vs float32")
    print(
        f"  Pearson r of the [token, layer] scores per fact: min {min(per_fact):.4f}, "
        f"mean {sum(per_fact) / len(per_fact):.4f}"
    )
    print("  Pearson r per layer (over facts and tokens): " + ", ".join(f"{r:.4f}" for r in per_layer))
    print(f"  Pearson r of the attributed function over facts: {float(torch.corrcoef(diffs)[0, 1]):.4f}")
    print(f"\n{'':24}{'float32':>12}{'8-bit':>12}{'ratio':>8}")
    mib = 2**20
    print(
        f"{'weights (MiB)':24}{full['memory'] / mib:12.3f}{q8['memory'] / mib:12.3f}"
        f"{q8['memory'] / full['memory']:8.3f}"
    )
    if full["peak"] is not None and q8["peak"] is not None:
        print(
            f"{'peak during tracing (MiB)':24}{full['peak'] / mib:12.3f}{q8['peak'] / mib:12.3f}"
            f"{q8['peak'] / max(full['peak'], 1):8.3f}"
        )
    print(f"{'tracing time (s)':24}{full['seconds']:12.3f}{q8['seconds']:12.3f}{q8['seconds'] / full['seconds']:8.3f}")


if __name__ == "__main__":
    main()
