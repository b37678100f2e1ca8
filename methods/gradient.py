"""Gradient methods on the input embeddings: saliency, input x gradient, integrated gradients,
DeepLIFT and gradient SHAP.

    model = instrument.load_model(hf_model, "integrated_gradients", n_steps=50)
"""

from __future__ import annotations

import torch

from instrument import kernels
from instrument.rows import RowAttribution
from methods.approximation import approximation
from methods.base import AttributionMethod, Request, chunks, gradients, leaf, path_request
from methods.registry import register
from methods.slopes import rescale_rule


def _split(request: Request, grads: list, source, target):
    """Pairs gradients back with the sides they belong to."""
    grads = list(grads)
    source_grad = grads.pop(0) if source is not None else None
    return source_grad, grads.pop(0)


@register("saliency")
class Saliency(AttributionMethod):
    """Gradient of the attributed function w.r.t. the input embeddings (absolute value by default)."""

    checkpointable = True

    def attribute(self, request: Request, abs: bool = True) -> RowAttribution:
        source, target = (leaf(t) for t in request.engine.embed(request.rows))
        grads, logits, _ = gradients(
            request, request.rows, [t for t in (source, target) if t is not None], source, target, shared_prefix=True
        )
        source_grad, target_grad = _split(request, grads, source, target)
        fix = torch.abs_ if abs else (lambda t: t)  # in place: the gradients are this call's own
        return RowAttribution(
            source=fix(source_grad) if source_grad is not None else None, target=fix(target_grad), logits=logits
        )


@register("input_x_gradient")
class InputXGradient(AttributionMethod):
    """Gradient times the input embeddings."""

    checkpointable = True

    def attribute(self, request: Request) -> RowAttribution:
        source, target = (leaf(t) for t in request.engine.embed(request.rows))
        grads, logits, _ = gradients(
            request, request.rows, [t for t in (source, target) if t is not None], source, target, shared_prefix=True
        )
        source_grad, target_grad = _split(request, grads, source, target)
        return RowAttribution(
            source=source_grad * source.detach() if source is not None else None,
            target=target_grad * target.detach(),
            logits=logits,
        )


class PathMethod(AttributionMethod):
    """Shared by methods integrating gradients along straight paths from baselines to inputs."""

    checkpointable = True

    def endpoints(self, request: Request, baselines, include_eos_baseline: bool):
        """Inputs and baselines per side; a side that is not attributed has baseline == input."""
        source, target = request.engine.embed(request.rows)
        source_base, target_base = request.engine.baseline(request.rows, baselines, include_eos_baseline)
        if not request.attribute_target:
            target_base = target
        return (source, source_base), (target, target_base)


@register("integrated_gradients")
class IntegratedGradients(PathMethod):
    """Integrated gradients (Sundararajan et al. 2017) on the input embeddings.

    The gradients of each chunk of path points are folded into a float32 accumulator as the chunk
    finishes, so memory depends on `internal_batch_size`, not on `n_steps`.

    The integration rule (`methods.approximation.RULES`, default "gausslegendre") is Captum's
    `method`; as `attribute(method=...)` names the attribution method, pass it per call as
    `approximation_method="riemann_trapezoid"` (CLI: `--approximation_method`). `method=` works
    where it does not collide: `load_model(hf_model, "integrated_gradients", method="riemann_trapezoid")`.
    `approximation_method`, when given, wins over `method`.
    """

    def attribute(
        self,
        request: Request,
        n_steps=50,
        method="gausslegendre",
        approximation_method=None,
        internal_batch_size=None,
        baselines=None,
        include_eos_baseline=False,
        multiply_by_inputs=True,
        return_convergence_delta=False,
    ) -> RowAttribution:
        alphas, weights = approximation(approximation_method or method, n_steps)
        rows = request.rows
        (source, source_base), (target, target_base) = self.endpoints(request, baselines, include_eos_baseline)
        sides = [(source, source_base), (target, target_base)] if source is not None else [(target, target_base)]
        totals = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x, _ in sides]
        for chunk in chunks(n_steps, rows, internal_batch_size, request=request, shared_prefix=True):
            chunk_alphas = torch.tensor([alphas[k] for k in chunk], dtype=torch.float32)
            points = [leaf(kernels.interpolate(x, base, chunk_alphas)) for x, base in sides]
            grads, _, _ = gradients(
                path_request(request, rows, len(chunk), shared_prefix=True),
                rows.repeat(len(chunk)),
                points,
                points[0] if source is not None else None,
                points[-1],
                shared_prefix=True,
            )
            chunk_weights = torch.tensor([weights[k] for k in chunk], dtype=torch.float32)
            for total, grad in zip(totals, grads):
                kernels.accumulate(total, grad, chunk_weights)  # in place, float32, one read of the gradients
            del points, grads  # the next chunk's path points replace these, never adding to them
        attributions = [
            kernels.finalize(total, x, base) if multiply_by_inputs else total for total, (x, base) in zip(totals, sides)
        ]
        logits, delta = None, None
        with torch.no_grad():
            if request.needs_logits or return_convergence_delta:
                logits = request.engine.logits(rows, source, target)
            if return_convergence_delta:
                at_input = request.score(rows, logits, source, target)
                at_base = request.score(
                    rows, request.engine.logits(rows, source_base, target_base), source_base, target_base
                )
                total = sum(a.flatten(1).sum(1) for a in attributions)
                delta = total - (at_input - at_base).float()
        return RowAttribution(
            source=attributions[0] if source is not None else None, target=attributions[-1], logits=logits, delta=delta
        )


@register("gradient_shap")
class GradientShap(PathMethod):
    """Gradient SHAP (Lundberg and Lee 2017): expected gradients at random points between baseline
    and (optionally noised) input, times input - baseline. Seeded."""

    def attribute(
        self,
        request: Request,
        n_samples=5,
        stdevs=0.0,
        baselines=None,
        include_eos_baseline=False,
        multiply_by_inputs=True,
        seed=42,
        internal_batch_size=None,
    ) -> RowAttribution:
        rows = request.rows
        (source, source_base), (target, target_base) = self.endpoints(request, baselines, include_eos_baseline)
        sides = [(source, source_base), (target, target_base)] if source is not None else [(target, target_base)]
        alphas, noises = _row_samples(rows, sides, n_samples, stdevs, seed)
        if source is not None and not request.attribute_target:
            noises[-1].zero_()  # the target prefix is no attributed input: it stays as it is
        noised = [x + noise.to(x) for (x, _), noise in zip(sides, noises)]
        # Without noise every sample has the same input - baseline: the mean gradient is accumulated and
        # multiplied once at the end, like integrated gradients. With noise, each sample's own.
        scale_each = multiply_by_inputs and bool(stdevs)
        totals = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x, _ in sides]
        # The noise of every sample (float32) and the noised inputs stay to the end.
        extra = len(rows) * (n_samples + 1) * len(sides)
        for chunk in chunks(n_samples, rows, internal_batch_size, request=request, extra_rows=extra):
            index = torch.tensor(list(chunk))
            points = []
            for (x, base), noisy in zip(sides, noised):
                a = alphas[index].to(x).view(len(chunk), len(rows), *([1] * (x.dim() - 1)))
                points.append(leaf((base + a * (noisy[index] - base)).flatten(0, 1)))
            grads, _, _ = gradients(
                path_request(request, rows, len(chunk), extra_rows=extra),
                rows.repeat(len(chunk)),
                points,
                points[0] if source is not None else None,
                points[-1],
            )
            mean = [1.0 / n_samples] * len(chunk)
            for total, grad, (x, base), noisy in zip(totals, grads, sides, noised):
                if scale_each:
                    grad = grad.float().unflatten(0, (len(chunk), -1)) * (noisy[index] - base).float()
                kernels.accumulate(total, grad, mean)
            del points, grads
        if multiply_by_inputs and not scale_each:
            totals = [kernels.finalize(total, x, base) for total, (x, base) in zip(totals, sides)]
        with torch.no_grad():
            logits = request.engine.logits(rows, source, target) if request.needs_logits else None
        return RowAttribution(source=totals[0] if source is not None else None, target=totals[-1], logits=logits)


def _row_samples(rows, sides, n_samples: int, stdevs: float, seed: int):
    """Random path points and input noise drawn per row from a generator seeded by the row's own
    content, so that results do not depend on how rows are batched or padded."""
    alphas = torch.empty(n_samples, len(rows))
    noises = [torch.zeros((n_samples, *x.shape)) for x, _ in sides]
    for r in range(len(rows)):
        prefix = rows.target_ids[r, : int(rows.target_mask[r].sum())].tolist()
        source = [] if rows.source_ids is None else rows.source_ids[r, : int(rows.source_mask[r].sum())].tolist()
        generator = torch.Generator().manual_seed(hash((seed, tuple(prefix), tuple(source))) & 0x7FFFFFFF)
        alphas[:, r] = torch.rand(n_samples, generator=generator)
        lengths = [len(source), len(prefix)] if rows.source_ids is not None else [len(prefix)]
        for noise, length in zip(noises, lengths):
            if stdevs:
                shape = (n_samples, length, *noise.shape[3:])
                noise[:, r, :length] = stdevs * torch.randn(shape, generator=generator)
    return alphas, noises


@register("deeplift")
class DeepLift(PathMethod):
    """DeepLIFT with the rescale rule (Shrikumar et al. 2017), inputs and baselines in one batch."""

    def attribute(
        self, request: Request, baselines=None, include_eos_baseline=False, multiply_by_inputs=True
    ) -> RowAttribution:
        rows = request.rows
        (source, source_base), (target, target_base) = self.endpoints(request, baselines, include_eos_baseline)
        sides = [(source, source_base), (target, target_base)] if source is not None else [(target, target_base)]
        points = [leaf(torch.cat([x, base])) for x, base in sides]
        with rescale_rule(request.engine.model):
            grads, logits, _ = gradients(
                request,
                rows.repeat(2),
                points,
                points[0] if source is not None else None,
                points[-1],
                shared_prefix=True,
            )
        # The multipliers (gradients under the rescale rule) times input - baseline, in one pass.
        attributions = [
            kernels.finalize(grad[: len(rows)].float(), x, base) if multiply_by_inputs else grad[: len(rows)]
            for grad, (x, base) in zip(grads, sides)
        ]
        return RowAttribution(
            source=attributions[0] if source is not None else None, target=attributions[-1], logits=logits[: len(rows)]
        )
