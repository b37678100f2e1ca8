"""One `attribute()` call's work: the method, the attributed function, the step scorers and the
examples, attributed batch of rows after batch of rows into an accumulator.

    run = AttributionRun(engine, examples, method, get_step_function("probability"), {}, {}, True)
    run.attribute_all(batch_size="auto")              # or run.attribute_rows([(0, 3), (1, 2)])
    sequences = run.collected.sequences(tokens)

`AttributionModel.attribute` builds it and hands `attribute_rows` to `instrument.batching.run_rows`
(memory-aware chunks, retried on out-of-memory errors), or calls it on fixed batches of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import Progress

from instrument import batching
from instrument.accumulator import Accumulator
from instrument.engine import Engine
from instrument.models import inseq_options
from instrument.rows import Example, Rows
from instrument.steps import StepFunction, score_rows
from methods.base import AttributionMethod, Request


@dataclass
class AttributionRun:
    """The arguments of one attribution, and `collected`: what has been attributed so far."""

    engine: Engine
    examples: list[Example]
    method: AttributionMethod
    attributed_fn: StepFunction
    scorers: dict[str, StepFunction]
    step_kwargs: dict[str, Any]
    attribute_target: bool
    max_memory: int | str = "auto"  # the planner's budget per batch (`instrument.planner.budget`)
    checkpoint_layers: bool | str = "auto"  # `Request.checkpoint_layers`
    collected: Accumulator = field(init=False)

    def __post_init__(self):
        self.collected = Accumulator(self.examples)

    def attribute_all(
        self, batch_size: int | str, *, reference: bool = False, show_progress: bool = True, label: str = ""
    ) -> None:
        """Attributes every row: in memory-aware chunks when `batch_size` or the method's
        `internal_batch_size` is "auto", else `batch_size` examples at a time (`reference`: one
        row at a time, one prefix forward per step and example, as Inseq)."""
        examples = self.examples
        internal_auto = batching.is_auto(self.method.defaults.get("internal_batch_size"))
        auto = not reference and (batching.is_auto(batch_size) or internal_auto)
        units = (
            []
            if auto
            else [[(b, p)] for b, e in enumerate(examples) for p in e.positions]
            if reference
            else [
                [(b, p) for b in range(start, min(start + batch_size, len(examples))) for p in examples[b].positions]
                for start in range(0, len(examples), batch_size)
            ]
        )
        with Progress(disable=not show_progress, transient=True, console=Console(stderr=True)) as progress:
            task = progress.add_task(label, total=sum(len(e.positions) for e in examples) if auto else len(units))
            if auto:  # memory-aware chunks, halved and run again on out-of-memory errors (instrument/batching.py)
                batching.run_rows(
                    examples,
                    self.attribute_rows,
                    devices=batching.model_devices(self.engine.model),
                    batch_size=batch_size,
                    internal_auto=internal_auto,
                    progress=lambda n: progress.advance(task, n),
                )
            state = batching.AutoState(devices=batching.model_devices(self.engine.model))
            for pairs in units:  # one state: a slot cap learnt from an out-of-memory error holds for the call
                self.attribute_rows(pairs, state)
                progress.advance(task)

    def attribute_rows(self, pairs: Sequence[tuple[int, int]], auto: batching.AutoState | None = None) -> None:
        """Attributes the rows `pairs` of (example index, position) into `collected` (safe to call again
        on the same rows). `auto`: the batching state path chunks are sized with."""
        engine = self.engine
        batch = sorted({b for b, _ in pairs})
        local = {b: i for i, b in enumerate(batch)}
        rows = Rows.build([self.examples[b] for b in batch], [(local[b], p) for b, p in pairs], engine.pad_token_id).to(
            engine.device
        )
        request = Request(
            engine,
            rows,
            self.score,
            self.attribute_target,
            needs_logits=bool(self.scorers),
            attributed_fn=self.attributed_fn.identifier,
            auto=auto,
            max_memory=self.max_memory,
            checkpoint_layers=self.checkpoint_layers,
        )
        result = self.method.attribute(request, **self.method.defaults)
        if self.method.attributes_inputs and not self.attribute_target:
            result.target = None
        scores = {}
        if self.scorers:
            with torch.no_grad():
                logits = result.logits if result.logits is not None else engine.logits(rows)
                source = engine.embed(rows)[0]
                scores = {
                    name: score_rows(engine, fn, rows, logits, self.step_kwargs, source)
                    for name, fn in self.scorers.items()
                }
        self.collected.add(batch, rows, result, scores)

    def score(self, rows: Rows, logits: torch.Tensor, source_embeds, target_embeds) -> torch.Tensor:
        """The attributed function's value per row (`Request.score`)."""
        # Inseq scores a contrastive attributed function on the original inputs unless told otherwise
        fn = self.attributed_fn
        if not self.step_kwargs.get("contrast_force_inputs"):
            fn = inseq_options.on_original_inputs(fn, rows)
        return score_rows(
            self.engine, fn, rows, logits, self.step_kwargs, source_embeds, target_embeds, is_attributed_fn=True
        )
