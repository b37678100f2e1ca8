"""Which 2-D sequences a view shows: the sequences of what it was given, aggregated as asked.

sequences_of(out)                         # [seq0, seq1, ...] (a single sequence: [seq])
prepared(out, aggregate=True)             # each aggregated with its default pipeline, then "scores"
prepared(out, aggregate="subwords")       # "subwords", then "scores" while more than 2-D
"""

from __future__ import annotations

from instrument.aggregation import aggregate_sequence
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput
from instrument.sequence_fields import TENSOR_FIELDS


def sequences_of(obj) -> list[FeatureAttributionSequenceOutput]:
    """The sequences of an output, or `[obj]` for one sequence; TypeError for anything else."""
    if isinstance(obj, FeatureAttributionOutput):
        return list(obj.sequence_attributions)
    if isinstance(obj, FeatureAttributionSequenceOutput):
        return [obj]
    raise TypeError(
        f"Expected a FeatureAttributionOutput or FeatureAttributionSequenceOutput, got {type(obj).__name__}"
    )


def flattened_sequences(attributions) -> list[FeatureAttributionSequenceOutput]:
    """`sequences_of`, also for a list or tuple of outputs and sequences (Inseq's functions take those)."""
    if isinstance(attributions, (list, tuple)):
        return [seq for item in attributions for seq in sequences_of(item)]
    return sequences_of(attributions)


def prepared(obj, aggregate: bool | str | list, **aggregate_kwargs) -> list[FeatureAttributionSequenceOutput]:
    """The sequences to show: as they are, or aggregated, then reduced to 2-D with "scores" if needed."""
    sequences = sequences_of(obj)
    if aggregate is False:
        return sequences
    if aggregate is True:
        return [default_view(seq, **aggregate_kwargs) for seq in sequences]
    sequences = [aggregate_sequence(seq, aggregate, **aggregate_kwargs) for seq in sequences]
    return [
        aggregate_sequence(seq, "scores", keep_layers=False) if attribution_dims(seq) > 2 else seq for seq in sequences
    ]


def default_view(seq: FeatureAttributionSequenceOutput, **aggregate_kwargs) -> FeatureAttributionSequenceOutput:
    """ "scores" over every extra dimension, or the sequence's own default pipeline when it has one
    (`weight_attributions` leaves an empty one: already 2-D, shown as it is)."""
    if seq._aggregator is None:
        return aggregate_sequence(seq, "scores", keep_layers=False, **aggregate_kwargs)
    seq = aggregate_sequence(seq, seq._aggregator, **aggregate_kwargs)
    return aggregate_sequence(seq, "scores", keep_layers=False) if attribution_dims(seq) > 2 else seq


def attribution_dims(seq: FeatureAttributionSequenceOutput) -> int:
    """The number of dimensions of the attribution tensors (2 when there are none)."""
    tensors = [getattr(seq, name) for name in TENSOR_FIELDS]
    return max((t.dim() for t in tensors if t is not None), default=2)
