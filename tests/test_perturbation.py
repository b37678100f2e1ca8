"""Perturbation methods (occlusion, LIME, value zeroing, ReAGent) against Captum or a direct computation.

The models are the tiny random fixtures in float64: perturbation methods take differences of
attributed functions, and on these models a source token moves a probability of ~3e-3 by ~1e-6,
so in float32 such differences carry ~1e-3 relative rounding noise and batched (padded, full-length)
and step-by-step forwards would differ by that much. In float64 both paths agree to ~1e-12.
"""

import math

import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion

import instrument
from instrument.models.base import attribute_reference

from helpers import DECODER_TARGETS, SOURCES, TRANSLATIONS, Case, assert_same, close, double_model
from tiny_models import ALL_ARCHS, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")


def texts(wrapped):
    return (SOURCES, TRANSLATIONS) if wrapped.is_encoder_decoder else (SOURCES, DECODER_TARGETS)


def check_batched_equals_reference(wrapped, method, **options):
    common = dict(
        method=method,
        show_progress=False,
        step_scores=["probability"],
        attribute_target=wrapped.is_encoder_decoder,
        **options,
    )
    batched = wrapped.attribute(*texts(wrapped), **common)
    reference = attribute_reference(wrapped, *texts(wrapped), **common)
    for got, expected in zip(batched, reference):
        assert_same(got.source_attributions, expected.source_attributions)
        assert_same(got.target_attributions, expected.target_attributions)
        torch.testing.assert_close(got.step_scores["probability"], expected.step_scores["probability"])
        assert not got.target_attributions[got.attr_pos_start - 1 :].isnan().all()
    return batched


# -- occlusion -----------------------------------------------------------------------------------

OCCLUSION_OPTIONS = [
    {},
    {"sliding_window_shapes": (1, 16), "strides": (1, 8), "perturbations_per_eval": 5},
    {"sliding_window_shapes": ((2, 32), (1, 12)), "strides": ((1, 32), (1, 10)), "baselines": None},
]


@pytest.fixture(scope="module", params=ALL_ARCHS)
def wrapped(request):
    model, tokenizer = double_model(request.param)
    return instrument.load_model(model, tokenizer=tokenizer)


@pytest.mark.parametrize("options", OCCLUSION_OPTIONS)
def test_occlusion_batched_equals_step_by_step(wrapped, options):
    check_batched_equals_reference(wrapped, "occlusion", **options)


OCCLUSION_CAPTUM = [
    # (arch, attribute_target, our options, Captum's sliding windows, strides, UNK baselines)
    ("gpt2", False, {}, ((1, 32),), 1, True),  # the default: UNK baselines, as Inseq
    (
        "gpt2",
        False,
        {"sliding_window_shapes": (2, 12), "strides": (1, 5), "baselines": None},
        ((2, 12),),
        ((1, 5),),
        True,
    ),
    (
        "llama",
        False,
        {"sliding_window_shapes": (3, 32), "strides": (2, 32), "baselines": "zeros"},
        ((3, 32),),
        ((2, 32),),
        False,
    ),
    ("bart", False, {}, ((1, 32),), 1, True),
    (
        "bart",
        True,
        {"sliding_window_shapes": ((2, 32), (1, 16)), "strides": ((2, 32), (1, 16)), "baselines": "zeros"},
        ((2, 32), (1, 16)),
        ((2, 32), (1, 16)),
        False,
    ),
    ("t5", True, {"baselines": None}, ((1, 32), (1, 32)), 1, True),
]


@pytest.mark.parametrize("arch, attribute_target, options, windows, strides, unk", OCCLUSION_CAPTUM)
def test_occlusion_equals_captum(arch, attribute_target, options, windows, strides, unk):
    c = Case(arch)
    seq = c.attribute("occlusion", attribute_target=attribute_target, **options)
    sides = c.sides(attribute_target)
    for j, p in enumerate(c.steps):
        if not c.enc_dec and p < windows[0][0]:
            continue
        inputs, baselines = c.embeds(p, attribute_target, c.tok.unk_token_id if unk else None)
        expected = CaptumOcclusion(c.prob_fn(p, attribute_target)).attribute(
            inputs,
            sliding_window_shapes=windows,
            strides=(strides,) * len(inputs) if isinstance(strides, int) else strides,
            baselines=baselines if unk else None,
        )
        granular = any(window[1] < c.model.config.hidden_size for window in windows)
        for side, ref in zip(sides, expected):
            if not granular:  # every hidden unit of a token has the same score: one per token is stored
                assert torch.equal(ref[0], ref[0][..., :1].expand_as(ref[0]))
            close(c.ours(seq, j, p, side), ref[0] if granular else ref[0][..., 0])
        if "target" in sides:
            assert seq.target_attributions[p:, j].isnan().all()
        attributions = seq.source_attributions if c.enc_dec else seq.target_attributions
        assert attributions.dim() == (3 if granular else 2)


def test_occlusion_one_forward_per_perturbation_chunk_for_all_steps():
    model, tokenizer = double_model("gpt2")
    wrapped = instrument.load_model(model, "occlusion", tokenizer=tokenizer, perturbations_per_eval=4)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    out = wrapped.attribute(SOURCES, DECODER_TARGETS, show_progress=False, step_scores=["probability"])
    handle.remove()
    # one window per token of each example's longest attributed prefix, read at every step
    perturbations = sum(seq.attr_pos_end - 1 for seq in out)
    assert len(calls) == 1 + math.ceil(perturbations / 4)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"sliding_window_shapes": (9, 32)}, ValueError, "spans 9 tokens"),
        ({"sliding_window_shapes": (1, 64)}, ValueError, "out of range"),
        ({"sliding_window_shapes": (1, 8), "strides": (1, 16)}, ValueError, "cannot be larger"),
        ({"sliding_window_shapes": "token"}, ValueError, "pair of ints"),
        ({"perturbations_per_eval": 0}, ValueError, "perturbations_per_eval"),
        ({"baselines": "mask"}, ValueError, "Unknown baselines"),
        ({"windows": 2}, TypeError, "windows"),
    ],
)
def test_occlusion_bad_options(options, error, match):
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    with pytest.raises(error, match=match):
        wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], method="occlusion", show_progress=False, **options)


# -- value zeroing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"layers": -1, "normalize": True, "perturbations_per_eval": 5},
        {"similarity_metric": "euclidean", "layers": [0]},
    ],
)
def test_value_zeroing_batched_equals_step_by_step(wrapped, options):
    batched = check_batched_equals_reference(wrapped, "value_zeroing", **options)
    n_layers = 1 if "layers" in options else 2
    assert batched[0].target_attributions.shape[2:] == (n_layers,)


class ZeroValue:
    """A reference independent of the library's hooks on value projections: an attention function
    registered with transformers that zeroes `value[:, :, j]` (token j, every head) in one attention
    module, then runs that module's own eager attention."""

    module, token = None, None

    @classmethod
    def attention(cls, module, query, key, value, attention_mask, **kwargs):
        import sys

        if module is cls.module:
            value = value.clone()
            value[:, :, cls.token] = 0
        return sys.modules[type(module).__module__].eager_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )

    @classmethod
    def register(cls):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register("test_value_zeroing", cls.attention)
        AttentionMaskInterface.register("test_value_zeroing", eager_mask)


def value_zeroing_by_hand(arch, seq, layers, metric="cosine"):
    """`{side: [positions, steps, layers]}`: for each step p, layer l and token j, one unpadded
    forward of the prefix with token j's values zeroed in layer l only, then the distance between
    block l's outputs at query p - 1 with and without it."""
    from instrument.selection import resolve_alias

    model, _ = double_model(arch)
    ZeroValue.register()
    model.set_attn_implementation("test_value_zeroing")
    for module in model.modules():  # transformers 5.17 leaves T5's decoder on its own copy of the config
        if hasattr(getattr(module, "config", None), "_attn_implementation_internal"):
            module.config._attn_implementation_internal = "test_value_zeroing"
    enc_dec = model.config.is_encoder_decoder
    blocks = resolve_alias(model, "layers", "decoder" if enc_dec else None)
    modules = {"target": resolve_alias(model, "attention", "decoder" if enc_dec else None)}
    if enc_dec:
        modules["source"] = resolve_alias(model, "cross_attention", "decoder")
    target = torch.tensor([t.id for t in seq.target])
    source = torch.tensor([t.id for t in seq.source])[None] if enc_dec else None
    out = {}
    for side, names in modules.items():
        length = len(seq.source) if side == "source" else len(seq.target)
        grid = torch.full(
            (length, seq.attr_pos_end - seq.attr_pos_start, len(layers)), float("nan"), dtype=torch.float64
        )
        for step, p in enumerate(range(seq.attr_pos_start, seq.attr_pos_end)):
            kwargs = (
                {"decoder_input_ids": target[:p][None], "input_ids": source}
                if enc_dec
                else {"input_ids": target[:p][None]}
            )
            for column, layer in enumerate(layers):
                # the last block is read after the stack's final norm (the model's last hidden state), as Inseq
                last = layer % len(blocks) == len(blocks) - 1
                block = model.get_submodule(blocks[layer].rsplit(".", 2)[0] if last else blocks[layer])
                attention = model.get_submodule(next(n for n in names if n.startswith(blocks[layer] + ".")))
                captured = []
                handle = block.register_forward_hook(
                    lambda m, a, o: captured.append(o if isinstance(o, torch.Tensor) else o[0])
                )
                with torch.no_grad():
                    ZeroValue.module = None
                    model(**kwargs)
                    ZeroValue.module = attention
                    for j in range(length if side == "source" else p):
                        ZeroValue.token = j
                        model(**kwargs)
                handle.remove()
                ZeroValue.module = None
                clean = captured[0][0, p - 1]
                for j, zeroed in enumerate(captured[1:]):
                    zeroed = zeroed[0, p - 1]
                    if metric == "cosine":
                        grid[j, step, column] = 1 - torch.dot(clean, zeroed) / (clean.norm() * zeroed.norm())
                    else:
                        grid[j, step, column] = (clean - zeroed).norm()
        out[side] = grid
    return out


@pytest.mark.parametrize(
    "arch, options",
    [
        ("gpt2", {}),
        ("gpt_neox", {"layers": [-1], "normalize": False}),
        ("llama", {"similarity_metric": "euclidean"}),
        ("t5", {"normalize": False, "min_score_threshold": 0}),
        ("bart", {"layers": [0], "min_score_threshold": 1e-6}),
        ("opt", {"layers": [-1]}),
    ],
)
def test_value_zeroing_equals_direct_computation(arch, options):
    model, tokenizer = double_model(arch, attn_implementation="sdpa")  # the method does not need eager
    wrapped = instrument.load_model(model, "value_zeroing", tokenizer=tokenizer)
    inputs, targets = texts(wrapped)
    out = wrapped.attribute(
        inputs[:2], targets[:2], show_progress=False, attribute_target=wrapped.is_encoder_decoder, **options
    )
    layers = [layer % 2 for layer in options["layers"]] if options.get("layers") else [0, 1]
    threshold = options.get("min_score_threshold", 1e-5)
    for seq in out:
        expected = value_zeroing_by_hand(arch, seq, layers, options.get("similarity_metric", "cosine"))
        for side, grid in expected.items():
            grid = torch.where(grid < threshold, torch.zeros_like(grid), grid)
            if options.get("normalize", True):
                total = grid.nansum(0, keepdim=True)
                grid = grid / torch.where(total == 0, torch.ones_like(total), total)
            ours = getattr(seq, f"{side}_attributions")
            assert torch.equal(ours.isnan(), grid.isnan())
            torch.testing.assert_close(
                ours.nan_to_num().double(),
                grid.nan_to_num(),
                rtol=1e-5,
                atol=1e-7 * float(grid.nan_to_num().abs().max()),
            )
            assert grid.nan_to_num().abs().max() > 0


@pytest.mark.parametrize(
    "options, match",
    [
        ({"similarity_metric": "dot"}, "similarity_metric"),
        ({"layers": 7}, "layers index 7 is out of range"),
        ({"perturbations_per_eval": -1}, "perturbations_per_eval"),
    ],
)
def test_value_zeroing_bad_options(options, match):
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=match):
        wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], method="value_zeroing", show_progress=False, **options)


# -- LIME ----------------------------------------------------------------------------------------


def test_lime_batched_equals_step_by_step(wrapped):
    check_batched_equals_reference(wrapped, "lime", n_samples=9, perturbations_per_eval=7)


class WeightedLeastSquares:
    """A Captum interpretable model: least squares with intercept weighted by the similarities,
    solved here through the pseudo-inverse of the weighted normal equations."""

    def __new__(cls):
        from captum._utils.models.model import Model

        class Surrogate(Model):
            def fit(self, train_data, **kwargs):
                x, y, w = next(iter(train_data))
                design = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
                weighted = design.T * w.double()
                self.coef = torch.linalg.pinv(weighted @ design) @ weighted @ y.double()

            def representation(self):
                return self.coef[:-1]

            def __call__(self, x):
                return x.double() @ self.coef[:-1] + self.coef[-1]

        return Surrogate()


@pytest.mark.parametrize(
    "arch, attribute_target, options",
    [
        ("gpt2", False, {}),
        ("llama", False, {"baselines": None, "kernel_width": 0.5}),
        ("bart", True, {}),
        ("t5", False, {"distance_mode": "euclidean", "kernel_width": 3.0}),
    ],
)
def test_lime_equals_captum_with_the_same_samples(arch, attribute_target, options):
    """Captum's Lime (its sampling loop, interpretable-to-input transform, similarity kernel and
    feature mask handling) fed the token subsets the library drew, with a least-squares surrogate."""
    from captum.attr import Lime as CaptumLime
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    from methods.lime import token_samples

    n_samples, seed = 40, 3
    c = Case(arch)
    seq = c.attribute(
        "lime", variant="captum", attribute_target=attribute_target, n_samples=n_samples, seed=seed, **options
    )
    sides = c.sides(attribute_target)
    for j, p in enumerate(c.steps):
        inputs, baselines = c.embeds(p, attribute_target, c.tok.unk_token_id if "baselines" in options else None)
        lengths = [x.shape[1] for x in inputs]
        bits = torch.cat(
            [token_samples(seed, int(side == "target"), n, n_samples) for side, n in zip(sides, lengths)], dim=1
        )

        def replay(original, **kwargs):
            for k in range(n_samples):
                yield bits[k][None].long()

        masks, offset = [], 0
        for x in inputs:
            masks.append((offset + torch.arange(x.shape[1]))[None, :, None].expand_as(x))
            offset += x.shape[1]
        lime = CaptumLime(
            c.prob_fn(p, attribute_target),
            interpretable_model=WeightedLeastSquares(),
            similarity_func=get_exp_kernel_similarity_function(
                options.get("distance_mode", "cosine"), options.get("kernel_width", 1.0)
            ),
            perturb_func=replay,
        )
        expected = lime.attribute(
            inputs,
            baselines=baselines if baselines is not None else tuple(0.0 for _ in inputs),
            feature_mask=tuple(masks),
            n_samples=n_samples,
            perturbations_per_eval=8,
        )
        for side, ref in zip(sides, expected):
            ours = c.ours(seq, j, p, side)
            assert torch.equal(ours, ours[..., :1].expand_as(ours))  # one coefficient per token, repeated
            close(ours, ref[0], rtol=1e-5)
        assert float(expected[0].abs().max()) > 0


def test_lime_sampling_is_seeded_bernoulli_half_and_prefix_consistent():
    from methods.lime import token_samples

    samples = token_samples(0, 1, 300, 400)
    assert abs(samples.double().mean() - 0.5) < 0.01  # 120000 fair coins: sd 0.0014
    per_token = samples.double().mean(0)
    assert per_token.min() > 0.4 and per_token.max() < 0.6  # 400 coins per token: sd 0.025, 4 sd
    assert torch.equal(token_samples(0, 1, 12, 400), samples[:, :12])  # a shorter prefix sees the same bits
    assert not torch.equal(token_samples(1, 1, 12, 400), samples[:, :12])
    assert not torch.equal(token_samples(0, 0, 12, 400), samples[:, :12])
    c = Case("gpt2")
    first, again = (c.attribute("lime", n_samples=10, seed=5) for _ in range(2))
    other = c.attribute("lime", n_samples=10, seed=6)
    assert torch.equal(first.target_attributions.nan_to_num(), again.target_attributions.nan_to_num())
    assert not torch.equal(first.target_attributions.nan_to_num(), other.target_attributions.nan_to_num())


def test_lime_recovers_a_token_effect_statistically():
    """With many samples, the coefficient of a token is its average marginal effect; the last prompt
    token moves the first generated token's probability most of all in this model, and LIME ranks
    it first, as occlusion of that token alone does."""
    c = Case("gpt2")
    lime = c.attribute("lime", variant="captum", n_samples=400, seed=0)
    occlusion = c.attribute("occlusion", baselines="zeros")  # the baseline LIME uses
    p = c.steps[0]
    lime_scores = lime.target_attributions[:p, 0, 0]
    occlusion_scores = occlusion.target_attributions[:p, 0]
    assert int(lime_scores.abs().argmax()) == int(occlusion_scores.abs().argmax())
    assert torch.sign(lime_scores[occlusion_scores.abs().argmax()]) == torch.sign(
        occlusion_scores[occlusion_scores.abs().argmax()]
    )


@pytest.mark.parametrize(
    "options, match",
    [
        ({"n_samples": 0}, "n_samples"),
        ({"variant": "captum", "distance_mode": "manhattan"}, "distance_mode"),
        ({"variant": "captum", "kernel_width": 0}, "kernel_width"),
        ({"variant": "sklearn"}, "variant must be"),
        ({"kernel_width": 2.0}, "kernel_width is an option of variant='captum'"),
        ({"baselines": None}, "baselines is an option of variant='captum'"),
        ({"variant": "captum", "mask_prob": 0.5}, "mask_prob is an option of variant='inseq'"),
        ({"mask_prob": 1.5}, "mask_prob"),
        ({"alpha": 0}, "alpha"),
        ({"mask_token": "mask"}, "mask_token"),
    ],
)
def test_lime_bad_options(options, match):
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=match):
        wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], method="lime", show_progress=False, **options)


# -- ReAGent -------------------------------------------------------------------------------------

REAGENT = {"max_probe_steps": 4, "num_probes": 3, "stopping_condition_top_k": 40}


def test_reagent_batched_equals_step_by_step(wrapped):
    check_batched_equals_reference(wrapped, "reagent", **REAGENT)


def reagent_by_hand(c, p, attribute_target, seed, num_probes, max_steps, top_k, keep_top_n, ratio, candidates):
    """ReAGent for one step, written out after the paper / Inseq's DeltaProbImportanceScoreEvaluator,
    TopKStoppingConditionEvaluator and AggregateRationalizer, on one unpadded forward per probe, with
    the random streams the library gives each probe (initial scores, then per iteration: update mask,
    update replacements, stopping-check replacements)."""
    from instrument.rows import Example, Rows
    from methods.reagent import probe_generator

    example = Example(target_ids=c.target, start=p, end=p + 1, source_ids=c.source)
    rows = Rows.build([example], [(0, p)], c.tok.pad_token_id)
    token = int(c.target[p])
    n_source = len(c.source) if c.enc_dec else 0
    ids = (
        torch.cat([c.source, c.target[:p]])
        if c.enc_dec and attribute_target
        else (c.source if c.enc_dec else c.target[:p])
    )

    def prob_and_top(new_ids):
        with torch.no_grad():
            if c.enc_dec:
                source = new_ids[:n_source][None]
                target = (new_ids[n_source:] if attribute_target else c.target[:p])[None]
                logits = c.model(input_ids=source, decoder_input_ids=target).logits[0, -1]
            else:
                logits = c.model(input_ids=new_ids[None]).logits[0, -1]
        return float(logits.float().softmax(-1)[token]), token in logits.topk(top_k).indices.tolist()

    original, _ = prob_and_top(ids)
    finals = []
    for k in range(num_probes):
        g = probe_generator(seed, k, rows, 0)
        logit = torch.rand(len(ids), generator=g, dtype=torch.float64)
        stopped = False
        for _ in range(max_steps):
            mask = torch.rand(len(ids), generator=g, dtype=torch.float64) < ratio
            sampled = candidates[torch.randint(len(candidates), (len(ids),), generator=g)]
            replaced_prob, _ = prob_and_top(torch.where(mask, sampled, ids))
            delta = original - replaced_prob
            logit = logit + torch.logit(
                torch.where(mask, torch.tensor(delta), torch.tensor(-delta)).double() * 0.5 + 0.5
            )
            importance = logit.softmax(-1)
            keep = torch.zeros(len(ids), dtype=torch.bool)
            keep[torch.argsort(importance, descending=True, stable=True)[:keep_top_n]] = True
            sampled = candidates[torch.randint(len(candidates), (len(ids),), generator=g)]
            _, hit = prob_and_top(torch.where(keep, ids, sampled))
            if hit:
                stopped = True
                break
        finals.append((logit.softmax(-1), stopped))
    done = [score for score, stopped in finals if stopped] or [score for score, _ in finals]
    return torch.stack(done).mean(0), sum(stopped for _, stopped in finals)


@pytest.mark.parametrize("arch, attribute_target", [("gpt2", False), ("llama", False), ("bart", True), ("t5", False)])
def test_reagent_equals_the_algorithm_written_out(arch, attribute_target):
    c = Case(arch)
    options = dict(
        seed=7, num_probes=4, max_probe_steps=6, stopping_condition_top_k=25, keep_top_n=2, replacing_ratio=0.4
    )
    seq = c.attribute("reagent", attribute_target=attribute_target, **options)
    special = {c.tok.pad_token_id, c.tok.unk_token_id, c.tok.eos_token_id}
    candidates = torch.tensor([t for t in range(c.tgt_emb.weight.shape[0]) if t not in special])
    stops = 0
    for j, p in enumerate(c.steps):
        expected, stopped = reagent_by_hand(
            c,
            p,
            attribute_target,
            options["seed"],
            options["num_probes"],
            options["max_probe_steps"],
            options["stopping_condition_top_k"],
            options["keep_top_n"],
            options["replacing_ratio"],
            candidates,
        )
        stops += stopped
        ours = torch.cat([c.ours(seq, j, p, side) for side in c.sides(attribute_target)])
        assert torch.equal(ours, ours[:, :1].expand_as(ours))  # one score per token, repeated over the embedding
        torch.testing.assert_close(ours[:, 0].double(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours[:, 0].sum().double(), torch.tensor(1.0, dtype=torch.float64))
    assert 0 < stops < len(c.steps) * options["num_probes"]  # some probes stopped early, some ran out of steps


@pytest.mark.parametrize(
    "options, match",
    [
        ({"keep_top_n": 0}, "keep_ratio"),
        ({"keep_top_n": 0, "keep_ratio": 1.5}, "keep_ratio"),
        ({"replacing_ratio": 0}, "replacing_ratio"),
        ({"num_probes": 0}, "num_probes"),
        ({"stopping_condition_top_k": 0}, "stopping_condition_top_k"),
        ({"internal_batch_size": 0}, "internal_batch_size"),
    ],
)
def test_reagent_bad_options(options, match):
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=match):
        wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], method="reagent", show_progress=False, **options)


@pytest.mark.parametrize(
    "attributed_fn, kwargs, match",
    [
        ("logit", {}, "attributed_fn='logit'"),
        ("entropy", {}, "attributed_fn='entropy'"),
        ("probability", {"logprob": True}, "probability in \\[0, 1\\].*attributed_fn='probability'"),
        (lambda args: args.logits[:, 0] * 0 + 2.0, {}, "probability in \\[0, 1\\].*attributed_fn='<lambda>'"),
    ],
)
def test_reagent_refuses_attributed_functions_that_are_not_probabilities(attributed_fn, kwargs, match):
    """ReAGent's update takes logit(0.5 +- 0.5 * delta): NaN unless the function is a probability."""
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=match):
        wrapped.attribute(
            SOURCES[0],
            DECODER_TARGETS[0],
            method="reagent",
            show_progress=False,
            attributed_fn=attributed_fn,
            **REAGENT,
            **kwargs,
        )


def test_reagent_accepts_probabilities_of_contrast_targets():
    model, tokenizer = tiny_model("gpt2")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    seq = wrapped.attribute(
        SOURCES[0],
        DECODER_TARGETS[0],
        method="reagent",
        show_progress=False,
        attributed_fn="contrast_prob",
        contrast_targets="Hello world, that",
        **REAGENT,
    )[0]
    scores = seq.target_attributions[..., 0]
    assert torch.isfinite(scores.nan_to_num()).all()
    torch.testing.assert_close(scores.nansum(0), torch.ones(scores.shape[1]))  # importance sums to 1 per step


def ridge_by_hand(features, targets, weights, alpha):
    """scikit-learn's `Ridge(alpha).fit(X, y, sample_weight=w).coef_` in its primal form: weighted
    centering (the intercept), then `(Xc^T W Xc + alpha I)^-1 Xc^T W yc`, float64."""
    x, y, w = features.double(), targets.double(), weights.double()
    xc = x - (w[:, None] * x).sum(0) / w.sum()
    yc = y - (w * y).sum() / w.sum()
    lhs = xc.T @ (w[:, None] * xc) + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(lhs, xc.T @ (w * yc))


@pytest.mark.parametrize("arch, mask_token, alpha", [("gpt2", "unk", 1.0), ("llama", "pad", 1e-3), ("t5", "unk", 1.0)])
def test_lime_inseq_variant_written_out(arch, mask_token, alpha):
    """Inseq's LIME, step by step: the library's token subsets (a token replaced with probability 0.3),
    replaced embeddings holding the mask token's id in every element, similarity = number of
    embedding elements left equal, and a ridge regression on the flattened perturbed embeddings."""
    from methods.lime import token_samples

    n_samples, seed = 30, 4
    c = Case(arch)
    seq = c.attribute("lime", n_samples=n_samples, seed=seed, mask_token=mask_token, alpha=alpha)
    fill = float(c.tok.unk_token_id if mask_token == "unk" else c.tok.pad_token_id)
    side = "source" if c.enc_dec else "target"
    for j, p in enumerate(c.steps):
        (x,), _ = c.embeds(p, attribute_target=False)
        keep = token_samples(seed, int(side == "target"), x.shape[1], n_samples, keep_prob=0.7)
        perturbed = torch.where(keep[:, :, None], x, torch.full_like(x, fill))  # [n, L, H]
        with torch.no_grad():
            targets = c.prob_fn(p)(perturbed).double()
        weights = (perturbed == x).sum((1, 2)).double()
        expected = ridge_by_hand(perturbed.flatten(1), targets, weights, alpha).view(x.shape[1:])
        close(c.ours(seq, j, p, side), expected, rtol=1e-5)
        assert float(expected.abs().max()) > 0
    assert getattr(seq, f"{side}_attributions").shape[-1] == x.shape[-1]  # one coefficient per embedding element


def test_lime_inseq_variant_replaces_three_tokens_in_ten():
    from methods.lime import token_samples

    keep = token_samples(0, 0, 200, 500, keep_prob=0.7)
    assert abs(1 - keep.double().mean() - 0.3) < 0.005  # 100000 draws: sd 0.0014


def test_occlusion_per_token_scores_work_with_aggregation_views_and_files(tmp_path):
    """One score per token, `[positions, steps]`: aggregators, views and files take it as they take
    attention's 2-D scores; the default aggregation keeps the sign and divides each step's scores by
    the sum of their absolute values."""
    model, tokenizer = tiny_model("bart")
    wrapped = instrument.load_model(model, tokenizer=tokenizer)
    out = wrapped.attribute(
        SOURCES[:2], TRANSLATIONS[:2], method="occlusion", attribute_target=True, show_progress=False
    )
    seq = out[0]
    assert seq.source_attributions.shape == (len(seq.source), len(seq.generated))
    assert seq.target_attributions.shape == (len(seq.target), len(seq.generated))
    scores = seq.aggregate()
    both = torch.cat([scores.source_attributions, scores.target_attributions]).nan_to_num()
    torch.testing.assert_close(both.abs().sum(0), torch.ones(both.shape[1]))
    raw = torch.cat([seq.source_attributions, seq.target_attributions]).nan_to_num()
    torch.testing.assert_close(both, raw / raw.abs().sum(0))
    assert (raw < 0).any() and (raw > 0).any()  # signed
    assert seq.aggregate("subwords").source_attributions.dim() == 2
    assert seq[0:2].source_attributions.shape == (2, len(seq.generated))
    html = out.show(return_html=True, display=False)
    assert isinstance(html, str) and html.count("<tr") > len(seq.source)
    path = tmp_path / "occlusion.safetensors"
    out.save(path)
    assert instrument.FeatureAttributionOutput.load(path).equals(out)
