"""Step functions: every registered one, requested as `step_scores`, equals its value computed by hand
from the logits of one plain forward pass over the whole text (the logits at position q - 1 predict
token q). Contrastive ones use a plain forward over the contrastive text, at the aligned position.
"""

import math

import pytest
import torch

import instrument
from instrument.steps import _REGISTRY

from tiny_models import tiny_model

BUILTIN = [
    "logit",
    "probability",
    "entropy",
    "crossentropy",
    "perplexity",
    "contrast_logits",
    "contrast_prob",
    "contrast_logits_diff",
    "contrast_prob_diff",
    "pcxmi",
    "kl_divergence",
    "in_context_pvi",
    "mc_dropout_prob_avg",
    "top_p_size",
]
CONTRASTIVE = [
    "contrast_logits",
    "contrast_prob",
    "contrast_logits_diff",
    "contrast_prob_diff",
    "pcxmi",
    "kl_divergence",
    "in_context_pvi",
]

# input, target, contrast target of the same token length, contrast of another length + its alignment
# (full target-token positions: (target position, contrast position)).
TEXTS = {
    "gpt2": (
        "Hello world",
        "Hello world, this is",
        "Hello world, that is",
        "Hello world, this was",
        [(6, 6), (7, 7), (8, 8), (9, 10)],
    ),
    "bart": (
        "Hello world",
        "Le chat.",
        "Le chien",
        "Le chat",
        [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 5), (7, 6)],
    ),
}


PROBABILITIES = {"probability", "contrast_prob", "contrast_prob_diff", "mc_dropout_prob_avg"}


def close(actual, expected, atol=1e-6):
    """rtol covers the float32 noise of one padded batch of rows against one plain forward. atol:
    logits / log-probabilities are O(1) to O(10) and their differences (pcxmi, KL...) pick up to
    ~6e-7 of that noise; probabilities are O(1e-3) here and get atol=1e-8 (`PROBABILITIES`)."""
    torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=atol)


def atol_for(name):
    if name == "pcxmi":  # a log-ratio in bits: the noise of the natural logs times 1 / ln 2
        return 2e-6
    return 1e-8 if name in PROBABILITIES else 1e-6


class Case:
    def __init__(self, arch, model=None, tokenizer=None):
        self.arch = arch
        self.model, self.tok = (model, tokenizer) if model is not None else tiny_model(arch)
        self.am = instrument.load_model(self.model, tokenizer=self.tok)
        self.enc_dec = bool(self.model.config.is_encoder_decoder)
        self.source_text, self.target_text, self.contrast_text, self.other_text, self.alignment = TEXTS[arch]
        self.source = torch.tensor(self.tok(self.source_text)["input_ids"]) if self.enc_dec else None
        self.target = self.ids(self.target_text)
        start = 1 if self.enc_dec else len(self.tok(self.source_text)["input_ids"])
        self.steps = list(range(start, len(self.target)))

    def ids(self, text):
        if self.enc_dec:
            return torch.tensor([self.model.config.decoder_start_token_id, *self.tok(text_target=text)["input_ids"]])
        return torch.tensor(self.tok(text)["input_ids"])

    @torch.no_grad()
    def logits(self, ids, source=None):
        """Plain forward over the whole sequence: row q - 1 predicts ids[q]."""
        if self.enc_dec:
            source = self.source if source is None else source
            return self.model(input_ids=source[None], decoder_input_ids=ids[None]).logits[0].float()
        return self.model(input_ids=ids[None]).logits[0].float()

    def scores(self, step_scores, **kwargs):
        seq = self.am.attribute(
            self.source_text,
            self.target_text,
            method="saliency",
            show_progress=False,
            step_scores=step_scores,
            **kwargs,
        )[0]
        return seq.step_scores

    def per_step(self, fn, contrast_ids=None, alignment=None, contrast_source=None):
        """fn(logits, token, contrast logits, contrast token) at every attributed step."""
        logits = self.logits(self.target)
        clogits = self.logits(contrast_ids, contrast_source) if contrast_ids is not None else None
        values = []
        for p in self.steps:
            q = dict(alignment or {}).get(p, p)
            values.append(
                fn(
                    logits[p - 1],
                    int(self.target[p]),
                    None if clogits is None else clogits[q - 1],
                    None if contrast_ids is None else int(contrast_ids[q]),
                )
            )
        return torch.tensor(values)


def lp(logits, token):
    return float(logits.log_softmax(-1)[token])


HAND = {  # name -> fn(logits z, token y, contrast logits lc, contrast token yc)
    "logit": lambda z, y, lc, yc: float(z[y]),
    "probability": lambda z, y, lc, yc: float(z.softmax(-1)[y]),
    "entropy": lambda z, y, lc, yc: float(-(z.softmax(-1) * z.log_softmax(-1)).sum()),
    "crossentropy": lambda z, y, lc, yc: -lp(z, y),
    "perplexity": lambda z, y, lc, yc: 2 ** -lp(z, y),  # Inseq's definition: 2 ** (cross-entropy in nats)
    "contrast_logits": lambda z, y, lc, yc: float(lc[yc]),
    "contrast_prob": lambda z, y, lc, yc: float(lc.softmax(-1)[yc]),
    "contrast_logits_diff": lambda z, y, lc, yc: float(z[y] - lc[yc]),
    "contrast_prob_diff": lambda z, y, lc, yc: float(z.softmax(-1)[y] - lc.softmax(-1)[yc]),
    "pcxmi": lambda z, y, lc, yc: -(lp(z, y) - lp(lc, yc)) / math.log(2),  # -log2(p / q)
    "in_context_pvi": lambda z, y, lc, yc: -lp(z, y) + lp(lc, yc),
    "kl_divergence": lambda z, y, lc, yc: kl_by_hand(z, lc),
}
HAND_LOGPROB = {
    "probability": lambda z, y, lc, yc: lp(z, y),
    "contrast_prob": lambda z, y, lc, yc: lp(lc, yc),
    "contrast_prob_diff": lambda z, y, lc, yc: lp(z, y) - lp(lc, yc),
}


def nucleus(logits, top_k=0, top_p=1.0):
    """Token ids kept by top-k and then top-p filtering of the distribution `logits` defines: the
    k most likely, and the fewest most likely ones whose probability mass reaches top_p."""
    probs = logits.double().softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        if (top_k and len(kept) >= top_k) or (top_p < 1.0 and mass >= top_p):
            break
        kept.append(i)
        mass += probs[i]
    return kept


def merged_filter(logits, contrast_logits, top_k=0, top_p=1.0):
    """Token ids kept for KL as Inseq selects them: nucleus (top_p) and then top_k, both chosen on
    the sum of the two logit vectors."""
    merged = (logits + contrast_logits).double()
    kept = list(range(len(merged)))
    if top_p < 1.0:
        kept = nucleus(merged, top_p=top_p)
    if top_k > 0:
        kept = sorted(kept, key=lambda i: -float(merged[i]))[:top_k]
    return sorted(kept)


def kl_by_hand(logits, contrast_logits, top_k=0, top_p=1.0):
    """KL(P || Q), P and Q renormalised over the tokens kept by the merged filter."""
    kept = merged_filter(logits, contrast_logits, top_k, top_p)
    p = logits.double()[kept].softmax(-1)
    q = contrast_logits.double()[kept].softmax(-1)
    return float((p * (p / q).log()).sum())


@pytest.fixture(scope="module", params=["gpt2", "bart"])
def case(request):
    return Case(request.param)


def test_builtin_names_are_registered():
    assert set(BUILTIN) <= set(instrument.list_step_functions())


def test_plain_and_contrastive_scores_equal_hand_values(case):
    names = list(HAND)
    scores = case.scores(names, contrast_targets=case.contrast_text)
    contrast = case.ids(case.contrast_text)
    assert len(contrast) == len(case.target)
    for name in names:
        expected = case.per_step(HAND[name], contrast_ids=contrast)
        assert scores[name].shape == (len(case.steps),), name
        close(scores[name], expected, atol_for(name))


def test_logprob_option(case):
    scores = case.scores(list(HAND_LOGPROB), contrast_targets=case.contrast_text, logprob=True)
    contrast = case.ids(case.contrast_text)
    for name, fn in HAND_LOGPROB.items():
        close(scores[name], case.per_step(fn, contrast_ids=contrast))


def test_contrast_alignment_for_other_lengths(case):
    contrast = case.ids(case.other_text)
    assert len(contrast) != len(case.target)
    names = ["contrast_prob", "contrast_logits_diff", "pcxmi"]
    scores = case.scores(names, contrast_targets=case.other_text, contrast_targets_alignments=case.alignment)
    for name in names:
        close(scores[name], case.per_step(HAND[name], contrast_ids=contrast, alignment=case.alignment), atol_for(name))
    # without alignments (Inseq's rule): positions aligned right to left from the end of the contrast, with a warning
    with pytest.warns(UserWarning, match="right to left"):
        scores = case.scores(names, contrast_targets=case.other_text)
    back = {p: len(contrast) - (len(case.target) - p) for p in case.steps}  # the i-th position from the end -> len - i
    right = {p: q if q > 0 else len(contrast) - 1 for p, q in back.items()}
    for name in names:
        close(scores[name], case.per_step(HAND[name], contrast_ids=contrast, alignment=right), atol_for(name))


def test_contrast_sources_on_encoder_decoder():
    case = Case("bart")
    other_source = "Good morning"
    scores = case.scores(["pcxmi", "contrast_prob"], contrast_sources=other_source)
    source = torch.tensor(case.tok(other_source)["input_ids"])
    for name in ("pcxmi", "contrast_prob"):
        # no contrast_targets: the contrastive text is the target itself, under the other source
        close(scores[name], case.per_step(HAND[name], contrast_ids=case.target, contrast_source=source), atol_for(name))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (10, 1.0), (0, 0.3), (300, 0.1), (5, 0.9)])
def test_kl_divergence_top_k_top_p(case, top_k, top_p):
    scores = case.scores(["kl_divergence"], contrast_targets=case.contrast_text, top_k=top_k, top_p=top_p)
    expected = case.per_step(
        lambda z, y, lc, yc: kl_by_hand(z, lc, top_k, top_p), contrast_ids=case.ids(case.contrast_text)
    )
    close(scores["kl_divergence"], expected)
    assert (expected > 0).any()  # zero where the contrast prefix is still the target prefix


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.99])
def test_top_p_size(case, top_p):
    scores = case.scores(["top_p_size"], top_p=top_p)
    expected = case.per_step(lambda z, y, lc, yc: len(nucleus(z, top_p=top_p)))
    assert torch.equal(scores["top_p_size"], expected.float())
    assert (expected >= 1).all()


def test_mc_dropout_is_the_z_score_of_noisy_forwards_and_restores_training_flags():
    """Inseq's definition: (p - mean(p_dropout)) / std(p_dropout) over n_mcd_steps forwards with
    dropout on. The noisy forwards are redone by hand with the same seed and the same rows."""
    from instrument.engine import train_mode
    from instrument.rows import Rows

    case = Case("gpt2")  # dropout rates 0.1
    case.model.lm_head.train()  # an uneven pattern of flags, which must survive
    flags = [m.training for m in case.model.modules()]
    torch.manual_seed(123)
    scores = case.scores(["mc_dropout_prob_avg", "probability"], n_mcd_steps=4)
    assert case.model.training is False
    assert [m.training for m in case.model.modules()] == flags
    close(scores["probability"], case.per_step(HAND["probability"]), atol=1e-8)
    engine = case.am.engine
    example = instrument.rows.Example(target_ids=case.target, start=case.steps[0], end=case.steps[-1] + 1)
    rows = Rows.build([example], [(0, p) for p in case.steps], engine.pad_token_id)
    torch.manual_seed(123)
    with torch.no_grad(), train_mode(case.model):
        noisy = torch.stack(
            [engine.forward(rows)[0].softmax(-1).gather(1, rows.token[:, None])[:, 0] for _ in range(4)]
        )
    expected = (scores["probability"] - noisy.mean(0)) / noisy.std(0)
    close(scores["mc_dropout_prob_avg"], expected, atol=1e-4)
    with pytest.raises(ValueError, match="n_mcd_steps"):
        case.scores(["mc_dropout_prob_avg"], n_mcd_steps=1)


@pytest.mark.parametrize("name", BUILTIN)
def test_each_as_attributed_fn(case, name):
    # contrast_force_inputs: the contrastive function runs on the contrastive inputs (Inseq's default scores
    # the contrast token on the original inputs, where kl_divergence is 0 everywhere)
    kwargs = {"contrast_targets": case.contrast_text, "contrast_force_inputs": True} if name in CONTRASTIVE else {}
    # Constant in the attributed inputs: a count (top_p_size), and on decoder-only models the
    # contrastive forward alone (it runs on ids, without gradient). Gradient methods refuse them, as
    # Inseq does, rather than return zeros.
    if name == "top_p_size" or (not case.enc_dec and name in ("contrast_logits", "contrast_prob")):
        with pytest.raises(ValueError, match=f"attributed_fn '{name}'"):
            case.am.attribute(
                case.source_text, case.target_text, method="saliency", show_progress=False, attributed_fn=name, **kwargs
            )
        return
    seq = case.am.attribute(
        case.source_text, case.target_text, method="saliency", show_progress=False, attributed_fn=name, **kwargs
    )[0]
    attributions = seq.source_attributions if case.enc_dec else seq.target_attributions
    visible = attributions[~attributions.isnan().all(-1)] if not case.enc_dec else attributions
    assert visible.numel() > 0 and torch.isfinite(visible).all()
    assert visible.abs().max() > 0


def test_contrastive_without_contrast_raises(case):
    with pytest.raises(ValueError, match="contrast"):
        case.scores(["contrast_prob"])


def test_register_custom_step_function(case):
    def top_logit(args, shift=0.0):
        return args.logits.max(-1).values + shift

    def twice_top_logit(args, shift=0.0):
        return 2 * args.logits.max(-1).values + shift

    instrument.register_step_function(top_logit, "test_top_logit")
    try:
        assert "test_top_logit" in instrument.list_step_functions()
        seq = case.am.attribute(
            case.source_text,
            case.target_text,
            method="saliency",
            show_progress=False,
            step_scores=["test_top_logit"],
            attributed_fn="test_top_logit",
            shift=1.5,
        )[0]
        close(seq.step_scores["test_top_logit"], case.per_step(lambda z, y, lc, yc: float(z.max()) + 1.5))
        attributions = seq.source_attributions if case.enc_dec else seq.target_attributions
        assert torch.nan_to_num(attributions).abs().max() > 0
        with pytest.raises(ValueError, match="exists"):
            instrument.register_step_function(twice_top_logit, "test_top_logit")
        instrument.register_step_function(twice_top_logit, "test_top_logit", overwrite=True)
        scores = case.scores(["test_top_logit"])
        close(scores["test_top_logit"], case.per_step(lambda z, y, lc, yc: 2 * float(z.max())))
    finally:
        _REGISTRY.pop("test_top_logit", None)
    with pytest.raises(ValueError, match="exists"):
        instrument.register_step_function(top_logit, "probability")


def test_unknown_step_function_lists_available_names(case):
    for kwargs in ({"step_scores": ["no_such_score"]}, {"attributed_fn": "no_such_score"}):
        with pytest.raises(ValueError, match="no_such_score") as error:
            case.am.attribute(case.source_text, case.target_text, method="saliency", show_progress=False, **kwargs)
        assert all(name in str(error.value) for name in BUILTIN)


def test_unknown_keyword_raises_type_error(case):
    with pytest.raises(TypeError, match="not_an_option"):
        case.scores(["probability", "entropy"], not_an_option=1)
