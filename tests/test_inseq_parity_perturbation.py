"""Perturbation methods against Inseq 0.7.1 itself, on the same (float64) tiny model objects.

    pytest tests/test_inseq_parity_perturbation.py        # skips when inseq cannot be imported

- occlusion: Inseq's defaults (one-token windows over the whole embedding, UNK baselines); Inseq
  keeps |score| per token, ours the signed score, compared as `.abs()`.
- lime: Inseq draws its masks from torch's global random state per step, ours per token from
  `seed` (see `methods.lime.token_samples`): the draws cannot be made identical, so Inseq's
  `torch.multinomial` is fed the library's masks and everything else (replacement, similarity,
  ridge, reshaping) is compared exactly; the sampling itself is compared statistically. Needs
  scikit-learn (Inseq's ridge surrogate). Inseq refuses `attribute_target=True` on encoder-decoders.
- value_zeroing: Inseq 0.7.1 predates transformers 5, so two shims (see `inseq_value_zeroing`) let
  it run; both are about plumbing, not about what it computes.
- reagent: Inseq draws replacement tokens from a part-of-speech sampler (nltk and its tagger data),
  ours uniformly from the vocabulary, and its randomness cannot be seeded like ours: compared
  statistically with a uniform sampler in Inseq (`test_reagent_equals_inseq_statistically`).

Marian: Inseq multiplies the embeddings it feeds by the model's `embed_scale`, and transformers
5's Marian decoder scales `inputs_embeds` once more, so Inseq runs a different model from
Marian's own forward (its probabilities differ by ~5%). The Marian fixture here has
`embed_scale = 1`, where both agree.

Ours is given a float64 probability as attributed function (the library's `probability` step
function is float32, and differences of ~1e-8 between probabilities of ~3e-3 would carry ~1%
rounding); Inseq's is computed in the model's dtype.
"""

import copy
import warnings

import pytest
import torch

import instrument

from tiny_models import ALL_ARCHS, ENCODER_DECODER, inseq_comparable

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    inseq = pytest.importorskip("inseq")

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = [(arch, False) for arch in ALL_ARCHS] + [(arch, True) for arch in ENCODER_DECODER]


def fixture(arch):
    """A float64 tiny model (perturbation scores are differences of ~1e-6: float32 would drown
    them), its tokenizer, and one (source, target) pair."""
    model, tokenizer = inseq_comparable(arch)
    model = model.double()
    if model.config.is_encoder_decoder:
        return model, tokenizer, ("Hello world", "Das Haus")
    return model, tokenizer, ("Hello world", "Hello world, this")


def probability64(args):
    """The target's probability, in float64 (see the module docstring)."""
    return args.logits.double().softmax(-1).gather(-1, args.target_ids[:, None])[:, 0]


def both(arch, method, attribute_target, ours_options=None, inseq_options=None, before_inseq=None):
    model, tokenizer, texts = fixture(arch)
    ours = instrument.load_model(model, tokenizer=tokenizer).attribute(
        *texts,
        method=method,
        attribute_target=attribute_target,
        show_progress=False,
        attributed_fn=probability64,
        **(ours_options or {}),
    )[0]
    wrapped = inseq.load_model(model, method, tokenizer=copy.deepcopy(tokenizer))
    if before_inseq is not None:
        before_inseq(wrapped)
    theirs = wrapped.attribute(*texts, attribute_target=attribute_target, show_progress=False, **(inseq_options or {}))[
        0
    ]
    assert [t.id for t in ours.target] == [t.id for t in theirs.target]
    assert (ours.attr_pos_start, ours.attr_pos_end) == (theirs.attr_pos_start, theirs.attr_pos_end)
    return ours, theirs


def assert_parity(ours, theirs, rtol=1e-4):
    """Equal NaN patterns and values within `rtol` relative error (of each value, or of the largest
    one for values near zero)."""
    assert ours is not None and theirs is not None
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert torch.equal(ours.isnan(), theirs.isnan())
    ours, theirs = ours.nan_to_num().double(), theirs.nan_to_num().double()
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * scale)


# -- occlusion -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, attribute_target", CASES)
def test_occlusion_equals_inseq(arch, attribute_target):
    ours, theirs = both(arch, "occlusion", attribute_target)
    assert ours.source_attributions is None or ours.source_attributions.dim() == 2
    assert_parity(
        ours.source_attributions.abs() if ours.source_attributions is not None else ours.target_attributions.abs(),
        theirs.source_attributions if theirs.source_attributions is not None else theirs.target_attributions,
    )
    if attribute_target:
        ours_target, their_target = ours.target_attributions.abs(), theirs.target_attributions
        assert_parity(ours_target, their_target)  # the decoder start token's row included: 0 in both
    assert (
        float(
            ours.target_attributions.nan_to_num().abs().max()
            if ours.source_attributions is None
            else ours.source_attributions.abs().max()
        )
        > 0
    )


# -- LIME ----------------------------------------------------------------------------------------


def replay_masks(monkeypatch, seed, n_samples, side):
    """Makes Inseq's per-sample `torch.multinomial([p, 1 - p], length)` draws (index 1: keep the
    token) return the library's masks for that sample, call after call (n_samples per step)."""
    from methods.lime import token_samples

    calls = []

    def multinomial(probs, length, replacement=False, **kwargs):
        sample = len(calls) % n_samples
        calls.append(length)
        return token_samples(seed, side, length, n_samples, keep_prob=float(probs[1]))[sample].long()

    monkeypatch.setattr(torch, "multinomial", multinomial)
    return calls


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_lime_equals_inseq_with_the_same_masks(arch, monkeypatch):
    pytest.importorskip("sklearn", reason="Inseq's LIME fits scikit-learn's Ridge")
    n_samples, seed = 12, 3
    enc_dec = arch in ENCODER_DECODER
    calls = []
    ours, theirs = both(
        arch,
        "lime",
        False,
        {"n_samples": n_samples, "seed": seed},
        {"n_samples": n_samples},
        before_inseq=lambda _: calls.append(replay_masks(monkeypatch, seed, n_samples, int(not enc_dec))),
    )
    assert len(calls[0]) == n_samples * (ours.attr_pos_end - ours.attr_pos_start)  # every draw replayed
    side = "source" if enc_dec else "target"
    expected = getattr(theirs, f"{side}_attributions")
    assert_parity(getattr(ours, f"{side}_attributions"), expected, rtol=1e-5)  # Inseq's coefficients are float32
    assert float(expected.nan_to_num().abs().max()) > 0


def test_lime_sampling_matches_inseq_statistically():
    """Inseq's own draws (torch's global random state) and ours (per token, seeded) replace each
    token with the same probability, independently: rates and pairwise co-replacement agree."""
    from inseq.attr.feat.ops.lime import Lime

    from methods.lime import token_samples

    model, tokenizer, _ = fixture("gpt2")
    wrapped = inseq.load_model(model, "lime", tokenizer=copy.deepcopy(tokenizer))
    lime = Lime(wrapped)
    embeds = torch.randn(1, 40, 4, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.stack(
        [(lime.perturb_func((embeds,))[0][0] == embeds[0]).all(-1) for _ in range(500)]
    )  # kept [500, 40]
    ours = token_samples(0, 1, 40, 500, keep_prob=0.7)
    for kept in (theirs, ours):
        replaced = (~kept).double()
        assert abs(replaced.mean() - 0.3) < 0.01  # 20000 draws: sd 0.0032
        both_replaced = (replaced[:, :-1] * replaced[:, 1:]).mean()
        assert abs(both_replaced - 0.09) < 0.01  # independent neighbours: 0.3 ** 2, sd 0.0021


def test_inseq_refuses_lime_on_target_side_of_encoder_decoders_ours_does_not():
    model, tokenizer, texts = fixture("bart")
    wrapped = inseq.load_model(model, "lime", tokenizer=copy.deepcopy(tokenizer))
    with pytest.raises(NotImplementedError):
        wrapped.attribute(*texts, attribute_target=True, show_progress=False, n_samples=4)
    ours = instrument.load_model(model, tokenizer=tokenizer).attribute(
        *texts, method="lime", attribute_target=True, n_samples=8, show_progress=False
    )[0]
    assert torch.isfinite(ours.source_attributions).all() and ours.target_attributions.nan_to_num().abs().max() > 0


# -- value zeroing -------------------------------------------------------------------------------


class KeepsDtype(torch.Tensor):
    """A tensor whose `.float()` keeps its dtype (see `inseq_value_zeroing`)."""

    def float(self):
        return self


def inseq_value_zeroing(monkeypatch, threshold=None):
    """Inseq 0.7.1's value zeroing under transformers 5, in the model's dtype: (1) transformer blocks
    now return a tensor, not a tuple, which its block hook indexes: the hook is re-made to accept
    both; (2) every fixture's attention now names its value vectors `value_states` (Inseq's table
    says `value` for GPT-2); (3) Inseq computes its cosine similarities on `.float()` copies of the
    states: 1 - cos then carries an absolute error of ~1e-7, 1% of the tiny BART's distances, so
    the states it is given keep their dtype through `.float()`. None of this changes what it
    computes. `threshold` replaces its `min_score_threshold` (1e-5, not an option of `attribute`)."""
    from inseq.attr.feat.ops.value_zeroing import ValueZeroing

    def states_hook(self, block_idx, hidden_state_idx=0):
        def hook(module, args, output):
            single = isinstance(output, torch.Tensor)
            states = output if single else output[hidden_state_idx]
            self.corrupted_block_output_states[block_idx] = states.clone().detach().cpu()
            clean = self.clean_block_output_states[block_idx].as_subclass(torch.Tensor).to(states)
            return clean if single else output[:hidden_state_idx] + (clean,) + output[hidden_state_idx + 1 :]

        return hook

    compute = ValueZeroing.compute_modules_post_zeroing_similarity

    def compute_in_model_dtype(self, *args, hidden_states, **kwargs):
        if threshold is not None:
            kwargs["min_score_threshold"] = threshold
        return compute(self, *args, hidden_states=hidden_states.as_subclass(KeepsDtype), **kwargs)

    monkeypatch.setattr(ValueZeroing, "get_states_extract_and_patch_hook", states_hook)
    monkeypatch.setattr(ValueZeroing, "compute_modules_post_zeroing_similarity", compute_in_model_dtype)

    def configure(wrapped):
        wrapped.config.value_vector = "value_states"

    return configure


# The tiny BART and Marian move their hidden states by ~1e-6 when a value vector is zeroed: below
# Inseq's threshold of 1e-5, so that both libraries give all zeros there; they are also compared
# with the threshold at 1e-9.
VALUE_ZEROING = CASES + [("bart", False, 1e-9), ("bart", True, 1e-9), ("marian", True, 1e-9)]


@pytest.mark.parametrize("case", VALUE_ZEROING, ids=lambda c: "-".join(map(str, c)))
def test_value_zeroing_equals_inseq(case, monkeypatch):
    arch, attribute_target, *threshold = case
    threshold = threshold[0] if threshold else None
    options = {} if threshold is None else {"min_score_threshold": threshold}
    configure = inseq_value_zeroing(monkeypatch, threshold)
    ours, theirs = both(arch, "value_zeroing", attribute_target, options, before_inseq=configure)
    rtol = 1e-4
    if arch in ENCODER_DECODER:
        assert_parity(ours.source_attributions, theirs.source_attributions, rtol)
        assert_parity(ours.sequence_scores["encoder_self_scores"], theirs.sequence_scores["encoder_self_scores"], rtol)
        if not attribute_target:
            assert ours.target_attributions is None and theirs.target_attributions is None
    if attribute_target or arch not in ENCODER_DECODER:
        assert_parity(ours.target_attributions, theirs.target_attributions, rtol)
    if threshold is not None or arch not in ("bart", "marian"):
        values = ours.source_attributions if arch in ENCODER_DECODER else ours.target_attributions
        assert float(values.nan_to_num().abs().max()) > 0


# -- ReAGent -------------------------------------------------------------------------------------


class UniformSampler:
    """Stands in for Inseq's part-of-speech token sampler (which needs nltk and its tagger data):
    replacements uniform over the vocabulary less pad / UNK / EOS, as the library draws them."""

    candidates = None

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, input_ids, **kwargs):
        return self.candidates[torch.randint(len(self.candidates), input_ids.shape)].to(input_ids.device)


@pytest.mark.slow
@pytest.mark.parametrize("arch, attribute_target", [("gpt2", False), ("bart", True)])
def test_reagent_equals_inseq_statistically(arch, attribute_target, monkeypatch):
    """Inseq draws ReAGent's randomness (initial scores, replaced positions, replacements) from torch's
    global random state, ours per probe from `seed`: the runs cannot be paired, so the mean
    importance of every (token, step) over 12 runs of each is compared, within 4.5 standard errors
    (each mean is over 12 x 16 probes). With `max_probe_steps=1` and a stopping top-k of the whole
    vocabulary, every probe stops after its first update (Inseq gives NaN when no probe stops, ours
    falls back on every probe). Inseq's replacements come from a part-of-speech sampler built
    with nltk; here both draw them uniformly (`UniformSampler`)."""
    from inseq.attr.feat.ops import reagent

    model, tokenizer, texts = fixture(arch)
    special = {tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id}
    vocab = model.get_input_embeddings().weight.shape[0]
    monkeypatch.setattr(UniformSampler, "candidates", torch.tensor([t for t in range(vocab) if t not in special]))
    monkeypatch.setattr(reagent, "POSTagTokenSampler", UniformSampler)
    options = {"num_probes": 16, "max_probe_steps": 1, "stopping_condition_top_k": vocab}
    runs = 12
    ours_model = instrument.load_model(model, tokenizer=tokenizer)
    wrapped = inseq.load_model(model, "reagent", tokenizer=copy.deepcopy(tokenizer), **options)
    ours, theirs = [], []
    for seed in range(runs):
        out = ours_model.attribute(
            *texts, method="reagent", attribute_target=attribute_target, seed=seed, show_progress=False, **options
        )[0]
        ours.append(torch.cat([t[..., 0] for t in (out.source_attributions, out.target_attributions) if t is not None]))
        torch.manual_seed(seed)
        out = wrapped.attribute(*texts, attribute_target=attribute_target, show_progress=False)[0]
        theirs.append(
            torch.cat([t[..., 0] for t in (out.source_attributions, out.target_attributions) if t is not None])
        )
    ours, theirs = torch.stack(ours).double(), torch.stack(theirs).double()  # [runs, tokens, steps]
    assert torch.equal(ours.isnan(), theirs.isnan())
    for scores in (ours, theirs):
        sums = scores.nansum(1)  # one importance distribution per step
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-5, atol=1e-5)
    error = (ours.var(0) / runs + theirs.var(0) / runs).sqrt()
    z = ((ours.mean(0) - theirs.mean(0)) / error).nan_to_num()
    assert float(z.abs().max()) < 4.5, z
