"""PECoRe (Sarti et al. 2023), batched: which generated tokens depend on the context (CTI), and which context
tokens they depend on (CCI). Inseq's `attribute-context`, with its arguments and its JSON.

    model = instrument.load_model("demo-lm", "saliency")
    out = instrument.attribute_context(model, input_current_text="the code of mien is",
                                       input_context_text="the code of dioel is na08 . the code of mien is po34 .")
    out.show()

Cost, for all examples together: CTI is one forward of every sequence with context and one without; CCI is
one forward of every sequence with context and one batched backward for all selected tokens (through the
engine's shared-prefix gradients; perturbation methods batch their perturbations the same way). The
contextless next tokens are read from the CTI forward (greedy decoding), not generated one call each.

Where Inseq 0.7.1 differs (here tokens are counted on the sequence the model sees, never re-tokenized
from decoded text): its contextless prefix for a token comes from the output tokenized alone, off by one
where that differs from the output tokenized after the input; on decoder-only models its first
contextless token is generated after a trailing separator; a generated token that does not survive
decoding and re-encoding (a lone byte, a word piece without its boundary mark) becomes other tokens; its
context scores ignore a BOS token, and on encoder-decoders its output context scores start one row early,
at the decoder start token. Everywhere else the two agree (tests/test_context_pecore.py).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import torch

from instrument.accumulator import Accumulator
from instrument.context.contextless import contrast_token
from instrument.context.pecore_inputs import (
    Sequences,
    context_settings,
    filtered_tokens,
    prepare_outputs,
    tokenize,
)
from instrument.context.pecore_output import AttributeContextOutput, CCIOutput, filter_rank
from instrument.models import validation
from instrument.rows import Example, Rows
from instrument.step_args import StepFunctionArgs, StepInputs
from instrument.steps import call_step_function, get_step_function
from methods.base import Request
from methods.registry import get_method

_PER_EXAMPLE = ("input_current_text", "input_context_text", "output_context_text", "output_current_text")


def attribute_context(
    model,
    input_current_text: str | Sequence[str],
    input_context_text: str | Sequence[str] | None = None,
    input_template: str | None = None,
    output_context_text: str | Sequence[str] | None = None,
    output_current_text: str | Sequence[str] | None = None,
    output_template: str | None = None,
    contextless_input_current_text: str | None = None,
    contextless_output_current_text: str | None = None,
    *,
    method: str = "pecore",
    attribution_method: str | None = None,
    attributed_fn: str | None = None,
    context_sensitivity_metric: str = "kl_divergence",
    handle_output_context_strategy: str = "manual",
    contextless_output_next_tokens: Sequence[str] = (),
    prompt_user_for_contextless_output_next_tokens: bool = False,
    special_tokens_to_keep: Sequence[str] = (),
    decoder_input_output_separator: str = " ",
    context_sensitivity_std_threshold: float | None = 1.0,
    context_sensitivity_topk: int | None = None,
    attribution_std_threshold: float | None = 1.0,
    attribution_topk: int | None = None,
    attribution_aggregators: Any = None,
    normalize_attributions: bool = False,
    rescale_attributions: bool = False,
    generation_kwargs: dict | None = None,
    attribution_kwargs: dict | None = None,
    show_intermediate_outputs: bool = False,
    add_output_info: bool = True,
    sources: str = "sentences",
    n_ablations: int = 64,
    seed: int = 0,
):
    """Context reliance of one example (strings) or several (lists of strings: one output per example).

        out = attribute_context(model, input_current_text="His colleagues asked him to come",
                                input_context_text="George was sick yesterday.", attributed_fn="contrast_prob_diff")
        out.show(); out.save("out.json")

    Arguments and defaults are those of Inseq's `attribute-context`; `model` is an `AttributionModel`
    (`instrument.load_model(...)`) or a name to load. `method="ablation"` attributes the context by random
    source ablations instead (`instrument.context.ablation`; `sources`, `n_ablations`, `seed`).
    """
    if method not in ("pecore", "ablation"):
        raise ValueError(f"method must be 'pecore' or 'ablation', got {method!r}")
    if isinstance(model, str):
        from instrument.models import load_model

        model = load_model(model, attribution_method or "saliency")
    if method == "ablation":
        from instrument.context.ablation import attribute_context_ablation

        return attribute_context_ablation(
            model,
            input_current_text=input_current_text,
            input_context_text=input_context_text,
            output_current_text=output_current_text,
            input_template=input_template,
            sources=sources,
            n_ablations=n_ablations,
            seed=seed,
            decoder_input_output_separator=decoder_input_output_separator,
            **({"generation_args": dict(generation_kwargs)} if generation_kwargs else {}),
        )
    single = isinstance(input_current_text, str)
    per_example = dict(
        zip(_PER_EXAMPLE, (input_current_text, input_context_text, output_context_text, output_current_text))
    )
    count = 1 if single else len(list(input_current_text))
    if count == 0:
        raise ValueError("input_current_text is empty")
    columns = {}
    for name, value in per_example.items():
        values = [value] * count if value is None or isinstance(value, str) else list(value)
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} examples; give one per example")
        columns[name] = values
    method_name = attribution_method or model.attribution_method or "saliency"
    get_method(method_name)
    shared = dict(
        show_intermediate_outputs=show_intermediate_outputs,
        save_path=None,
        add_output_info=add_output_info,
        viz_path=None,
        show_viz=False,
        model_name_or_path=model.model_name,
        attribution_method=method_name,
        device=str(model.device),
        attributed_fn=attributed_fn,
        attribution_selectors=None,
        attribution_aggregators=attribution_aggregators,
        normalize_attributions=normalize_attributions,
        rescale_attributions=rescale_attributions,
        model_kwargs={},
        tokenizer_kwargs={},
        generation_kwargs=dict(generation_kwargs or {}),
        attribution_kwargs=dict(attribution_kwargs or {}),
        context_sensitivity_metric=context_sensitivity_metric,
        handle_output_context_strategy=handle_output_context_strategy,
        contextless_output_next_tokens=list(contextless_output_next_tokens),
        prompt_user_for_contextless_output_next_tokens=prompt_user_for_contextless_output_next_tokens,
        special_tokens_to_keep=list(special_tokens_to_keep),
        decoder_input_output_separator=decoder_input_output_separator,
        context_sensitivity_std_threshold=context_sensitivity_std_threshold,
        context_sensitivity_topk=context_sensitivity_topk,
        attribution_std_threshold=attribution_std_threshold,
        attribution_topk=attribution_topk,
    )
    templates = dict(
        input_template=input_template,
        output_template=output_template,
        contextless_input_current_text=contextless_input_current_text,
        contextless_output_current_text=contextless_output_current_text,
    )
    settings = []
    for b in range(count):
        example = {name: columns[name][b] for name in _PER_EXAMPLE}
        settings.append(
            context_settings(
                **shared,
                input_current_text=example["input_current_text"],
                input_context_text=example["input_context_text"],
                input_template=templates["input_template"],
                output_context_text=example["output_context_text"],
                output_current_text=example["output_current_text"],
                output_template=templates["output_template"],
                contextless_input_current_text=templates["contextless_input_current_text"],
                contextless_output_current_text=templates["contextless_output_current_text"],
            )
        )
    outputs = run_pecore(model, settings)
    return outputs[0] if single else outputs


def run_pecore(model, settings: list[dict[str, Any]]) -> list[AttributeContextOutput]:
    """PECoRe on examples whose settings `context_settings` checked (outputs generated when not given),
    the model in eval mode (its mode restored after)."""
    with validation.eval_mode(model.model):
        return _run(model, settings)


def _run(model, settings: list[dict[str, Any]]) -> list[AttributeContextOutput]:
    started = time.perf_counter()
    for s in settings:
        if s.get("output_current_text") is None or (s["has_output_context"] and s.get("output_context_text") is None):
            s["output_context_text"], s["output_current_text"] = prepare_outputs(model, s)
    seqs = [tokenize(model, s) for s in settings]
    metric = get_step_function(settings[0]["context_sensitivity_metric"])
    cti, contextless_logits = _cti(model, seqs, metric)
    outputs, selected = [], []
    for b, (s, seq) in enumerate(zip(settings, seqs)):
        scores = cti[b].tolist()
        ranked, threshold = filter_rank(scores, s["context_sensitivity_std_threshold"], s["context_sensitivity_topk"])
        tokens = model.tokenizer.convert_ids_to_tokens(seq.contextless_ids[seq.contextless_start :][: seq.n].tolist())
        outputs.append(
            AttributeContextOutput(
                input_context=s.get("input_context_text"),
                input_context_tokens=seq.input_context_tokens,
                output_context=s.get("output_context_text"),
                output_context_tokens=seq.output_context_tokens,
                output_current=s["output_current_text"],
                output_current_tokens=tokens,
                cti_scores=scores,
                info=s if s["add_output_info"] else None,
                cti_threshold=threshold,
            )
        )
        selected.append(ranked)
        if s["show_intermediate_outputs"]:
            from rich import print as rprint

            rprint(f"CTI ({s['context_sensitivity_metric']}):", list(zip(tokens, [round(x, 4) for x in scores])))
    if any(selected):
        _cci(model, settings, seqs, selected, contextless_logits, outputs)
    for out in outputs:
        if out.info is not None:
            out.info = dict(out.info, exec_time=time.perf_counter() - started)
    return outputs


def _cti(model, seqs: list[Sequences], metric) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The metric of each output token between the runs without context (original) and with context
    (contrast), as Inseq's CTI: one forward of each sequence, all examples batched. Also the logits
    without context (CCI's contrast), per example `[n, V]`."""
    engine = model.engine
    examples, pairs = [], []
    for b, seq in enumerate(seqs):
        examples.append(Example(seq.contextless_ids, 0, 0, seq.contextless_source))
        pairs += [(2 * b, seq.contextless_start + i) for i in range(seq.n)]
        examples.append(Example(seq.context_ids, 0, 0, seq.context_source))
        pairs += [(2 * b + 1, seq.context_start + i) for i in range(seq.n)]
    rows = Rows.build(examples, pairs, engine.pad_token_id).to(engine.device)
    with torch.no_grad():
        logits = engine.logits(rows)
        odd = rows.example % 2 == 1
        less, ctx = (~odd).nonzero().squeeze(1), odd.nonzero().squeeze(1)
        less_rows = rows.take(less)
        args = StepFunctionArgs(
            logits=logits[less],
            target_ids=less_rows.token,
            contrast=lambda: (logits[ctx], rows.token[ctx]),
            rerun=_no_rerun,
            inputs=StepInputs(engine, less_rows),
        )
        engine.scored = metric.identifier
        scores = call_step_function(metric, args, {}).float().cpu()
    sizes = [seq.n for seq in seqs]
    return list(scores.split(sizes)), list(logits[less].detach().split(sizes))


def _no_rerun(*args, **kwargs):
    raise ValueError("This step function reruns the model (Monte Carlo dropout); it cannot score context sensitivity")


def _cci(model, settings, seqs: list[Sequences], selected, contextless_logits, outputs) -> None:
    """Attributes every selected token of every example in one method call: each example's sequence with
    context runs once, and the selected tokens' gradients come from one batched backward."""
    s0, engine, tokenizer = settings[0], model.engine, model.tokenizer
    attributed = get_step_function(s0["attributed_fn"] or "probability")
    contrastive = attributed.needs_contrast
    method_cls = get_method(s0["attribution_method"])
    kwargs = dict(s0["attribution_kwargs"])
    defaults = model.method_kwargs if s0["attribution_method"] == model.attribution_method else {}
    method = method_cls(**{**defaults, **{k: v for k, v in kwargs.items() if k in method_cls.params}})
    step_kwargs = {k: v for k, v in kwargs.items() if k not in method_cls.params}
    examples, pairs, contrast_ids, forced, rows_contrast, cci = [], [], [], [], [], []
    for b, (s, seq, ranked) in enumerate(zip(settings, seqs, selected)):
        examples.append(Example(seq.context_ids, 0, 0, seq.context_source))
        given = s["contextless_output_next_tokens"]
        if given and len(given) != len(ranked):
            raise ValueError(
                f"contextless_output_next_tokens has {len(given)} tokens but CTI selected {len(ranked)}; give one each"
            )
        for k, (i, score) in enumerate(ranked):
            q = seq.context_start + i
            pairs.append((b, q))
            token = int(seq.context_ids[q])
            contrast, less_text = None, None
            if contrastive:
                contrast = contrast_token(model, s, seq, i, k, contextless_logits[b])
                contrast_ids.append(contrast)
                forced.append(attributed.identifier == "kl_divergence" or contrast == token)
                rows_contrast.append(contextless_logits[b][i])
                less = seq.contextless_ids[: seq.contextless_start + i].tolist() + [contrast]
                less_text = tokenizer.convert_tokens_to_string(
                    filtered_tokens(model, less, s["special_tokens_to_keep"])
                )
            contextual = tokenizer.convert_tokens_to_string(
                filtered_tokens(model, seq.context_ids[: q + 1], s["special_tokens_to_keep"])
            ).lstrip(" ")
            cci.append(
                CCIOutput(
                    cti_idx=i,
                    cti_token=outputs[b].output_current_tokens[i],
                    cti_score=score,
                    contextual_output=contextual,
                    contrast_token=None if contrast is None else tokenizer.convert_ids_to_tokens(contrast),
                    contextless_output=less_text,
                )
            )
    rows = Rows.build(examples, pairs, engine.pad_token_id).to(engine.device)
    index = {pair: r for r, pair in enumerate(pairs)}
    contrast_tokens = torch.tensor(contrast_ids or [0], device=engine.device)
    forced_rows = torch.tensor(forced or [False], device=engine.device)
    contrast_logits = torch.stack(rows_contrast).to(engine.device) if rows_contrast else None

    def score(rows_, logits, source_embeds, target_embeds):
        at = torch.tensor(
            [index[(e, p)] for e, p in zip(rows_.example.tolist(), rows_.position.tolist())], device=logits.device
        )

        def contrast():
            if not contrastive:
                raise ValueError(f"attributed_fn {attributed.identifier!r} needs a contrast")
            kept = torch.where(forced_rows[at, None], contrast_logits[at].to(logits.dtype), logits)
            return kept, contrast_tokens[at]

        args = StepFunctionArgs(
            logits,
            rows_.token,
            contrast,
            _no_rerun,
            step_kwargs,
            StepInputs(engine, rows_, source_embeds, target_embeds),
            True,
        )
        engine.scored = attributed.identifier
        return call_step_function(attributed, args, step_kwargs)

    attribute_target = not model.is_encoder_decoder or s0["has_output_context"]
    request = Request(engine, rows, score, attribute_target, needs_logits=False, attributed_fn=attributed.identifier)
    result = method.attribute(request, **method.defaults)
    if method.attributes_inputs and not attribute_target:
        result.target = None
    per_token = [Example(examples[b].target_ids[: q + 1], q, q + 1, examples[b].source_ids) for b, q in pairs]
    collected = Accumulator(per_token)
    collected.add(list(range(len(pairs))), replace(rows, example=torch.arange(len(pairs))), result, {})
    owners = [b for b, _ in pairs]
    for r, seq_out in enumerate(collected.sequences(model._tokens)):
        b, s, seq = owners[r], settings[owners[r]], seqs[owners[r]]
        # As Inseq's attribute-context: `rescale_attributions` only acts with `attribution_selectors`
        aggregated = seq_out.aggregate(s["attribution_aggregators"], normalize=bool(s["normalize_attributions"]))
        if s["show_intermediate_outputs"]:
            aggregated.show()
        cci[r].input_context_scores = _span(aggregated, seq.input_span, model.is_encoder_decoder)
        cci[r].output_context_scores = _span(aggregated, seq.output_span, False)
        outputs[b].cci_scores.append(cci[r])


def _span(aggregated, span, on_source: bool) -> list[float] | None:
    if span is None:
        return None
    grid = aggregated.source_attributions if on_source else aggregated.target_attributions
    start, length = span
    return grid[start : start + length, 0].tolist()
