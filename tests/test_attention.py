"""The `attention` method against the weights Hugging Face returns with `output_attentions=True`.

Our attributions come from models loaded with SDPA attention (the method switches them to eager for
the call and back); the reference weights from the same random weights loaded with eager attention,
one unpadded forward per attributed step `p` on the prefix `target[:p]`, reading the query `p - 1`.
"""

import pytest
import torch

import instrument
from instrument.models.base import attribute_reference

from helpers import DECODER_TARGETS, SOURCES, TRANSLATIONS, assert_same
from tiny_models import ALL_ARCHS, tiny_model

OPTIONS = [
    {},
    {"aggregate_fn": "max", "layers": -1},
    {"aggregate_fn": None, "layers": [1, 0], "heads": [3, 0]},
]


def texts(wrapped):
    return (SOURCES, TRANSLATIONS) if wrapped.is_encoder_decoder else (SOURCES, DECODER_TARGETS)


@pytest.fixture(scope="module", params=ALL_ARCHS)
def pair(request):
    """(wrapper around an SDPA model, the same weights with eager attention)."""
    model, tokenizer = tiny_model(request.param, attn_implementation="sdpa")
    eager, _ = tiny_model(request.param, attn_implementation="eager")
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert torch.equal(p, q), name
    return instrument.load_model(model, tokenizer=tokenizer), eager


@pytest.mark.parametrize("options", OPTIONS + [{"source_attention": "encoder", "aggregate_fn": None}])
def test_batched_equals_step_by_step(pair, options):
    wrapped, _ = pair
    if options.get("source_attention") and not wrapped.is_encoder_decoder:
        pytest.skip("encoder attention is for encoder-decoders")
    common = dict(
        method="attention",
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
        torch.testing.assert_close(
            got.step_scores["probability"], expected.step_scores["probability"], rtol=1e-5, atol=1e-7
        )
    assert wrapped.model.config._attn_implementation == "sdpa"


def reference_weights(wrapped, eager, seq, source_attention="cross"):
    """HF's own attentions per step: `{side: [positions, steps, layers, heads]}`, NaN past the prefix."""
    target = torch.tensor([t.id for t in seq.target])
    steps = range(seq.attr_pos_start, seq.attr_pos_end)
    out = {}
    sides = {"target": "attentions"}
    if wrapped.is_encoder_decoder:
        source = torch.tensor([t.id for t in seq.source])[None]
        sides = {
            "target": "decoder_attentions",
            "source": "cross_attentions" if source_attention == "cross" else "encoder_attentions",
        }
    for side, key in sides.items():
        columns = []
        for p in steps:
            prefix = target[:p][None]
            with torch.no_grad():
                if wrapped.is_encoder_decoder:
                    result = eager(input_ids=source, decoder_input_ids=prefix, output_attentions=True)
                else:
                    result = eager(input_ids=prefix, output_attentions=True)
            weights = torch.stack([w[0] for w in getattr(result, key)])  # [layers, heads, queries, keys]
            if key == "encoder_attentions":
                column = weights.mean(2)  # attention received, averaged over the queries
            else:
                column = weights[:, :, p - 1]
            length = len(seq.source) if side == "source" else len(seq.target)
            full = torch.full((length, *column.shape[:2]), float("nan"))
            full[: column.shape[-1]] = column.permute(2, 0, 1)
            columns.append(full)
        out[side] = torch.stack(columns, dim=1)
    return out


def close(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual.isnan(), expected.isnan())
    torch.testing.assert_close(actual.nan_to_num(), expected.nan_to_num(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source_attention", ["cross", "encoder"])
def test_equals_output_attentions_per_layer_head_and_aggregated(pair, source_attention):
    wrapped, eager = pair
    if source_attention == "encoder" and not wrapped.is_encoder_decoder:
        pytest.skip("encoder attention is for encoder-decoders")
    inputs, targets = texts(wrapped)
    common = dict(method="attention", show_progress=False, attribute_target=True, source_attention=source_attention)
    if not wrapped.is_encoder_decoder:
        common.pop("attribute_target")
    full = wrapped.attribute(inputs, targets, aggregate_fn=None, **common)
    mean = wrapped.attribute(inputs, targets, **common)
    picked = wrapped.attribute(inputs, targets, aggregate_fn="max", layers=[-1], heads=[1, 3], **common)
    for seq, seq_mean, seq_max in zip(full, mean, picked):
        expected = reference_weights(wrapped, eager, seq, source_attention)
        for side, weights in expected.items():
            ours = getattr(seq, f"{side}_attributions")
            assert ours.shape[2:] == weights.shape[2:] == (2, 4)
            close(ours, weights)  # every layer and head
            close(getattr(seq_mean, f"{side}_attributions"), weights.mean((2, 3)))
            close(getattr(seq_max, f"{side}_attributions"), weights[:, :, -1][..., [1, 3]].amax(2))
    assert wrapped.model.config._attn_implementation == "sdpa"


def test_cross_attention_columns_sum_to_one_and_causal_nan():
    model, tokenizer = tiny_model("bart")
    wrapped = instrument.load_model(model, "attention", tokenizer=tokenizer)
    seq = wrapped.attribute(SOURCES[1], TRANSLATIONS[1], attribute_target=True, show_progress=False)[0]
    torch.testing.assert_close(seq.source_attributions.sum(0), torch.ones(seq.source_attributions.shape[1]))
    for step in range(seq.target_attributions.shape[1]):
        p = seq.attr_pos_start + step
        torch.testing.assert_close(seq.target_attributions[:p, step].sum(), torch.tensor(1.0))
        assert seq.target_attributions[p:, step].isnan().all()
    # without attribute_target an encoder-decoder reports the source side only, like the gradient methods
    assert wrapped.attribute(SOURCES[1], TRANSLATIONS[1], show_progress=False)[0].target_attributions is None


def test_one_forward_per_batch_and_hooks_removed():
    model, tokenizer = tiny_model("llama", attn_implementation="sdpa")
    wrapped = instrument.load_model(model, "attention", tokenizer=tokenizer)
    calls = []
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    wrapped.attribute(SOURCES, DECODER_TARGETS, show_progress=False, step_scores=["probability", "entropy"])
    handle.remove()
    assert len(calls) == 1  # all steps of all three examples, and their step scores, from one forward
    assert hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"aggregate_fn": "sum"}, "aggregate_fn"),
        ({"layers": [5]}, "layers index 5 is out of range"),
        ({"heads": [99]}, "heads index 99 is out of range"),
        ({"heads": "all"}, "heads must be"),
        ({"source_attention": "self"}, "source_attention"),
    ],
)
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_bad_options_fail_clearly_and_restore_the_implementation(arch, options, match):
    model, tokenizer = tiny_model(arch, attn_implementation="sdpa")
    wrapped = instrument.load_model(model, "attention", tokenizer=tokenizer)
    inputs, targets = texts(wrapped)
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    with pytest.raises(ValueError, match=match):
        wrapped.attribute(inputs[0], targets[0], show_progress=False, **options)
    assert all(config._attn_implementation == "sdpa" for config in configs)
    assert all(not m._forward_hooks for m in model.modules())


def test_implementation_restored_when_the_forward_fails_and_eager_stays_eager():
    model, tokenizer = tiny_model("gpt2", attn_implementation="sdpa")
    wrapped = instrument.load_model(model, "attention", tokenizer=tokenizer)

    def broken(module, args, output):
        assert model.config._attn_implementation == "eager"  # switched for the call
        raise RuntimeError("boom")

    handle = model.transformer.h[1].register_forward_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            wrapped.attribute(SOURCES[0], DECODER_TARGETS[0], show_progress=False)
    finally:
        handle.remove()
    assert model.config._attn_implementation == "sdpa"
    eager, tokenizer = tiny_model("gpt2", attn_implementation="eager")
    instrument.load_model(eager, "attention", tokenizer=tokenizer).attribute(
        SOURCES[0], DECODER_TARGETS[0], show_progress=False
    )
    assert eager.config._attn_implementation == "eager"


@pytest.mark.slow
def test_memory_benchmark_runs_short():
    """benchmarks/attention_memory.py on 256 tokens (its default is 4,096): it runs, stays in budget."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        import attention_memory
    finally:
        sys.path.pop(0)
    assert attention_memory.main(["--tokens", "256", "--steps", "2", "--budget-gb", "2"]) == 0
