"""seq-instrument: one-pass, hook-based interpretability for sequence generation models.

    >>> import instrument
    >>> with instrument.trace(model, "layers", grads=True) as t:
    ...     model(**batch).logits[0, -1].max().backward()
    >>> out = instrument.load_model(model, "saliency", tokenizer=tokenizer).attribute("Hello world")
"""
import importlib as _importlib

_methods = _importlib.import_module("methods")
if not getattr(_methods, "SEQ_INSTRUMENT_METHODS", False):
    raise ImportError(
        f"'import methods' found {getattr(_methods, '__file__', _methods)!r}, not seq-instrument's methods package; "
        "rename your own module called 'methods' or move it off sys.path"
    )

from instrument import demo, kernels  # noqa: E402
from instrument.aggregation import (  # noqa: E402
    list_aggregation_functions, list_aggregators, merge_attributions, register_aggregation_function, register_aggregator,
)
from instrument.models import AttributionModel, load_model  # noqa: E402
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId  # noqa: E402
from instrument.steps import StepFunctionArgs, list_step_functions, register_step_function  # noqa: E402
from instrument.trace import Trace, trace  # noqa: E402


def list_feature_attribution_methods() -> list:
    """Names accepted by `load_model(..., attribution_method=...)` and `attribute(method=...)`."""
    return _methods.list_methods()


__all__ = [
    "AttributionModel", "FeatureAttributionOutput", "FeatureAttributionSequenceOutput", "StepFunctionArgs",
    "TokenWithId", "Trace", "demo", "kernels", "list_aggregation_functions", "list_aggregators",
    "list_feature_attribution_methods", "list_step_functions", "load_model", "merge_attributions",
    "register_aggregation_function", "register_aggregator", "register_step_function", "trace",
]
