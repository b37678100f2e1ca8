"""Registry of attribution methods by name.

@register("saliency")
class Saliency(GradientMethod): ...
get_method("saliency")
"""

from __future__ import annotations

_METHODS: dict[str, type] = {}


def register(name: str):
    """Class decorator adding an attribution method under `name`."""

    def add(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls

    return add


def get_method(name: str) -> type:
    if name not in _METHODS:
        raise ValueError(f"Unknown attribution method {name!r}. Available: {', '.join(_METHODS)}")
    return _METHODS[name]


def list_methods() -> list[str]:
    return list(_METHODS)
