"""The interactive view driven in real headless Chromium through Selenium: hover, click, layer and head
selection, search, keyboard, export, and the size and render time of a 50 x 200 output.

Needs /usr/bin/chromium, /usr/bin/chromedriver (Debian's chromium and chromium-driver) and selenium; skipped
without them unless INSTRUMENT_REQUIRE_CHROMIUM=1. Screenshots of every view go to $INSTRUMENT_ARTIFACTS
(default: a temporary folder), printed at the end of the module.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_views import big_output

import instrument
from instrument.outputs import FeatureAttributionOutput

from tiny_models import tiny_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _missing() -> str | None:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return "chromium is not installed (/usr/bin/chromium)"
    if not (os.path.exists(CHROMEDRIVER) or shutil.which("chromedriver")):
        return "chromedriver is not installed (/usr/bin/chromedriver, Debian's chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, request):
    folder = Path(os.environ.get("INSTRUMENT_ARTIFACTS") or tmp_path_factory.mktemp("artifacts")) / "views"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nscreenshots of the interactive views: {folder}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _missing()
    if missing:
        if os.environ.get("INSTRUMENT_REQUIRE_CHROMIUM"):
            pytest.fail(f"INSTRUMENT_REQUIRE_CHROMIUM is set but {missing}")
        pytest.skip(f"{missing}; set INSTRUMENT_REQUIRE_CHROMIUM=1 to fail instead of skipping")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else None))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def outputs():
    gpt2, tok = tiny_model("gpt2")
    bart, bart_tok = tiny_model("bart")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "plain": instrument.load_model(bart, "saliency", tokenizer=bart_tok).attribute(
                ["Hello world", "The cat."],
                ["Le chat.", "Das Haus"],
                show_progress=False,
                attribute_target=True,
                step_scores=["probability"],
            ),
            "layers": instrument.load_model(gpt2, "layer_gradient_x_activation", tokenizer=tok).attribute(
                "Hello world",
                "Hello world and more",
                target_layers="layers",
                show_progress=False,
                step_scores=["probability"],
            ),
            "heads": instrument.load_model(gpt2, "attention", tokenizer=tok).attribute(
                "Hello world", "Hello world and more", aggregate_fn=None, show_progress=False
            ),
        }


def open_page(browser, out, tmp_path, name):
    page = out.save_html(tmp_path / f"{name}.html")
    browser.get(page.resolve().as_uri())
    root = browser.find_element("css selector", ".si-root")
    assert root.get_attribute("data-ready") == "1"
    assert browser.execute_script("return document.querySelectorAll('.si-root canvas.si-heatmap').length") == 1
    return root


def hover(browser, canvas, r, c):
    """Moves the mouse over cell (r, c) of a heatmap canvas; returns the tooltip's value and its text."""
    from selenium.webdriver.common.action_chains import ActionChains

    browser.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", canvas)
    geometry = {k: float(canvas.get_attribute(f"data-{k}")) for k in ("x0", "y0", "cw", "ch")}
    x = geometry["x0"] + (c + 0.5) * geometry["cw"] - canvas.size["width"] / 2
    y = geometry["y0"] + (r + 0.5) * geometry["ch"] - canvas.size["height"] / 2
    ActionChains(browser).move_to_element_with_offset(canvas, int(x), int(y)).perform()
    tip = browser.find_element("css selector", ".si-tip")
    assert tip.is_displayed()
    return tip.find_element("css selector", ".si-tip-value").text, tip.text


def rows_of(shown):
    """The page's heatmap as a matrix: source rows, then target rows, one column per generated token."""
    tensors = [t for t in (shown.source_attributions, shown.target_attributions) if t is not None]
    return np.concatenate([t.numpy() for t in tensors])


def test_hover_shows_exact_value_tokens_ids_and_step_scores(browser, outputs, tmp_path, artifacts):
    out = outputs["plain"]
    root = open_page(browser, out, tmp_path, "plain")
    seq, shown = out[0], out[0].aggregate()
    matrix = rows_of(shown)
    canvas = root.find_element("css selector", "canvas.si-heatmap")
    tokens = [*seq.source, *seq.target]
    for r, c in [(0, 0), (len(seq.source) + 2, 1), (len(tokens) - 1, len(seq.generated) - 1)]:
        value, text = hover(browser, canvas, r, c)
        if np.isnan(matrix[r, c]):
            assert value == "NaN"
        else:
            assert np.float32(value) == np.float32(matrix[r, c]), (r, c, value)
        assert f"id {tokens[r].id}" in text and f"id {seq.generated[c].id}" in text
        assert tokens[r].token in text and seq.generated[c].token in text
        probability = np.float32(seq.step_scores["probability"][c])
        assert any(
            np.float32(line.split(": ")[1]) == probability
            for line in text.splitlines()
            if line.startswith("probability")
        )
    browser.save_screenshot(str(artifacts / "heatmap-hover.png"))


def test_click_generated_token_shows_its_column(browser, outputs, tmp_path, artifacts):
    out = outputs["plain"]
    root = open_page(browser, out, tmp_path, "plain")
    matrix = rows_of(out[0].aggregate())
    root.find_elements("css selector", ".si-gen")[2].click()
    values = [row.text for row in root.find_elements("css selector", ".si-bars .si-bar-value")]
    expected = [v for v in matrix[:, 2] if not np.isnan(v)]
    assert len(values) == len(expected) and all(np.float32(a) == np.float32(b) for a, b in zip(values, expected))
    assert "step 2" in root.find_element("css selector", ".si-bars h4").text
    widths = [bar.size["width"] for bar in root.find_elements("css selector", ".si-bars .si-fill")]
    assert widths.index(max(widths)) == int(np.nanargmax(np.abs(matrix[:, 2])))  # the longest bar is the top score
    browser.save_screenshot(str(artifacts / "bar-chart.png"))


def test_layer_selector_shows_that_layers_stored_values(browser, outputs, tmp_path, artifacts):
    from selenium.webdriver.support.ui import Select

    out = outputs["layers"]
    root = open_page(browser, out, tmp_path, "layers")
    per_layer = out[0].aggregate("scores", keep_layers=True).target_attributions.numpy()  # [tokens, steps, layers]
    reduced = out[0].aggregate("scores", keep_layers=False).target_attributions.numpy()
    canvas = root.find_element("css selector", "canvas.si-heatmap")
    assert np.float32(hover(browser, canvas, 3, 1)[0]) == reduced[3, 1]
    for layer in range(per_layer.shape[2]):
        Select(root.find_element("css selector", "select.si-layer")).select_by_value(f'{{"layer":{layer}}}')
        assert np.float32(hover(browser, canvas, 3, 1)[0]) == per_layer[3, 1, layer]
        assert np.float32(hover(browser, canvas, 5, 0)[0]) == per_layer[5, 0, layer]
    # the layers x tokens heatmap of one generated token, moved with the slider (keyboard)
    slider = root.find_element("css selector", "input.si-step")
    slider.send_keys("\ue014")  # arrow right: the next generated token
    assert "step 1" in root.find_element("css selector", ".si-step-label").text
    layer_map = root.find_element("css selector", "canvas.si-layer-map-target")
    assert np.float32(hover(browser, layer_map, 1, 4)[0]) == per_layer[4, 1, 1]  # row = layer, column = token
    browser.save_screenshot(str(artifacts / "layers.png"))


def test_heads_grid_and_selection(browser, outputs, tmp_path, artifacts):
    from selenium.webdriver.support.ui import Select

    out = outputs["heads"]
    root = open_page(browser, out, tmp_path, "heads")
    kept = out[0].target_attributions.numpy()  # [tokens, steps, layers, heads]
    heads = root.find_elements("css selector", "canvas.si-head")
    assert len(heads) == kept.shape[3]
    canvas = root.find_element("css selector", "canvas.si-heatmap")
    assert np.float32(hover(browser, canvas, 2, 1)[0]) == np.float32(np.nanmean(kept[2, 1]))
    Select(root.find_element("css selector", "select.si-head-layer")).select_by_value("1")
    root.find_elements("css selector", ".si-heads figure")[2].click()  # layer 1, head 2 in the main heatmap
    assert np.float32(hover(browser, canvas, 2, 1)[0]) == kept[2, 1, 1, 2]
    assert (
        np.float32(hover(browser, root.find_elements("css selector", "canvas.si-head")[3], 0, 0)[0]) == kept[0, 0, 1, 3]
    )
    browser.save_screenshot(str(artifacts / "heads.png"))


def test_search_keyboard_and_export(browser, tmp_path, artifacts):
    sequences = [big_output(prompt=4, generated=3, seed=i) for i in range(30)]
    info = {"input_texts": [f"input number {i} " + ("zebra" if i == 17 else "cat") for i in range(30)]}
    out = FeatureAttributionOutput(sequences, info=info)
    root = open_page(browser, out, tmp_path, "search")
    search = root.find_element("css selector", "input.si-search")
    search.send_keys("zebra")
    visible = [li for li in root.find_elements("css selector", ".si-list li") if li.is_displayed()]
    assert len(visible) == 1 and "input number 17" in visible[0].text
    assert "1 of 30" in root.find_element("css selector", ".si-count").text
    browser.save_screenshot(str(artifacts / "search.png"))
    search.send_keys("\ue007")  # Enter opens the first match
    assert "zebra" in root.find_element("css selector", ".si-text").text
    canvas = root.find_element("css selector", "canvas.si-heatmap")
    canvas.click()
    canvas.send_keys("\ue015", "\ue014")  # down, right: cell (1, 1)
    scores = sequences[17].aggregate().target_attributions.numpy()  # shown as normalised by "scores"
    readout = root.find_element("css selector", ".si-readout").text
    assert "score" in readout and np.float32(readout.split("score (scores) ")[1].split(" ")[0]) == scores[1, 1]
    root.find_element("css selector", "button.si-export-csv").click()
    text = root.find_element("css selector", "textarea.si-export-text").get_attribute("value")
    table = list(csv.reader(io.StringIO(text)))
    assert table[0][:3] == ["attributed", "id", "side"] and table[0][3:] == [t.token for t in sequences[17].generated]
    for row, expected in zip(table[1:], scores):
        assert [np.float32(x) if x else np.nan for x in row[3:]] == pytest.approx(expected, nan_ok=True, rel=0, abs=0)
    assert table[-1][0] == "probability"


def test_50_by_200_page_size_and_render_time(browser, tmp_path, artifacts):
    out = FeatureAttributionOutput([big_output(50, 200)])
    page = out.save_html(tmp_path / "big.html")
    assert page.stat().st_size < 2_000_000
    started = time.perf_counter()
    browser.get(page.resolve().as_uri())
    loaded = time.perf_counter() - started
    render_ms = float(browser.find_element("css selector", ".si-root").get_attribute("data-render-ms"))
    browser.save_screenshot(str(artifacts / "big-50x200.png"))
    assert render_ms < 2000, render_ms  # the script's own drawing
    assert loaded < 6, loaded  # the whole page load, generous for a loaded CI machine


def test_dataset_browser_list_search_and_open(browser, tmp_path, artifacts):
    import threading

    from selenium.webdriver.support.ui import WebDriverWait

    from instrument.files.shards import make_manifest, write_manifest, write_shard
    from instrument.views.server import make_server

    entries = []
    for k in range(2):
        indices = range(60 * k, 60 * (k + 1))
        out = FeatureAttributionOutput([big_output(prompt=4, generated=3, seed=i) for i in indices])
        texts = [[f"input {i} " + ("zebra" if i == 77 else "cat"), f"output {i}"] for i in indices]
        entries.append(write_shard(tmp_path, k, out, [f"row-{i}" for i in indices], texts))
    write_manifest(tmp_path, make_manifest("tiny", "saliency", {}, {}, entries, complete=True))
    server = make_server(tmp_path, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get("http://%s:%d/" % server.server_address[:2])
        wait = WebDriverWait(browser, 10)
        wait.until(lambda d: "page 1 of 3" in d.find_element("id", "where").text)
        assert len(browser.find_elements("css selector", "#rows tr")) == 50
        browser.find_element("id", "next").click()
        wait.until(lambda d: "page 2 of 3" in d.find_element("id", "where").text)
        browser.save_screenshot(str(artifacts / "dataset-list.png"))
        browser.find_element("id", "q").send_keys("zebra")
        wait.until(lambda d: len(d.find_elements("css selector", "#rows tr")) == 1)
        browser.find_element("css selector", "#rows a").click()
        root = wait.until(lambda d: d.find_element("css selector", ".si-root[data-ready='1']"))
        assert "row-77" in root.find_element("css selector", ".si-title").text
        assert "zebra" in root.find_element("css selector", ".si-text").text
        browser.save_screenshot(str(artifacts / "dataset-example.png"))
    finally:
        server.shutdown()
        server.server_close()
