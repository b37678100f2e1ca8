"""Whole data sets: `model.attribute_dataset` and `instrument attribute-dataset` (instrument.models.dataset)."""

import json
import shutil

import pytest
from dataset_helpers import assert_all_close

import instrument
from instrument.cli import main
from instrument.models import dataset as dataset_module
from instrument.models.dataset import plan_batches, replica_placement

from tiny_models import CORPUS, tiny_model


def make_rows(count=10):
    """Prompts (the first words of a corpus line) and targets (the whole line): the prompt's tokens are a
    prefix of the target's."""
    lines = (CORPUS * 3)[:count]
    return [{"prompt": " ".join(line.split()[: 2 + i % 3]), "answer": line} for i, line in enumerate(lines)]


@pytest.fixture(scope="module")
def model():
    hf_model, tokenizer = tiny_model("gpt2")
    return instrument.load_model(hf_model, "saliency", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    hf_model, tokenizer = tiny_model("gpt2")
    hf_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reference(model, rows, **kwargs):
    return model.attribute([r["prompt"] for r in rows], [r["answer"] for r in rows], show_progress=False, **kwargs)


def run(model, rows, directory, **kwargs):
    options = dict(input_text_field="prompt", generated_text_field="answer", shard_size=4, batch_size=3)
    return model.attribute_dataset(rows, directory, show_progress=False, **{**options, **kwargs})


def test_plan_batches_sorts_by_length_and_respects_budgets():
    assert plan_batches([5, 2, 9, 3], [0, 0, 0, 0], 2, None) == [[1, 3], [0, 2]]
    assert plan_batches([5, 2, 9, 3], [0, 0, 0, 0], 8, 10) == [[1, 3], [0], [2]]  # 3 x 5 > 10 tokens
    assert plan_batches([5, 2, 9, 3], [1, 0, 0, 1], "auto", None) == [[1, 2], [3, 0]]  # targets apart
    # at most 10% padding: 3 x 20 = 60 padded tokens for 41 real ones would be too many
    assert plan_batches([20, 10, 21, 11], [0, 0, 0, 0], "auto", None, 0.1) == [[1, 3], [0, 2]]
    assert plan_batches([20, 10, 21, 11], [0, 0, 0, 0], "auto", None) == [[1, 3, 0, 2]]


def test_shards_equal_one_attribute_call_and_resume_skips_done_shards(model, tmp_path, monkeypatch):
    rows = make_rows(10)
    ds = run(model, rows, tmp_path / "out", step_scores=["probability"])
    manifest = ds.manifest
    assert manifest["complete"] and [s["ids"] for s in manifest["shards"]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert ds.ids == list(range(10)) and ds.texts == [(r["prompt"], r["answer"]) for r in rows]
    assert manifest["arguments"]["step_scores"] == ["probability"] and manifest["method"] == "saliency"
    assert {"torch", "transformers", "python"} <= set(manifest["versions"])
    expected = reference(model, rows, step_scores=["probability"])
    assert_all_close(ds, expected)
    loaded = instrument.FeatureAttributionOutput.load(tmp_path / "out")
    assert_all_close(loaded, expected)
    assert loaded.info["input_texts"] == [r["prompt"] for r in rows]

    # a job that stopped after its first shard: the rerun does the other two only
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "out" / "shard-00002.safetensors").write_bytes(b"half written")
    calls = []
    attribute = type(model).attribute
    monkeypatch.setattr(type(model), "attribute", lambda self, *a, **k: calls.append(a[0]) or attribute(self, *a, **k))
    resumed = run(model, rows, tmp_path / "out", step_scores=["probability"], batch_size=8)
    assert sorted(x for inputs in calls for x in inputs) == sorted(r["prompt"] for r in rows[4:])
    assert resumed.complete and len(resumed) == 10
    assert_all_close(resumed, expected)


def test_other_arguments_are_refused_and_overwrite_starts_over(model, tmp_path):
    rows = make_rows(5)
    run(model, rows, tmp_path / "out")
    with pytest.raises(ValueError, match="other arguments.*shard_size: 4 there, 2 now"):
        run(model, rows, tmp_path / "out", shard_size=2)
    with pytest.raises(ValueError, match="method"):
        run(model, rows, tmp_path / "out", method="input_x_gradient")
    ds = run(model, rows, tmp_path / "out", shard_size=2, overwrite=True)
    assert [s["file"] for s in ds.manifest["shards"]] == [f"shard-0000{k}.safetensors" for k in range(3)]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        run(model, rows, tmp_path / "other")


def test_bad_rows_are_named_or_skipped(model, tmp_path):
    rows = make_rows(6)
    rows[4]["answer"] = None
    rows[1] = {"prompt": "Hello"}
    with pytest.raises(ValueError, match="row 1: no field 'answer'"):
        run(model, rows, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # found before anything was attributed or written
    ds = run(model, rows, tmp_path / "b", skip_bad_rows=True)
    assert ds.ids == [0, 2, 3, 5]
    assert [(s["id"], s["shard"]) for s in ds.skipped] == [
        (1, "shard-00000.safetensors"),
        (4, "shard-00001.safetensors"),
    ]
    assert "None" in ds.skipped[1]["reason"]
    assert_all_close(ds, reference(model, [rows[i] for i in ds.ids]))
    with pytest.raises(ValueError, match="empty"):
        run(model, [], tmp_path / "c")
    with pytest.raises(ValueError, match="input_text_field"):
        model.attribute_dataset([{"question": "Hi"}], tmp_path / "d", show_progress=False)


def test_unwritable_or_full_output_fails_before_the_first_batch(model, tmp_path, monkeypatch):
    rows = make_rows(3)
    monkeypatch.setattr(type(model), "attribute", lambda *a, **k: pytest.fail("attributed"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot create the output directory"):
        run(model, rows, tmp_path / "file" / "out")
    monkeypatch.setattr(dataset_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(ValueError, match="full"):
        run(model, rows, tmp_path / "out")


def test_auto_batches_on_the_cpu_are_length_buckets(model, monkeypatch):
    """batch_size="auto" on the CPU: a shard's examples in batches padded by at most 10%, equal to `attribute`."""
    rows = [{"prompt": "a b", "answer": "a b " + " ".join(["c"] * n)} for n in (1, 20, 2, 21)]
    sizes = []
    attribute = type(model).attribute

    def spy(self, inputs, *args, **kwargs):
        sizes.append(sorted(len(t.split()) for t in args[0]))
        return attribute(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "attribute", spy)
    out = model.attribute_dataset(
        rows, input_text_field="prompt", generated_text_field="answer", batch_size="auto", show_progress=False
    )
    monkeypatch.undo()
    assert sizes == [[3, 4], [22, 23]]
    assert_all_close(out, reference(model, rows))


def test_generation_in_memory_and_the_paged_view(model, tmp_path, capsys):
    prompts = ["Hello world", "The capital of", "Good morning"]
    out = model.attribute_dataset(
        prompts, shard_size=3, batch_size=3, generation_args={"max_new_tokens": 3}, show_progress=False
    )
    expected = model.attribute(prompts, generation_args={"max_new_tokens": 3}, show_progress=False)
    assert out.info["ids"] == [0, 1, 2] and out.info["generated_texts"] == expected.info["generated_texts"]
    assert_all_close(out, expected)
    ds = model.attribute_dataset(
        prompts,
        tmp_path / "out",
        batch_size="auto",
        viz_path=tmp_path / "view.html",
        generation_args={"max_new_tokens": 3},
    )
    page = (tmp_path / "view.html").read_text()
    assert page.count("<table") == 3 and page.count('<template class="page"') == 1 and "Example 2" in page
    assert ds.texts[0][0] == "Hello world" and ds.texts[0][1].startswith("Hello world")
    bar = capsys.readouterr().err
    assert "3/3" in bar and "examples/s" in bar and "tokens/s" in bar


def test_model_spec_loads_what_the_command_loads(saved_model):
    spec = dataset_module.ModelSpec(str(saved_model), "saliency", model_kwargs={})
    loaded = spec.load()
    assert loaded.model_name == spec.model_name == instrument.load_model(str(saved_model)).model_name
    assert loaded.attribution_method == "saliency"


def test_replica_placement():
    placed = replica_placement(1, 2, 4, total_memory=lambda gpu: 1000)
    assert placed == {"device_map": "auto", "max_memory": {2: 900, 3: 900}}
    with pytest.raises(ValueError, match="nproc_per_node 2"):
        replica_placement(2, 2, 4, total_memory=lambda gpu: 1000)


# -- the command ----------------------------------------------------------------------------------------


def test_command_reads_local_files(saved_model, model, tmp_path, capsys):
    pytest.importorskip("datasets")
    rows = make_rows(6)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data.csv").write_text("prompt,answer\n" + "".join(f'"{r["prompt"]}","{r["answer"]}"\n' for r in rows))
    (tmp_path / "data.txt").write_text("".join(r["prompt"] + "\n" for r in rows[:2]))
    cache = json.dumps({"cache_dir": str(tmp_path / "cache")})
    common = ["-m", str(saved_model), "--quiet", "--shard_size", "4", "-bs", "2", "--dataset_kwargs", cache]
    expected = reference(model, rows)
    for name, file, split in (("json", "data.jsonl", "train"), ("csv", "data.csv", "train[:4]")):
        out = tmp_path / name
        argv = ["attribute-dataset", "-d", name, "--files", str(tmp_path / file), "--split", split]
        assert main([*argv, "-in", "prompt", "-gen", "answer", "-o", str(out), *common]) == 0
        ds = instrument.open_attributions(out)
        assert ds.manifest["arguments"]["dataset"]["name"] == name
        assert_all_close(ds, list(expected)[: len(ds)])
    assert len(instrument.open_attributions(tmp_path / "csv")) == 4
    # streaming, with a slice of the split; targets generated
    argv = ["attribute-dataset", "-d", "json", "--files", str(tmp_path / "data.jsonl"), "--streaming"]
    argv += ["--split", "train[1:3]", "-in", "prompt", "-o", str(tmp_path / "stream"), "--generation_kwargs"]
    assert main([*argv, '{"max_new_tokens": 2}', *common]) == 0
    assert instrument.open_attributions(tmp_path / "stream").ids == [0, 1]
    argv = ["attribute-dataset", "--dataset_name", "text", "--dataset_files", str(tmp_path / "data.txt")]
    argv += ["-o", str(tmp_path / "text")]
    assert main([*argv, "--generation_kwargs", '{"max_new_tokens": 2}', *common]) == 0
    assert instrument.open_attributions(tmp_path / "text").texts[1][0] == rows[1]["prompt"]
    capsys.readouterr()


def test_command_errors(saved_model, tmp_path, capsys):
    pytest.importorskip("datasets")
    (tmp_path / "data.jsonl").write_text('{"prompt": "Hello"}\n{"prompt": null}\n')
    (tmp_path / "broken.jsonl").write_text('{"prompt": "Hello"\n')
    cache = json.dumps({"cache_dir": str(tmp_path / "cache")})
    base = ["attribute-dataset", "-m", str(saved_model), "--quiet", "-d", "json", "--dataset_kwargs", cache]
    cases = [
        (["--files", str(tmp_path / "data.jsonl"), "-in", "question", "-o", str(tmp_path / "o1")], "no such field"),
        (
            ["--files", str(tmp_path / "data.jsonl"), "-in", "prompt", "-o", str(tmp_path / "o2")],
            "row 1: field 'prompt'",
        ),
        (["--files", str(tmp_path / "broken.jsonl"), "-o", str(tmp_path / "o3")], "cannot load the data set json"),
        (["--files", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o4")], "no such file"),
        (["--files", str(tmp_path / "data.jsonl"), "-in", "prompt"], "give it with -o DIR"),
        (["--files", str(tmp_path / "data.jsonl"), "--split", "train[5:]", "-o", str(tmp_path / "o5")], "no data"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err
    assert main([*base, "--files", str(tmp_path / "data.jsonl"), "-in", "prompt", "-o", str(tmp_path / "o6"),
                 "--skip_bad_rows", "--generation_kwargs", '{"max_new_tokens": 2}']) == 0  # fmt: skip
    assert instrument.open_attributions(tmp_path / "o6").manifest["skipped"][0]["id"] == 1
