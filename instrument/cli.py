"""The `instrument` command: attribute one example or a whole file of them, list methods and step functions.

$ instrument attribute -m demo-mt -a integrated_gradients -i "grurn bir gran drix gas tresk"
$ instrument attribute -m demo-lm -a saliency -f prompts.jsonl -o out.safetensors --hide
$ instrument list-methods
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

COMMAND_MODULES: tuple = (
    "instrument.commands.dataset",
    "instrument.commands.context",
    "instrument.commands.evaluate",
    "instrument.commands.plan",
    "instrument.commands.view",
)  # see _command_modules


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_attribute_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `instrument attribute` except its inputs (-i/-f): model, method, attributed function,
    options, outputs. Other commands that attribute (`attribute-dataset`, ...) add them too."""
    parser.add_argument(
        "-m", "--model", required=True, help="a demo model (demo-lm, demo-mt), a local directory or a hub name"
    )
    parser.add_argument(
        "-a",
        "--attribution_method",
        default="saliency",
        help="method name (see `instrument list-methods`); default: saliency",
    )
    parser.add_argument(
        "-g",
        "--generated_texts",
        nargs="+",
        metavar="TARGET",
        help="targets to force instead of generating (one per input)",
    )
    parser.add_argument(
        "-fn", "--attributed_fn", default=None, help="step function to attribute (default: probability)"
    )
    parser.add_argument(
        "--step_scores", nargs="+", default=[], metavar="NAME", help="step functions to compute alongside"
    )
    parser.add_argument(
        "--attribute_target", action="store_true", help="also attribute the target prefix (encoder-decoders)"
    )
    parser.add_argument("-bs", "--batch_size", type=int, default=None, help="examples per batch (default: all at once)")
    parser.add_argument("-s", "--attr_pos_start", type=int, default=None, help="first attributed target position")
    parser.add_argument("-e", "--attr_pos_end", type=int, default=None, help="end of the attributed target positions")
    parser.add_argument(
        "-o", "--save_path", type=Path, default=None, help="write the attributions here (.safetensors, or .json)"
    )
    parser.add_argument("--viz_path", type=Path, default=None, help="write the HTML view here")
    parser.add_argument("--hide", action="store_true", help="do not print the heatmaps")
    parser.add_argument(
        "--aggregate_output",
        action="store_true",
        help="aggregate (hidden dimension to one score per token) before saving",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_path file")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda (default: where the model is)")
    parser.add_argument(
        "--model_kwargs", type=_json, default={}, metavar="JSON", help="keyword arguments for from_pretrained"
    )
    parser.add_argument(
        "--approximation_method",
        default=None,
        metavar="RULE",
        help="integration rule of integrated gradients, layer IG and sequential IG: riemann_left, "
        "riemann_right, riemann_middle, riemann_trapezoid or gausslegendre (their default)",
    )
    parser.add_argument(
        "--attribution_kwargs",
        type=_json,
        default={},
        metavar="JSON",
        help="method and step function options, e.g. '{\"n_steps\": 20}'",
    )
    parser.add_argument(
        "--generation_kwargs",
        type=_json,
        default={},
        metavar="JSON",
        help="generation options, e.g. '{\"max_new_tokens\": 10}'",
    )


def _command_modules() -> list:
    """Modules adding more commands: each has `add_command(commands) -> parser` and sets the parser's
    default `run=fn(args)`."""
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="instrument", description="Attribute the outputs of sequence generation models to their inputs."
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    attribute = commands.add_parser(
        "attribute",
        help="attribute texts (given, or generated by the model) and show or save the result",
        description="Attribute generated texts to input texts, e.g. "
        '`instrument attribute -m demo-mt -a integrated_gradients -i "grurn bir gran drix gas tresk"`.',
    )
    source = attribute.add_mutually_exclusive_group(required=True)
    source.add_argument("-i", "--input_texts", nargs="+", metavar="TEXT", help="input texts")
    source.add_argument(
        "-f",
        "--input_file",
        type=Path,
        metavar="FILE",
        help="a data set: a text file with one input per line, or JSON lines with 'input' and optionally "
        "'target' fields (lines without a target are generated)",
    )
    add_attribute_flags(attribute)
    more = [module.add_command(commands) for module in _command_modules()]
    listing = [
        commands.add_parser("list-methods", help="list the attribution methods"),
        commands.add_parser("list-step-functions", help="list the step functions"),
    ]
    for command in (attribute, *listing, *more):  # --debug after the command too; SUPPRESS keeps one given before it
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
        )
    return parser


def _read_dataset(path: Path) -> tuple[list[str], list[str | None] | None]:
    """Inputs and targets (None for a line without one; None for all when no line has one)."""
    if not path.is_file():
        raise ValueError(f"no such input file: {path}")
    inputs, targets = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix in (".jsonl", ".json"):
            try:
                record = json.loads(line)
                inputs.append(record["input"])
                targets.append(record.get("target"))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: expected a JSON object with an 'input' field") from None
        else:
            inputs.append(line)
            targets.append(None)
    if not inputs:
        raise ValueError(f"{path} holds no examples")
    return inputs, None if all(t is None for t in targets) else targets


def run_attribute(args: argparse.Namespace) -> None:
    import transformers

    import instrument
    from methods import get_method

    get_method(args.attribution_method)  # an unknown name fails before the model loads
    transformers.utils.logging.disable_progress_bar()  # one progress bar (ours) on stderr is enough

    if args.input_file is not None:
        inputs, targets = _read_dataset(args.input_file)
        if args.generated_texts:
            raise ValueError("give targets in the input file, not with -g, when using -f")
    else:
        inputs, targets = args.input_texts, args.generated_texts
    for path in (args.save_path, args.viz_path):
        if path is not None and path.exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
    model = instrument.load_model(
        args.model, args.attribution_method, device=args.device, model_kwargs=args.model_kwargs
    )

    def attribute(inputs_, targets_):
        return model.attribute(
            inputs_,
            targets_,
            attributed_fn=args.attributed_fn,
            step_scores=args.step_scores,
            attribute_target=args.attribute_target,
            batch_size=args.batch_size,
            attr_pos_start=args.attr_pos_start,
            attr_pos_end=args.attr_pos_end,
            generation_args=args.generation_kwargs,
            **args.attribution_kwargs,
            **({"approximation_method": args.approximation_method} if args.approximation_method else {}),
        )

    if targets is None or all(t is not None for t in targets):
        out = attribute(inputs, targets)
    else:  # a data set with targets on some lines: those are forced, the others generated
        out = _forced_and_generated(attribute, inputs, targets)
    if not args.hide:
        out.show()
    if args.viz_path is not None:
        out.save_html(args.viz_path, overwrite=args.overwrite)
    if args.save_path is not None:
        (out.aggregate() if args.aggregate_output else out).save(args.save_path, overwrite=args.overwrite)


def _forced_and_generated(attribute, inputs: list[str], targets: list[str | None]):
    """`attribute(inputs, targets)` run on the examples with a target and, generating, on the rest;
    the sequences (and `info`'s per-example lists) in the order of `inputs`."""
    from instrument import FeatureAttributionOutput, merge_attributions

    forced = [i for i, t in enumerate(targets) if t is not None]
    generated = [i for i, t in enumerate(targets) if t is None]
    merged = merge_attributions(
        [
            attribute([inputs[i] for i in forced], [targets[i] for i in forced]),
            attribute([inputs[i] for i in generated], None),
        ]
    )
    place = {index: k for k, index in enumerate(forced + generated)}
    order = [place[i] for i in range(len(inputs))]
    info = dict(merged.info)
    for key in ("input_texts", "generated_texts"):
        info[key] = [info[key][k] for k in order]
    return FeatureAttributionOutput([merged.sequence_attributions[k] for k in order], None, info)


LIBRARY_ERRORS = (ValueError, TypeError, LookupError, OSError, ImportError)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `instrument` console script; returns the exit code.

    Bad input (an error the library raises for it: ValueError, TypeError, a missing file or model...)
    gives one line on stderr and exit code 2; anything else one line and a hint to rerun with
    `--debug`, which shows the traceback, and exit code 1."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list-methods":
            import instrument

            print("\n".join(instrument.list_feature_attribution_methods()))
        elif args.command == "list-step-functions":
            import instrument

            print("\n".join(instrument.list_step_functions()))
        elif args.command == "attribute":
            run_attribute(args)
        else:
            args.run(args)
    except LIBRARY_ERRORS as error:
        if args.debug:
            raise
        print(f"instrument: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.debug:
            raise
        print(
            f"instrument: unexpected error ({type(error).__name__}: {_one_line(error)}); "
            "rerun with --debug for the traceback",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
