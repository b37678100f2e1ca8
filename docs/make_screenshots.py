"""Remakes the README's screenshots of the views (docs/images/*.png) with headless Chromium and tiny models.

python docs/make_screenshots.py          # needs selenium, /usr/bin/chromium, /usr/bin/chromedriver, matplotlib
"""

from __future__ import annotations

import io
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from PIL import Image
from rich.console import Console
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import instrument  # noqa: E402
from instrument.files.shards import make_manifest, write_manifest, write_shard  # noqa: E402
from instrument.views.server import make_server  # noqa: E402

from tiny_models import tiny_model  # noqa: E402

IMAGES = ROOT / "docs" / "images"


def small(path: Path, png: bytes, crop_height: int | None = None) -> None:
    """Saves a screenshot cropped to its content, as a 64-colour PNG (a few tens of kB)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if crop_height:
        image = image.crop((0, 0, image.width, min(crop_height, image.height)))
    image.quantize(colors=64).save(path, optimize=True)


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    gpt2, tok = tiny_model("gpt2")
    bart, bart_tok = tiny_model("bart")
    plain = instrument.load_model(bart, "integrated_gradients", tokenizer=bart_tok).attribute(
        ["Hello world", "The cat sat."],
        ["Le chat.", "Das Haus"],
        show_progress=False,
        attribute_target=True,
        step_scores=["probability"],
        n_steps=8,
    )
    layers = instrument.load_model(gpt2, "layer_gradient_x_activation", tokenizer=tok).attribute(
        "Hello world", "Hello world and more", target_layers="layers", show_progress=False, step_scores=["probability"]
    )
    heads = instrument.load_model(gpt2, "attention", tokenizer=tok).attribute(
        "Hello world", "Hello world and more", aggregate_fn=None, show_progress=False
    )
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,760", "--hide-scrollbars"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch) / "demo-dataset"
        scratch.mkdir()
        try:
            driver.get(plain.save_html(scratch / "plain.html").as_uri())
            canvas = driver.find_element("css selector", "canvas.si-heatmap")
            driver.find_elements("css selector", ".si-gen")[2].click()
            ActionChains(driver).move_to_element_with_offset(canvas, -10, 30).perform()
            small(IMAGES / "view-heatmap.png", driver.get_screenshot_as_png())
            driver.get(layers.save_html(scratch / "layers.html").as_uri())
            driver.find_element("css selector", "input.si-step").send_keys("\ue014")
            small(IMAGES / "view-layers.png", driver.get_screenshot_as_png(), 640)
            driver.get(heads.save_html(scratch / "heads.html").as_uri())
            small(IMAGES / "view-heads.png", driver.get_screenshot_as_png(), 600)
            console = Console(record=True, width=100, file=io.StringIO(), color_system="truecolor", force_terminal=True)
            plain[0].show(console=console)
            layers.show_layers(step=1, console=console)
            (scratch / "console.html").write_text(console.export_html(), encoding="utf-8")
            driver.get((scratch / "console.html").as_uri())
            small(IMAGES / "view-console.png", driver.get_screenshot_as_png())
            entries = []
            for k in range(4):
                out = instrument.FeatureAttributionOutput(
                    [plain[i % 2] for i in range(k * 30, (k + 1) * 30)], info=plain.info
                )
                texts = [[f"example input {i}", f"example output {i}"] for i in range(k * 30, (k + 1) * 30)]
                entries.append(write_shard(scratch, k, out, [f"row-{i}" for i in range(k * 30, (k + 1) * 30)], texts))
            write_manifest(scratch, make_manifest("tiny-bart", "integrated_gradients", {}, {}, entries, complete=True))
            server = make_server(scratch, port=0)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            driver.get("http://%s:%d/" % server.server_address[:2])
            driver.find_element("id", "q").send_keys("input 1")
            WebDriverWait(driver, 10).until(lambda d: "(31 examples)" in d.find_element("id", "where").text)
            small(IMAGES / "view-dataset.png", driver.get_screenshot_as_png(), 520)
            server.shutdown()
        finally:
            driver.quit()
    buffer = io.BytesIO()
    plain.plot(example=1).savefig(buffer, format="png", dpi=70)
    small(IMAGES / "view-plot.png", buffer.getvalue())


if __name__ == "__main__":
    main()
