"""Attribution methods of seq-instrument, one module per family, found through a registry.

    >>> import methods
    >>> methods.list_methods()
"""
from methods import gradient, layer  # noqa: E402,F401  (registers the methods)
from methods import attention  # noqa: E402,F401
from methods import perturbation  # noqa: E402,F401
from methods import path  # noqa: E402,F401
from methods.registry import get_method, list_methods, register  # noqa: E402

__all__ = ["get_method", "list_methods", "register"]
