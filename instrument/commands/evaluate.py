"""`instrument evaluate`: faithfulness (and plausibility) of one or more methods on a data set, one table.

$ instrument evaluate -m demo-mt -a integrated_gradients -a saliency -f data.jsonl --json eval.json --plot curves.png
$ instrument evaluate -m demo-lm -a attention -f prompts.jsonl --metrics comprehensiveness deletion --cutoffs 10 50

Lines of the JSON-lines file: {"input": ..., "target": ... (optional: generated when missing),
"alignment": [[generated token index, source token index], ...] (optional: plausibility on the lines
that have one)}; a plain text file gives one input per line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_command(commands) -> argparse.ArgumentParser:
    from instrument.cli import add_attribute_flags
    from instrument.evaluation import DEFAULT_CUTOFFS, METRICS, SIDES

    parser = commands.add_parser(
        "evaluate",
        help="evaluate the faithfulness (and plausibility) of attribution methods on a data set",
        description="Attribute a data set with each method (-a, repeatable) and print a table of methods x "
        "metrics (mean and 95%% bootstrap CI, a random-attribution row to read them against), e.g. "
        "`instrument evaluate -m demo-mt -a integrated_gradients -a saliency -f data.jsonl`.",
        conflict_handler="resolve",  # -a is repeatable here
    )
    parser.add_argument(
        "-f",
        "--input_file",
        type=Path,
        required=True,
        metavar="FILE",
        help="JSON lines with 'input', optionally 'target' and 'alignment' ([[generated index, source index], ...]), "
        "or a text file with one input per line",
    )
    add_attribute_flags(parser)
    parser.add_argument(
        "-a",
        "--attribution_method",
        action="append",
        default=None,
        help="a method to evaluate (repeat for more); default: saliency",
    )
    parser.add_argument(
        "--metrics", nargs="+", choices=METRICS, default=None, help="default: all (plausibility with alignments)"
    )
    parser.add_argument(
        "--cutoffs",
        nargs="+",
        type=float,
        default=list(DEFAULT_CUTOFFS),
        metavar="PERCENT",
        help="top-k%% cut-offs of comprehensiveness and sufficiency (default: 1 5 10 20 50)",
    )
    parser.add_argument(
        "--removal",
        choices=("baseline", "delete"),
        default="baseline",
        help="replace removed tokens (default) or delete them",
    )
    parser.add_argument("--baseline", default="unk", help="the replacing token: unk (default), pad or a token id")
    parser.add_argument("--side", choices=SIDES, default=None, help="what is removed (default: every attributed side)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline, soft masks and bootstrap")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the table as JSON here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a PNG of the deletion/insertion curves (matplotlib)",
    )
    parser.set_defaults(run=run_evaluate)
    return parser


def _read(path: Path):
    """Inputs, targets (None where missing; None if all are) and alignments (None if no line has one)."""
    from instrument.cli import _read_dataset

    inputs, targets = _read_dataset(path)
    alignments = None
    if path.suffix in (".jsonl", ".json"):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if any("alignment" in r for r in records):
            alignments = [[tuple(pair) for pair in r.get("alignment", [])] for r in records]
    return inputs, targets, alignments


def run_evaluate(args: argparse.Namespace) -> None:
    import transformers

    import instrument
    from methods import get_method

    methods = args.attribution_method or ["saliency"]
    for name in methods:
        get_method(name)  # an unknown name fails before the model loads
    unused = [flag for flag, value in (("-o", args.save_path), ("--viz_path", args.viz_path)) if value is not None]
    if unused or args.generated_texts:
        raise ValueError(f"evaluate saves no attributions and takes targets from the file: drop {unused or ['-g']}")
    for path in (args.json, args.plot):
        if path is not None and path.exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install 'seq-instrument[plots]'") from None
    baseline = int(args.baseline) if args.baseline.lstrip("-").isdigit() else args.baseline
    inputs, targets, alignments = _read(args.input_file)
    transformers.utils.logging.disable_progress_bar()
    model = instrument.load_model(args.model, methods[0], device=args.device, model_kwargs=args.model_kwargs)
    if targets is not None and any(t is None for t in targets):
        raise ValueError("give a 'target' on every line of the file, or on none (then they are generated)")
    if targets is None:  # generate once, so that every method explains the same texts
        targets = model.attribute(
            inputs, method="saliency", show_progress=False, generation_args=args.generation_kwargs
        )
        targets = targets.info["generated_texts"]
    table = None
    for name in methods:
        started = time.perf_counter()
        out = model.attribute(
            inputs,
            targets,
            method=name,
            attributed_fn=args.attributed_fn,
            attribute_target=args.attribute_target,
            batch_size=args.batch_size,
            attr_pos_start=args.attr_pos_start,
            attr_pos_end=args.attr_pos_end,
            show_progress=False,
            **args.attribution_kwargs,
            **({"approximation_method": args.approximation_method} if args.approximation_method else {}),
        )
        seconds = time.perf_counter() - started
        result = out.evaluate(
            model,
            args.metrics,
            cutoffs=args.cutoffs,
            removal=args.removal,
            baseline=baseline,
            side=args.side,
            alignments=alignments,
            seed=args.seed,
            method=name,
        )
        result.seconds[name] = seconds
        table = result if table is None else table + result
    table.show(title=f"{args.model}: attribution evaluation, mean [95% CI] over generated tokens")
    if args.json is not None:
        table.to_json(args.json)
    if args.plot is not None:
        table.plot(args.plot, title=str(args.model))
