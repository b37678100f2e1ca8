"""What `attribute_context` returns: the context-sensitive tokens and their contextual cues, in Inseq's JSON.

out = instrument.attribute_context(model, input_current_text="...", input_context_text="...")
out.show()                        # generated text, context-sensitive tokens highlighted, cues under each
out.save("pecore.json")           # Inseq's `attribute-context` JSON keys
out.save_html("pecore.html")
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

INSEQ_KEYS = (
    "input_context",
    "input_context_tokens",
    "output_context",
    "output_context_tokens",
    "output_current",
    "output_current_tokens",
    "cti_scores",
    "cci_scores",
)


@dataclass
class CCIOutput:
    """One context-sensitive token (`cti_idx` in `output_current_tokens`) and its contextual cues:
    one score per input / output context token (None where there is no such context)."""

    cti_idx: int
    cti_token: str
    cti_score: float
    contextual_output: str
    contrast_token: str | None = None
    contextless_output: str | None = None
    input_context_scores: list[float] | None = None
    output_context_scores: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AttributeContextOutput:
    """PECoRe's result for one example. `to_dict()` has Inseq 0.7.1's keys (`info`: the settings)."""

    input_context: str | None = None
    input_context_tokens: list[str] | None = None
    output_context: str | None = None
    output_context_tokens: list[str] | None = None
    output_current: str | None = None
    output_current_tokens: list[str] | None = None
    cti_scores: list[float] | None = None
    cci_scores: list[CCIOutput] = field(default_factory=list)
    info: dict[str, Any] | None = None
    cti_threshold: float | None = None  # not saved (Inseq recomputes it from the scores and info)

    def to_dict(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in INSEQ_KEYS if key != "cci_scores"}
        out["cci_scores"] = [cci.to_dict() for cci in self.cci_scores]
        if self.info is not None:
            out["info"] = dict(self.info)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttributeContextOutput:
        """The inverse of `to_dict` (also reads Inseq's files)."""
        missing = [key for key in INSEQ_KEYS if key not in data]
        if missing:
            raise ValueError(f"Not an attribute-context output: missing key(s) {missing}")
        values = {key: data[key] for key in INSEQ_KEYS if key != "cci_scores"}
        return cls(**values, cci_scores=[CCIOutput(**c) for c in data["cci_scores"]], info=data.get("info"))

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Writes `to_dict()` as JSON (indent 4, as Inseq)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass overwrite=True to replace it")
        path.write_text(json.dumps(self.to_dict(), indent=4), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> AttributeContextOutput:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def selected(self) -> list[int]:
        """Indices (in `output_current_tokens`) of the context-sensitive tokens."""
        return [cci.cti_idx for cci in self.cci_scores]

    def top_cues(self, cci: CCIOutput, k: int = 3) -> list[tuple[str, int, str, float]]:
        """The `k` highest-scoring context tokens of one selected token: (side, index, token, score)."""
        cues = []
        for side, tokens, scores in (
            ("input", self.input_context_tokens, cci.input_context_scores),
            ("output", self.output_context_tokens, cci.output_context_scores),
        ):
            if tokens and scores:
                cues += [(side, i, tokens[i], float(s)) for i, s in enumerate(scores)]
        return sorted(cues, key=lambda cue: -cue[3])[:k]

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text

        info = self.info or {}
        header = Text.assemble(
            ("Context-sensitive tokens", "bold dodger_blue1"),
            f" (CTI: {info.get('context_sensitivity_metric', '?')}",
            f", threshold {self.cti_threshold:.4g})" if self.cti_threshold is not None else ")",
            " and their ",
            ("contextual cues", "bold green"),
            f" (CCI: {info.get('attribution_method', '?')} of {info.get('attributed_fn') or 'probability'})",
        )
        parts = [header]
        if self.input_context is not None:
            parts.append(Text.assemble(("Input context: ", "bold"), self.input_context))
        if info.get("input_current_text"):
            parts.append(Text.assemble(("Input current: ", "bold"), info["input_current_text"]))
        if self.output_context is not None:
            parts.append(Text.assemble(("Output context: ", "bold"), self.output_context))
        every = (
            (self.output_current_tokens or []) + (self.input_context_tokens or []) + (self.output_context_tokens or [])
        )
        gap = "" if any(t.startswith(("Ġ", "▁")) for t in every) else " "  # word-level tokenizers mark no spaces
        current = [_readable(t) for t in self.output_current_tokens or []]
        parts.append(Text.assemble(("Output current: ", "bold"), gap.join(current)))
        if not self.cci_scores:
            parts.append(Text("No context-sensitive token above the threshold.", style="italic"))
        for n, cci in enumerate(self.cci_scores, start=1):
            line = Text(f"#{n}. ", style="bold")
            for i, token in enumerate(current):
                line.append(
                    (f"{token}({cci.cti_score:.3f})" if i == cci.cti_idx else token) + gap,
                    style="bold dodger_blue1" if i == cci.cti_idx else "",
                )
            if cci.contrast_token is not None and cci.contrast_token != cci.cti_token:
                line.append(
                    f"   (without context: {_readable(cci.contrast_token).strip() or cci.contrast_token!r})", "italic"
                )
            parts.append(line)
            scores = (cci.input_context_scores or []) + (cci.output_context_scores or [])
            ranked, threshold = filter_rank(
                scores, info.get("attribution_std_threshold", 1.0), info.get("attribution_topk")
            )
            cues = {i: score for i, score in ranked}
            offset = 0
            for label, tokens, side in (
                ("Input context", self.input_context_tokens, cci.input_context_scores),
                ("Output context", self.output_context_tokens, cci.output_context_scores),
            ):
                if not tokens or side is None:
                    continue
                line = Text(f"   {label} (CCI > {threshold:.3g}): ", style="bold")
                for i, token in enumerate(tokens):
                    score = cues.get(offset + i)
                    line.append(
                        _readable(token) + (f"({score:.3g})" if score is not None else "") + gap,
                        style="bold green" if score is not None else "",
                    )
                offset += len(side)
                parts.append(line)
        return Group(*parts)

    def show(self, console=None) -> None:
        """Prints the generated text with the context-sensitive tokens highlighted and, under each, its top cues."""
        from rich.console import Console

        (console or Console()).print(self)

    def to_html(self) -> str:
        """The console view as a standalone HTML page."""
        from rich.console import Console

        console = Console(record=True, width=120, file=io.StringIO())
        console.print(self)
        return console.export_html()

    def save_html(self, path: str | Path, overwrite: bool = False) -> None:
        path = Path(path)
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass overwrite=True to replace it")
        path.write_text(self.to_html(), encoding="utf-8")


def _readable(token: str) -> str:
    return token.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ")


def scores_threshold(scores: list[float], std_weight: float | None) -> float:
    """Inseq's selection threshold: mean + std_weight * std (unbiased), in float32; the mean for one score."""
    if std_weight is None or not scores:
        return 0.0
    values = torch.tensor(scores)
    if std_weight == 0 or len(scores) == 1:
        return float(values.mean())
    return float(values.mean() + std_weight * values.std())


def filter_rank(
    scores: list[float], std_threshold: float | None, topk: int | None
) -> tuple[list[tuple[int, float]], float]:
    """Indices and scores with |score| >= the threshold, largest |score| first, at most `topk` (Inseq's rule)."""
    threshold = torch.tensor(scores_threshold(scores, std_threshold))
    ranked = sorted(enumerate(scores), key=lambda pair: abs(pair[1]), reverse=True)
    kept = [(i, s) for i, s in ranked if bool(torch.tensor(abs(s)) >= threshold)]
    return (kept[:topk] if topk else kept), float(threshold)
