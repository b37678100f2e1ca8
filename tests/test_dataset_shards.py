"""The directory format of a data set's attributions: shards, manifest, lazy reading (instrument.files.shards)."""

import json

import pytest
from dataset_helpers import assert_all_close, assert_close

import instrument
from instrument.files import shards

from tiny_models import tiny_model

INPUTS = ["Hello world", "The capital of France is", "Good morning!", "The quick brown fox", "Water boils at"]


@pytest.fixture(scope="module")
def model():
    hf_model, tokenizer = tiny_model("gpt2")
    return instrument.load_model(hf_model, "saliency", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    """Two shards (ids 10, 11, 12 and 13, 14) of greedy generations, and the output of one call on all five."""
    directory = tmp_path_factory.mktemp("attributions")
    whole = model.attribute(INPUTS, generation_args={"max_new_tokens": 3}, show_progress=False)
    entries = []
    for k, (start, stop) in enumerate([(0, 3), (3, 5)]):
        part = model.attribute(INPUTS[start:stop], generation_args={"max_new_tokens": 3}, show_progress=False)
        texts = list(zip(part.info["input_texts"], part.info["generated_texts"]))
        entries.append(shards.write_shard(directory, k, part, list(range(10 + start, 10 + stop)), texts))
    manifest = shards.make_manifest("tiny", "saliency", {"n": 1}, {"torch": "x"}, entries, complete=True)
    shards.write_manifest(directory, manifest)
    return directory, whole


def test_manifest_contract(written):
    directory, whole = written
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "seq-instrument-dataset" and manifest["version"] == 1 and manifest["complete"]
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert manifest["shards"][1]["ids"] == [13, 14]
    assert manifest["shards"][0]["texts"][0][0] == "Hello world"
    assert set(manifest) >= {"model", "method", "arguments", "versions", "skipped"}
    for entry in manifest["shards"]:  # each shard is an ordinary attribution file
        assert len(instrument.FeatureAttributionOutput.load(directory / entry["file"])) == len(entry["ids"])
    assert not list(directory.glob("*.tmp"))


def test_lazy_reading_equals_one_call(written, monkeypatch):
    directory, whole = written
    ds = instrument.open_attributions(directory)
    assert len(ds) == 5 and ds.ids == [10, 11, 12, 13, 14]
    assert ds.texts == list(zip(whole.info["input_texts"], whole.info["generated_texts"]))
    assert ds.shard_of(4) == "shard-00001.safetensors" and ds.shard_of(-5) == "shard-00000.safetensors"
    reads = []
    real = shards.load_file
    monkeypatch.setattr(shards, "load_file", lambda path: reads.append(path.name) or real(path))
    for i in (3, 4, 3):
        assert_close(ds[i], whole[i])
    assert reads == ["shard-00001.safetensors"]  # only the shard holding them, once
    assert_all_close(ds, whole)
    loaded = instrument.FeatureAttributionOutput.load(directory)
    assert_all_close(loaded, whole)
    assert loaded.info["input_texts"] == INPUTS
    with pytest.raises(IndexError):
        ds[5]


def test_damaged_and_unfinished_directories(written, tmp_path):
    directory, _ = written
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in directory.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    data = bytearray((copy / "shard-00001.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "shard-00001.safetensors").write_bytes(bytes(data))
    ds = instrument.open_attributions(copy)
    ds[0]
    with pytest.raises(ValueError, match="checksum"):
        ds[4]
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["complete"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not finished"):
        instrument.FeatureAttributionOutput.load(copy)
    (copy / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="manifest.json"):
        instrument.open_attributions(copy)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        instrument.open_attributions(tmp_path)
