"""How one score or one token is written in a view.

format_score(0.25), format_score(1.5e-05), format_score(float("nan"))   # "0.250", "1.50e-05", ""
token_label("a\\nb")                                                      # "a\\\\nb": one line
exact(0.1, torch.float16)                                                 # "0.1" (read back as float16)
"""

from __future__ import annotations

import math

import numpy as np
import torch


def token_label(token: str) -> str:
    """`token_label("a\\nb") == "a\\\\nb"`: the token on one line, control characters escaped."""
    out = []
    for char in token:
        if char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out) or "''"


def format_score(value: float) -> str:
    """`format_score(0.25) == "0.250"`, `format_score(1.5e-05) == "1.50e-05"`, NaN is ""."""
    if math.isnan(value):
        return ""
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3f}"
    return f"{value:.2e}"


def exact(value: float, dtype: torch.dtype) -> str:
    """The shortest string that reads back as the same value of `dtype` (used in HTML titles)."""
    kind = {torch.float16: np.float16, torch.float64: np.float64}.get(dtype, np.float32)
    return str(kind(value)) if not math.isnan(value) else "nan"
