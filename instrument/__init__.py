"""seq-instrument: one-pass, hook-based interpretability for sequence generation models.

    >>> import instrument
    >>> with instrument.trace(model, "layers", grads=True) as t:
    ...     model(**batch).logits[0, -1].max().backward()
"""
from instrument.trace import Trace, trace

__all__ = ["Trace", "trace"]
