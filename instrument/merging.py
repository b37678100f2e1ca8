"""Merging outputs: the sequences of several `FeatureAttributionOutput`s in one, with merged `info`.

merged = merge_attributions([out1, out2])   # also written out1 + out2
len(merged) == len(out1) + len(out2)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from instrument.outputs import RUNTIME_INFO, FeatureAttributionOutput

PER_EXAMPLE_INFO = ("input_texts", "generated_texts")  # one entry per sequence: concatenated when merging


def merge_attributions(outputs: Sequence[FeatureAttributionOutput]) -> FeatureAttributionOutput:
    """`merge_attributions([out1, out2])`: all their sequences, in order, with merged `info`.

    In `info`, per-example lists (`input_texts`, `generated_texts`) are concatenated, `exec_time` is
    summed, values equal in all outputs are kept, and any other key (e.g. `step_scores` when the outputs
    computed different ones) gets the list of per-output values, None where an output lacks the key.
    """
    outputs = list(outputs)
    if not outputs:
        raise ValueError("merge_attributions needs at least one FeatureAttributionOutput")
    for item in outputs:
        if not isinstance(item, FeatureAttributionOutput):
            raise TypeError(f"merge_attributions takes FeatureAttributionOutput objects, got {type(item).__name__}")
    info: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for item in outputs for k in item.info))
    for key in keys:
        values = [item.info.get(key) for item in outputs]
        present = [key in item.info for item in outputs]
        if key in PER_EXAMPLE_INFO and all(present) and all(isinstance(v, list) for v in values):
            info[key] = [x for v in values for x in v]
        elif key in RUNTIME_INFO and all(isinstance(v, (int, float)) for v in values):
            info[key] = sum(values)
        elif all(present) and all(_same(v, values[0]) for v in values):
            info[key] = values[0]
        else:
            info[key] = values
    steps = [item.step_attributions for item in outputs]
    step_attributions = (
        None
        if all(s is None for s in steps)
        else ([x for s in steps for x in s] if all(isinstance(s, list) for s in steps) else steps)
    )
    return FeatureAttributionOutput(
        [s for item in outputs for s in item.sequence_attributions], step_attributions, info
    )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else isinstance(b, torch.Tensor) and torch.equal(a, b)
    except Exception:
        return a is b
