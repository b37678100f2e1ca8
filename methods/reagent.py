"""ReAGent (Zhao et al. 2024) on the input tokens, with Inseq's parameters, every step and probe batched.

out = model.attribute(text, method="reagent", max_probe_steps=100, num_probes=8)
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from instrument.rows import RowAttribution
from methods.base import AttributionMethod, Request
from methods.perturber import attributed_sides, plan_copies, side_lengths
from methods.registry import register

# Built-in step functions that are not probabilities: ReAGent's update would be NaN with them.
NOT_PROBABILITIES = {
    "logit",
    "entropy",
    "crossentropy",
    "perplexity",
    "contrast_logits",
    "contrast_logits_diff",
    "contrast_prob_diff",
    "pcxmi",
    "kl_divergence",
    "in_context_pvi",
    "top_p_size",
}


def _probabilities(request: Request, scores: torch.Tensor) -> torch.Tensor:
    """`scores`, checked to be probabilities (a custom attributed function, or `logprob=True`, may not be)."""
    bad = ~((scores >= 0) & (scores <= 1))
    if bad.any():
        raise ValueError(
            f"reagent needs attributed_fn to be a probability in [0, 1], but attributed_fn="
            f"{request.attributed_fn!r} gave {float(scores[bad][0]):.4g} (is logprob=True set?)"
        )
    return scores


def probe_generator(seed: int, probe: int, rows, r: int) -> torch.Generator:
    """The random stream of probe `probe` of row r, seeded by the row's own tokens (its prefix and
    source), so that it does not depend on which other rows share the batch."""
    prefix = rows.target_ids[r, : int(rows.target_mask[r].sum())].tolist()
    source = [] if rows.source_ids is None else rows.source_ids[r, : int(rows.source_mask[r].sum())].tolist()
    return torch.Generator().manual_seed(hash((int(seed), int(probe), tuple(prefix), tuple(source))) & 0x7FFFFFFF)


class _Probe:
    """One ReAGent probe of one row: its tokens, its logit importance scores and its random stream."""

    def __init__(self, r: int, ids: torch.Tensor, generator: torch.Generator, candidates: torch.Tensor):
        self.r, self.ids, self.generator, self.candidates = r, ids, generator, candidates
        self.logit = torch.rand(len(ids), generator=generator, dtype=torch.float64)
        self.stopped = False

    def replacements(self) -> torch.Tensor:
        """A random replacement token for every position (uniform over the candidate vocabulary)."""
        return self.candidates[torch.randint(len(self.candidates), (len(self.ids),), generator=self.generator)]

    def update_mask(self, ratio: float) -> torch.Tensor:
        return torch.rand(len(self.ids), generator=self.generator, dtype=torch.float64) < ratio

    @property
    def importance(self) -> torch.Tensor:
        return self.logit.softmax(-1)


@register("reagent")
class Reagent(AttributionMethod):
    """ReAGent (Zhao et al. 2024), with Inseq's parameters, run for every step and probe together.

    Per step, `num_probes` probes each start from random logit importance scores over the attributed
    tokens (the source, plus the target prefix when it is attributed) and repeat, at most
    `max_probe_steps` times: replace a random `replacing_ratio` of the tokens, take
    `delta = f(original) - f(replaced)` of the attributed function (default: the target's
    probability, as ReAGent), and add `logit(0.5 + 0.5 * delta)` to the replaced tokens' scores and
    `logit(0.5 - 0.5 * delta)` to the others'; then, with importance `softmax(scores)`, keep the
    `keep_top_n` most important tokens (or `ceil(keep_ratio * length)` when `keep_top_n` is 0;
    `invert_keep_ratio` replaces those instead), replace the rest, and stop the probe once the
    target token is among the `stopping_condition_top_k` top predictions. The attribution is the
    mean importance over the probes that stopped (over all probes if none did), repeated over the
    embedding dimension as Inseq returns it.

    Replacement tokens: ReAGent draws them from a language model (Inseq: same-POS words); here they
    are drawn uniformly from the attributed model's vocabulary (special tokens pad / UNK / EOS
    excluded), which needs no second model. Randomness is seeded per (seed, probe, row tokens).
    The attributed function must be a probability (its update is NaN otherwise): `attributed_fn`
    such as "logit" or "entropy", or values outside [0, 1], raise a ValueError.
    Every active probe of every row of the batch goes through one forward per stage.
    """

    def attribute(
        self,
        request: Request,
        keep_top_n=5,
        keep_ratio=None,
        invert_keep_ratio=False,
        stopping_condition_top_k=3,
        replacing_ratio=0.3,
        max_probe_steps=3000,
        num_probes=16,
        seed=42,
        internal_batch_size=None,
    ) -> RowAttribution:
        for name, value, low in (
            ("keep_top_n", keep_top_n, 0),
            ("stopping_condition_top_k", stopping_condition_top_k, 1),
            ("max_probe_steps", max_probe_steps, 1),
            ("num_probes", num_probes, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if keep_top_n == 0 and (keep_ratio is None or not 0 <= keep_ratio <= 1):
            raise ValueError(f"With keep_top_n=0, keep_ratio must be a fraction in [0, 1], got {keep_ratio!r}")
        if not 0 < replacing_ratio <= 1:
            raise ValueError(f"replacing_ratio must be in (0, 1], got {replacing_ratio!r}")
        if internal_batch_size is not None and (
            isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1
        ):
            raise ValueError(f"internal_batch_size must be None or a positive integer, got {internal_batch_size!r}")
        if request.attributed_fn in NOT_PROBABILITIES:
            raise ValueError(
                f"reagent needs attributed_fn to be a probability (its update takes logit(0.5 +- 0.5 * delta)); "
                f"got attributed_fn={request.attributed_fn!r}: use 'probability' (the default) or 'contrast_prob'"
            )
        engine, rows = request.engine, request.rows
        vocab = int(engine.target_embedding.weight.shape[0])
        special = {t for t in (engine.pad_token_id, engine.unk_token_id, engine.eos_token_id) if t is not None}
        candidates = torch.tensor([t for t in range(vocab) if t not in special], dtype=torch.long)
        sides = attributed_sides(request, rows.source_ids is not None)
        lengths = {side: side_lengths(rows, side).tolist() for side in sides}
        probes = []
        for r in range(len(rows)):
            ids = torch.cat(
                [
                    (rows.source_ids if side == "source" else rows.target_ids)[r, : lengths[side][r]].cpu()
                    for side in sides
                ]
            )
            probes += [_Probe(r, ids, probe_generator(seed, k, rows, r), candidates) for k in range(num_probes)]
        with torch.no_grad():
            logits = engine.forward(rows)[0]
            original = _probabilities(request, request.score(rows, logits, *engine.embed(rows)).double().cpu())
            for _ in range(max_probe_steps):
                active = [probe for probe in probes if not probe.stopped]
                if not active:
                    break
                masks = [probe.update_mask(replacing_ratio) for probe in active]
                replaced = [torch.where(mask, probe.replacements(), probe.ids) for probe, mask in zip(active, masks)]
                scores, _ = self._run(
                    request, active, replaced, lengths=lengths, sides=sides, batch_size=internal_batch_size
                )
                for probe, mask, score in zip(active, masks, scores):
                    delta = original[probe.r] - score
                    signed = torch.where(mask, delta, -delta)
                    probe.logit = probe.logit + torch.logit(signed * 0.5 + 0.5)
                kept = [
                    self._keep_mask(probe.importance, keep_top_n, keep_ratio, invert_keep_ratio) for probe in active
                ]
                replaced = [torch.where(keep, probe.ids, probe.replacements()) for probe, keep in zip(active, kept)]
                _, hits = self._run(
                    request,
                    active,
                    replaced,
                    lengths=lengths,
                    sides=sides,
                    batch_size=internal_batch_size,
                    top_k=stopping_condition_top_k,
                )
                for probe, hit in zip(active, hits):
                    probe.stopped = bool(hit)
        out = {
            side: torch.zeros(
                len(rows),
                *(rows.source_ids if side == "source" else rows.target_ids).shape[1:],
                engine.target_embedding.weight.shape[1],
            )
            for side in sides
        }
        for r in range(len(rows)):
            mine = probes[r * num_probes : (r + 1) * num_probes]
            done = [probe for probe in mine if probe.stopped] or mine
            mean = torch.stack([probe.importance for probe in done]).mean(0).float()
            offset = 0
            for side in sides:
                n = lengths[side][r]
                out[side][r, :n] = mean[offset : offset + n, None]
                offset += n
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)

    @staticmethod
    def _keep_mask(importance: torch.Tensor, top_n: int, ratio, invert: bool) -> torch.Tensor:
        """Tokens left in place for the stopping check: the top-n by importance (the others when inverted)."""
        n = top_n if top_n > 0 else int(math.ceil(ratio * len(importance)))
        top = torch.zeros(len(importance), dtype=torch.bool)
        top[torch.argsort(importance, descending=True, stable=True)[:n]] = True
        return ~top if invert else top

    @staticmethod
    def _run(
        request: Request,
        probes: list[_Probe],
        replaced: list[torch.Tensor],
        *,
        lengths: dict,
        sides: list[str],
        batch_size: int | None,
        top_k: int | None = None,
    ):
        """Attributed function (and, with top_k, whether the target is among the top-k predictions)
        of each probe's row with its tokens replaced, in forwards of at most `batch_size` rows."""
        engine, rows = request.engine, request.rows
        scores, hits = [], []
        size = batch_size or plan_copies(request, rows, len(probes), reads=1)
        for start in range(0, len(probes), size):
            chunk, ids = probes[start : start + size], replaced[start : start + size]
            index = torch.tensor([probe.r for probe in chunk], dtype=torch.long, device=rows.target_ids.device)
            sub = rows.take(index)
            fields = {}
            for side in sides:
                name = "source_ids" if side == "source" else "target_ids"
                values = getattr(sub, name).clone()
                for n, (probe, new) in enumerate(zip(chunk, ids)):
                    offset = sum(lengths[s][probe.r] for s in sides[: sides.index(side)])
                    length = lengths[side][probe.r]
                    values[n, :length] = new[offset : offset + length].to(values.device)
                fields[name] = values
            sub = replace(sub, **fields)
            logits = engine.forward(sub)[0]
            scores.append(_probabilities(request, request.score(sub, logits, None, None).double().cpu()))
            if top_k is not None:
                top = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
                hits.append((top == sub.token[:, None]).any(-1).cpu())
        return torch.cat(scores), (torch.cat(hits) if hits else None)
