"""seq-instrument: one-pass, hook-based interpretability for sequence generation models.

import instrument
with instrument.trace(model, "layers", grads=True) as t:
    model(**batch).logits[0, -1].max().backward()
out = instrument.load_model(model, "saliency", tokenizer=tokenizer).attribute("Hello world")
"""

import inspect as _inspect
from pathlib import Path as _Path

import methods as _methods

if _Path(getattr(_methods, "__file__", None) or "").resolve().parent.parent != _Path(__file__).resolve().parent.parent:
    raise ImportError(
        f"'import methods' found {getattr(_methods, '__file__', _methods)!r}, not seq-instrument's methods package "
        "(installed beside instrument); rename your own module called 'methods' or move it off sys.path"
    )

from instrument import demo, kernels, patching  # noqa: E402
from instrument.aggregation import get_aggregator, list_aggregators, register_aggregator  # noqa: E402
from instrument.context.ablation import attribute_context_ablation  # noqa: E402
from instrument.context.pecore import attribute_context  # noqa: E402
from instrument.evaluation import evaluate  # noqa: E402
from instrument.evaluation_table import EvaluationTable  # noqa: E402
from instrument.files.shards import open_attributions  # noqa: E402
from instrument.merging import merge_attributions  # noqa: E402
from instrument.models import AttributionModel, load_model  # noqa: E402
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId  # noqa: E402
from instrument.readouts import logit_lens  # noqa: E402
from instrument.reductions import (  # noqa: E402
    get_aggregation_function,
    list_aggregation_functions,
    register_aggregation_function,
)
from instrument.selection import register_model_config  # noqa: E402
from instrument.steps import StepFunctionArgs, get_step_function, list_step_functions, register_step_function  # noqa: E402
from instrument.trace import Trace, trace  # noqa: E402
from instrument.views.inseq_functions import (  # noqa: E402
    show_attributions,
    show_granular_attributions,
    show_token_attributions,
)


def list_feature_attribution_methods() -> list:
    """Names accepted by `load_model(..., attribution_method=...)` and `attribute(method=...)`."""
    return _methods.list_methods()


def explain(id: str) -> None:
    """`explain("saliency")` prints what an identifier means: an attribution method, an aggregator, an
    aggregation function or a step function (as Inseq's `explain`). Unknown identifiers raise ValueError."""
    found = []
    if id in _methods.list_methods():
        found.append(("attribution method", _methods.get_method(id)))
    if id in list_aggregators():
        found.append(("aggregator", get_aggregator(id).fn))
    if id in list_aggregation_functions():
        found.append(("aggregation function", get_aggregation_function(id)))
    if id in list_step_functions():
        found.append(("step function", get_step_function(id).fn))
    if not found:
        raise ValueError(
            f"Unknown identifier {id!r}: not an attribution method, aggregator, aggregation function "
            "or step function (see list_feature_attribution_methods(), list_aggregators(), "
            "list_aggregation_functions(), list_step_functions())"
        )
    for kind, obj in found:
        doc = _inspect.getdoc(obj)
        print(f"{id} ({kind}): {doc}" if doc else f"{id} ({kind}): no description is available.")


__all__ = [
    "AttributionModel",
    "EvaluationTable",
    "FeatureAttributionOutput",
    "FeatureAttributionSequenceOutput",
    "StepFunctionArgs",
    "TokenWithId",
    "Trace",
    "attribute_context",
    "attribute_context_ablation",
    "demo",
    "evaluate",
    "explain",
    "kernels",
    "list_aggregation_functions",
    "list_aggregators",
    "list_feature_attribution_methods",
    "list_step_functions",
    "load_model",
    "logit_lens",
    "merge_attributions",
    "open_attributions",
    "patching",
    "register_aggregation_function",
    "register_aggregator",
    "register_model_config",
    "register_step_function",
    "show_attributions",
    "show_granular_attributions",
    "show_token_attributions",
    "trace",
]
