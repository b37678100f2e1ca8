"""The result of `instrument.evaluation.evaluate`: methods x metrics, mean with a bootstrap CI.

table = out.evaluate(model)
table.show()                       # a rich table in the console
table.to_dict()["rows"]["integrated_gradients"]["deletion_auc"]   # {"mean", "low", "high", "n"}
table.to_pandas()                  # one row per method (needs pandas)
(table_ig + table_saliency).plot("curves.png")   # mean deletion / insertion curves (needs matplotlib)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOWER_IS_BETTER = ("sufficiency", "deletion", "aer")  # metric name prefixes where a low value is faithful


@dataclass
class EvaluationTable:
    """Rows (methods) of metric columns; `values[method][column]` holds the per-unit values (generated
    tokens; examples for "aer"), `rows[method][column]` their mean and 95% CI, `curves[method]` the
    mean deletion / insertion curves on x = 0, 0.1, ..., 1, `seconds[method]` optional timings."""

    metrics: list[str]
    cutoffs: list[float] = field(default_factory=list)
    rows: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, method: str, values: dict[str, list[float]], curves=None, n_bootstrap: int = 1000, seed: int = 0):
        """Adds (or replaces) a method's row from its per-unit values."""
        self.values[method] = {k: [float(x) for x in v] for k, v in values.items()}
        self.rows[method] = {k: summarize(v, n_bootstrap, seed) for k, v in self.values[method].items()}
        self.curves[method] = dict(curves or {})

    def __add__(self, other: EvaluationTable) -> EvaluationTable:
        """The rows of both (one "random" row: the first table's); the columns of both, in order."""
        if not isinstance(other, EvaluationTable):
            return NotImplemented
        merged = EvaluationTable(
            self.metrics + [m for m in other.metrics if m not in self.metrics],
            self.cutoffs or other.cutoffs,
            info={**other.info, **self.info},
        )
        for table in (self, other):
            for method in table.rows:
                if method == "random" and method in merged.rows:
                    continue
                merged.rows[method] = table.rows[method]
                merged.values[method] = table.values[method]
                merged.curves[method] = table.curves.get(method, {})
                if method in table.seconds:
                    merged.seconds[method] = table.seconds[method]
        if "random" in merged.rows:  # last, as the reference row
            for part in (merged.rows, merged.values, merged.curves):
                part["random"] = part.pop("random")
        return merged

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: metrics, rows (mean, low, high, n per column), curves, seconds, info."""
        return {
            "metrics": list(self.metrics),
            "cutoffs": list(self.cutoffs),
            "rows": {m: {c: dict(v) for c, v in row.items()} for m, row in self.rows.items()},
            "curves": {m: dict(c) for m, c in self.curves.items()},
            "seconds": dict(self.seconds),
            "info": {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool, type(None)))},
        }

    def to_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(self.to_dict(), file, indent=1, allow_nan=True)

    def to_pandas(self):
        """A DataFrame, one row per method and one column per metric (the means), plus `<metric>_low`,
        `<metric>_high` and `seconds` where measured. Needs pandas."""
        try:
            import pandas
        except ImportError:
            raise ImportError("to_pandas needs pandas: pip install pandas") from None
        records = {}
        for method, row in self.rows.items():
            record = {}
            for column in self.metrics:
                if column in row:
                    record[column] = row[column]["mean"]
                    record[f"{column}_low"], record[f"{column}_high"] = row[column]["low"], row[column]["high"]
            if method in self.seconds:
                record["seconds"] = self.seconds[method]
            records[method] = record
        return pandas.DataFrame.from_dict(records, orient="index")

    def show(self, console: Any = None, title: str | None = None) -> None:
        """Prints the table (rich): a row per metric (the arrow says which way is faithful), a column
        per method, mean and [95% CI] per cell."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title or "Attribution evaluation: mean [95% CI]")
        table.add_column("metric")
        for method in self.rows:
            table.add_column(method, justify="right")
        for column in self.metrics:
            arrow = "↓" if column.startswith(LOWER_IS_BETTER) else "↑"
            table.add_row(f"{column} {arrow}", *[_cell(row.get(column)) for row in self.rows.values()])
        if self.seconds:
            table.add_row("seconds", *[f"{self.seconds[m]:.2f}" if m in self.seconds else "" for m in self.rows])
        (console or Console()).print(table)

    def to_markdown(self, columns: list[str] | None = None) -> str:
        """A Markdown table of the means and CIs (for READMEs)."""
        columns = columns or self.metrics
        head = ["method"] + [f"{c} {'↓' if c.startswith(LOWER_IS_BETTER) else '↑'}" for c in columns]
        if self.seconds:
            head.append("seconds")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, row in self.rows.items():
            cells = [method] + [_cell(row.get(c)) for c in columns]
            if self.seconds:
                cells.append(f"{self.seconds[method]:.2f}" if method in self.seconds else "")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path, title: str | None = None) -> None:
        """Writes a PNG of the mean deletion and insertion curves of every method. Needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("plot needs matplotlib: pip install 'seq-instrument[plots]'") from None
        kinds = [k for k in ("deletion", "insertion") if any(k in c for c in self.curves.values())]
        if not kinds:
            raise ValueError("plot: no deletion or insertion curves; evaluate with metrics 'deletion'/'insertion'")
        figure, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.2), squeeze=False)
        for axis, kind in zip(axes[0], kinds):
            for method, curves in self.curves.items():
                if kind in curves:
                    y = curves[kind]
                    x = np.linspace(0, 1, len(y))
                    style = "--" if method == "random" else "-"
                    axis.plot(x, y, style, label=method, color="grey" if method == "random" else None)
            axis.set_title(f"{kind} (AUC {'lower' if kind == 'deletion' else 'higher'} is better)", fontsize=9)
            axis.set_xlabel(f"fraction of input tokens {'removed' if kind == 'deletion' else 'kept'}")
            axis.set_ylabel("probability of the generated token")
            axis.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        if title:
            figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=80)
        plt.close(figure)


def summarize(values: list[float], n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of the finite `values` and its percentile bootstrap 95% CI (`n_bootstrap` resamples); NaN if none."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not len(finite):
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, len(finite), size=(n_bootstrap, len(finite)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(finite.mean()), "low": float(low), "high": float(high), "n": len(finite)}


def _cell(stat: dict | None) -> str:
    if stat is None or not math.isfinite(stat["mean"]):
        return "–"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"
