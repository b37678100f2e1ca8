"""Views: rich console heatmaps (read back through `Console(record=True)`), HTML checked with Python's
`html.parser`, and the same HTML rendered by headless Chromium.

    out.show(console=Console(record=True, width=80)); console.export_text()  # labels and numbers intact
"""

import html.parser
import io
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from rich.console import Console

import instrument
from instrument.merging import merge_attributions
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId
from instrument.views.console import LEGEND_PREFIX
from instrument.views.labels import format_score

from tiny_models import tiny_model

NAN = float("nan")
MARKUP_TOKENS = ["[/", "[bold]x", "[/red]", "[link=http://x]y", "\\[", ":smile:", "<b>&amp;", "\"q'", "a\nb"]


def recorder(width):
    return Console(record=True, width=width, file=io.StringIO(), color_system="truecolor", force_terminal=True)


def decoder_only(labels, seed=0, prompt=2):
    """A decoder-only output over tokens `labels`, 2-D scores, NaN where a step cannot see a position."""
    torch.manual_seed(seed)
    n = len(labels)
    scores = torch.rand(n, n - prompt) * 2 - 1
    for j, q in enumerate(range(prompt, n)):
        scores[q:, j] = NAN
    return FeatureAttributionSequenceOutput(
        source=[],
        target=[TokenWithId(t, i) for i, t in enumerate(labels)],
        source_attributions=None,
        target_attributions=scores,
        step_scores={"probability": torch.rand(n - prompt)},
        attr_pos_start=prompt,
        attr_pos_end=n,
    )


@pytest.fixture(scope="module")
def real():
    model, tok = tiny_model("bart")
    return instrument.load_model(model, "saliency", tokenizer=tok).attribute(
        ["Hello world", "The cat."],
        ["Le chat.", "Das [/Haus] <b>"],
        show_progress=False,
        attribute_target=True,
        step_scores=["probability"],
    )


# -- console ----------------------------------------------------------------------------------------


def table_rows(text):
    """{row label: [cell strings]} per printed table, from the exported console text."""
    tables, current = [], None
    for line in text.splitlines():
        if re.match(r"^\s*Example \d+", line):
            current = {"header": None, "rows": []}
            tables.append(current)
        elif line.startswith(LEGEND_PREFIX):  # the legend (wrapped lines) after each example's tables
            current = None
        elif current is not None and line.strip() and not set(line.strip()) <= set("━─"):
            parts = line.split()
            if current["header"] is None:
                current["header"] = parts
            else:
                current["rows"].append(parts)
    return tables


def test_console_real_output_labels_and_numbers(real):
    console = recorder(120)
    real.show(console=console)
    text = console.export_text(clear=False)
    aggregated = real.aggregate()
    for index, seq in enumerate(aggregated.sequence_attributions):
        assert f"Example {index}" in text
        for token in [*seq.source, *seq.target]:
            assert token.token in text
        for value in [*seq.source_attributions.flatten().tolist(), *seq.target_attributions.flatten().tolist()]:
            if not math.isnan(value):
                assert format_score(value) in text
        assert format_score(float(seq.step_scores["probability"][0])) in text
    assert "probability" in text
    assert all(len(line) <= 120 for line in text.splitlines())
    styled = console.export_text(styles=True)
    assert "48;2;" in styled  # truecolor backgrounds on the cells


def test_console_long_sequence_is_split_not_mangled():
    labels = [f"w{i:02d}" for i in range(64)]
    seq = decoder_only(labels)
    console = recorder(80)
    seq.show(console=console, aggregate=False)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    tables = table_rows(text)
    assert len(tables) > 3
    headers = [label for table in tables for label in table["header"]]
    assert headers == labels[2:]  # every generated token once, in order, never broken
    scores = seq.target_attributions
    column = 0
    for table in tables:
        width = len(table["header"])
        for row in table["rows"]:
            label, cells = row[0], row[1:]
            if label == "probability":
                expected = [format_score(v) for v in seq.step_scores["probability"][column : column + width].tolist()]
            else:
                values = scores[labels.index(label), column : column + width].tolist()
                expected = [format_score(v) for v in values if not math.isnan(v)]
            assert cells == expected, (label, cells, expected)
        assert [row[0] for row in table["rows"]] == labels + ["probability"]
        column += width
    assert column == len(labels) - 2
    assert "(steps 1-" in text and "of 62)" in text


def test_console_max_columns_and_highlight():
    seq = decoder_only([f"t{i}" for i in range(12)])
    console = recorder(200)
    seq.show(console=console, aggregate=False, max_columns=4, step_score_highlight="probability")
    tables = table_rows(console.export_text())
    assert [len(t["header"]) for t in tables] == [4, 4, 2]
    with pytest.raises(ValueError, match="No step score 'nope'"):
        seq.show(console=console, aggregate=False, step_score_highlight="nope")


def test_console_markup_tokens_are_literal():
    seq = decoder_only(MARKUP_TOKENS, prompt=3)
    console = recorder(200)
    seq.show(console=console)  # aggregate=True on a 2-D output only normalizes
    text = console.export_text()
    for token in MARKUP_TOKENS:
        assert token.replace("\n", "\\n") in text, token
    assert "😄" not in text


def test_show_needs_2d_without_aggregation():
    seq = decoder_only(["a", "b", "c"])
    seq3d = FeatureAttributionSequenceOutput(
        [], seq.target, None, seq.target_attributions[..., None].repeat(1, 1, 4), attr_pos_start=2, attr_pos_end=3
    )
    with pytest.raises(ValueError, match="aggregate first"):
        seq3d.show(aggregate=False, console=recorder(80))
    seq3d.show(console=recorder(80))  # default: aggregated with "scores"


# -- HTML ---------------------------------------------------------------------------------------------------


class Tables(html.parser.HTMLParser):
    """Collects, per <table>: column headers, row headers, and <td> cells (text, title, style)."""

    def __init__(self):
        super().__init__()
        self.tables, self.cell, self.tags = [], None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"columns": [], "rows": [], "cells": []})
        elif tag in ("td", "th"):
            self.cell = {"tag": tag, "text": "", **attrs}
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            table = self.tables[-1]
            if tag == "td":
                table["cells"].append(self.cell)
            elif self.cell.get("scope") == "col":
                table["columns"].append(self.cell["text"])
            elif self.cell.get("scope") == "row":
                table["rows"].append(self.cell["text"])
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data


def parse(text):
    parser = Tables()
    parser.feed(text)
    parser.close()
    return parser


def check_tables(parsed, aggregated):
    assert len(parsed.tables) == len(aggregated)
    for table, seq in zip(parsed.tables, aggregated.sequence_attributions):
        rows = [t.token.replace("\n", "\\n") for t in [*seq.source, *seq.target]] + list(seq.step_scores)
        assert table["columns"] == [t.token.replace("\n", "\\n") for t in seq.generated]
        assert table["rows"] == rows
        assert len(table["cells"]) == len(rows) * len(table["columns"])
        parts = [seq.source_attributions, seq.target_attributions, torch.stack(list(seq.step_scores.values()))]
        values = torch.cat([p for p in parts if p is not None]).flatten().tolist()
        for cell, value in zip(table["cells"], values):
            if math.isnan(value):
                assert cell["text"] == "" and "background" not in cell["style"]
            else:
                assert cell["text"] == format_score(value)
                assert np.float32(cell["title"]) == np.float32(value)  # the exact value


def test_html_real_output(real):
    text = real.show(return_html=True)
    assert "<script" not in text and "http" not in text and "<link" not in text
    check_tables(parse(text), real.aggregate())
    assert "background-color:rgb(" in text
    # notebooks get the interactive view (instrument.views.interactive); the static tables stay in show()
    assert "seqInstrumentView(" in real._repr_html_() and "<table" not in real._repr_html_()
    assert real[1].show(return_html=True).count("<table") == 1
    words = parse(real.show(return_html=True, aggregate="subwords")).tables[0]  # then "scores" to reach 2-D
    check_tables(parse(real.show(return_html=True, aggregate="subwords")), real.aggregate(["subwords", "scores"]))
    assert len(words["rows"]) < len(parse(text).tables[0]["rows"])


def test_html_escapes_tokens():
    seq = decoder_only(MARKUP_TOKENS, prompt=3)
    text = seq.show(return_html=True)
    assert "<b>" not in text and "&lt;b&gt;&amp;amp;" in text  # the token is escaped, never markup
    check_tables(parse(text), FeatureAttributionOutput([seq.aggregate()]))


def test_html_highlight_and_save(tmp_path):
    seq = decoder_only([f"t{i}" for i in range(6)])
    text = seq.show(return_html=True, step_score_highlight="probability")
    header = parse(text).tables[0]
    assert len(header["columns"]) == 4
    assert text.count('scope="col" style="') == 4 and "background-color:rgb" in text.split("</thead>")[0]
    path = FeatureAttributionOutput([seq]).save_html(tmp_path / "view.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    with pytest.raises(FileExistsError):
        seq.save_html(path)
    seq.save_html(path, overwrite=True)


def _chromium():
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def test_headless_chromium_renders_the_tables(real, tmp_path):
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("INSTRUMENT_REQUIRE_CHROMIUM"):
            pytest.fail("INSTRUMENT_REQUIRE_CHROMIUM is set but chromium is not installed (/usr/bin/chromium)")
        pytest.skip(
            "chromium is not installed (/usr/bin/chromium); apt-get install chromium, "
            "or set INSTRUMENT_REQUIRE_CHROMIUM=1 to fail instead of skipping"
        )
    shown = merge_attributions([real, FeatureAttributionOutput([decoder_only(MARKUP_TOKENS, prompt=3)])])
    page = shown.save_html(tmp_path / "view.html", interactive=False)  # the static tables
    profile = tmp_path / "profile"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = parse(result.stdout)  # the DOM after parsing and rendering: tables, cells and labels intact
    check_tables(parsed, shown.aggregate())
    assert parsed.tables[-1]["rows"][: len(MARKUP_TOKENS)] == [t.replace("\n", "\\n") for t in MARKUP_TOKENS]
