"""Attribution methods of seq-instrument, one module per method or family, found through a registry.

    >>> import methods
    >>> methods.list_methods()
"""
from methods import gradient, layer  # noqa: E402,F401  (registers the methods)
from methods import attention  # noqa: E402,F401
from methods import occlusion, value_zeroing, lime, reagent  # noqa: E402,F401
from methods import path  # noqa: E402,F401
from methods.registry import get_method, list_methods, register  # noqa: E402

__all__ = ["get_method", "list_methods", "register"]
