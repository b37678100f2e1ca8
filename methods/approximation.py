"""Integration rules for path methods: points `alphas` in [0, 1] and their `weights`.

alphas, weights = approximation("riemann_trapezoid", 5)
"""

from __future__ import annotations

import numpy as np

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def approximation(rule: str, n_steps: int) -> tuple[list[float], list[float]]:
    """`(alphas, weights)` approximating the integral over [0, 1] as Captum does."""
    if n_steps < 1 or (rule == "riemann_trapezoid" and n_steps < 2):
        raise ValueError(
            f"n_steps must be at least {2 if rule == 'riemann_trapezoid' else 1} for {rule}, got {n_steps}"
        )
    if rule == "gausslegendre":
        nodes, node_weights = np.polynomial.legendre.leggauss(n_steps)
        return list(0.5 * (nodes + 1)), list(0.5 * node_weights)
    if rule == "riemann_left":
        return list(np.linspace(0, 1 - 1 / n_steps, n_steps)), [1 / n_steps] * n_steps
    if rule == "riemann_right":
        return list(np.linspace(1 / n_steps, 1, n_steps)), [1 / n_steps] * n_steps
    if rule == "riemann_middle":
        return list(np.linspace(1 / (2 * n_steps), 1 - 1 / (2 * n_steps), n_steps)), [1 / n_steps] * n_steps
    if rule == "riemann_trapezoid":
        # Captum's weights (1/n inside, 1/2n at the ends: they sum to (n-1)/n), kept so that results
        # equal Captum's and Inseq's number for number.
        return list(np.linspace(0, 1, n_steps)), [0.5 / n_steps] + [1 / n_steps] * (n_steps - 2) + [0.5 / n_steps]
    raise ValueError(f"Unknown approximation_method (integration rule) {rule!r}; use one of {', '.join(RULES)}")
