"""Aggregation: the registry of aggregators, pipelines of them as Inseq spells them, and the entry
points `seq.aggregate` and `out.aggregate` call.

    aggregate_sequence(seq, ["subwords", "scores"], ["absmax", "vnorm"])
    aggregate_output(out, "vnorm")                          # "scores" with the L2 norm
    register_aggregator(lambda seq, aggregate_fn: seq, "identity")
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable

from instrument.aggregators import difference, pair, scores, slices, spans, split, subwords
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, copy_replace
from instrument.reductions import get_aggregation_function, list_aggregation_functions


@dataclass(frozen=True)
class Aggregator:
    name: str
    fn: Callable[..., FeatureAttributionSequenceOutput]
    default_fn: Any
    params: tuple[str, ...]


_AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(
    fn: Callable[..., FeatureAttributionSequenceOutput], name: str, default_fn: Any = None, overwrite: bool = False
) -> None:
    """Make `fn(seq, aggregate_fn, **options) -> FeatureAttributionSequenceOutput` usable as `aggregator=name`.

    register_aggregator(lambda seq, aggregate_fn: seq, "identity")
    """
    if name in _AGGREGATORS and not overwrite:
        raise ValueError(f"Aggregator {name!r} exists already; pass overwrite=True to replace it")
    params = tuple(list(inspect.signature(fn).parameters)[2:])
    _AGGREGATORS[name] = Aggregator(name, fn, default_fn, params)


for _fn, _default in [
    (scores, "vnorm"),
    (spans, "absmax"),
    (subwords, "absmax"),
    (split, "absmax"),
    (slices, None),
    (pair, difference),
]:
    register_aggregator(_fn, _fn.__name__, _default)


def list_aggregators() -> list[str]:
    """Names accepted as `aggregator`: `["scores", "spans", "subwords", "split", "slices", "pair"]` and registered
    ones."""
    return list(_AGGREGATORS)


def get_aggregator(name: str) -> Aggregator:
    """`get_aggregator("subwords").fn` is `subwords`; unknown names raise ValueError."""
    if name not in _AGGREGATORS:
        raise ValueError(f"Unknown aggregator {name!r}. Available: {', '.join(_AGGREGATORS)}")
    return _AGGREGATORS[name]


def _pipeline(aggregator, aggregate_fn) -> list[tuple[Aggregator, Any]]:
    """The (aggregator, function) stages of `aggregator`, spelled as Inseq takes it.

    An aggregation function's name stands for "scores" with that function (`"vnorm"`); a list mixes
    both (`["vnorm", "subwords"]`) or holds `(aggregator, function)` pairs (`[("scores", "sum")]`).
    """
    names = ["scores"] if aggregator is None else [aggregator] if isinstance(aggregator, str) else list(aggregator)
    if not names:
        raise ValueError("aggregator is an empty list")
    if isinstance(aggregator, str) and isinstance(aggregate_fn, (list, tuple)):
        raise ValueError("With a single aggregator, aggregate_fn must be a single function (or its name), not a list")
    if isinstance(aggregate_fn, (list, tuple)):
        if len(aggregate_fn) != len(names):
            raise ValueError(
                f"{len(aggregate_fn)} aggregate functions for {len(names)} aggregators {names}; give one per aggregator"
            )
        fns = list(aggregate_fn)
    else:
        fns = [aggregate_fn] * len(names)
    stages = []
    for name, fn in zip(names, fns):
        if isinstance(name, (list, tuple)):
            if len(name) != 2 or fn is not None:
                raise ValueError(
                    f"Pipeline stages are aggregator names or (aggregator, aggregate_fn) pairs, got {name!r}"
                    + (" together with aggregate_fn" if fn is not None else "")
                )
            name, fn = name
        if not isinstance(name, str):
            raise TypeError(f"Aggregators are given by name, got {type(name).__name__}")
        if name not in _AGGREGATORS and name in list_aggregation_functions():
            if fn is not None:
                raise ValueError(
                    f'{name!r} is an aggregation function used as aggregator ("scores" with {name!r}); '
                    "do not pass aggregate_fn with it"
                )
            name, fn = "scores", name
        if name not in _AGGREGATORS:
            raise ValueError(
                f"Unknown aggregator {name!r}. Available: {', '.join(_AGGREGATORS)}; "
                f'or an aggregation function for "scores": {", ".join(list_aggregation_functions())}'
            )
        agg = _AGGREGATORS[name]
        fn = agg.default_fn if fn is None else fn
        if name == "pair" and isinstance(fn, str):
            raise ValueError("The pair aggregator takes a function of two tensors, e.g. lambda a, b: b - a")
        stages.append((agg, fn if name in ("pair", "slices") or fn is None else get_aggregation_function(fn)))
    return stages


def accepts(aggregator, option: str) -> bool:
    """Whether some aggregator of the pipeline `aggregator` takes keyword `option`."""
    if isinstance(aggregator, (list, tuple)) and not aggregator:
        return False
    return any(option in agg.params for agg, _ in _pipeline(aggregator, None))


# Options every aggregator takes, as Inseq passes them down a pipeline; only "scores" uses them.
SHARED_OPTIONS = ("normalize", "rescale")


def aggregate_sequence(seq: FeatureAttributionSequenceOutput, aggregator=None, aggregate_fn=None, **kwargs):
    """`aggregate_sequence(seq, ["subwords", "scores"], ["absmax", "vnorm"])`: the aggregators in order."""
    if aggregator is None:
        aggregator = getattr(seq, "_aggregator", None)
    if isinstance(aggregator, (list, tuple)) and not aggregator and aggregate_fn is None:
        return copy_replace(seq)  # an empty pipeline, as left by `weight_attributions`: nothing to do
    stages = _pipeline(aggregator, aggregate_fn)
    if kwargs.get("normalize") and kwargs.get("rescale"):
        raise ValueError("Pass either normalize=True or rescale=True, not both")
    unknown = set(kwargs) - {p for agg, _ in stages for p in agg.params} - set(SHARED_OPTIONS)
    if unknown:
        raise TypeError(f"Unknown option(s) {sorted(unknown)} for aggregator(s) {[agg.name for agg, _ in stages]}")
    for agg, fn in stages:
        seq = agg.fn(seq, fn, **{k: v for k, v in kwargs.items() if k in agg.params})
    return seq


def aggregate_output(
    out: FeatureAttributionOutput, aggregator=None, aggregate_fn=None, **kwargs
) -> FeatureAttributionOutput:
    """`aggregate_output(out, "subwords")`: every sequence aggregated; `paired_attr` may be a whole output."""
    if "logprob" not in kwargs and accepts(aggregator, "logprob"):
        kwargs["logprob"] = bool((out.info.get("step_scores_args") or {}).get("logprob", False))
    paired = kwargs.pop("paired_attr", None)
    if isinstance(paired, FeatureAttributionOutput):
        if len(paired) != len(out):
            raise ValueError(f"Cannot pair {len(out)} sequences with {len(paired)}: give outputs of the same length")
        pairs = paired.sequence_attributions
    else:
        pairs = [paired] * len(out)
    sequences = [
        aggregate_sequence(seq, aggregator, aggregate_fn, **kwargs, **({} if other is None else {"paired_attr": other}))
        for seq, other in zip(out.sequence_attributions, pairs)
    ]
    return replace(out, sequence_attributions=sequences, info=dict(out.info))
