"""What every attribution method shares: its options, the request it serves, gradients at a point.

method = get_method("saliency")(abs=True)
result = method.attribute(request)        # RowAttribution for request.rows
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from instrument import batching, planner
from instrument.engine import Engine, checkpointed_layers, frozen_parameters
from instrument.rows import RowAttribution, Rows, full_rows
from methods.slopes import activation_slopes

Score = Callable[[Rows, torch.Tensor, Any, Any], torch.Tensor]


@dataclass
class Request:
    """Rows to attribute, the attributed function, and which sides are attributed inputs.

    `score(rows, logits, source_embeds, target_embeds)` gives one differentiable value per row.
    On encoder-decoders the target prefix is an attributed input only with `attribute_target`;
    otherwise it stays at its real embedding whatever the method does to the source.
    `needs_logits`: the caller reads the result's logits (for step scores); a method that has no
    use for them may skip the LM head. `attributed_fn`: the step function's identifier, for methods
    that only make sense for some (ReAGent needs a probability). `auto`: the memory-aware batching
    state of the run (`instrument.batching.run_rows`) that `chunks(..., "auto", auto=request.auto)` sizes
    path chunks with (None: a fresh one per call). `max_memory`: the memory budget in bytes that
    batched backwards are planned to fit (`instrument.planner`; "auto": what the device has free).
    `checkpoint_layers`: recompute each layer in the backward (`instrument.engine.checkpointed_layers`)
    for gradients w.r.t. the inputs: True, False, or "auto" (where the planner finds that one graph
    does not fit `max_memory`).
    """

    engine: Engine
    rows: Rows
    score: Score
    attribute_target: bool = True
    needs_logits: bool = True
    attributed_fn: str | None = None
    auto: batching.AutoState | None = None
    max_memory: int | str | None = "auto"
    checkpoint_layers: bool | str = "auto"
    reserved_memory: int = 0  # bytes held besides the gradient batch (`path_request`), off the budget

    @property
    def attribute_source(self) -> bool:
        return self.rows.source_ids is not None


class AttributionMethod:
    """A registered method: its options and their defaults are the keywords of its `attribute()`,
    read once per class into `params`.

        Saliency.params                               # def attribute(self, request, abs=True)
        {'abs': True}
    """

    name = ""
    params: dict[str, Any] = {}
    # Input methods attribute the target prefix only on request; layer methods report whatever side
    # their layers are on.
    attributes_inputs = True
    # Takes gradients w.r.t. the inputs alone, with no hook inside the layers that captures anything:
    # its layers can be recomputed in the backward (`Request.checkpoint_layers`).
    checkpointable = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "attribute" in cls.__dict__ and "params" not in cls.__dict__:
            cls.params = signature_defaults(cls.attribute)

    def __init__(self, **defaults):
        unknown = set(defaults) - set(self.params)
        if unknown:
            raise TypeError(f"{self.name} takes no option(s) {sorted(unknown)}; its options: {sorted(self.params)}")
        for name, value in defaults.items():
            check_option(self.name, name, value, self.params[name])
        self.defaults = {**self.params, **defaults}

    def attribute(self, request: Request, **options) -> RowAttribution:
        raise NotImplementedError


def signature_defaults(attribute: Callable) -> dict[str, Any]:
    """`{option: default}` of an `attribute(self, request, ...)` method; every option needs a default.

    signature_defaults(lambda self, request, n_steps=50: None)
    {'n_steps': 50}
    """
    options = list(inspect.signature(attribute).parameters.values())[2:]
    defaults = {}
    for option in options:
        if option.kind in (option.VAR_POSITIONAL, option.VAR_KEYWORD):
            continue
        if option.default is option.empty:
            raise TypeError(f"{attribute.__qualname__}: option {option.name!r} needs a default value")
        defaults[option.name] = option.default
    return defaults


# Options counting something: positive integers.
COUNTS = ("n_steps", "n_samples", "n_neighbors", "perturbations_per_eval", "num_probes", "max_probe_steps")


def check_option(method: str, name: str, value: Any, default: Any) -> None:
    """A method option of the type its default has (bool, int, real), else TypeError naming it.

    check_option("integrated_gradients", "n_steps", "20", 50)   # TypeError
    """
    if name == "internal_batch_size":
        batching.check_size(name, value)
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "True or False"
    elif isinstance(default, int):
        ok, kind = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
    else:
        return
    if not ok:
        raise TypeError(f"{method}: {name} must be {kind}, got {value!r} ({type(value).__name__})")
    if name in COUNTS and value < 1:
        raise ValueError(f"{method}: {name} must be a positive integer, got {value!r}")
    if isinstance(default, float) and value < 0:
        raise ValueError(f"{method}: {name} must be non-negative, got {value!r}")


def gradients(
    request: Request,
    rows: Rows,
    wrt: list[torch.Tensor],
    source=None,
    target=None,
    layers=(),
    layer_patch=None,
    shared_prefix: bool = False,
):
    """Gradients of each row's score w.r.t. `wrt` (leaves fed in as embeddings or layer patches),
    plus the logits and the live layer outputs of that one forward, all `[R, ...]`.

    `shared_prefix=True` says that the rows of one example (and block of `Rows.repeat`) see the same
    inputs, so that each is a prefix of the longest: then one forward of the longest row serves them
    all, and one batched backward per step gives each row its own gradient (see `_shared_prefix`).
    """
    if shared_prefix and layer_patch is None and len(rows) > 1:
        return _shared_prefix(request, rows, wrt, source, target, layers)
    inputs_only = not layers and layer_patch is None
    model = request.engine.model
    checkpoint = inputs_only and _checkpoint(request, rows)
    with (
        torch.enable_grad(),
        frozen_parameters(model) if inputs_only else contextlib.nullcontext(),
        checkpointed_layers(model) if checkpoint else contextlib.nullcontext(),
    ):
        logits, activations = request.engine.forward(rows, source, target, layers, layer_patch)
        scores = request.score(rows, logits, source, target)
        wanted = list(wrt) + [activations[name] for name in layers]
        _check_differentiable(request, scores)
        grads = _check_used(request, torch.autograd.grad(scores.sum(), wanted, allow_unused=True), wanted)
    return grads, logits.detach(), {name: activations[name].detach() for name in layers}


def _not_differentiable(request: Request, why: str) -> ValueError:
    name = getattr(request.engine, "scored", None) or "the attributed function"
    return ValueError(
        f"attributed_fn {name!r} {why}, so gradient attributions would all be zero. Gradient, path and layer "
        "methods need a function computed differentiably from the logits (not argmax, counts or values "
        "computed without gradient); use a perturbation method for such functions"
    )


def _check_differentiable(request: Request, scores: torch.Tensor) -> None:
    if not scores.requires_grad:
        raise _not_differentiable(request, "returned a value that has no gradient")


def _check_used(request: Request, grads, wanted) -> list[torch.Tensor]:
    """Gradients, zeros for the inputs the function does not use (the target prefix under a
    contrastive function that reads contrast ids); an error when it uses none of them."""
    if grads and all(g is None for g in grads):
        raise _not_differentiable(request, "returned a value that does not depend on the attributed inputs")
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads)]


def _shared_prefix(request: Request, rows: Rows, wrt: list[torch.Tensor], source, target, layers):
    """`gradients` from one forward per example. The graph is cut at the LM head's input: one cheap
    backward gives each row's score its gradient there (a row's logits depend on its own state
    only); then backwards batched over slots (`is_grads_batched`) take them to the inputs, slot
    s holding one row of every full row (plus, in the same pass, any path from the scores to the
    inputs that bypasses the head, such as a contrastive forward sharing the source embeddings).
    Under causal attention a row's score depends on nothing after its prefix, so the full row
    gives each row its own gradient (zero past the prefix).

    Memory: the batched backward's buffers grow with the slots it carries (x heads x length² in
    attention), so the slots go in chunks that the memory planner (`instrument.planner`) fits into
    `request.max_memory` beside the graph; gradients w.r.t. inputs alone run with the parameters
    frozen (no weight gradient, nor the tensors only weight gradients need)."""
    fr = full_rows(rows)
    full = {id(t): leaf(t[fr.longest]) for t in (source, target) if t is not None}
    full_source, full_target = (full[id(t)] if t is not None else None for t in (source, target))
    owner, n_full, n_slots = fr.owner, len(fr.full), fr.positions.shape[1]

    def per_row(value: torch.Tensor, slot: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
        """`[S, F, ...]` (or `[S, F * positions, hidden]`) -> `[len(slot), ...]`."""
        if value.shape[1] != n_full:  # modules that flatten rows and positions (OPT's feed-forward)
            value = value.reshape(value.shape[0], n_full, -1, value.shape[-1])
        return value[slot.to(value.device), of.to(value.device)]

    def per_row_activation(value: torch.Tensor) -> torch.Tensor:
        if value.shape[0] != n_full:
            value = value.reshape(n_full, -1, value.shape[-1])
        return value[owner.to(value.device)]

    model = request.engine.model
    plan = plan_slots(request, fr, n_slots, inputs_only=not layers)
    freeze = frozen_parameters(model) if not layers else contextlib.nullcontext()
    checkpoint = checkpointed_layers(model) if plan.checkpoint else contextlib.nullcontext()
    with torch.enable_grad(), activation_slopes(model), freeze, checkpoint:
        logits, activations, (states, head_input) = request.engine.forward_reads(fr, full_source, full_target, layers)
        scores = request.score(
            rows,
            logits,
            full_source[owner] if full_source is not None else None,
            full_target[owner] if full_target is not None else None,
        )
        wanted = [full[id(t)] for t in wrt] + [activations[name] for name in layers]
        _check_differentiable(request, scores)
        one_hot = (fr.slot[None, :] == torch.arange(n_slots, device=fr.slot.device)[:, None]).to(scores.dtype)
        roots, seeds = [scores], [one_hot]
        if head_input.requires_grad:
            at_head = torch.autograd.grad(scores.sum(), head_input, retain_graph=True, allow_unused=True)[0]
            if at_head is not None:  # [R, 1, D] -> [S, R, 1, D], row r in its slot
                roots.append(states)
                seeds.append(one_hot.to(at_head.dtype).view(n_slots, -1, 1, 1) * at_head)
        step, start = cotangent_chunk(request, plan.cotangents, n_slots), 0
        grads: list[torch.Tensor | None] = [None] * len(wanted)
        while start < n_slots:
            part = [seed[start : start + step] for seed in seeds]
            try:  # the graph is kept to the end, so that a chunk that ran out of memory can run again smaller
                found = torch.autograd.grad(
                    roots, wanted, part, is_grads_batched=True, allow_unused=True, retain_graph=True
                )
            except BaseException as error:
                if step == 1 or not batching.is_out_of_memory(error):
                    raise
                found = None
            if found is None:
                step = _learn(request, step)
                continue
            found = _check_used(request, found, [t.expand(len(part[0]), *t.shape) for t in wanted])
            # Each row's gradient goes straight to its place: no [slots, ...] tensor of every chunk.
            in_chunk = ((fr.slot >= start) & (fr.slot < start + len(part[0]))).nonzero().squeeze(1)
            for i, g in enumerate(found):
                picked = per_row(g, fr.slot[in_chunk] - start, owner[in_chunk])
                if grads[i] is None:
                    grads[i] = picked.new_zeros((len(rows), *picked.shape[1:]))
                grads[i].index_copy_(0, in_chunk.to(picked.device), picked)
            del found
            start += step
        activations = {name: value.detach() for name, value in activations.items()}

    return grads, logits.detach(), {name: per_row_activation(activations[name]) for name in layers}


def plan_slots(request: Request, fr, n_slots: int, inputs_only: bool = True) -> planner.Plan:
    """The planner's plan for one shared-prefix batch of the full rows `fr` in the request's memory
    budget: slots per batched backward, and whether to checkpoint the layers (inputs only)."""
    return _plan(request, fr.full, n_slots, request.checkpoint_layers if inputs_only else False)


def _checkpoint(request: Request, rows: Rows) -> bool:
    """Whether one forward and backward of `rows` (no shared prefix) runs with checkpointed layers."""
    if request.checkpoint_layers != "auto":
        return bool(request.checkpoint_layers)
    return _plan(request, rows, 1, "auto", shared_prefix=False).checkpoint


def _plan(request: Request, rows: Rows, slots: int, checkpoint: bool | str, shared_prefix: bool = True) -> planner.Plan:
    return planner.plan_gradients(
        request.engine.model,
        length=rows.target_ids.shape[1],
        source_length=rows.source_length,
        rows=len(rows),
        slots=slots,
        max_memory=request.max_memory,
        dtype=request.engine.input_dtype,
        checkpoint=checkpoint,
        reserved=request.reserved_memory,
        shared_prefix=shared_prefix,
    )


def cotangent_chunk(request: Request, chosen: int, n_slots: int) -> int:
    """Slots per batched backward: `chosen` (the planner's), at most the cap an earlier
    out-of-memory error of this call left (`AutoState.cotangent_cap`)."""
    cap = request.auto.cotangent_cap if request.auto is not None else None
    chosen = max(1, min(chosen, cap or n_slots))
    if request.auto is not None:
        request.auto.cotangents_run = max(request.auto.cotangents_run, chosen)
    return chosen


def _learn(request: Request, step: int) -> int:
    """Half the slots after an out-of-memory error, kept for the rest of the call (`request.auto`)."""
    batching.free_memory()  # called after the except block: the error's frames are gone
    step = max(1, step // 2)
    if request.auto is not None:
        request.auto.cotangent_cap = step
        request.auto.note(f"out of memory in a batched backward: {step} slots per backward from now on")
    return step


def leaf(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().requires_grad_()


# On the CPU, chunks of about this many tokens (path points x rows x width) run fastest: in larger
# ones every tensor outgrows the caches and glibc's mmap threshold (at most 32 MiB), so that each
# is served fresh pages, and IG over 50 points in one chunk took 1.7x as long (benchmarks/README.md).
CPU_CHUNK_TOKENS = 1200


def chunks(
    total: int,
    rows: Rows,
    internal_batch_size: int | str | None,
    rows_per_point: int | None = None,
    auto: batching.AutoState | None = None,
    request: Request | None = None,
    shared_prefix: bool = False,
    extra_rows: int = 0,
) -> Iterable[range]:
    """Splits `total` path points, each running `rows_per_point` rows (default: all of `rows`), into
    chunks of at most `internal_batch_size` rows in all (None: all points on accelerators, as Captum;
    about `CPU_CHUNK_TOKENS` tokens a chunk on the CPU), and with a `request`, at most as many points
    as the memory planner fits in `request.max_memory` (`instrument.planner.plan_points`; with
    `shared_prefix`, the rows of each point run as `gradients(..., shared_prefix=True)` runs them;
    `extra_rows`: rows of tensors the method keeps besides inputs, baselines and totals).
    "auto": chunks sized from the measured free memory with the batching state `auto`, the
    request's (`instrument.batching.auto_chunks`, an iterator; None: a fresh state).

        for chunk in chunks(n_steps, request.rows, internal_batch_size, request=request): ...
    """
    batching.check_size("internal_batch_size", internal_batch_size)
    per_point = max(len(rows) if rows_per_point is None else rows_per_point, 1)
    if batching.is_auto(internal_batch_size):
        return batching.auto_chunks(total, per_point, auto if auto is not None else getattr(request, "auto", None))
    if internal_batch_size:
        per_chunk = max(1, internal_batch_size // per_point)
    elif rows.target_ids.device.type == "cpu":
        per_chunk = max(1, CPU_CHUNK_TOKENS // (per_point * (rows.target_ids.shape[1] + rows.source_length)))
    else:
        per_chunk = total
    if request is not None:
        per_chunk = min(per_chunk, _planned_points(request, rows, total, per_point, shared_prefix, extra_rows))
    return [range(start, min(start + per_chunk, total)) for start in range(0, total, per_chunk)]


def _path_layout(rows: Rows, per_point: int, shared_prefix: bool, extra_rows: int) -> dict[str, Any]:
    """How the planner sees a path method's points over `rows` (`planner.predict_path`'s arguments)."""
    slots, width, forward_rows = 1, rows.target_ids.shape[1], per_point
    if shared_prefix:  # one full row per example and point, read at each of its slots
        fr = full_rows(rows)
        forward_rows, slots, width = len(fr.full), fr.positions.shape[1], fr.full.target_ids.shape[1]
    return {
        "length": width,
        "rows_per_point": forward_rows,
        "attributed_rows": len(rows),
        "point_rows": len(rows) if shared_prefix else per_point,
        "slots": slots,
        "source_length": rows.source_length,
        "shared_prefix": shared_prefix,
        "extra_rows": extra_rows,
    }


def _planned_points(
    request: Request, rows: Rows, total: int, per_point: int, shared_prefix: bool, extra_rows: int
) -> int:
    """Path points per chunk that the planner fits in the request's budget."""
    return planner.plan_points(
        request.engine.model,
        points=total,
        max_memory=request.max_memory,
        dtype=request.engine.input_dtype,
        checkpoint=request.checkpoint_layers,
        **_path_layout(rows, per_point, shared_prefix, extra_rows),
    )


def path_request(
    request: Request, rows: Rows, points: int, rows_per_point: int | None = None, shared_prefix=False, extra_rows=0
) -> Request:
    """The request for the gradients of a chunk of `points` path points over `rows` (as `chunks`
    saw them): what the path method holds besides (`planner.path_held`) is off its budget.

        grads = gradients(path_request(request, rows, len(chunk), shared_prefix=True), ...)
    """
    layout = _path_layout(
        rows, max(len(rows) if rows_per_point is None else rows_per_point, 1), shared_prefix, extra_rows
    )
    shape = planner.model_shape(request.engine.model, request.engine.input_dtype)
    held = planner.path_held(
        shape,
        layout["length"],
        points,
        layout["attributed_rows"],
        layout["point_rows"],
        layout["source_length"],
        extra_rows,
    )
    return dataclasses.replace(request, reserved_memory=request.reserved_memory + held)
