"""Value zeroing (Mohebbi et al. 2023) inside attention, per layer, as Inseq computes it.

out = model.attribute(text, method="value_zeroing", layers=[-1])       # [positions, steps, layers]
out[0].sequence_scores["encoder_self_scores"]                          # encoder-decoders
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from instrument.hooks import HookHandles
from instrument.indices import pick_indices
from instrument.rows import RowAttribution, full_rows
from instrument.selection import model_config, resolve_alias, select_modules
from methods.base import AttributionMethod, Request
from methods.perturber import Perturber
from methods.registry import register


class _Stop(Exception):
    """Ends a forward once the last block whose output is read has run."""


def _zero_rows(output: torch.Tensor, index: torch.Tensor, columns) -> torch.Tensor:
    """`output [N, tokens, ...]` with `output[n, index[n], *columns] = 0` where `index[n] >= 0`."""
    output = output.clone()
    n = (index >= 0).nonzero().squeeze(1)
    columns = columns if isinstance(columns, tuple) else (columns,)
    output[(n, index[n]) + columns] = 0
    return output


def value_projection(attention: nn.Module, name: str, value_vector: str | None = None):
    """The module computing an attention module's value vectors, and `zero(output, index)` setting
    token `index[n]`'s value vectors (all heads) to zero in copy n of its output. `value_vector`: the
    module's name inside `attention` registered by `instrument.register_model_config`."""
    if value_vector is not None:
        try:
            module = attention.get_submodule(value_vector)
        except AttributeError:
            raise ValueError(f"The registered value_vector {value_vector!r} is not a module inside {name}") from None
        return module, lambda out, index: _zero_rows(out, index, slice(None))
    children = dict(attention.named_children())
    for key in ("v_proj", "v", "value", "value_proj"):
        if key in children:
            return children[key], lambda out, index: _zero_rows(out, index, slice(None))
    if "c_attn" in children and hasattr(attention, "split_size"):  # GPT-2: [q | k | v] (or [k | v] for cross-attention)
        split = attention.split_size
        return children["c_attn"], lambda out, index: _zero_rows(out, index, slice(out.shape[-1] - split, None))
    if "query_key_value" in children and "GPTNeoX" in type(attention).__name__:  # per head [q | k | v]
        size = attention.head_size

        def zero(out, index):
            view = out.reshape(*out.shape[:-1], -1, 3 * size)
            return _zero_rows(view, index, (slice(None), slice(2 * size, None))).reshape(out.shape)

        return children["query_key_value"], zero
    raise ValueError(
        f"value_zeroing does not know where {name} ({type(attention).__name__}) computes its value vectors "
        "(looked for v_proj, v, value, GPT-2's c_attn and GPT-NeoX's query_key_value)"
    )


def _first(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_first(output, value: torch.Tensor):
    return value if isinstance(output, torch.Tensor) else (value, *output[1:])


@register("value_zeroing")
class ValueZeroing(AttributionMethod):
    """Value zeroing (Mohebbi et al. 2023), per layer: `[positions, steps, layers]`, as Inseq computes it.

    For each layer and each token j, token j's value vectors (every head) are set to zero in that
    layer's attention, the layer runs on its *unperturbed* input, and token j's score at query i is
    the cosine distance (`similarity_metric="cosine"`, or "euclidean": the L2 distance) between the
    layer's original and perturbed outputs at position i. The representation compared is the output
    hidden state of the transformer block (its first output), except for the last block of the
    stack, whose output is read after the stack's final norm (the model's last hidden state), as
    Inseq does. Step p reads query `p - 1`. Decoder self-attention gives the target side; on
    encoder-decoders, zeroing source token j's values in the decoder's cross-attention gives the
    source side, and encoder self-attention gives `sequence_scores["encoder_self_scores"]`,
    `[source tokens zeroed, source queries, layers]` (`output_encoder_self_scores=False` skips it),
    the same `layers` indices picking encoder blocks. As Inseq, scores below `min_score_threshold`
    (1e-5) are set to 0 and, with `normalize=True` (the default), each query's scores are divided
    by their sum over the tokens it sees (per side and layer); `normalize=False,
    min_score_threshold=0` give the raw distances. `layers` picks blocks (indices, negative from
    the end; default: all).

    Batched: a perturbed copy of an example's full row zeroes token j in every picked layer at
    once, and each block's output is replaced by its unperturbed output before the next block, so
    that every layer sees its unperturbed input: one forward per `perturbations_per_eval` copies,
    cut short after the last picked block.
    """

    def attribute(
        self,
        request: Request,
        layers=None,
        similarity_metric="cosine",
        normalize=True,
        min_score_threshold=1e-5,
        output_encoder_self_scores=True,
        perturbations_per_eval=32,
    ) -> RowAttribution:
        if similarity_metric not in ("cosine", "euclidean"):
            raise ValueError(f"similarity_metric must be 'cosine' or 'euclidean', got {similarity_metric!r}")
        if not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
            raise ValueError(f"perturbations_per_eval must be a positive integer, got {perturbations_per_eval!r}")
        if (
            isinstance(min_score_threshold, bool)
            or not isinstance(min_score_threshold, (int, float))
            or not min_score_threshold >= 0
        ):
            raise ValueError(f"min_score_threshold must be a number >= 0, got {min_score_threshold!r}")
        engine, rows = request.engine, request.rows
        model, enc_dec = engine.model, engine.is_encoder_decoder
        stacks = {"decoder": _Stack(model, "decoder" if enc_dec else None, layers)}
        if request.attribute_target or not enc_dec:
            stacks["decoder"].zero("target", "attention")
        if enc_dec:
            stacks["decoder"].zero("source", "cross_attention")
            if output_encoder_self_scores:
                stacks["encoder"] = _Stack(model, "encoder", layers)
                stacks["encoder"].zero("encoder", "attention")
        fr = full_rows(rows)
        perturber = Perturber(request, fr)
        encoder = select_modules(model, model.get_encoder())[0] if enc_dec else None
        read = [name for stack in stacks.values() for name in stack.read]
        with torch.no_grad():
            logits, clean = engine.forward_steps(
                fr.full, fr.positions, layers=list(dict.fromkeys(read + ([encoder] if enc_dec else [])))
            )
            logits = fr.gather(logits)
            clean = {name: value.detach() for name, value in clean.items()}
            out = {
                side: self._side(
                    perturber,
                    side,
                    stacks["decoder"],
                    clean=clean,
                    encoder=encoder,
                    metric=similarity_metric,
                    per_eval=perturbations_per_eval,
                )
                for side in stacks["decoder"].zeroers
            }
            sequence = {}
            if "encoder" in stacks:
                scores = self._encoder_side(
                    perturber, stacks["encoder"], clean=clean, metric=similarity_metric, per_eval=perturbations_per_eval
                )
                sequence["encoder_self_scores"] = self._finish(
                    scores, fr.full.source_mask.bool().cpu()[:, :, None, None], min_score_threshold, normalize
                )[fr.owner.cpu()]
        for side, values in out.items():
            out[side] = self._finish(
                values, self._visible(rows, side).bool().cpu()[:, :, None], min_score_threshold, normalize
            )
        return RowAttribution(
            source=out.get("source"), target=out.get("target"), logits=logits, sequence_scores=sequence
        )

    @staticmethod
    def _finish(values: torch.Tensor, visible: torch.Tensor, threshold: float, normalize: bool) -> torch.Tensor:
        """Scores below `threshold` set to 0, then (`normalize`) divided by their sum over the visible
        tokens (dim 1), a zero sum left as is."""
        values = torch.where(values < threshold, torch.zeros_like(values), values)
        if normalize:
            total = (values * visible).sum(1, keepdim=True)
            values = values / torch.where(total == 0, torch.ones_like(total), total)
        return values

    @staticmethod
    def _visible(rows, side: str) -> torch.Tensor:
        if side == "source":
            return rows.source_mask.float()
        length = rows.target_ids.shape[1]
        return (torch.arange(length, device=rows.target_ids.device)[None] < rows.position[:, None]).float()

    @staticmethod
    def _zeroed_run(
        stack: _Stack, side: str, *, clean: dict, owners: torch.Tensor, zero_at: torch.Tensor, run: Callable[[], Any]
    ) -> dict[str, torch.Tensor]:
        """Runs `run()` with token `zero_at[n]`'s values zeroed in copy n in every picked layer of
        `stack`, each read block's output replaced by its clean output (`clean[name][owners]`);
        returns the perturbed representations of the picked layers (the last block's after the
        stack's final norm), stopping once they are all read."""
        model = stack.model
        captured = {}
        picked = set(stack.picked_names)

        def block_hook(name):
            def hook(module, args, output):
                if name in picked:
                    captured[name] = _first(output)
                if name == stack.read[-1] and not stack.final:
                    raise _Stop
                return _with_first(output, clean[name][owners])  # the next block sees its clean input

            return hook

        def stack_hook(module, args, output):
            captured[stack.blocks[-1]] = _first(output)
            raise _Stop

        with HookHandles() as hooks:
            for projection, zero in stack.zeroers[side]:
                hooks.forward(projection, lambda m, a, o, zero=zero: zero(o, zero_at))
            for name in (
                stack.read[:-2] if stack.final else stack.read
            ):  # when final, read ends with the last block, the stack
                hooks.forward(model.get_submodule(name), block_hook(name))
            if stack.final:
                hooks.forward(model.get_submodule(stack.name), stack_hook)
            try:
                run()
            except _Stop:
                pass
        return captured

    @staticmethod
    def _distances(
        stack: _Stack, *, clean: dict, captured: dict, owners: torch.Tensor, queries: torch.Tensor, metric: str
    ) -> torch.Tensor:
        """`[N, K, layers]` distances at positions `queries [N, K]` between clean and perturbed outputs."""
        n_index = torch.arange(len(owners), device=queries.device)[:, None]
        distances = []
        for name, key in zip(stack.picked_names, stack.clean_names):
            original, perturbed = clean[key][owners][n_index, queries], captured[name][n_index, queries]
            original, perturbed = original.double(), perturbed.double()  # 1 - cos of nearly equal vectors
            if metric == "cosine":
                distances.append(1 - torch.nn.functional.cosine_similarity(original, perturbed, dim=-1))
            else:
                distances.append((original - perturbed).norm(dim=-1))
        return torch.stack(distances, dim=-1).float().cpu()

    def _side(
        self,
        perturber: Perturber,
        side: str,
        stack: _Stack,
        *,
        clean: dict,
        encoder: str | None,
        metric: str,
        per_eval: int,
    ) -> torch.Tensor:
        """`[R, tokens zeroed, layers]` scores of one side: each row's query reads its step's position."""
        from transformers.modeling_outputs import BaseModelOutput

        engine, fr, rows = perturber.engine, perturber.fr, perturber.request.rows
        full = fr.full
        mask = full.source_mask if side == "source" else full.target_mask
        perturbations = [(f, j) for f, j in mask.nonzero().tolist()]
        result = torch.zeros(len(rows), mask.shape[1], len(stack.picked))
        per_eval = _per_eval(perturber, stack, clean, per_eval, full.target_ids.shape[1])
        for start in range(0, len(perturbations), per_eval):
            chunk = perturbations[start : start + per_eval]
            owners = torch.tensor([f for f, _ in chunk], dtype=torch.long, device=full.target_ids.device)
            zero_at = torch.tensor([j for _, j in chunk], dtype=torch.long, device=full.target_ids.device)
            sub = full.take(owners)
            kwargs = {"use_cache": False}
            if engine.is_encoder_decoder:
                kwargs.update(
                    encoder_outputs=BaseModelOutput(last_hidden_state=clean[encoder][owners]),
                    attention_mask=sub.source_mask,
                    decoder_input_ids=sub.target_ids,
                    decoder_attention_mask=sub.target_mask,
                )
            else:
                kwargs.update(input_ids=sub.target_ids, attention_mask=sub.target_mask)
            captured = self._zeroed_run(
                stack, side, clean=clean, owners=owners, zero_at=zero_at, run=lambda: engine.model(**kwargs)
            )
            distances = self._distances(
                stack, clean=clean, captured=captured, owners=owners, queries=fr.positions[owners], metric=metric
            )  # [N, K, layers]
            pairs_n, pairs_r = [], []
            for n, (f, _) in enumerate(chunk):
                for r in perturber.rows_of[f]:
                    pairs_n.append(n)
                    pairs_r.append(r)
            pairs_n, pairs_r = torch.tensor(pairs_n), torch.tensor(pairs_r)
            result[pairs_r, zero_at.cpu()[pairs_n]] = distances[pairs_n, fr.slot.cpu()[pairs_r]]
        return result

    def _encoder_side(
        self, perturber: Perturber, stack: _Stack, *, clean: dict, metric: str, per_eval: int
    ) -> torch.Tensor:
        """`[F, source tokens zeroed, source queries, layers]` encoder self-attention scores per full row."""
        full = perturber.fr.full
        mask = full.source_mask
        width = mask.shape[1]
        perturbations = [(f, j) for f, j in mask.nonzero().tolist()]
        result = torch.zeros(len(full), width, width, len(stack.picked))
        encoder = stack.model.get_encoder()
        per_eval = _per_eval(perturber, stack, clean, per_eval, width)
        for start in range(0, len(perturbations), per_eval):
            chunk = perturbations[start : start + per_eval]
            owners = torch.tensor([f for f, _ in chunk], dtype=torch.long, device=full.target_ids.device)
            zero_at = torch.tensor([j for _, j in chunk], dtype=torch.long, device=full.target_ids.device)
            sub = full.take(owners)
            captured = self._zeroed_run(
                stack,
                "encoder",
                clean=clean,
                owners=owners,
                zero_at=zero_at,
                run=lambda: encoder(input_ids=sub.source_ids, attention_mask=sub.source_mask),
            )
            queries = torch.arange(width, device=owners.device)[None].expand(len(chunk), -1)
            distances = self._distances(
                stack, clean=clean, captured=captured, owners=owners, queries=queries, metric=metric
            )  # [N, S, layers]
            result[owners.cpu(), zero_at.cpu()] = distances
        return result


def _per_eval(perturber: Perturber, stack: _Stack, clean: dict, requested: int, width: int) -> int:
    """Zeroed copies per forward: the planner's choice (`Perturber.per_eval`); the forwards stop
    before the LM head and keep each picked layer's output."""
    hidden = next(iter(clean.values())).shape[-1]
    return perturber.per_eval(requested, reads=0, kept=len(stack.picked) * width * hidden * 4)


class _Stack:
    """The blocks of one stack (decoder-only model, decoder or encoder), the picked ones, and the
    value projections to zero in them, per side. `name` is the module holding the blocks, whose
    output is the stack's last hidden state (after its final norm)."""

    def __init__(self, model: nn.Module, scope: str | None, layers):
        self.model = model
        self.scope = scope
        self.blocks = resolve_alias(model, "layers", scope)
        if not self.blocks:
            raise ValueError(
                f"Found no transformer blocks in {type(model).__name__}" + (f"'s {scope}" if scope else "")
            )
        self.picked = pick_indices(layers, len(self.blocks), "layers", distinct=True)
        self.picked_names = [self.blocks[i] for i in self.picked]
        self.final = self.picked[-1] == len(self.blocks) - 1
        self.read = self.blocks[: self.picked[-1] + 1]
        holder = self.blocks[0].rsplit(".", 1)[0]  # the module list; its parent is the stack
        if "." not in holder:
            raise ValueError(
                f"value_zeroing needs the blocks {holder} inside a stack module "
                f"(a *ForCausalLM / *ForConditionalGeneration model)"
            )
        self.name = holder.rsplit(".", 1)[0]
        # Where the clean representation of each picked layer is read from.
        self.clean_names = [
            self.name if self.final and i == len(self.blocks) - 1 else self.blocks[i] for i in self.picked
        ]
        if self.final:
            self.read = self.read + [self.name]
        self.zeroers: dict[str, list] = {}

    def zero(self, side: str, alias: str):
        names = resolve_alias(self.model, alias, self.scope)
        self.zeroers[side] = []
        for index in self.picked:
            inside = [n for n in names if n.startswith(self.blocks[index] + ".")]
            if len(inside) != 1:
                kind = "cross-" if alias == "cross_attention" else "self-"
                raise ValueError(f"Expected one {kind}attention module in {self.blocks[index]}, found {inside}")
            registered = getattr(model_config(self.model), "value_vector", None)
            self.zeroers[side].append(value_projection(self.model.get_submodule(inside[0]), inside[0], registered))
