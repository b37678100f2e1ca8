"""The memory planner: the peak memory of an attribution batch, predicted from the model's config,
and the chunk sizes that fit a budget.

    plan = plan_gradients(model, length=1032, slots=32, max_memory=2 * 2**30)
    plan.cotangents, plan.peak        # slots per batched backward, predicted peak bytes

What is predicted is the tensor memory a batch adds on top of the weights (torch's allocator: the
profiler's memory events on the CPU, `max_memory_allocated` on CUDA), from the model's shape
(`Shape`: layers, hidden size, heads, feed-forward width, vocabulary, bytes per element, attention
implementation) and the batch's (full rows, their length, slots per backward). A gradient batch
(`methods.base.gradients`, shared prefix) holds one forward graph (the tensors saved for the
backward, with frozen parameters) and, during each batched backward, buffers per slot (cotangent):
the gradients of one layer's activations, and under eager attention a `heads x length²` matrix. The
coefficients are counts of `hidden`- and `intermediate`-wide tensors per token, fitted to the
profiler's peaks on small GPT-2-shaped models (tests/test_planner.py checks them within 20% over
lengths, methods, chunks and attention implementations; GPT-2 small at 256 + 32 tokens: 0.89x).
With checkpointed layers (`checkpoint=True`, `instrument.engine.checkpointed_layers`) the graph is
each layer's input, plus layers' graphs rebuilt in the backward (tests/test_checkpointing.py); path
methods (`predict_path`, `plan_points`) add their own tensors (inputs, baselines, totals, the path
points) to the gradient batch of the points they run together (tests/test_path_planner.py). Methods
that only run forwards (attention, perturbations) hold one layer's transients at a time, eager
attention's scores, the logits read and what they keep: `predict_forward`, and `plan_rows` for the
rows (examples, perturbed copies) per forward (tests/test_forward_planner.py). Not yet
covered: Llama-shaped models (off by 20-35% in the same checks), eager attention at short lengths
with many slots (over-predicted by up to 40%), DIG's own preprocessing. Quantized weights (8-/4-bit)
change the weights, not the activations: they are counted at the compute dtype.

`max_memory`: bytes, or "auto" (the default: what the model's devices have free now, less
`instrument.batching.SAFETY_MARGIN`). An out-of-memory error still halves the chunks, and that
cap holds for the rest of the call (`instrument.batching.AutoState.cotangent_cap`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Plan",
    "Shape",
    "budget",
    "check_checkpoint_layers",
    "check_max_memory",
    "model_shape",
    "plan_gradients",
    "plan_points",
    "plan_rows",
    "predict_forward",
    "predict_gradients",
    "path_held",
    "predict_path",
]

# In elements per token, each a multiple of `hidden` (+ of `intermediate`), fitted to the profiler's
# peaks on GPT-2- and Llama-shaped models (see tests/test_planner.py):
GRAPH_HIDDEN, GRAPH_INTERMEDIATE = 6.0, 1.0  # the forward graph, per layer
SLOT_HIDDEN, SLOT_INTERMEDIATE = 4.0, 1.0  # one slot's batched-backward buffers
KEPT_PER_SLOT = 2.25  # each slot's input gradient, kept to the end, while backwards run
FORWARD_HIDDEN = 52.0  # the attribution's other buffers (embeddings, outputs), peaking outside the backward
UNSHARED_FORWARD_HIDDEN = 40.0  # the same where each row runs on its own (no shared prefix: path points)
# Eager attention, in heads x length² elements: per layer in the graph, per slot in the backward.
GRAPH_SCORES, SLOT_SCORES = 1.0, 2.0
# The slots of one backward keep their buffers under this fraction of the graph, or under SLOT_FLOOR bytes
# where that is more ("auto" budgets only): short inputs keep all their slots in one backward.
SLOT_SHARE, SLOT_FLOOR = 0.5, 128 * 2**20
# Checkpointed layers (`instrument.engine.checkpointed_layers`) keep this many hidden-wide tensors per
# token and layer (the layer's input) in the graph; in the backward, about two layers' graphs while one
# is recomputed; outside it, the first recompute's transients, in layers' graphs without the scores.
CHECKPOINT_KEPT, CHECKPOINT_LAYERS, CHECKPOINT_RECOMPUTE = 1.0, 2.0, 3.0
# Path methods (`predict_path`), per attributed row: inputs, baselines and float32 totals; the path points.
PATH_KEPT, PATH_PER_POINT = 3.0, 1.0
# No-grad forwards (`predict_forward`: attention, perturbation methods), per row and token: one layer's
# transients in hidden- and intermediate-wide tensors, and eager attention's heads x length² scores
# (fitted on GPT-2-shaped models, tests/test_forward_planner.py); at the LM head, the logits of the
# positions read (the forward's, the rows' gathered copies, their probabilities) beside a few hidden states
# and the copies of the embeddings the attributed function is given.
NOGRAD_HIDDEN, NOGRAD_INTERMEDIATE, NOGRAD_SCORES = 7.5, 3.6, 1.3
NOGRAD_LOGITS, NOGRAD_HEAD_HIDDEN = 2.2, 3.0


@dataclass(frozen=True)
class Shape:
    """What the planner reads off a model: `model_shape(model)`."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    bytes: int  # per element of the activations (the compute dtype)
    attention: str  # "eager" materialises heads x length² scores; "sdpa", "flash_attention_2"... do not
    encoder_layers: int = 0
    quantization: str | None = None

    @property
    def eager(self) -> bool:
        return self.attention == "eager"


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_shape(model: Any, dtype: torch.dtype | None = None) -> Shape:
    """The `Shape` of a Hugging Face model (or of its config, with `dtype`).

    model_shape(transformers.GPT2LMHeadModel(transformers.GPT2Config())).layers
    12
    """
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(_get(config, "hidden_size", "n_embd", "d_model"))
    layers = int(_get(config, "num_hidden_layers", "n_layer", "decoder_layers", "num_layers"))
    heads = int(_get(config, "num_attention_heads", "n_head", "decoder_attention_heads"))
    intermediate = int(_get(config, "intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "d_ff") or 4 * hidden)
    encoder_layers = (
        int(_get(config, "encoder_layers", default=0)) if getattr(config, "is_encoder_decoder", False) else 0
    )
    if dtype is None:
        floating = (
            [p.dtype for p in model.parameters() if p.is_floating_point()] if hasattr(model, "parameters") else []
        )
        dtype = floating[0] if floating else _get(config, "dtype", default=torch.float32)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    quantization = _get(config, "quantization_config", default=None)
    if quantization is not None:
        quantization = "4bit" if _get(quantization, "load_in_4bit", default=False) else "8bit"
    return Shape(
        layers=layers,
        hidden=hidden,
        heads=heads,
        intermediate=intermediate,
        vocab=int(_get(config, "vocab_size", default=0)),
        bytes=torch.empty((), dtype=dtype).element_size(),
        attention=str(_get(config, "_attn_implementation", default=None) or "sdpa"),  # transformers 5 default
        encoder_layers=encoder_layers,
        quantization=quantization,
    )


@dataclass(frozen=True)
class Plan:
    """A batch's predicted peak (bytes, above the weights) and the chunks chosen for the budget."""

    peak: int
    graph: int  # one forward graph
    per_slot: int  # one slot's backward buffers
    fixed: int  # inputs and results
    cotangents: int  # slots per batched backward
    slots: int
    budget: int | None
    fits: bool
    checkpoint: bool = False  # layers recomputed in the backward (activation checkpointing)

    def describe(self) -> str:
        gib = 2**30
        limit = "unbounded" if self.budget is None else f"{self.budget / gib:.3f} GiB"
        return (
            f"predicted peak {self.peak / gib:.3f} GiB (graph {self.graph / gib:.3f} GiB, "
            f"{self.per_slot / gib:.4f} GiB per slot, inputs and results {self.fixed / gib:.3f} GiB); "
            f"{self.cotangents} of {self.slots} slots per batched backward; budget {limit}; "
            + ("layers checkpointed (recomputed per layer in the backward)" if self.checkpoint else "no checkpointing")
            + ("" if self.fits else "; does not fit even one slot at a time")
        )


def check_max_memory(max_memory: Any) -> None:
    """A positive number of bytes or "auto", else ValueError naming `max_memory`."""
    ok = max_memory == "auto" if isinstance(max_memory, str) else isinstance(max_memory, int) and max_memory > 0
    if isinstance(max_memory, bool) or not ok:
        raise ValueError(f"max_memory must be a positive number of bytes or 'auto', got {max_memory!r}")


def budget(max_memory: int | str | None, model: Any = None) -> int | None:
    """Bytes a batch may use: `max_memory` as given, or (None, "auto") what the model's devices have
    free less the safety margin; None where that is unknown."""
    if max_memory is not None:
        check_max_memory(max_memory)
    if isinstance(max_memory, int):
        return max_memory
    from instrument.batching import SAFETY_MARGIN
    from instrument.memory import available_memory, model_devices

    devices = model_devices(model) if model is not None and hasattr(model, "parameters") else [torch.device("cpu")]
    free = available_memory(devices)
    return None if free is None else int(free * (1 - SAFETY_MARGIN))


def check_checkpoint_layers(checkpoint_layers: Any) -> None:
    """True, False or "auto", else ValueError naming `checkpoint_layers`."""
    if not (isinstance(checkpoint_layers, bool) or checkpoint_layers == "auto"):
        raise ValueError(f"checkpoint_layers must be True, False or 'auto', got {checkpoint_layers!r}")


def predict_gradients(
    shape: Shape,
    length: int,
    rows: int = 1,
    slots: int = 1,
    cotangents: int = 1,
    source_length: int = 0,
    checkpoint: bool = False,
    forward_hidden: float = FORWARD_HIDDEN,
) -> tuple[int, int, int, int]:
    """(peak, graph, per slot, fixed) bytes of one shared-prefix gradient batch: `rows` full rows of
    `length` tokens (plus `source_length` on encoder-decoders), `slots` read per row, `cotangents`
    of them per batched backward; `checkpoint`: with checkpointed layers. The peak is the larger of
    the backward phase (graph, the slots in flight, the gradients kept) and the rest of the call
    (graph and the other buffers: `forward_hidden` per token, less without a shared prefix)."""
    b, d, i = shape.bytes, shape.hidden, shape.intermediate
    unit = rows * (length + source_length) * d * b  # one hidden-wide activation of every token
    layers = shape.layers + shape.encoder_layers
    squares = rows * shape.heads * (length**2 + source_length**2 + length * source_length) * b if shape.eager else 0
    layer = unit * (GRAPH_HIDDEN + GRAPH_INTERMEDIATE * i / d) + GRAPH_SCORES * squares
    graph = layers * layer
    rest = graph  # what the graph holds outside the backward
    if checkpoint:  # each layer's input kept; its graph rebuilt, one layer at a time, in the backward
        rest = layers * unit * CHECKPOINT_KEPT
        graph = rest + CHECKPOINT_LAYERS * layer
        rest += CHECKPOINT_RECOMPUTE * unit * (GRAPH_HIDDEN + GRAPH_INTERMEDIATE * i / d)
    per_slot = unit * (SLOT_HIDDEN + SLOT_INTERMEDIATE * i / d) + SLOT_SCORES * squares
    backward = graph + cotangents * per_slot + unit * (1 + KEPT_PER_SLOT * slots)
    peak = max(backward, rest + unit * (forward_hidden + slots))
    fixed = peak - graph - cotangents * per_slot
    return int(peak), int(graph), int(per_slot), int(fixed)


def _shape_and_limit(model: Any, dtype: torch.dtype | None, max_memory: int | str | None) -> tuple[Shape, int | None]:
    """The model's `Shape` (a Shape is taken as is) and its budget in bytes (`budget`)."""
    if isinstance(model, Shape):
        return model, budget(max_memory, None)
    return model_shape(model, dtype), budget(max_memory, model)


def plan_gradients(
    model: Any,
    length: int,
    slots: int,
    rows: int = 1,
    source_length: int = 0,
    max_memory: int | str | None = "auto",
    dtype: torch.dtype | None = None,
    checkpoint: bool | str = False,
    reserved: int = 0,
    shared_prefix: bool = True,
) -> Plan:
    """How many slots each batched backward carries so that the batch fits `max_memory`, and
    whether its layers are checkpointed (`checkpoint`: True, False, or "auto": where one graph
    with a single slot per backward does not fit and the checkpointed one fits better). `reserved`:
    bytes the caller holds besides (a path method's own tensors, `path_held`), off the budget;
    `shared_prefix=False`: each row runs on its own (one slot).

    plan_gradients(model, length=1032, slots=32, max_memory=2**31).cotangents
    """
    check_checkpoint_layers(checkpoint)
    shape, limit = _shape_and_limit(model, dtype, max_memory)
    limit = None if limit is None else limit - reserved
    slots = max(int(slots), 1)
    forward = FORWARD_HIDDEN if shared_prefix else UNSHARED_FORWARD_HIDDEN
    if checkpoint == "auto":  # where one slot per backward does not fit, and recomputing needs less
        plain, recomputed = (
            predict_gradients(shape, length, rows, slots, 1, source_length, c, forward)[0] for c in (False, True)
        )
        checkpoint = limit is not None and plain > limit and recomputed < plain
    predict = functools.partial(
        predict_gradients,
        shape,
        length,
        rows,
        slots,
        source_length=source_length,
        checkpoint=checkpoint,
        forward_hidden=forward,
    )
    graph, per_slot = predict(1)[1:3]
    chosen = slots
    if max_memory is None or max_memory == "auto":  # bounded buffers: about half a graph's worth of slots
        chosen = min(chosen, max(1, int(max(SLOT_SHARE * graph, SLOT_FLOOR) // max(per_slot, 1))))
    fits = True
    if limit is not None:  # the largest chunk whose predicted peak fits
        while chosen > 1 and predict(chosen)[0] > limit:
            chosen -= 1
        fits = predict(chosen)[0] <= limit
    peak, graph, per_slot, fixed = predict(chosen)
    return Plan(peak, graph, per_slot, fixed, chosen, slots, limit, fits, checkpoint)


def predict_path(
    shape: Shape,
    length: int,
    points: int,
    rows_per_point: int,
    attributed_rows: int,
    slots: int = 1,
    cotangents: int = 1,
    source_length: int = 0,
    checkpoint: bool = False,
    point_rows: int | None = None,
    shared_prefix: bool = True,
    extra_rows: int = 0,
) -> int:
    """Peak bytes of one chunk of a path method (integrated gradients and co.): `points` path points,
    each `rows_per_point` rows of `length` tokens through the model (the gradient batch of
    `predict_gradients`), plus the method's own tensors of the `attributed_rows` rows: inputs,
    baselines and float32 totals, and the path points themselves, `point_rows` rows per point
    (default `rows_per_point`; more where one forward row serves several rows' points), and
    `extra_rows` rows of the method's own (gradient SHAP's noise). `shared_prefix`: the gradient
    batch is `methods.base.gradients(..., shared_prefix=True)`'s (else each row runs on its own)."""
    forward = FORWARD_HIDDEN if shared_prefix else UNSHARED_FORWARD_HIDDEN
    peak = predict_gradients(
        shape, length, points * rows_per_point, slots, cotangents, source_length, checkpoint, forward
    )[0]
    point_rows = rows_per_point if point_rows is None else point_rows
    return peak + path_held(shape, length, points, attributed_rows, point_rows, source_length, extra_rows)


def path_held(
    shape: Shape,
    length: int,
    points: int,
    attributed_rows: int,
    point_rows: int,
    source_length: int = 0,
    extra_rows: int = 0,
) -> int:
    """Bytes a path method holds besides its gradient batch (see `predict_path`)."""
    row = (length + source_length) * shape.hidden * shape.bytes
    return int(row * (PATH_KEPT * attributed_rows + PATH_PER_POINT * points * point_rows + extra_rows))


def plan_points(
    model: Any,
    length: int,
    points: int,
    rows_per_point: int,
    attributed_rows: int,
    slots: int = 1,
    source_length: int = 0,
    max_memory: int | str | None = "auto",
    dtype: torch.dtype | None = None,
    checkpoint: bool | str = False,
    point_rows: int | None = None,
    shared_prefix: bool = True,
    extra_rows: int = 0,
) -> int:
    """How many path points (integrated gradients' interpolation points, each `rows_per_point` rows
    of `length` tokens through the model, for `attributed_rows` rows) one forward may carry so that
    its chunk (`predict_path`, one slot per backward) fits `max_memory`: the largest count up to
    `points`, at least 1. With `checkpoint="auto"`, checkpointed layers where not even one point
    fits without.

    plan_points(model, length=288, points=50, rows_per_point=1, attributed_rows=32, slots=32, max_memory=2**30)
    """
    check_checkpoint_layers(checkpoint)
    shape, limit = _shape_and_limit(model, dtype, max_memory)
    if limit is None:
        return max(int(points), 1)

    def peak(count: int, recompute: bool) -> int:
        return predict_path(
            shape,
            length,
            count,
            rows_per_point,
            attributed_rows,
            slots,
            1,
            source_length,
            recompute,
            point_rows,
            shared_prefix,
            extra_rows,
        )

    recompute = bool(checkpoint) if checkpoint != "auto" else peak(1, False) > limit > peak(1, True)
    low, high = 1, max(int(points), 1)
    while low < high:  # peaks grow with the points: the largest count that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if peak(middle, recompute) <= limit else (low, middle - 1)
    return low


def predict_forward(
    shape: Shape,
    length: int,
    rows: int,
    source_length: int = 0,
    reads: int = 1,
    kept: int = 0,
    eager: bool | None = None,
    embed_copies: int = 0,
) -> int:
    """Peak bytes (above the weights) of one no-grad forward of `rows` rows of `length` tokens (plus
    `source_length` on encoder-decoders) that reads the logits at `reads` positions per row and keeps
    `kept` bytes per row besides (the attention method's maps): the larger of the layers' phase (one
    layer's transients at a time, eager attention's scores; `eager`: None, the model's implementation)
    and the LM head's (the logits read, float32, and `embed_copies` copies per row of its embeddings:
    the perturbation methods give the attributed function each step's perturbed input).

        predict_forward(model_shape(model), length=1032, rows=16, reads=32)
    """
    eager = shape.eager if eager is None else eager
    b, d, i = shape.bytes, shape.hidden, shape.intermediate
    unit = rows * (length + source_length) * d * b
    squares = rows * shape.heads * (length**2 + source_length**2 + length * source_length) * b if eager else 0
    layers = unit * (NOGRAD_HIDDEN + NOGRAD_INTERMEDIATE * i / d) + NOGRAD_SCORES * squares
    head = NOGRAD_LOGITS * rows * reads * shape.vocab * 4 + (NOGRAD_HEAD_HIDDEN + embed_copies) * unit
    return int(max(layers, head) + rows * kept)


def plan_rows(
    model: Any,
    length: int,
    rows: int,
    source_length: int = 0,
    reads: int = 1,
    kept: int = 0,
    max_memory: int | str | None = "auto",
    dtype: torch.dtype | None = None,
    eager: bool | None = None,
    embed_copies: int = 0,
) -> int:
    """How many of `rows` rows one no-grad forward may carry so that its peak (`predict_forward`)
    fits `max_memory`: the largest count up to `rows`, at least 1 (all of them where the budget is
    unknown).

        plan_rows(model, length=1032, rows=32, reads=32, max_memory=2**30)   # perturbed copies per forward
    """
    shape, limit = _shape_and_limit(model, dtype, max_memory)
    rows = max(int(rows), 1)
    if limit is None:
        return rows
    per_row = predict_forward(shape, length, 1, source_length, reads, kept, eager, embed_copies)
    return max(1, min(rows, limit // max(per_row, 1)))  # the peak is linear in the rows
