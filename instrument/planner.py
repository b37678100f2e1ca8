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
coefficients are counts of `hidden`- and `intermediate`-wide tensors per token and layer, measured
once on GPT-2-, Llama- and OPT-shaped blocks (tests/test_planner.py checks them against the
profiler within 20%). Quantized weights (8-/4-bit) change the weights, not the activations: they
are counted at the compute dtype.

`max_memory`: bytes, or "auto" (the default: what the model's devices have free now, less
`instrument.batching.SAFETY_MARGIN`). An out-of-memory error still halves the chunks, and that
cap holds for the rest of the call (`instrument.batching.AutoState.cotangent_cap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Plan",
    "Shape",
    "budget",
    "check_max_memory",
    "model_shape",
    "plan_gradients",
    "plan_forward",
    "predict_gradients",
]

# Per token and layer, in elements: the forward graph saved for an input-gradient backward, and the
# buffers of one slot's batched backward (measured, see the module docstring).
GRAPH_HIDDEN, GRAPH_INTERMEDIATE = 9.0, 3.0
SLOT_HIDDEN, SLOT_INTERMEDIATE = 8.0, 2.0
# Eager attention: score matrices kept per layer in the graph, and live in one slot's backward.
GRAPH_SCORES, SLOT_SCORES = 2.0, 3.0
# A forward without gradients: what one layer holds at once, per token.
FORWARD_HIDDEN, FORWARD_INTERMEDIATE, FORWARD_SCORES = 6.0, 2.0, 2.0


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
        dtype = floating[0] if floating else _get(config, "dtype", "torch_dtype", default=torch.float32)
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
        attention=str(_get(config, "_attn_implementation", default="eager") or "eager"),
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

    def describe(self) -> str:
        gib = 2**30
        limit = "unbounded" if self.budget is None else f"{self.budget / gib:.3f} GiB"
        return (
            f"predicted peak {self.peak / gib:.3f} GiB (graph {self.graph / gib:.3f} GiB, "
            f"{self.per_slot / gib:.4f} GiB per slot, inputs and results {self.fixed / gib:.3f} GiB); "
            f"{self.cotangents} of {self.slots} slots per batched backward; budget {limit}"
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


def predict_gradients(
    shape: Shape, length: int, rows: int = 1, slots: int = 1, cotangents: int = 1, source_length: int = 0
):
    """(peak, graph, per slot, fixed) bytes of one shared-prefix gradient batch: `rows` full rows of
    `length` tokens (plus `source_length` on encoder-decoders), `slots` read per row, `cotangents`
    of them per batched backward."""
    b, d, i = shape.bytes, shape.hidden, shape.intermediate
    tokens = rows * (length + source_length)
    layers = shape.layers + shape.encoder_layers

    def scores(kind: float) -> float:
        if not shape.eager:
            return 0.0
        squares = rows * (length**2 + source_length**2 + length * source_length)
        return kind * shape.heads * squares * b

    graph = layers * (tokens * b * (GRAPH_HIDDEN * d + GRAPH_INTERMEDIATE * i) + scores(GRAPH_SCORES))
    per_slot = tokens * b * (SLOT_HIDDEN * d + SLOT_INTERMEDIATE * i) + scores(SLOT_SCORES)
    # Each slot's input gradient is kept until the last backward, and read off once more per row.
    fixed = 3 * slots * tokens * d * 4 + 4 * tokens * d * b
    peak = graph + cotangents * per_slot + fixed
    return int(peak), int(graph), int(per_slot), int(fixed)


def plan_gradients(
    model: Any,
    length: int,
    slots: int,
    rows: int = 1,
    source_length: int = 0,
    max_memory: int | str | None = "auto",
    dtype: torch.dtype | None = None,
) -> Plan:
    """How many slots each batched backward carries so that the batch fits `max_memory`.

    plan_gradients(model, length=1032, slots=32, max_memory=2**31).cotangents
    """
    shape = model if isinstance(model, Shape) else model_shape(model, dtype)
    limit = budget(max_memory, None if isinstance(model, Shape) else model)
    _, graph, per_slot, fixed = predict_gradients(shape, length, rows, slots, 1, source_length)
    slots = max(int(slots), 1)
    if limit is None:
        chosen = slots
    else:
        chosen = int(max(0, limit - graph - fixed) // max(per_slot, 1))
    fits = chosen >= 1 or limit is None
    chosen = max(1, min(chosen, slots))
    peak = graph + chosen * per_slot + fixed
    return Plan(int(peak), graph, per_slot, fixed, chosen, slots, limit, fits)


def plan_forward(shape: Shape, length: int, rows: int = 1) -> int:
    """Peak bytes of a forward without gradients (attention and perturbation methods stream
    these): one layer's activations at a time, and its scores under eager attention."""
    b, d, i = shape.bytes, shape.hidden, shape.intermediate
    peak = rows * length * b * (FORWARD_HIDDEN * d + FORWARD_INTERMEDIATE * i)
    if shape.eager:
        peak += FORWARD_SCORES * rows * shape.heads * length**2 * b
    return int(peak)


def rows_that_fit(per_row: float, limit: int | None, total: int) -> int:
    """How many rows of `per_row` bytes fit in `limit` (all when unknown), at least one."""
    if limit is None or per_row <= 0:
        return total
    return max(1, min(total, math.floor(limit / per_row)))
