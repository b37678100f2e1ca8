"""`instrument plan`: the memory planner's prediction for one attribution, without running it.

    instrument plan -m gpt2 -a saliency --length 1000 --generated 32 --max_memory 2GiB

Reads the model's config only (no weights are loaded); prints the shape it read, the predicted peak
(above the weights), the slots per batched backward chosen for the budget and whether the layers are
checkpointed (recomputed in the backward; `--checkpoint_layers`) (`instrument.planner`). For the
methods that only run forwards (attention, occlusion, LIME, value zeroing, ReAGent): the predicted
peak of one forward and the perturbed copies it carries (`planner.predict_forward`, `plan_rows`).
"""

from __future__ import annotations

import argparse
import re

# Rows of one forward per example: deeplift runs inputs and baselines together; path methods one
# row per path point of a chunk.
_GRADIENT = {"saliency": 1, "input_x_gradient": 1, "deeplift": 2, "integrated_gradients": None}
# No-grad forwards: perturbed copies of the full row (the attention method: the row itself, eagerly).
_FORWARD = ("attention", "occlusion", "lime", "value_zeroing", "reagent")


def parse_bytes(text: str) -> int | str:
    """`"auto"`, a number of bytes, or one with a unit: `parse_bytes("1.5GiB")` -> 1610612736."""
    if text == "auto":
        return text
    found = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not found:
        raise argparse.ArgumentTypeError(f"max_memory: expected bytes (e.g. 2GiB, 500MB, 1e9) or 'auto', got {text!r}")
    unit = (found.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30}
    return int(float(found.group(1)) * scale.get(unit, 2**40))


def _checkpoint(text: str) -> bool | str:
    choices = {"auto": "auto", "true": True, "false": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"checkpoint_layers: expected true, false or auto, got {text!r}")
    return choices[text.lower()]


def add_command(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser("plan", help="predict the peak memory of an attribution and the chunks chosen")
    parser.add_argument("-m", "--model", required=True, help="a demo model, hub name or local directory (config only)")
    parser.add_argument("-a", "--attribution_method", default="saliency", help="method name; default: saliency")
    parser.add_argument("--length", type=int, required=True, help="prompt tokens")
    parser.add_argument("--generated", type=int, default=32, help="attributed (generated) tokens; default 32")
    parser.add_argument("--max_memory", type=parse_bytes, default="auto", help="bytes (2GiB, 500MB) or auto")
    parser.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16...); default: the config's")
    parser.add_argument("--attn_implementation", default=None, help="eager, sdpa...; default: the config's")
    parser.add_argument(
        "--perturbations_per_eval", type=int, default=32, help="perturbed copies per forward asked for; default 32"
    )
    parser.add_argument("--n_steps", type=int, default=50, help="path points (integrated gradients); default 50")
    parser.add_argument(
        "--points", type=int, default=None, help="path points per forward (integrated gradients); default: planned"
    )
    parser.add_argument(
        "--checkpoint_layers",
        type=_checkpoint,
        default="auto",
        help="recompute layers in the backward: true, false or auto (where one graph does not fit); default auto",
    )
    parser.set_defaults(run=run)
    return parser


def run(args) -> None:
    import torch
    import transformers

    from instrument import planner
    from instrument.demo import model_path

    config = transformers.AutoConfig.from_pretrained(model_path(args.model) or args.model)
    if args.attn_implementation:
        config._attn_implementation = args.attn_implementation
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if dtype is None:
        named = getattr(config, "dtype", None)
        dtype = getattr(torch, named) if isinstance(named, str) else named or torch.float32
    shape = planner.model_shape(config, dtype)
    print(f"model {args.model}: {shape}")
    method = args.attribution_method
    if method in _FORWARD:
        _plan_forward(args, shape)
        return
    if method not in _GRADIENT:
        print(f"{method}: forwards without a batched backward (streamed); nothing for the planner to chunk")
        return
    length, held = args.length + args.generated, 0
    rows = _GRADIENT[method]
    if rows is None:  # a path method: points per forward planned like `methods.base.chunks` plans them
        layout = {"rows_per_point": 1, "attributed_rows": args.generated, "point_rows": args.generated}
        rows = args.points or planner.plan_points(
            shape,
            length,
            args.n_steps,
            **layout,
            slots=args.generated,
            max_memory=args.max_memory,
            checkpoint=args.checkpoint_layers,
        )
        held = planner.path_held(shape, length, rows, args.generated, args.generated)
        print(
            f"{method}: {rows} of {args.n_steps} path points per forward; the path's own tensors {held / 2**30:.3f} GiB"
        )
    plan = planner.plan_gradients(
        shape,
        length=length,
        slots=args.generated,
        rows=rows,
        max_memory=args.max_memory,
        checkpoint=args.checkpoint_layers,
        reserved=held,
    )
    print(f"{method}, {args.length} + {args.generated} tokens, {rows} full row(s): {plan.describe()}")


def _plan_forward(args, shape) -> None:
    from instrument import planner

    method, length, gib = args.attribution_method, args.length + args.generated, 2**30
    reads, kept, requested, eager = args.generated, 0, args.perturbations_per_eval, None
    copies = reads  # occlusion and LIME score each step on its own copy of the perturbed embeddings
    if method == "attention":  # one row per example, eager attention, the mean map of the steps kept
        requested, eager, kept, copies = 1, True, args.generated * length * 4, 0
    elif method == "value_zeroing":  # stops before the LM head, keeps each layer's output
        reads, kept, copies = 0, shape.layers * length * shape.hidden * 4, 0
    elif method == "reagent":
        reads, copies = 1, 0
    options = {"reads": reads, "kept": kept, "eager": eager, "embed_copies": copies}
    rows = planner.plan_rows(shape, length, requested, max_memory=args.max_memory, **options)
    peak = planner.predict_forward(shape, length, rows, **options)
    limit = planner.budget(args.max_memory)
    what = "row" if method == "attention" else f"of {requested} perturbed copies"
    print(
        f"{method}, {args.length} + {args.generated} tokens: predicted peak {peak / gib:.3f} GiB, "
        f"{rows} {what} per forward (no gradients); budget "
        + ("unbounded" if limit is None else f"{limit / gib:.3f} GiB")
        + ("" if limit is None or peak <= limit else "; does not fit even one row")
    )
