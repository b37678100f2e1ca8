"""`instrument attribute-context`: which context tokens made the model say what it said (PECoRe, as Inseq's
command of the same name), or which context sources (`--method ablation`).

$ instrument attribute-context -m demo-lm -fn contrast_prob_diff -o pecore.json \
    --input_context_text "the code of dioel is na08 . the code of mien is po34 ." \
    --input_current_text "the code of mien is"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Flags of `instrument attribute` that mean nothing here: refused rather than ignored.
_NOT_HERE = {
    "generated_texts": None,
    "step_scores": [],
    "attribute_target": False,
    "batch_size": None,
    "attr_pos_start": None,
    "attr_pos_end": None,
    "aggregate_output": False,
}


def add_command(commands) -> argparse.ArgumentParser:
    from instrument.cli import add_attribute_flags

    parser = commands.add_parser(
        "attribute-context",
        help="find the context-sensitive generated tokens and the context tokens they rely on (PECoRe)",
        description="Context reliance (Inseq's attribute-context): context-sensitive token identification, then "
        "contextual cues imputation; or --method ablation for context attribution by source ablations.",
    )
    text = parser.add_argument_group("texts")
    text.add_argument("--input_current_text", required=True, help="the input (prompt, or source sentence)")
    text.add_argument("--input_context_text", default=None, help="the input context, {context} in --input_template")
    text.add_argument(
        "--input_template", default=None, help='default "{context} {current}" ("{current}" without context)'
    )
    text.add_argument("--output_context_text", default=None, help="an output context, {context} in --output_template")
    text.add_argument("--output_current_text", default=None, help="the output to explain (forced); generated if absent")
    text.add_argument("--output_template", default=None, help='default "{context} {current}" or "{current}"')
    text.add_argument(
        "--contextless_input_current_text", default=None, help='input without context (default "{current}")'
    )
    text.add_argument(
        "--contextless_output_current_text", default=None, help='output without context (default "{current}")'
    )
    pecore = parser.add_argument_group("PECoRe")
    pecore.add_argument("--context_sensitivity_metric", default="kl_divergence", help="a contrastive step function")
    pecore.add_argument("--handle_output_context_strategy", choices=("manual", "auto", "pre"), default="manual")
    pecore.add_argument("--contextless_output_next_tokens", nargs="*", default=[], metavar="TOKEN")
    pecore.add_argument("--prompt_user_for_contextless_output_next_tokens", action="store_true")
    pecore.add_argument("--special_tokens_to_keep", nargs="*", default=[], metavar="TOKEN")
    pecore.add_argument("--decoder_input_output_separator", default=" ")
    pecore.add_argument("--context_sensitivity_std_threshold", type=float, default=1.0)
    pecore.add_argument("--context_sensitivity_topk", type=int, default=None)
    pecore.add_argument("--attribution_std_threshold", type=float, default=1.0)
    pecore.add_argument("--attribution_topk", type=int, default=None)
    pecore.add_argument("--attribution_aggregators", nargs="+", default=None, metavar="NAME")
    pecore.add_argument("--normalize_attributions", action="store_true")
    pecore.add_argument("--rescale_attributions", action="store_true")
    pecore.add_argument("--show_intermediate_outputs", action="store_true")
    pecore.add_argument("--add_output_info", action=argparse.BooleanOptionalAction, default=True)
    pecore.add_argument("--show_viz", action=argparse.BooleanOptionalAction, default=True)
    ablation = parser.add_argument_group("ablation")
    ablation.add_argument("--method", choices=("pecore", "ablation"), default="pecore")
    ablation.add_argument("--sources", choices=("sentences", "documents"), default="sentences")
    ablation.add_argument("--n_ablations", type=int, default=64)
    ablation.add_argument("--seed", type=int, default=0)
    add_attribute_flags(parser)
    parser.set_defaults(run=run_attribute_context)
    return parser


def run_attribute_context(args: argparse.Namespace) -> None:
    import transformers

    import instrument
    from methods import get_method

    for name, default in _NOT_HERE.items():
        if getattr(args, name) != default:
            raise ValueError(f"--{name} does not apply to attribute-context")
    get_method(args.attribution_method)
    for path in (args.save_path, args.viz_path):
        if path is not None and Path(path).exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
    transformers.utils.logging.disable_progress_bar()
    model = instrument.load_model(
        args.model, args.attribution_method, device=args.device, model_kwargs=args.model_kwargs
    )
    kwargs = dict(args.attribution_kwargs)
    if args.approximation_method:
        kwargs["approximation_method"] = args.approximation_method
    texts = dict(
        input_current_text=args.input_current_text,
        input_context_text=args.input_context_text,
        input_template=args.input_template,
        output_current_text=args.output_current_text,
    )
    if args.method == "ablation":
        out = instrument.attribute_context(
            model,
            **texts,
            method="ablation",
            sources=args.sources,
            n_ablations=args.n_ablations,
            seed=args.seed,
            decoder_input_output_separator=args.decoder_input_output_separator,
            generation_kwargs=args.generation_kwargs,
        )
    else:
        out = instrument.attribute_context(
            model,
            **texts,
            output_context_text=args.output_context_text,
            output_template=args.output_template,
            contextless_input_current_text=args.contextless_input_current_text,
            contextless_output_current_text=args.contextless_output_current_text,
            attribution_method=args.attribution_method,
            attributed_fn=args.attributed_fn,
            context_sensitivity_metric=args.context_sensitivity_metric,
            handle_output_context_strategy=args.handle_output_context_strategy,
            contextless_output_next_tokens=args.contextless_output_next_tokens,
            prompt_user_for_contextless_output_next_tokens=args.prompt_user_for_contextless_output_next_tokens,
            special_tokens_to_keep=args.special_tokens_to_keep,
            decoder_input_output_separator=args.decoder_input_output_separator,
            context_sensitivity_std_threshold=args.context_sensitivity_std_threshold,
            context_sensitivity_topk=args.context_sensitivity_topk,
            attribution_std_threshold=args.attribution_std_threshold,
            attribution_topk=args.attribution_topk,
            attribution_aggregators=args.attribution_aggregators,
            normalize_attributions=args.normalize_attributions,
            rescale_attributions=args.rescale_attributions,
            generation_kwargs=args.generation_kwargs,
            attribution_kwargs=kwargs,
            show_intermediate_outputs=args.show_intermediate_outputs,
            add_output_info=args.add_output_info,
        )
        if out.info is not None:
            out.info.update(save_path=_str(args.save_path), viz_path=_str(args.viz_path), show_viz=args.show_viz)
    if args.show_viz and not args.hide:
        out.show()
    if args.viz_path is not None:
        if not hasattr(out, "save_html"):
            raise ValueError("--viz_path: this method's output has no HTML view")
        out.save_html(args.viz_path, overwrite=True)
    if args.save_path is not None:
        Path(args.save_path).write_text(json.dumps(out.to_dict(), indent=4), encoding="utf-8")


def _str(path) -> str | None:
    return None if path is None else str(path)
