"""Faithfulness and plausibility of every attribution method on the demo models, and the cost of evaluating.

    PYTHONPATH=. python benchmarks/faithfulness.py table --examples 12 --write   # demo-mt + demo-lm table and figure
    PYTHONPATH=. python benchmarks/faithfulness.py timing --repeats 3           # GPT-2-small-shaped model

`table`: every registered method attributes `--examples` held-out demo-mt translations (forced
targets, alignments known: plausibility) and as many demo-lm facts ("the capital of X is" -> Y); each
output is evaluated with `out.evaluate` (all faithfulness metrics, default cut-offs, UNK removal, the
default sides: the source on demo-mt, the whole prefix on demo-lm). One Markdown table per model
(mean over generated tokens; "seconds": the attribution alone), and one PNG of the mean deletion /
insertion curves of a few methods against random (`benchmarks/faithfulness.png`). `--write` replaces
the section between the faithfulness markers of benchmarks/README.md.

`timing`: on a GPT-2-small-shaped model with random weights (the tokenizer and texts of
`throughput.py`), 8 examples (prompts of 8 tokens, 6 to 9 forced tokens after them): each method
(integrated gradients with 50 steps, saliency) attributes, then its own output is evaluated on
comprehensiveness and sufficiency at 5 cut-offs (both sides: 10 perturbed inputs per generated token),
without and with the random row (20), against the time of that attribution. Repeats interleaved,
medians, torch's default thread count.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import sys
import time

import torch

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import instrument  # noqa: E402
from instrument.demo import alignment_examples, fact_examples, model_path  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faithfulness.png")
BEGIN, END = "<!-- faithfulness:begin -->", "<!-- faithfulness:end -->"
COLUMNS = ["comprehensiveness_aopc", "sufficiency_aopc", "deletion_auc", "insertion_auc", "soft_comprehensiveness"]
PLOTTED = ("integrated_gradients", "saliency", "attention", "occlusion", "random")
# Fewer path points / probes than the defaults, so that every method runs in minutes on a shared CPU.
OPTIONS = {
    name: {"n_steps": 20}
    for name in (
        "integrated_gradients",
        "layer_integrated_gradients",
        "sequential_integrated_gradients",
        "discretized_integrated_gradients",
    )
} | {"reagent": {"max_probe_steps": 200}}


def table_for(name: str, n: int):
    model = instrument.load_model(model_path(name), "saliency")
    if name == "demo-mt":
        examples = alignment_examples(n, seed=1234)
        inputs, targets = [s for s, _, _ in examples], [t for _, t, _ in examples]
        alignments = [a for _, _, a in examples]
    else:
        facts = fact_examples(n, seed=1234)
        inputs, targets = [p for p, _, _ in facts], [f"{p} {a}" for p, a, _ in facts]
        alignments = None
    table, failed = None, {}
    for method in instrument.list_feature_attribution_methods():
        started = time.perf_counter()
        try:
            out = model.attribute(inputs, targets, method=method, show_progress=False, **OPTIONS.get(method, {}))
            seconds = time.perf_counter() - started
            result = out.evaluate(model, alignments=alignments, method=method, n_bootstrap=300)
        except Exception as error:  # a method this model cannot run: said in the README, not hidden
            failed[method] = f"{type(error).__name__}: {error}".splitlines()[0]
            continue
        result.seconds[method] = seconds
        table = result if table is None else table + result
    return table, failed


def run_table(args) -> None:
    sections = []
    tables = {}
    for name in ("demo-mt", "demo-lm"):
        table, failed = table_for(name, args.examples)
        tables[name] = table
        columns = COLUMNS + (["aer", "top1_accuracy"] if name == "demo-mt" else [])
        text = (
            f"**{name}** ({args.examples} examples, {len(table.values['random']['deletion_auc'])} generated tokens)\n\n"
        )
        text += table.to_markdown(columns)
        if failed:
            text += "\n\nNot evaluated: " + "; ".join(f"`{m}` ({why})" for m, why in failed.items())
        sections.append(text)
        print(text + "\n")
    plot(tables)
    if args.write:
        command = "PYTHONPATH=. python benchmarks/faithfulness.py " + shlex.join(sys.argv[1:])
        body = f"\n    {command}\n\nMeasured {time.strftime('%Y-%m-%d')} on a shared 2-core CPU (under load).\n\n"
        body += "\n\n".join(sections) + "\n\n![deletion and insertion curves](faithfulness.png)\n"
        text = open(README, encoding="utf-8").read()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise SystemExit(f"benchmarks/README.md lacks the {BEGIN} ... {END} markers")
        open(README, "w", encoding="utf-8").write(pattern.sub(lambda _: BEGIN + body + END, text))


def plot(tables) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(13, 2.9))
    for k, (name, table) in enumerate(tables.items()):
        for i, kind in enumerate(("deletion", "insertion")):
            axis = axes[2 * k + i]
            for method in PLOTTED:
                if method in table.curves and kind in table.curves[method]:
                    y = table.curves[method][kind]
                    x = [j / (len(y) - 1) for j in range(len(y))]
                    grey = method == "random"
                    axis.plot(x, y, "--" if grey else "-", color="grey" if grey else None, label=method)
            axis.set_title(f"{name}: {kind}", fontsize=9)
            axis.set_xlabel("fraction " + ("removed" if kind == "deletion" else "kept"), fontsize=8)
            axis.tick_params(labelsize=7)
            axis.grid(alpha=0.3)
    axes[0].set_ylabel("p(generated token)", fontsize=8)
    axes[-1].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(FIGURE, dpi=60)
    plt.close(figure)


def run_timing(args) -> None:
    from benchmarks.throughput import CORPUS, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    hf = build_model(tokenizer)
    model = instrument.load_model(hf, "saliency", tokenizer=tokenizer)
    words = [line.split() for line in CORPUS.splitlines() if len(line.split()) >= 14][:8]
    inputs = [" ".join(w[:8]) for w in words]
    targets = [" ".join(w[: 8 + 6 + k % 4]) for k, w in enumerate(words)]
    metrics = ["comprehensiveness", "sufficiency"]
    methods = {"integrated_gradients": {"n_steps": 50}, "saliency": {}}
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for method, options in methods.items():
            started = time.perf_counter()
            out = model.attribute(inputs, targets, method=method, show_progress=False, **options)
            times.setdefault(f"{method}:attribute", []).append(time.perf_counter() - started)
            for random_baseline in (False, True):
                started = time.perf_counter()
                table = out.evaluate(model, metrics, n_bootstrap=200, random_baseline=random_baseline)
                key = f"{method}:evaluate" + (" + random" if random_baseline else "")
                times.setdefault(key, []).append(time.perf_counter() - started)
    steps = len(table.values["random"]["comprehensiveness_aopc"])
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"    PYTHONPATH=. python benchmarks/faithfulness.py {shlex.join(sys.argv[1:])}")
    print(f"8 examples, {steps} generated tokens, 5 cut-offs, torch threads {torch.get_num_threads()}")
    print("| method | attribution s | evaluation s | evaluation / attribution | with the random row s | ratio |")
    print("|---|---|---|---|---|---|")
    for method in methods:
        a, e, r = (median[f"{method}:{k}"] for k in ("attribute", "evaluate", "evaluate + random"))
        print(f"| {method} | {a:.2f} | {e:.2f} | {e / a:.2f} | {r:.2f} | {r / a:.2f} |")
    print("all repeats:", {k: [round(x, 2) for x in v] for k, v in times.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = parser.add_subparsers(dest="part", required=True)
    table = parts.add_parser("table")
    table.add_argument("--examples", type=int, default=12)
    table.add_argument("--write", action="store_true", help="write the tables into benchmarks/README.md")
    timing = parts.add_parser("timing")
    timing.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run_table(args) if args.part == "table" else run_timing(args)


if __name__ == "__main__":
    main()
