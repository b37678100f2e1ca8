"""Aggregation: every aggregator and aggregation function against a computation by hand, on small
hand-made outputs and on real outputs of tiny models.

    seq.aggregate(["subwords", "scores"])  ==  the same merges and norms written out with loops
"""

import math
import re
import warnings

import numpy as np
import pytest
import torch

import instrument
from instrument.aggregation import list_aggregators
from instrument.merging import merge_attributions
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId, copy_replace
from instrument.reductions import get_aggregation_function, list_aggregation_functions, register_aggregation_function
from instrument.spans import _column_groups, spans_to_groups, split_spans, word_spans

from tiny_models import tiny_model

NAN = float("nan")


def tokens(*names):
    return [TokenWithId(name, 100 + i) for i, name in enumerate(names)]


def causal(rows: int, start: int, end: int, *extra, seed=0, offset=0):
    """`[rows, end - start, *extra]` random values, NaN where target row p cannot be seen by step q (p >= q)."""
    torch.manual_seed(seed)
    t = torch.randn(rows, end - start, *extra)
    for j, q in enumerate(range(start, end)):
        t[q - offset :, j] = NAN
    return t


def decoder_only(hidden=(2,), seed=0):
    """`▁The ▁ca | t ▁sat .`: 2 prompt tokens, 3 generated."""
    target = tokens("▁The", "▁ca", "t", "▁sat", ".")
    return FeatureAttributionSequenceOutput(
        source=[],
        target=target,
        source_attributions=None,
        target_attributions=causal(5, 2, 5, *hidden, seed=seed),
        step_scores={
            "probability": torch.tensor([0.5, 0.2, 0.4]),
            "logit": torch.tensor([1.0, 2.0, 4.0]),
            "deltas": torch.tensor([0.1, -0.3, 0.2]),
        },
        attr_pos_start=2,
        attr_pos_end=5,
    )


def encoder_decoder(hidden=(2,), seed=0, with_target=True):
    """source `▁Hel lo ▁world </s>`, target `<pad> | ▁Hal lo ▁Welt`."""
    torch.manual_seed(seed)
    return FeatureAttributionSequenceOutput(
        source=tokens("▁Hel", "lo", "▁world", "</s>"),
        target=tokens("<pad>", "▁Hal", "lo", "▁Welt"),
        source_attributions=torch.randn(4, 3, *hidden),
        target_attributions=causal(4, 1, 4, *hidden, seed=seed + 1) if with_target else None,
        step_scores={"probability": torch.tensor([0.5, 0.2, 0.4])},
        attr_pos_start=1,
        attr_pos_end=4,
    )


def close(actual, expected):
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=1e-6, atol=1e-7)


def merged_by_hand(t, row_groups, col_groups, pick):
    """Reference merge: each merged cell gets `pick` of all non-NaN original values of its rows x columns
    (per trailing element), NaN when there is none; single cells are copied."""
    extra = t.shape[2:]
    out = torch.empty(len(row_groups), len(col_groups), *extra)
    for i, (ra, rb) in enumerate(row_groups):
        for j, (ca, cb) in enumerate(col_groups):
            block = t[ra:rb, ca:cb].reshape(-1, *extra)
            if (rb - ra) * (cb - ca) == 1:
                out[i, j] = block[0]
                continue
            for index in np.ndindex(*extra):
                values = [float(v) for v in block[(slice(None),) + index] if not math.isnan(float(v))]
                out[(i, j) + index] = pick(values) if values else NAN
    return out


def absmax_by_hand(values):
    return max(values, key=abs)


# -- aggregation functions --------------------------------------------------------------------


def test_list_aggregation_functions():
    assert {"sum", "mean", "vnorm", "absmax", "max", "min", "prod"} <= set(list_aggregation_functions())
    assert {"scores", "spans", "subwords", "split", "slices", "pair"} <= set(list_aggregators())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sum", [0.0, NAN, 6.0]),
        ("mean", [0.0, NAN, 2.0]),
        ("vnorm", [math.sqrt(14), NAN, math.sqrt(20)]),
        ("absmax", [-3.0, NAN, 4.0]),
        ("max", [2.0, NAN, 4.0]),
        ("min", [-3.0, NAN, 0.0]),
        ("prod", [-6.0, NAN, 0.0]),
    ],
)
def test_aggregation_function_by_hand(name, expected):
    x = torch.tensor([[1.0, NAN, -3.0, 2.0], [NAN, NAN, NAN, NAN], [2.0, 4.0, 0.0, NAN]])
    fn = get_aggregation_function(name)
    close(fn(x, 1), torch.tensor(expected))
    close(fn(x.T, 0), torch.tensor(expected))  # any dimension


@pytest.mark.parametrize("name", ["sum", "mean", "vnorm", "absmax", "max", "min", "prod"])
def test_aggregation_function_against_numpy(name):
    torch.manual_seed(1)
    x = torch.randn(4, 5, 3)
    x[x > 1.0] = NAN
    x[0, :, 1] = NAN  # one all-NaN lane
    a = x.double().numpy()
    filled = np.where(np.isnan(a), 0, a)
    with warnings.catch_warnings():  # numpy warns about the all-NaN lane
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = {
            "sum": lambda: np.nansum(a, 1),
            "mean": lambda: np.nanmean(a, 1),
            "vnorm": lambda: np.sqrt(np.nansum(a * a, 1)),
            "max": lambda: np.nanmax(a, 1),
            "min": lambda: np.nanmin(a, 1),
            "prod": lambda: np.nanprod(a, 1),
            "absmax": lambda: np.take_along_axis(filled, np.abs(filled).argmax(1)[:, None], 1)[:, 0],
        }[name]()
    reference[np.isnan(a).all(1)] = np.nan
    fn = get_aggregation_function(name)
    close(fn(x, 1), torch.from_numpy(reference).float())


def test_register_aggregation_function():
    register_aggregation_function(lambda x, dim: x.nan_to_num().abs().sum(dim), "test_abssum", overwrite=True)
    assert "test_abssum" in list_aggregation_functions()
    seq = decoder_only()
    out = seq.aggregate("scores", "test_abssum", normalize=False)
    close(out.target_attributions, seq.target_attributions.nan_to_num().abs().sum(-1))
    with pytest.raises(ValueError, match="exists already"):
        register_aggregation_function(lambda x, dim: x, "sum")
    with pytest.raises(ValueError, match="Unknown aggregation function 'nope'"):
        seq.aggregate("scores", "nope")


# -- scores -----------------------------------------------------------------------------------


def norm_by_hand(t):
    out = torch.empty(t.shape[:2])
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            values = [float(v) for v in t[i, j]]
            out[i, j] = NAN if all(math.isnan(v) for v in values) else math.sqrt(sum(v * v for v in values))
    return out


def test_scores_decoder_only_by_hand():
    seq = decoder_only(hidden=(3,))
    norms = norm_by_hand(seq.target_attributions)
    close(seq.aggregate("scores", normalize=False).target_attributions, norms)
    out = seq.aggregate()  # default: vnorm, normalized per step
    for j in range(norms.shape[1]):
        column = [float(v) for v in norms[:, j] if not math.isnan(float(v))]
        close(out.target_attributions[:, j], norms[:, j] / sum(abs(v) for v in column))
        assert math.isclose(float(out.target_attributions[:, j].nansum()), 1.0, rel_tol=1e-6)
    assert torch.equal(out.target_attributions.isnan(), seq.target_attributions[..., 0].isnan())
    assert out.step_scores.keys() == seq.step_scores.keys()


def test_scores_encoder_decoder_normalizes_source_and_target_together():
    seq = encoder_decoder(hidden=(2,))
    out = seq.aggregate("scores", "sum")
    src, tgt = seq.source_attributions.sum(-1), seq.target_attributions.sum(-1)
    denominator = src.abs().sum(0) + tgt.nan_to_num().abs().sum(0)
    close(out.source_attributions, src / denominator)
    close(out.target_attributions, tgt / denominator)


def test_scores_rescale_and_errors():
    seq = encoder_decoder(hidden=(2,))
    out = seq.aggregate("scores", rescale=True)
    src, tgt = norm_by_hand(seq.source_attributions), norm_by_hand(seq.target_attributions)
    top = torch.maximum(src.max(), tgt.nan_to_num().max())  # one scale for the whole example, as Inseq
    close(out.source_attributions, src / top)
    close(out.target_attributions, tgt / top)
    assert float(out.source_attributions.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="either normalize=True or rescale=True"):
        seq.aggregate("scores", normalize=True, rescale=True)


def test_scores_zero_column_stays_zero():
    seq = encoder_decoder(hidden=(2,), with_target=False)
    seq.source_attributions[:, 1] = 0.0
    out = seq.aggregate()
    assert torch.equal(out.source_attributions[:, 1], torch.zeros(4))


def test_scores_keeps_layers_unless_told():
    seq = encoder_decoder(hidden=(2, 3))  # [rows, steps, layers=2, hidden=3]
    kept = seq.aggregate("scores", normalize=False)
    assert kept.source_attributions.shape == (4, 3, 2)
    close(kept.source_attributions, torch.linalg.vector_norm(seq.source_attributions, dim=-1))
    normalized = seq.aggregate("scores")
    src, tgt = kept.source_attributions, kept.target_attributions
    close(
        normalized.source_attributions, src / (src.abs().sum(0) + tgt.nan_to_num().abs().sum(0))
    )  # per step and layer
    flat = seq.aggregate("scores", keep_layers=False, layer_fn="mean", normalize=False)
    close(flat.source_attributions, kept.source_attributions.mean(-1))
    # a second "scores" reduces the kept layer dimension
    assert kept.aggregate("scores").source_attributions.shape == (4, 3)


def test_aggregation_never_mutates():
    seq = encoder_decoder(hidden=(2,))
    before = {k: v.clone() for k, v in [("s", seq.source_attributions), ("t", seq.target_attributions)]}
    scores_before = {k: v.clone() for k, v in seq.step_scores.items()}
    for agg, kwargs in [
        ("scores", {}),
        ("subwords", {}),
        ("spans", {"source_spans": (0, 2)}),
        ("slices", {"source_spans": (1, 3)}),
        ("split", {"split_pattern": "lo"}),
        ("pair", {"paired_attr": encoder_decoder(seed=3)}),
    ]:
        out = seq.aggregate(agg, **kwargs)
        assert out is not seq
    close(seq.source_attributions, before["s"])
    close(seq.target_attributions, before["t"])
    assert all(torch.equal(seq.step_scores[k], v) for k, v in scores_before.items())
    assert [t.token for t in seq.source] == ["▁Hel", "lo", "▁world", "</s>"]


# -- spans, subwords, split ----------------------------------------------------------------------


def test_spans_encoder_decoder_by_hand():
    seq = encoder_decoder(hidden=(2,))
    out = seq.aggregate("spans", source_spans=[(0, 2)], target_spans=(1, 3))
    assert [t.token for t in out.source] == ["▁Hello", "▁world", "</s>"]
    assert [t.id for t in out.source] == [-1, 102, 103]
    assert [t.token for t in out.target] == ["<pad>", "▁Hallo", "▁Welt"]
    assert (out.attr_pos_start, out.attr_pos_end) == (1, 3)
    assert [t.token for t in out.generated] == ["▁Hallo", "▁Welt"]
    src_groups, tgt_groups, col_groups = [(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 3), (3, 4)], [(0, 2), (2, 3)]
    close(out.source_attributions, merged_by_hand(seq.source_attributions, src_groups, col_groups, absmax_by_hand))
    close(out.target_attributions, merged_by_hand(seq.target_attributions, tgt_groups, col_groups, absmax_by_hand))
    # probability of the merged token is the product of its steps' probabilities
    close(out.step_scores["probability"], torch.tensor([0.5 * 0.2, 0.4]))
    summed = seq.aggregate("spans", "sum", source_spans=[(0, 2)], target_spans=(1, 3))
    close(summed.source_attributions, merged_by_hand(seq.source_attributions, src_groups, col_groups, sum))


def test_spans_nan_only_where_all_inputs_nan():
    seq = decoder_only(hidden=())  # 2-D: [5 rows, 3 steps]
    out = seq.aggregate("spans", "sum", target_spans=[(3, 5)])  # "▁sat" + "." merge rows and steps 1, 2
    expected = merged_by_hand(seq.target_attributions, [(0, 1), (1, 2), (2, 3), (3, 5)], [(0, 1), (1, 3)], sum)
    close(out.target_attributions, expected)
    assert math.isnan(out.target_attributions[2, 0]) and not math.isnan(out.target_attributions[2, 1])
    assert math.isnan(out.target_attributions[3, 0])  # a future position stays NaN
    # the merged row sees its own first subword at its last step: "▁sat" at the step of "."
    close(out.target_attributions[3, 1], seq.target_attributions[3, 2])
    close(out.step_scores["logit"], torch.tensor([1.0, 3.0]))  # mean
    close(out.step_scores["deltas"], torch.tensor([0.1, -0.3]))  # absmax


def test_span_validation():
    seq = encoder_decoder()
    for spans, message in [
        ([(0, 5)], "out of range"),
        ([(2, 1)], "out of range"),
        ([(0, 2), (1, 3)], "must not overlap"),
        (["ab"], "pairs of integers"),
    ]:
        with pytest.raises(ValueError, match=message):
            seq.aggregate("spans", source_spans=spans)


@pytest.mark.parametrize(
    "texts, marker, chars, expected",
    [
        (["▁H", "ello", "▁world", ","], "word_start", ("▁",), [(0, 2), (2, 4)]),
        (["H", "el", "lo", "Ġw", "or", "ld"], "word_start", ("Ġ",), [(0, 3), (3, 6)]),
        (["<s>", "Le", "Ġc", "h", "</s>"], "word_start", ("Ġ",), [(0, 1), (1, 2), (2, 4), (4, 5)]),
        (["phen", "##omen", "##al", "[SEP]", "##x"], "continuation", ("##",), [(0, 3), (3, 4), (4, 5)]),
        (["lo", "w</w>", "er</w>", "new", "est</w>"], "word_end", ("</w>",), [(0, 2), (2, 3), (3, 5)]),
        (["Hello", "Ċ", "World", "Ġ", "x"], "word_start", ("Ġ",), [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    ],
)
def test_word_spans(texts, marker, chars, expected):
    assert word_spans(texts, marker, chars) == expected


def test_subwords_across_the_generation_boundary_by_hand():
    seq = decoder_only(hidden=(2,))  # ▁The ▁ca | t ▁sat .
    out = seq.aggregate("subwords")
    assert [t.token for t in out.target] == ["▁The", "▁cat", "▁sat."]
    assert (out.attr_pos_start, out.attr_pos_end) == (1, 3)  # "▁cat" was partly generated
    assert [t.token for t in out.generated] == ["▁cat", "▁sat."]
    expected = merged_by_hand(seq.target_attributions, [(0, 1), (1, 3), (3, 5)], [(0, 1), (1, 3)], absmax_by_hand)
    close(out.target_attributions, expected)
    close(out.step_scores["probability"], torch.tensor([0.5, 0.2 * 0.4]))
    assert "logit" in out.step_scores and out.step_scores["logit"].shape == (2,)


def test_subwords_options():
    seq = FeatureAttributionSequenceOutput(
        source=tokens("[CLS]", "phen", "##omen", "##al", "[SEP]"),
        target=tokens("[CLS]", "ok", "##ay"),
        source_attributions=torch.randn(5, 2),
        target_attributions=causal(3, 1, 3),
        attr_pos_start=1,
        attr_pos_end=3,
    )
    auto = seq.aggregate("subwords")  # "##" detected
    assert [t.token for t in auto.source] == ["[CLS]", "phen##omen##al", "[SEP]"]
    assert [t.token for t in auto.target] == ["[CLS]", "ok##ay"]
    inseq_style = seq.aggregate("subwords", special_chars="##", is_suffix_symbol=True)
    assert inseq_style.equals(auto)
    only_source = seq.aggregate("subwords", aggregate_target=False)
    assert len(only_source.target) == 3 and len(only_source.source) == 3
    plain = FeatureAttributionSequenceOutput(
        [], tokens("a", "b", "c"), None, causal(3, 1, 3), attr_pos_start=1, attr_pos_end=3
    )
    assert plain.aggregate("subwords").equals(plain)  # no marker found: nothing merged


def test_subwords_logprob_sums():
    seq = decoder_only()
    seq.step_scores["probability"] = torch.tensor([-1.0, -2.0, -0.5])
    out = seq.aggregate("subwords", logprob=True)
    close(out.step_scores["probability"], torch.tensor([-1.0, -2.5]))
    wrapped = FeatureAttributionOutput([seq], info={"step_scores_args": {"logprob": True}})
    close(wrapped.aggregate("subwords")[0].step_scores["probability"], torch.tensor([-1.0, -2.5]))
    close(
        seq.aggregate("subwords", step_score_fns={"probability": "max"}).step_scores["probability"],
        torch.tensor([-1.0, -0.5]),
    )


def test_step_scores_merge_by_aggregate_map_like_user_functions():
    probability = instrument.steps.get_step_function("probability")
    assert probability.aggregate_map == {"spans": "prod", "logprob": "sum"}
    instrument.register_step_function(
        probability.fn, "t_my_prob", aggregate_map=dict(probability.aggregate_map), overwrite=True
    )
    instrument.register_step_function(probability.fn, "t_plain", overwrite=True)  # no aggregate_map: averaged
    try:
        seq = decoder_only()
        seq.step_scores.update(t_my_prob=seq.step_scores["probability"], t_plain=seq.step_scores["probability"])
        for logprob, merged in [(False, 0.2 * 0.4), (True, 0.2 + 0.4)]:
            out = seq.aggregate("subwords", logprob=logprob)
            close(out.step_scores["t_my_prob"], torch.tensor([0.5, merged]))
            close(out.step_scores["t_my_prob"], out.step_scores["probability"])
            close(out.step_scores["t_plain"], torch.tensor([0.5, 0.3]))
            close(out.step_scores["deltas"], torch.tensor([0.1, -0.3]))  # not a step function: absmax
    finally:
        for name in ("t_my_prob", "t_plain"):
            instrument.steps._REGISTRY.pop(name)


def test_copy_replace_keeps_every_field_and_shares_no_container():
    seq = decoder_only()
    seq._aggregator = ["subwords", "scores"]
    copied = copy_replace(seq, attr_pos_end=4)
    assert copied.attr_pos_end == 4 and copied._aggregator == seq._aggregator and copied.target == seq.target
    assert all(
        getattr(copied, n) is not getattr(seq, n)
        for n in ("source", "target", "step_scores", "sequence_scores", "_aggregator")
    )
    assert copied.target_attributions is seq.target_attributions  # tensors are not copied


def test_split_by_hand():
    seq = FeatureAttributionSequenceOutput(
        source=tokens("▁A", "▁b", ".", "▁C", "!", "▁d"),
        target=tokens("<pad>", "▁X", ".", "▁Y"),
        source_attributions=torch.randn(6, 3, 2),
        target_attributions=None,
        step_scores={"probability": torch.tensor([0.5, 0.5, 0.5])},
        attr_pos_start=1,
        attr_pos_end=4,
    )
    out = seq.aggregate("split", split_pattern=".")
    assert [t.token for t in out.source] == ["▁A▁b.", "▁C!▁d"]
    assert [t.token for t in out.target] == ["<pad>▁X.", "▁Y"]
    assert (out.attr_pos_start, out.attr_pos_end) == (0, 2)
    close(
        out.source_attributions,
        merged_by_hand(seq.source_attributions, [(0, 3), (3, 6)], [(0, 2), (2, 3)], absmax_by_hand),
    )
    close(out.step_scores["probability"], torch.tensor([0.25, 0.5]))
    regex = seq.aggregate("split", split_pattern=re.compile(r"[.!]"), aggregate_target=False)
    assert [t.token for t in regex.source] == ["▁A▁b.", "▁C!", "▁d"]
    assert len(regex.target) == 4
    with pytest.raises(ValueError, match="split_pattern"):
        seq.aggregate("split")


# -- slices ---------------------------------------------------------------------------------------


def test_slices_encoder_decoder():
    seq = encoder_decoder()
    out = seq.aggregate("slices", source_spans=(1, 3))
    assert [t.token for t in out.source] == ["lo", "▁world"]
    close(out.source_attributions, seq.source_attributions[1:3])
    assert out.target_attributions is seq.target_attributions and out.attr_pos_start == 1
    assert seq[1:3].equals(out) and seq[-3:-1].equals(out)
    assert seq[0].source == seq.source[:1]
    assert seq.aggregate("slices", source_spans=[(0, 1), (2, 4)]).source == [seq.source[0], *seq.source[2:]]
    with pytest.raises(ValueError, match="Empty slice"):
        seq[3:3]
    with pytest.raises(ValueError, match="needs source_spans"):
        seq.aggregate("slices")


def test_slices_decoder_only_keeps_generated():
    seq = decoder_only()  # ▁The ▁ca | t ▁sat .
    out = seq[1:2]
    assert [t.token for t in out.target] == ["▁ca", "t", "▁sat", "."]
    assert (out.attr_pos_start, out.attr_pos_end) == (1, 4)
    close(out.target_attributions, seq.target_attributions[1:])
    assert out.generated == seq.generated and out.step_scores.keys() == seq.step_scores.keys()
    assert seq[0:5].equals(seq)
    with pytest.raises(ValueError, match="no source"):
        seq.aggregate("slices", source_spans=(0, 1))


# -- pair -----------------------------------------------------------------------------------------


def test_pair_by_hand_and_operator():
    a, b = encoder_decoder(seed=0), encoder_decoder(seed=5)
    b.target[2] = TokenWithId("la", 7)
    diff = a - b
    close(diff.source_attributions, a.source_attributions - b.source_attributions)
    close(diff.target_attributions, a.target_attributions - b.target_attributions)
    close(diff.step_scores["probability"], torch.zeros(3))
    assert diff.target[2].token == "la → lo" and diff.target[1] == a.target[1]
    assert b.aggregate("pair", paired_attr=a).equals(diff)  # Inseq: attr.aggregate("pair", paired_attr=p) is p - attr
    assert torch.isnan(diff.target_attributions).equal(a.target_attributions.isnan())
    outputs = FeatureAttributionOutput([a]) - FeatureAttributionOutput([b])
    assert outputs[0].equals(diff)


def test_pair_shape_mismatch_is_a_clear_error():
    a = encoder_decoder()
    b = FeatureAttributionSequenceOutput(
        a.source[:3],
        a.target,
        a.source_attributions[:3],
        a.target_attributions,
        dict(a.step_scores),
        attr_pos_start=1,
        attr_pos_end=4,
    )
    with pytest.raises(ValueError, match=r"source lengths differ \(3 vs 4 tokens\).*source_attributions shapes differ"):
        a - b
    c = encoder_decoder(with_target=False)
    with pytest.raises(ValueError, match="target_attributions is None on one side only"):
        a - c
    with pytest.raises(ValueError, match="needs paired_attr"):
        a.aggregate("pair")


# -- pipelines and outputs ----------------------------------------------------------------------------


def test_pipeline_equals_steps_in_order():
    seq = encoder_decoder(hidden=(3,))
    piped = seq.aggregate(["subwords", "scores"], ["sum", "vnorm"])
    stepwise = seq.aggregate("subwords", "sum").aggregate("scores", "vnorm")
    assert piped.equals(stepwise)
    assert seq.aggregate(["subwords", "scores"]).equals(seq.aggregate("subwords").aggregate("scores"))
    with pytest.raises(ValueError, match="2 aggregate functions for 1 aggregators"):
        seq.aggregate(["scores"], ["sum", "sum"])
    with pytest.raises(ValueError, match="Unknown aggregator 'words'"):
        seq.aggregate("words")
    with pytest.raises(TypeError, match="Unknown option"):
        seq.aggregate("scores", source_spans=(0, 1))


def test_output_aggregate_maps_and_merge_attributions():
    one = FeatureAttributionOutput(
        [encoder_decoder(seed=0)], info={"input_texts": ["a"], "exec_time": 1.0, "model_name": "m", "batch_size": 1}
    )
    two = FeatureAttributionOutput(
        [encoder_decoder(seed=1), encoder_decoder(seed=2)],
        info={"input_texts": ["b", "c"], "exec_time": 2.0, "model_name": "m", "batch_size": 2},
    )
    merged = merge_attributions([one, two])
    assert len(merged) == 3 and merged[2] is two[1]
    assert merged.info == {"input_texts": ["a", "b", "c"], "exec_time": 3.0, "model_name": "m", "batch_size": [1, 2]}
    aggregated = merged.aggregate(["subwords", "scores"])
    assert aggregated.info == merged.info and aggregated.info is not merged.info
    for before, after in zip(merged.sequence_attributions, aggregated.sequence_attributions):
        assert after.equals(before.aggregate(["subwords", "scores"]))
    with pytest.raises(ValueError, match="Cannot pair 1 sequences with 3"):
        merged - one


# -- real outputs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    outputs = {}
    for arch, method, source, target, extra in [
        ("llama", "saliency", "Hello world", "Hello world, the capital of France is Paris.", {}),
        ("bart", "input_x_gradient", "Hello world", "The capital of France.", {"attribute_target": True}),
    ]:
        model, tok = tiny_model(arch)
        outputs[arch] = instrument.load_model(model, method, tokenizer=tok).attribute(
            source, target, show_progress=False, step_scores=["probability"], **extra
        )
    return outputs


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_real_subwords_and_spans_by_hand(real, arch):
    seq = real[arch][0]
    for fn, pick in [("absmax", absmax_by_hand), ("sum", sum)]:
        out = seq.aggregate("subwords", fn)
        src_groups = word_spans(seq.source, "word_start", ("▁", "Ġ"))
        tgt_groups = word_spans(seq.target, "word_start", ("▁", "Ġ"))
        columns, _, _ = _column_groups(tgt_groups, seq.attr_pos_start, seq.attr_pos_end)
        assert [t.token for t in out.target] == ["".join(t.token for t in seq.target[a:b]) for a, b in tgt_groups]
        close(out.target_attributions, merged_by_hand(seq.target_attributions, tgt_groups, columns, pick))
        if seq.source_attributions is not None:
            close(out.source_attributions, merged_by_hand(seq.source_attributions, src_groups, columns, pick))
        probability = torch.tensor([math.prod(seq.step_scores["probability"][a:b].tolist()) for a, b in columns])
        close(out.step_scores["probability"], probability)
    start = seq.attr_pos_start
    target_spans = ([(0, 2)] if start >= 2 else []) + [(start, start + 3)]  # a prompt span and a generated one
    source_spans = [(1, 3)] if seq.source_attributions is not None else None
    out = seq.aggregate("spans", "sum", source_spans=source_spans, target_spans=target_spans)
    tgt_groups = spans_to_groups(target_spans, len(seq.target), "target")
    columns, new_start, new_end = _column_groups(tgt_groups, start, seq.attr_pos_end)
    assert (
        (out.attr_pos_start, out.attr_pos_end)
        == (new_start, new_end)
        == (start - (start >= 2), new_start + len(columns))
    )
    assert len(columns) == seq.attr_pos_end - start - 2
    close(out.target_attributions, merged_by_hand(seq.target_attributions, tgt_groups, columns, sum))
    if seq.source_attributions is not None:
        src_groups = spans_to_groups(source_spans, len(seq.source), "source")
        close(out.source_attributions, merged_by_hand(seq.source_attributions, src_groups, columns, sum))

    words = [t.token for t in seq.aggregate("subwords").target]
    if arch == "llama":
        assert words[-3:] == ["▁France", "▁is", "▁Paris."] and words[0] == "<s>"


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_real_scores_split_slices_pair(real, arch):
    seq = real[arch][0]
    scored = seq.aggregate()
    target_norms = norm_by_hand(seq.target_attributions)
    denominator = target_norms.nan_to_num().sum(0)
    if seq.source_attributions is not None:
        source_norms = norm_by_hand(seq.source_attributions)
        denominator = denominator + source_norms.sum(0)
        close(scored.source_attributions, source_norms / denominator)
    close(scored.target_attributions, target_norms / denominator)

    sentences = seq.aggregate("split", "sum", split_pattern=",")
    groups = split_spans(seq.target, ",")
    columns, _, _ = _column_groups(groups, seq.attr_pos_start, seq.attr_pos_end)
    close(sentences.target_attributions, merged_by_hand(seq.target_attributions, groups, columns, sum))

    sliced = seq[1:3]
    if seq.source_attributions is not None:
        close(sliced.source_attributions, seq.source_attributions[1:3])
    else:
        close(sliced.target_attributions, seq.target_attributions[[1, 2, *range(seq.attr_pos_start, len(seq.target))]])
    assert sliced.generated == seq.generated

    zero = seq - seq
    assert torch.equal(zero.target_attributions.isnan(), seq.target_attributions.isnan())
    assert float(zero.target_attributions.nan_to_num().abs().max()) == 0.0
