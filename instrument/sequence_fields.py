"""The fields of `FeatureAttributionSequenceOutput` grouped by kind, read from the dataclass itself.

    from instrument.sequence_fields import TENSOR_FIELDS, DICT_FIELDS
    TENSOR_FIELDS, DICT_FIELDS   # ("source_attributions", "target_attributions"), ("step_scores", "sequence_scores")
    [getattr(seq, name) for name in TENSOR_FIELDS]

Saving, loading, equality and the views loop over these groups, so a field added to the dataclass
is saved, compared and checked without a second list to update. Private fields (`_aggregator`) are
in no group.
"""

from __future__ import annotations

import typing
from dataclasses import fields

import torch

from instrument.outputs import FeatureAttributionSequenceOutput, TokenWithId

_HINTS = typing.get_type_hints(FeatureAttributionSequenceOutput)
PUBLIC_FIELDS = tuple(f.name for f in fields(FeatureAttributionSequenceOutput) if not f.name.startswith("_"))
TOKEN_FIELDS = tuple(name for name in PUBLIC_FIELDS if _HINTS[name] == list[TokenWithId])
TENSOR_FIELDS = tuple(name for name in PUBLIC_FIELDS if _HINTS[name] == torch.Tensor | None)
DICT_FIELDS = tuple(name for name in PUBLIC_FIELDS if typing.get_origin(_HINTS[name]) is dict)
POSITION_FIELDS = tuple(name for name in PUBLIC_FIELDS if _HINTS[name] is int)

if set(PUBLIC_FIELDS) != {*TOKEN_FIELDS, *TENSOR_FIELDS, *DICT_FIELDS, *POSITION_FIELDS}:
    raise TypeError(f"FeatureAttributionSequenceOutput has fields of a kind not grouped here: {PUBLIC_FIELDS}")
