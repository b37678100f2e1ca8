"""The colour scales of the views: diverging red/blue for attributions, green/amber for step-score highlights.

colour(0.5, scale=1.0)               # (238, 146, 146): halfway from white to red
colour(float("nan"), 1.0)            # None: the cell stays blank
text_colour((220, 38, 38))           # "white" on a dark background
bounds_scale(-2.0, 1.0)              # 2.0: colours saturate at the larger magnitude
"""

from __future__ import annotations

import math
from collections.abc import Iterable

POSITIVE, NEGATIVE, WHITE = (220, 38, 38), (37, 99, 235), (255, 255, 255)
HIGHLIGHT_POSITIVE, HIGHLIGHT_NEGATIVE = (22, 163, 74), (180, 83, 9)


def _blend(value: float, scale: float, positive: tuple, negative: tuple) -> tuple[int, int, int] | None:
    if math.isnan(value) or scale <= 0:
        return None
    strength = min(abs(value) / scale, 1.0)
    end = positive if value >= 0 else negative
    return tuple(round(w + (e - w) * strength) for w, e in zip(WHITE, end))


def colour(value: float, scale: float) -> tuple[int, int, int] | None:
    """Background for `value`: white to red (positive) or blue (negative) by `|value| / scale`."""
    return _blend(value, scale, POSITIVE, NEGATIVE)


def highlight_colour(value: float, scale: float) -> tuple[int, int, int] | None:
    """Background of a generated token highlighted by a step score: white to green (positive) or amber."""
    return _blend(value, scale, HIGHLIGHT_POSITIVE, HIGHLIGHT_NEGATIVE)


def text_colour(background: tuple[int, int, int] | None) -> str:
    """ "white" on dark backgrounds, else "black" (by perceived luminance)."""
    if background is None:
        return "black"
    red, green, blue = background
    return "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 140 else "black"


def largest_magnitude(values: Iterable[float]) -> float:
    """The scale that fits `values`: their largest finite magnitude (0 when there is none)."""
    return max((abs(x) for x in values if math.isfinite(x)), default=0.0)


def bounds_scale(min_val: float | None, max_val: float | None) -> float | None:
    """The colour scale for explicit bounds: colours saturate at the larger magnitude of the two."""
    if min_val is None and max_val is None:
        return None
    return max(abs(min_val or 0.0), abs(max_val or 0.0))
