"""What the perturbation methods share: perturbed copies of full rows, scored at every step.

    perturber = Perturber(request, full_rows(request.rows))
    logits, original = perturber.original()                  # [R, V], [R]
    n, r, scores = perturber.run(owners, None, perturbed)    # (perturbation, row, score) triples

Occlusion, LIME and value zeroing run under `torch.no_grad()` on perturbed copies of the *full* row
of an example (its longest attributed prefix): under causal attention one forward of it gives the
attributed function at every step of the example (`Engine.forward_steps`), so the number of
forwards depends on the number of perturbations, not on the number of steps; perturbed copies of all
examples go through the model together, `perturbations_per_eval` at a time. Where a step cannot see
a perturbation (a window on target tokens after its prefix), that perturbation does not count for
it, so every step gets what the method computes on its own prefix. ReAGent's probes depend on each
step's own importance scores, so they run per step; the probes of all steps and examples share each
forward.

Copies per forward: `perturbations_per_eval`, or fewer where the memory planner
(`instrument.planner.plan_rows`) finds that they do not fit `request.max_memory`
(`Perturber.per_eval`). A forward that still runs out of memory runs again in halves, and that
size holds for the rest of the call (`Perturber.run`).
"""

from __future__ import annotations

import torch

from instrument import batching, planner
from instrument.rows import FullRows, Rows
from methods.base import Request


class Perturber:
    """Scores perturbed copies of full rows at every step (row) of their examples."""

    def __init__(self, request: Request, fr: FullRows):
        self.request, self.fr = request, fr
        self.engine = request.engine
        owner = fr.owner.tolist()
        self.rows_of: list[list[int]] = [[] for _ in range(len(fr.full))]
        for r, f in enumerate(owner):
            self.rows_of[f].append(r)
        self.cap: int | None = None  # copies per forward at most, after an out-of-memory error

    def per_eval(self, requested: int, reads: int | None = None, kept: int = 0) -> int:
        """Perturbed copies per forward: `requested`, or as many as the planner fits in the request's
        `max_memory` (copies of the full rows, `reads` logit positions each: default the steps read,
        each scored on its own copy of the embeddings, `run`). `kept`: bytes per copy the method keeps
        besides."""
        reads = self.fr.positions.shape[1] if reads is None else reads
        return plan_copies(self.request, self.fr.full, requested, reads, kept, embed_copies=reads)

    def original(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[R, V]` and attributed function `[R]` of every row at the unperturbed input."""
        rows = self.request.rows
        logits = self.fr.gather(self.engine.forward_steps(self.fr.full, self.fr.positions)[0])
        source, target = self.engine.embed(rows)
        return logits, self.request.score(
            rows, logits, source, target
        ).double()  # differences of probabilities: no float32 rounding

    def run(self, owners: torch.Tensor, source: torch.Tensor | None, target: torch.Tensor | None, pairs=None):
        """Scores of `(perturbation n, row r)` pairs: `(n [E], r [E], scores [E])`.

        `owners[n]` is the full row perturbation n copies, `source` / `target` its embeddings
        (None: unperturbed side); `pairs(n, r) -> bool` filters the pairs (default: every row of
        the example)."""
        if self.cap is not None and len(owners) > self.cap:
            return self._split(owners, source, target, pairs, self.cap)
        try:
            return self._run(owners, source, target, pairs)
        except BaseException as error:
            if not batching.is_out_of_memory(error) or len(owners) == 1:
                raise
        batching.free_memory()  # outside the except block: the error's frames are gone
        self.cap = len(owners) // 2
        if self.request.auto is not None:
            self.request.auto.note(
                f"out of memory with {len(owners)} perturbed copies: {self.cap} per forward from now on"
            )
        return self.run(owners, source, target, pairs)

    def _split(self, owners, source, target, pairs, size):
        parts = []
        for a in range(0, len(owners), size):
            b = a + size
            kept = None if pairs is None else (lambda n, r, a=a: pairs(n + a, r))
            n, r, scores = self.run(
                owners[a:b], None if source is None else source[a:b], None if target is None else target[a:b], kept
            )
            parts.append((n + a, r, scores))
        parts = [part for part in parts if len(part[0])] or parts[:1]
        return tuple(torch.cat(values) for values in zip(*parts))

    def _run(self, owners, source, target, pairs):
        engine, fr, rows = self.engine, self.fr, self.request.rows
        owners_list = owners.tolist()
        index_n, index_r = [], []
        for n, f in enumerate(owners_list):
            for r in self.rows_of[f]:
                if pairs is None or pairs(n, r):
                    index_n.append(n)
                    index_r.append(r)
        if not index_n:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, torch.zeros(0)
        device = rows.target_ids.device
        index_n = torch.tensor(index_n, dtype=torch.long, device=device)
        index_r = torch.tensor(index_r, dtype=torch.long, device=device)
        full = fr.full.take(owners.to(device))
        logits = engine.forward_steps(full, fr.positions[owners.to(device)], source, target)[0]
        logits = logits[index_n, fr.slot[index_r]]
        picked = rows.take(index_r)
        scores = self.request.score(
            picked,
            logits,
            source[index_n] if source is not None else None,
            target[index_n] if target is not None else None,
        )
        return index_n, index_r, scores.double()


def side_lengths(rows, side: str) -> torch.Tensor:
    """Length of each row's source, or of its target prefix."""
    mask = rows.source_mask if side == "source" else rows.target_mask
    return mask.sum(1)


def attributed_sides(request: Request, has_source: bool) -> list[str]:
    """The sides a perturbation method attributes: the source (if any), and the target prefix when
    `attribute_target`."""
    return (["source"] if has_source else []) + (["target"] if request.attribute_target else [])


def plan_copies(request: Request, rows: Rows, requested: int, reads: int, kept: int = 0, embed_copies: int = 0) -> int:
    """How many copies of `rows`' rows (full width, `reads` logit positions each) one no-grad forward
    carries: `requested` at most, fewer where `instrument.planner.plan_rows` finds that they do not
    fit `request.max_memory` (`kept`, `embed_copies`: see `planner.predict_forward`)."""
    return planner.plan_rows(
        request.engine.model,
        rows.target_ids.shape[1],
        requested,
        source_length=rows.source_length,
        reads=reads,
        kept=kept,
        max_memory=request.max_memory,
        embed_copies=embed_copies,
    )
