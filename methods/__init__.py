"""Attribution methods of seq-instrument, one module per method or family, found through a registry.

import methods
methods.list_methods()
"""

from methods import (  # noqa: E402,F401  (registers the methods)  # noqa: E402,F401
    attention,  # noqa: E402,F401
    attnlrp,
    gradient,
    layer,
    lime,
    mixing,
    occlusion,
    path,  # noqa: E402,F401
    reagent,
    value_zeroing,
)
from methods.registry import get_method, list_methods, register  # noqa: E402

__all__ = ["get_method", "list_methods", "register"]
