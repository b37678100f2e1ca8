"""LIME (Ribeiro et al. 2016) with tokens as interpretable features, as Inseq (default) or Captum.

out = model.attribute(text, method="lime", n_samples=100, seed=0)       # Inseq's; variant="captum"
"""

from __future__ import annotations

import torch

from instrument.rows import FullRows, RowAttribution, Rows, full_rows
from methods.base import AttributionMethod, Request
from methods.perturber import Perturber, attributed_sides, side_lengths
from methods.registry import register


def _same(a, b) -> bool:
    """`a == b` for option values (tensors compare by identity)."""
    return a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)


def token_samples(seed: int, side: int, length: int, n_samples: int, keep_prob: float = 0.5) -> torch.Tensor:
    """`[n_samples, length]` booleans, sample k keeping token j with probability `keep_prob` (0.5:
    Captum's default LIME sampling; Inseq's LIME replaces a token with probability 0.3). Token j's
    column comes from a generator seeded by `(seed, side, j)` (side 0: source, 1: target), so it does
    not depend on the sequence's length: a step's samples are its example's samples restricted to its
    prefix, whether steps are attributed together or one by one."""
    columns = []
    for j in range(length):
        generator = torch.Generator().manual_seed(hash((int(seed), int(side), j)) & 0x7FFFFFFF)
        columns.append(torch.rand(n_samples, generator=generator) < keep_prob)
    return torch.stack(columns, dim=1) if columns else torch.zeros(n_samples, 0, dtype=torch.bool)


def weighted_least_squares(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coefficients (intercept dropped) of `targets ~ features @ coef + intercept` minimising
    `sum(weights * residual ** 2)`, in float64 on the CPU; minimum-norm when underdetermined."""
    design = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    root = weights.double().clamp_min(0).sqrt()[:, None]
    weighted_targets = (root[:, 0] * targets.double()).cpu()[:, None]
    solution = torch.linalg.lstsq((root * design).cpu(), weighted_targets, driver="gelsd").solution
    return solution[:-1, 0]


def token_ridge(
    kept: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *, alpha: float
) -> torch.Tensor:
    """Ridge regression (`alpha`, intercept, sample `weights`: scikit-learn's `Ridge`) of `targets [n]`
    on features that are, for sample a and token j, `c + kept[a, j] * directions[j]` (the token's
    embedding where kept, the constant c where replaced; `directions[j] = embedding_j - c`), in
    float64 through the `n x n` dual system, so that the `[tokens, hidden]` features are never built.
    Returns the `[tokens, hidden]` coefficients: `gamma_j * directions[j]`."""
    z, y, w = kept.double(), targets.double(), weights.double().clamp_min(0)
    directions = directions.double()
    total = w.sum()
    centered = z - (w[:, None] * z).sum(0) / total  # weighted centering, as with an intercept
    root = w.sqrt()[:, None] * centered  # [n, T]
    gram = (root * (directions * directions).sum(-1)[None]) @ root.T  # A A^T, A = sqrt(W) X_centered
    t = w.sqrt() * (y - (w * y).sum() / total)
    dual = torch.linalg.solve(gram + alpha * torch.eye(len(y), dtype=torch.float64), t)
    return (root.T @ dual)[:, None] * directions


@register("lime")
class Lime(AttributionMethod):
    """LIME (Ribeiro et al. 2016) with tokens as interpretable features, as Inseq (default) or Captum.

    `variant="inseq"`, Inseq 0.7.1's LIME: `n_samples` (50) perturbed inputs, each token replaced
    with probability `mask_prob` (0.3), as Inseq does on embeddings: a replaced token's embedding
    holds the *id* of `mask_token` ("unk" or "pad") in every element (not that token's embedding);
    each sample weighted by its number of embedding elements left equal to the original's; and a
    scikit-learn style `Ridge(alpha)` with intercept fitted on the perturbed embeddings themselves,
    one coefficient per embedding element: `[positions, steps, hidden]`, as Inseq returns it. Inseq
    refuses `attribute_target=True` on encoder-decoders; here both sides are features then.

    `variant="captum"`, Captum's `Lime` with a token feature mask: each token kept with probability
    0.5 (the others set to `baselines`, default "zeros"), weighted by Captum's default similarity
    `exp(-d ** 2 / (2 * kernel_width ** 2))`, `d` the cosine (`distance_mode`) distance between the
    flattened original and perturbed embeddings, and a linear surrogate with intercept fitted by
    weighted least squares (Captum's default surrogate is a Lasso, which needs scikit-learn); a
    token's coefficient is its attribution, repeated over the embedding as Captum returns it.

    Sampling is seeded by `seed`, per token (see `token_samples`), not by torch's global random state
    as in Inseq. Batched: sample k of an example is one perturbed copy of its full row (the same
    token subsets for every example), read at every step; each step fits on its own tokens.
    """

    VARIANT_OPTIONS = {
        "inseq": ("mask_prob", "mask_token", "alpha"),
        "captum": ("baselines", "kernel_width", "distance_mode"),
    }

    def attribute(
        self,
        request: Request,
        variant="inseq",
        n_samples=50,
        perturbations_per_eval=32,
        mask_prob=0.3,
        mask_token="unk",
        alpha=1.0,
        baselines="zeros",
        include_eos_baseline=False,
        kernel_width=1.0,
        distance_mode="cosine",
        seed=42,
    ) -> RowAttribution:
        if variant not in self.VARIANT_OPTIONS:
            raise ValueError(f"variant must be 'inseq' or 'captum', got {variant!r}")
        given = dict(
            mask_prob=mask_prob,
            mask_token=mask_token,
            alpha=alpha,
            baselines=baselines,
            kernel_width=kernel_width,
            distance_mode=distance_mode,
        )
        other = "captum" if variant == "inseq" else "inseq"
        for name in self.VARIANT_OPTIONS[other]:
            if not _same(given[name], self.params[name]):
                raise ValueError(f"{name} is an option of variant={other!r}, not of variant={variant!r}")
        for name, value in (("n_samples", n_samples), ("perturbations_per_eval", perturbations_per_eval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if distance_mode not in ("cosine", "euclidean"):
            raise ValueError(f"distance_mode must be 'cosine' or 'euclidean', got {distance_mode!r}")
        if not kernel_width > 0:
            raise ValueError(f"kernel_width must be positive, got {kernel_width!r}")
        if not 0 <= mask_prob <= 1:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if mask_token not in ("unk", "pad"):
            raise ValueError(f"mask_token must be 'unk' or 'pad', got {mask_token!r}")
        engine, rows = request.engine, request.rows
        inseq = variant == "inseq"
        fill = engine.unk_token_id if mask_token == "unk" else engine.pad_token_id
        if inseq and fill is None:
            raise ValueError("The tokenizer has no UNK token for mask_token='unk'; pass mask_token='pad'")
        fr = full_rows(rows)
        perturber = Perturber(request, fr)
        with torch.no_grad():
            inputs = dict(zip(("source", "target"), engine.embed(fr.full)))
            if inseq:
                bases = {side: None if x is None else torch.full_like(x, float(fill)) for side, x in inputs.items()}
            else:
                bases = dict(zip(("source", "target"), engine.baseline(fr.full, baselines, include_eos_baseline)))
            sides = attributed_sides(request, inputs["source"] is not None)
            keep_prob = 1 - mask_prob if inseq else 0.5
            keep = {
                side: token_samples(seed, int(side == "target"), inputs[side].shape[1], n_samples, keep_prob)
                for side in sides
            }
            lengths = {side: side_lengths(rows, side).tolist() for side in sides}
            visible = {
                side: (torch.arange(inputs[side].shape[1])[None] < torch.tensor(lengths[side])[:, None]).double()
                for side in sides
            }  # [R, L]
            logits, _ = perturber.original()
            outputs = torch.full((len(rows), n_samples), float("nan"), dtype=torch.float64)
            equal = torch.zeros(len(rows), n_samples, dtype=torch.float64)  # Inseq's similarity: equal elements
            jobs = [(f, k) for f in range(len(fr.full)) for k in range(n_samples)]
            per_eval = perturber.per_eval(perturbations_per_eval)
            for start in range(0, len(jobs), per_eval):
                chunk = jobs[start : start + per_eval]
                owners = torch.tensor([f for f, _ in chunk], dtype=torch.long)
                samples = torch.tensor([k for _, k in chunk], dtype=torch.long)
                embeds = {"source": None, "target": None}
                for side in sides:
                    x, base = inputs[side], bases[side]
                    kept = keep[side][samples].to(x.device)[:, :, None]
                    embeds[side] = torch.where(kept, x[owners.to(x.device)], base[owners.to(x.device)])
                n_index, r_index, scores = perturber.run(owners, embeds["source"], embeds["target"])
                n_index, r_index = n_index.cpu(), r_index.cpu()
                outputs[r_index, samples[n_index]] = scores.double().cpu()
                if inseq:
                    for side in sides:
                        same = (
                            (embeds[side] == inputs[side][owners.to(inputs[side].device)]).sum(-1).double().cpu()
                        )  # [N, L]
                        equal[r_index, samples[n_index]] += (same[n_index] * visible[side][r_index]).sum(1)
            out = {side: torch.zeros(len(rows), *inputs[side].shape[1:]) for side in sides}
            if not inseq:
                similarity = self._similarity(
                    rows,
                    fr,
                    sides=sides,
                    inputs=inputs,
                    bases=bases,
                    keep=keep,
                    kernel_width=kernel_width,
                    distance_mode=distance_mode,
                )
            owner = fr.owner.tolist()
            for r in range(len(rows)):
                bits = torch.cat([keep[side][:, : lengths[side][r]] for side in sides], dim=1)
                if inseq:
                    directions = torch.cat(
                        [inputs[side][owner[r], : lengths[side][r]].double().cpu() - float(fill) for side in sides]
                    )
                    coef = token_ridge(bits, directions, outputs[r], equal[r], alpha=alpha).float()  # [T, hidden]
                else:
                    coef = weighted_least_squares(bits, outputs[r], similarity[r]).float()[:, None]
                offset = 0
                for side in sides:
                    n = lengths[side][r]
                    out[side][r, :n] = coef[offset : offset + n]
                    offset += n
        return RowAttribution(source=out.get("source"), target=out.get("target"), logits=logits)

    @staticmethod
    def _similarity(
        rows: Rows,
        fr: FullRows,
        *,
        sides: list[str],
        inputs: dict,
        bases: dict,
        keep: dict,
        kernel_width: float,
        distance_mode: str,
    ) -> torch.Tensor:
        """`[R, n_samples]` kernel weights from per-token dot products (float64): the distance between
        the row's flattened inputs and each perturbed version, over the row's own tokens."""
        owner = fr.owner.cpu()
        dot = pert = orig = 0
        for side in sides:
            x, b = inputs[side].double().cpu()[owner], bases[side].double().cpu()[owner]  # [R, L, H]
            visible = (torch.arange(x.shape[1])[None] < side_lengths(rows, side).cpu()[:, None]).double()  # [R, L]
            kept = keep[side].double()  # [n, L]
            xx, xb, bb = (x * x).sum(-1) * visible, (x * b).sum(-1) * visible, (b * b).sum(-1) * visible
            if distance_mode == "cosine":
                dot = dot + xx @ kept.T + xb @ (1 - kept).T
                pert = pert + xx @ kept.T + bb @ (1 - kept).T
                orig = orig + xx.sum(1, keepdim=True)
            else:  # squared L2 distance: only the removed tokens differ
                dot = dot + (xx - 2 * xb + bb) @ (1 - kept).T
        if distance_mode == "cosine":
            eps = 1e-8
            distance = 1 - dot / (orig.sqrt() * pert.sqrt()).clamp_min(eps)
        else:
            distance = dot.clamp_min(0).sqrt()
        return torch.exp(-(distance**2) / (2 * kernel_width**2))
