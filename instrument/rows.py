"""Rows: one example at one attributed step, batched and padded; what methods return for them.

    rows = Rows.build(examples, [(0, 3), (0, 4), (1, 2)], pad_id=tokenizer.pad_token_id)
    fr = full_rows(rows)        # each example's longest row, and where every row reads from it

A *row* is one example at one attributed step `p`: the decoder sees the target prefix `target[:p]`
and predicts `target[p]`. Rows of one example whose inputs agree are prefixes of its longest row,
and under causal attention that row's hidden state at position `p - 1` is the one row `p` would
compute: so one forward of each example's longest row (`full_rows`) serves all its steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import torch


@dataclass
class Example:
    """One prepared example: token ids and the attributed target positions `[start, end)`.

    `contrast_ids` / `contrast_source_ids` feed contrastive step functions; `alignment` maps a
    target position to the contrast position holding its counterpart.
    """

    target_ids: torch.Tensor
    start: int
    end: int
    source_ids: torch.Tensor | None = None
    contrast_ids: torch.Tensor | None = None
    contrast_source_ids: torch.Tensor | None = None
    alignment: dict[int, int] | None = None

    @property
    def positions(self) -> range:
        return range(self.start, self.end)


def _pad(sequences: Sequence[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for index, seq in enumerate(sequences):
        ids[index, : len(seq)] = seq
        mask[index, : len(seq)] = 1
    return ids, mask


@dataclass
class Rows:
    """A padded batch of (example, step) rows. Row `i` predicts `token[i]` from `target_ids[i]`."""

    example: torch.Tensor
    position: torch.Tensor
    token: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    source_ids: torch.Tensor | None = None
    source_mask: torch.Tensor | None = None
    contrast: "Rows | None" = None
    contrast_uses_source_ids: bool = False
    block: torch.Tensor | None = None  # which block of `repeat` a row is in (None: one block)

    @classmethod
    def build(cls, examples: Sequence[Example], pairs: Sequence[tuple[int, int]], pad_id: int) -> "Rows":
        """Rows for `pairs` of (example index, target position)."""
        target_ids, target_mask = _pad([examples[b].target_ids[:p] for b, p in pairs], pad_id)
        rows = cls(
            example=torch.tensor([b for b, _ in pairs], dtype=torch.long),
            position=torch.tensor([p for _, p in pairs], dtype=torch.long),
            token=torch.stack([examples[b].target_ids[p] for b, p in pairs]),
            target_ids=target_ids,
            target_mask=target_mask,
        )
        if examples[0].source_ids is not None:
            rows.source_ids, rows.source_mask = _pad([examples[b].source_ids for b, _ in pairs], pad_id)
        if examples[0].contrast_ids is not None:
            rows.contrast = _contrast_rows(examples, pairs, pad_id)
        return rows

    def __len__(self) -> int:
        return len(self.example)

    @property
    def source_length(self) -> int:
        """The padded source width (0 without a source: decoder-only rows)."""
        return self.source_ids.shape[1] if self.source_ids is not None else 0

    @property
    def last(self) -> torch.Tensor:
        """Index of each row's last real target position (where its prediction is read)."""
        return self.target_mask.sum(1) - 1

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields holding a tensor (not `contrast`, whose rows are Rows of their own), by name."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        return {name: value for name, value in values.items() if isinstance(value, torch.Tensor)}

    def repeat(self, times: int) -> "Rows":
        """The rows `times` times over, block after block (row `k * R + r` is row `r` of block `k`)."""
        if times == 1:
            return self
        values = {
            name: value.repeat(times, *([1] * (value.dim() - 1)))
            for name, value in self.tensors().items()
            if name != "block"
        }
        contrast = self.contrast.repeat(times) if self.contrast is not None else None
        block = self.example.new_zeros(len(self)) if self.block is None else self.block
        blocks = torch.arange(times, device=block.device).repeat_interleave(len(self))
        return replace(self, **values, contrast=contrast, block=blocks * (int(block.max()) + 1) + block.repeat(times))

    def take(self, index: torch.Tensor) -> "Rows":
        """The rows at `index` (a 1-D index tensor), in that order; the padded width is kept."""
        index = torch.as_tensor(index, dtype=torch.long)
        values = {name: value[index.to(value.device)] for name, value in self.tensors().items()}
        contrast = self.contrast.take(index) if self.contrast is not None else None
        return replace(self, **values, contrast=contrast)

    def to(self, device) -> "Rows":
        values = {name: value.to(device) for name, value in self.tensors().items()}
        return replace(self, **values, contrast=self.contrast.to(device) if self.contrast is not None else None)


def _contrast_rows(examples: Sequence[Example], pairs: Sequence[tuple[int, int]], pad_id: int) -> Rows:
    contrast_pairs = []
    for b, p in pairs:
        example = examples[b]
        q = example.alignment.get(p, p) if example.alignment else p
        if not 0 < q < len(example.contrast_ids):
            raise ValueError(f"Contrast position {q} (aligned to target position {p}) is outside the contrast sequence")
        contrast_pairs.append((b, q))
    contrast_examples = [
        Example(
            target_ids=e.contrast_ids,
            start=0,
            end=0,
            source_ids=e.contrast_source_ids if e.contrast_source_ids is not None else e.source_ids,
        )
        for e in examples
    ]
    rows = Rows.build(contrast_examples, contrast_pairs, pad_id)
    rows.contrast_uses_source_ids = examples[0].contrast_source_ids is not None
    return rows


@dataclass
class RowAttribution:
    """What a method returns for R rows: granular scores over source / target positions.

    `source`: `[R, source_len, ...]`, `target`: `[R, prefix_len, ...]`; `logits` are the logits at
    the unperturbed input when the method computed them anyway; `delta` the convergence delta;
    `sequence_scores` per-example scores, `[R, source_len, source_len, ...]` (each row holds its
    example's), such as value zeroing's encoder self-attention scores.
    """

    source: torch.Tensor | None = None
    target: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    sequence_scores: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class FullRows:
    """Each row of `rows` read off one full-length forward of its example (see `full_rows`).

    `full` holds one row per example (per block of `Rows.repeat`): its longest prefix, at index
    `longest[f]` of the rows. Every other row of the example is a prefix of it, so under causal
    attention its hidden state at position `p - 1` is the one row `p` computes. `owner[r]` is row
    r's full row, `positions[f]` the positions read from full row f (padded by repeating its last
    one), `slot[r]` where row r's position sits in them.
    """

    full: Rows
    longest: torch.Tensor
    owner: torch.Tensor
    slot: torch.Tensor
    positions: torch.Tensor

    def gather(self, per_full: torch.Tensor) -> torch.Tensor:
        """`[F, K, ...]` values at `positions` -> `[R, ...]` values, one per row."""
        return per_full[self.owner.to(per_full.device), self.slot.to(per_full.device)]


def full_rows(rows: Rows) -> FullRows:
    """The longest row of each example (and block of `Rows.repeat`) in `rows`, and where every row
    reads from it.

        fr = full_rows(rows)
        logits = fr.gather(engine.forward_steps(fr.full, fr.positions)[0])   # [R, V], as engine.forward(rows)[0]
    """
    groups = rows.example.tolist() if rows.block is None else list(zip(rows.example.tolist(), rows.block.tolist()))
    positions = rows.position.tolist()
    longest: dict[Any, int] = {}
    for r, (g, p) in enumerate(zip(groups, positions)):
        if g not in longest or p > positions[longest[g]]:
            longest[g] = r
    index = {g: f for f, g in enumerate(longest)}
    read: list[dict[int, int]] = [{} for _ in longest]  # position -> slot, per full row
    owner, slot = [], []
    for g, p in zip(groups, positions):
        f = index[g]
        owner.append(f)
        slot.append(read[f].setdefault(p - 1, len(read[f])))
    width = max(len(q) for q in read)
    padded = torch.tensor([list(q) + [list(q)[-1]] * (width - len(q)) for q in read], dtype=torch.long)
    device = rows.target_ids.device
    picked = torch.tensor(list(longest.values()), dtype=torch.long, device=device)
    return FullRows(
        full=rows.take(picked),
        longest=picked,
        owner=torch.tensor(owner, dtype=torch.long, device=device),
        slot=torch.tensor(slot, dtype=torch.long, device=device),
        positions=padded.to(device),
    )
