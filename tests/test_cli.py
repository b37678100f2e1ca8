import json
import subprocess
import sys

import pytest
import torch

import instrument
from instrument.cli import main

from tiny_models import tiny_model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny GPT-2 and its tokenizer in a local directory, as `-m` takes them."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model, tokenizer = tiny_model("gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_attribute_saves_shows_and_loads(saved_model, tmp_path, capsys):
    out_path, html_path = tmp_path / "out.safetensors", tmp_path / "out.html"
    code = main(
        [
            "attribute",
            "-m",
            str(saved_model),
            "-a",
            "integrated_gradients",
            "-i",
            "Hello world",
            "-g",
            "Hello world, this is",
            "--step_scores",
            "probability",
            "-o",
            str(out_path),
            "--viz_path",
            str(html_path),
            "--attribution_kwargs",
            '{"n_steps": 4}',
        ]
    )
    assert code == 0
    shown = capsys.readouterr().out
    assert "Ġis" in shown and "probability" in shown
    loaded = instrument.FeatureAttributionOutput.load(out_path)
    assert loaded.info["attribution_args"]["n_steps"] == 4
    assert loaded[0].target_attributions.shape[1] == loaded[0].attr_pos_end - loaded[0].attr_pos_start > 0
    assert "seqInstrumentView(" in html_path.read_text()  # --viz_path writes the interactive view
    assert main(["attribute", "-m", str(saved_model), "-i", "Hello", "-o", str(out_path), "--hide"]) == 2
    assert "exists" in capsys.readouterr().err


def test_attribute_a_data_set_file(saved_model, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"input": i, "target": t})
            for i, t in [("Hello", "Hello world"), ("The capital", "The capital of France")]
        )
    )
    out_path = tmp_path / "out.json"
    assert (
        main(
            ["attribute", "-m", str(saved_model), "-f", str(data), "-o", str(out_path), "--hide", "--aggregate_output"]
        )
        == 0
    )
    loaded = instrument.FeatureAttributionOutput.load(out_path)
    assert len(loaded) == 2 and loaded[1].target_attributions.dim() == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["attribute", "-i", "Hello"], "required: -m/--model"),
        (["attribute", "-m", "x", "-i", "a", "--attribution_kwargs", "{bad"], "not valid JSON"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_library_errors_give_one_line_and_exit_2(saved_model, capsys):
    assert main(["attribute", "-m", str(saved_model), "-a", "salency", "-i", "Hello", "--hide"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Unknown attribution method" in err[0]


def test_lists_and_help_through_the_console_entry():
    listed = subprocess.run(
        [sys.executable, "-m", "instrument", "list-methods"], capture_output=True, text=True, check=True
    )
    assert "integrated_gradients" in listed.stdout.split()
    steps = subprocess.run(
        [sys.executable, "-m", "instrument", "list-step-functions"], capture_output=True, text=True, check=True
    )
    assert "contrast_prob_diff" in steps.stdout.split()
    helped = subprocess.run(
        [sys.executable, "-m", "instrument", "attribute", "--help"], capture_output=True, text=True, check=True
    )
    assert "--attribution_kwargs" in helped.stdout and "demo-mt" in helped.stdout


def test_data_set_with_targets_on_some_lines_forces_those_and_generates_the_rest(saved_model, tmp_path):
    data = tmp_path / "mixed.jsonl"
    records = [
        {"input": "Hello", "target": "Hello world"},
        {"input": "The capital"},
        {"input": "Good morning", "target": "Good morning! How"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in records))
    out_path = tmp_path / "out.json"
    argv = [
        "attribute",
        "-m",
        str(saved_model),
        "-f",
        str(data),
        "-o",
        str(out_path),
        "--hide",
        "--generation_kwargs",
        '{"max_new_tokens": 3, "do_sample": false}',
    ]
    assert main(argv) == 0
    loaded = instrument.FeatureAttributionOutput.load(out_path)
    assert loaded.info["input_texts"] == ["Hello", "The capital", "Good morning"]
    model = instrument.load_model(str(saved_model), "saliency")
    generated = model.attribute(
        "The capital", generation_args={"max_new_tokens": 3, "do_sample": False}, show_progress=False
    )
    expected_texts = ["Hello world", generated.info["generated_texts"][0], "Good morning! How"]
    assert loaded.info["generated_texts"] == expected_texts
    for seq, text in zip(loaded, expected_texts):  # each sequence in file order, with its own target
        assert [t.id for t in seq.target] == model.tokenizer(text)["input_ids"]
    torch.testing.assert_close(
        loaded[1].target_attributions, generated[0].target_attributions, rtol=1e-5, atol=1e-7, equal_nan=True
    )


def test_unknown_model_or_missing_file_give_one_line_and_exit_2(tmp_path, capsys):
    assert main(["attribute", "-m", str(tmp_path / "no-such-model"), "-i", "Hello", "--hide"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("instrument: error:") and "no-such-model" in err[0]
    assert main(["attribute", "-m", "demo-lm", "-f", str(tmp_path / "missing.jsonl"), "--hide"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such input file" in err[0]


def test_unexpected_error_gives_one_line_with_a_hint_and_debug_shows_the_traceback(saved_model, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nover two lines")

    monkeypatch.setattr(instrument.models.base.AttributionModel, "attribute", broken)
    argv = ["attribute", "-m", str(saved_model), "-i", "Hello", "--hide"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RuntimeError: something inside broke over two lines" in err[0] and "--debug" in err[0]
    for debug_argv in (argv + ["--debug"], ["--debug"] + argv):
        with pytest.raises(RuntimeError, match="something inside broke"):
            main(debug_argv)


def test_import_instrument_gives_demo_without_loading_a_model():
    code = (
        "import sys, instrument; path = instrument.demo.model_path('demo-mt'); "
        "assert path is None or path.endswith('demo-mt'); "
        "assert instrument.demo.alignment_examples(1)[0]; "
        "assert not any(m.startswith('transformers.models.marian') or "
        "m.startswith('transformers.models.gpt2') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
