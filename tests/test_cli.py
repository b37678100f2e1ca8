import json
import subprocess
import sys

import pytest

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
    code = main([
        "attribute", "-m", str(saved_model), "-a", "integrated_gradients", "-i", "Hello world",
        "-g", "Hello world, this is", "--step_scores", "probability", "-o", str(out_path),
        "--viz_path", str(html_path), "--attribution_kwargs", '{"n_steps": 4}',
    ])
    assert code == 0
    shown = capsys.readouterr().out
    assert "Ġis" in shown and "probability" in shown
    loaded = instrument.FeatureAttributionOutput.load(out_path)
    assert loaded.info["attribution_args"]["n_steps"] == 4
    assert loaded[0].target_attributions.shape[1] == loaded[0].attr_pos_end - loaded[0].attr_pos_start > 0
    assert "<table" in html_path.read_text()
    assert main(["attribute", "-m", str(saved_model), "-i", "Hello", "-o", str(out_path), "--hide"]) == 2
    assert "exists" in capsys.readouterr().err


def test_attribute_a_data_set_file(saved_model, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"input": i, "target": t}) for i, t in
                              [("Hello", "Hello world"), ("The capital", "The capital of France")]))
    out_path = tmp_path / "out.json"
    assert main(["attribute", "-m", str(saved_model), "-f", str(data), "-o", str(out_path), "--hide", "--aggregate_output"]) == 0
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
    listed = subprocess.run([sys.executable, "-m", "instrument", "list-methods"], capture_output=True, text=True, check=True)
    assert "integrated_gradients" in listed.stdout.split()
    steps = subprocess.run([sys.executable, "-m", "instrument", "list-step-functions"], capture_output=True, text=True, check=True)
    assert "contrast_prob_diff" in steps.stdout.split()
    helped = subprocess.run([sys.executable, "-m", "instrument", "attribute", "--help"], capture_output=True, text=True, check=True)
    assert "--attribution_kwargs" in helped.stdout and "demo-mt" in helped.stdout
