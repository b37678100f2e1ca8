"""Views beyond the heatmap tables: console legends and layers x tokens tables, the interactive view's data
(checked against the outputs' own tensors), and matplotlib images.

    out.show_layers(step=0, console=Console(record=True)); out.interactive_html(); out.save_png("a.png")
"""

import io
import json
import math
import re

import numpy as np
import pytest
import torch
from rich.console import Console

import instrument
from instrument.views.console import LEGEND_PREFIX
from instrument.views.interactive import embed, view_data
from instrument.views.labels import format_score, token_label

from tiny_models import tiny_model


def recorder(width):
    return Console(record=True, width=width, file=io.StringIO(), color_system="truecolor", force_terminal=True)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def layered(gpt2):
    model, tok = gpt2
    return instrument.load_model(model, "layer_gradient_x_activation", tokenizer=tok).attribute(
        ["Hello world", "A cat"],
        ["Hello world and more", "A cat sat down"],
        target_layers="layers",
        show_progress=False,
        step_scores=["probability"],
    )


@pytest.fixture(scope="module")
def heads(gpt2):
    model, tok = gpt2
    return instrument.load_model(model, "attention", tokenizer=tok).attribute(
        "Hello world", "Hello world and more", aggregate_fn=None, show_progress=False
    )


@pytest.fixture(scope="module")
def plain(gpt2):
    model, tok = gpt2
    return instrument.load_model(model, "saliency", tokenizer=tok).attribute(
        ["Hello world", "The cat"], ["Hello world, how are you", "The cat sat"], show_progress=False
    )


# -- console ----------------------------------------------------------------------------------------------------


def test_console_legend_states_scale_and_normalisation(plain):
    console = recorder(100)
    plain.show(console=console)
    text = console.export_text(clear=False)
    legends = [line for line in text.splitlines() if line.startswith(LEGEND_PREFIX)]
    assert len(legends) == len(plain)
    for line, seq in zip(legends, plain.aggregate()):
        top = max(abs(seq.minimum), abs(seq.maximum))
        assert f"{format_score(-top)} " in line and f" {format_score(top)} " in line
    assert "L1" in text and "vnorm" in text
    styled = console.export_text(styles=True)
    assert "48;2;37;99;235" in styled and "48;2;220;38;38" in styled  # both ends of the diverging scale


def test_console_layers_table_holds_per_layer_scores(layered):
    console = recorder(200)
    layered[0].show_layers(step=1, console=console)
    text = console.export_text()
    per_layer = layered[0].aggregate("scores", keep_layers=True).target_attributions  # [tokens, steps, layers]
    rows = [line.split() for line in text.splitlines() if re.match(r"^\s*\d+\s", line)]
    assert len(rows) == per_layer.shape[2]
    for layer, row in enumerate(rows):
        assert int(row[0]) == layer
        expected = [format_score(v) for v in per_layer[:, 1, layer].tolist() if not math.isnan(v)]
        assert row[1:] == expected
    assert "step 1" in text and LEGEND_PREFIX in text
    with pytest.raises(ValueError, match="no layer dimension"):
        layered.aggregate().show_layers(console=console)
    with pytest.raises(ValueError, match="step must be"):
        layered.show_layers(step=99, console=console)


def test_console_wide_layers_table_is_split_to_the_width(layered):
    console = recorder(60)
    layered[0].show_layers(step=0, console=console)
    text = console.export_text()
    assert all(len(line) <= 60 for line in text.splitlines())
    assert len(re.findall(r"target tokens \d+-\d+", text)) >= 2
    shown = [label for line in text.splitlines() if line.strip().startswith("layer") for label in line.split()[1:]]
    assert shown == [token_label(t.token) for t in layered[0].target]  # every token once, in order


# -- the interactive view's data ---------------------------------------------------------------------------------


def test_view_data_holds_exact_values_and_stacks(layered, heads, plain):
    data = json.loads(embed(view_data(layered)))
    assert data["header"]["method"] == "layer_gradient_x_activation" and "target_layers" in data["header"]["arguments"]
    assert data["header"]["version"].startswith("seq-instrument")
    for example, seq in zip(data["examples"], layered):
        view = example["views"]["tokens"]
        shown = seq.aggregate("scores", keep_layers=False).target_attributions  # layers reduced too
        values = np.array([[np.nan if v is None else v for v in row] for row in view["values"]], dtype=np.float32)
        np.testing.assert_array_equal(values, shown.numpy().astype(np.float32))  # exact float32, NaN kept
        stack = seq.aggregate("scores", keep_layers=True).target_attributions.permute(2, 0, 1)
        got = np.array(view["layers"]["target"], dtype=float)
        np.testing.assert_array_equal(np.float32(np.nan_to_num(got, nan=-7)), np.nan_to_num(stack.numpy(), nan=-7))
        assert view["steps"]["probability"] == [float(str(np.float32(x))) for x in seq.step_scores["probability"]]
    view = view_data(heads)["examples"][0]["views"]["tokens"]
    kept = heads[0].target_attributions  # [tokens, steps, layers, heads]
    assert np.array(view["heads"]["target"], dtype=float).shape == (kept.shape[2], kept.shape[3], *kept.shape[:2])
    mean = kept.float().nanmean(dim=(2, 3))
    got = np.array([[np.nan if v is None else v for v in row] for row in view["values"]], dtype=np.float32)
    np.testing.assert_array_equal(got, mean.numpy())
    words = view_data(plain)["examples"][0]["views"]
    assert set(words) == {"tokens", "words"} and len(words["words"]["rows"]) < len(words["tokens"]["rows"])


def test_interactive_html_is_self_contained_and_escapes_tokens(plain):
    seq = plain[0]
    seq.target[0] = instrument.TokenWithId("</script><b>&", 3)
    text = instrument.FeatureAttributionOutput([seq], info=plain.info).interactive_html()
    assert "</script><b>" not in text and "http://" not in text and "https://" not in text
    assert "<link" not in text and "src=" not in text and "@import" not in text and "url(" not in text
    assert text.count("<script") == 2  # the data and the inline script
    assert plain._repr_html_().startswith('<div class="si-root"')


def test_interactive_size_of_50_by_200():
    seq = big_output()
    text = instrument.FeatureAttributionOutput([seq]).interactive_html()
    assert len(text.encode()) < 2_000_000, len(text)


def big_output(prompt=50, generated=200, seed=0):
    """A decoder-only 2-D output: `prompt` + `generated` tokens, NaN where a step cannot see a position."""
    torch.manual_seed(seed)
    n = prompt + generated
    scores = torch.rand(n, generated)
    for j in range(generated):
        scores[prompt + j :, j] = float("nan")
    tokens = [instrument.TokenWithId(f"w{i}", i) for i in range(n)]
    return instrument.FeatureAttributionSequenceOutput(
        [], tokens, None, scores, {"probability": torch.rand(generated)}, attr_pos_start=prompt, attr_pos_end=n
    )


# -- images ---------------------------------------------------------------------------------------------------------


def test_plot_images(plain, layered, tmp_path):
    pytest.importorskip("matplotlib")
    figure = plain.plot()
    image = figure.axes[0].images[0]
    shown = plain[0].aggregate().target_attributions
    np.testing.assert_array_equal(np.ma.filled(image.get_array(), np.nan), shown.numpy())
    low, high = image.get_clim()
    assert low == -high == -np.nanmax(np.abs(shown.numpy()))  # centred at 0
    assert image.cmap(0.5)[:3] == pytest.approx((1.0, 1.0, 1.0))
    png, svg = plain.save_png(tmp_path / "a.png", example=1), layered.save_svg(tmp_path / "b.svg", step=0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and svg.read_text().lstrip().startswith("<?xml")
    layers = layered.plot(step=1).axes[0].images[0]
    expected = layered[0].aggregate("scores", keep_layers=True).target_attributions[:, 1, :].T
    np.testing.assert_array_equal(np.ma.filled(layers.get_array(), np.nan), expected.numpy())
    with pytest.raises(ValueError, match="example"):
        plain.plot(example=5)


def test_plot_of_kept_heads_is_their_mean(heads):
    pytest.importorskip("matplotlib")
    image = heads.plot().axes[0].images[0]
    mean = heads[0].target_attributions.float().nanmean(dim=(2, 3))
    np.testing.assert_array_equal(np.ma.filled(image.get_array(), np.nan), mean.numpy())
    with pytest.raises(ValueError, match="step= is for layer outputs"):
        heads.plot(step=0)


def test_interactive_view_of_an_aggregator_pipeline(plain):
    data = view_data(plain, aggregate="subwords")
    expected = plain[0].aggregate(["subwords", "scores"])  # subwords (still 3-D), then "scores"
    view = data["examples"][0]["views"]
    assert set(view) == {"tokens"}  # a pipeline given: no tokens / words switch
    assert [row[0] for row in view["tokens"]["rows"]] == [token_label(t.token) for t in expected.target]
    got = np.array([[np.nan if v is None else v for v in row] for row in view["tokens"]["values"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected.target_attributions.numpy())
    assert data["header"]["normalisation"].startswith("pipeline 'subwords', then 'scores'")
