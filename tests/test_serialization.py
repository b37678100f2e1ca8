"""Save / load: exact float32 round trips in both formats for every output shape, float16 storage,
and clear `ValueError`s for truncated, tampered and foreign files.

    out.save(tmp_path / "a.safetensors");  FeatureAttributionOutput.load(tmp_path / "a.safetensors").equals(out)
"""

import json
import struct

import pytest
import safetensors
import torch
from safetensors.torch import save_file

import instrument
from instrument.files.json_values import jsonable
from instrument.files.safetensors_format import METADATA_KEY
from instrument.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId

from tiny_models import tiny_model

FORMATS = ["safetensors", "json"]


@pytest.fixture(scope="module")
def outputs():
    """Real outputs of every shape, plus a hand-made one with awkward values and info."""
    gpt2, gpt2_tok = tiny_model("gpt2")
    bart, bart_tok = tiny_model("bart")
    gpt2_model = instrument.load_model(gpt2, "saliency", tokenizer=gpt2_tok)
    bart_model = instrument.load_model(bart, "integrated_gradients", tokenizer=bart_tok, n_steps=4)
    cases = {
        "decoder_only": gpt2_model.attribute(
            ["Hello world", "The capital"],
            ["Hello world, this is", "The capital of France"],
            show_progress=False,
            step_scores=["probability", "entropy"],
        ),
        "encoder_decoder_target": bart_model.attribute(
            "Hello world",
            "Le chat.",
            show_progress=False,
            attribute_target=True,
            step_scores=["probability"],
            return_convergence_delta=True,
        ),
        "encoder_decoder_source_only": bart_model.attribute("Hello world", "Le chat.", show_progress=False),
        "layers": instrument.load_model(gpt2, "layer_gradient_x_activation", tokenizer=gpt2_tok).attribute(
            "Hello world", "Hello world, this is", show_progress=False, target_layers="layers"
        ),
    }
    cases["aggregated"] = cases["encoder_decoder_target"].aggregate(["subwords", "scores"])
    weird = FeatureAttributionSequenceOutput(
        source=[TokenWithId('"q" <b>&\\', 5), TokenWithId("▁ünï\n", 6)],
        target=[TokenWithId("<pad>", 1), TokenWithId("x", 2)],
        source_attributions=torch.tensor([[float("inf")], [float("-inf")]]),
        target_attributions=torch.tensor([[float("nan")], [float("nan")]]),
        step_scores={"my.score": torch.tensor([1e-30])},
        sequence_scores={"enc": torch.ones(2, 1, 3)},
        attr_pos_start=1,
        attr_pos_end=2,
    )
    cases["hand_made"] = FeatureAttributionOutput(
        [weird],
        step_attributions=None,
        info={
            "attribution_args": {"baselines": torch.zeros(2, 3), "big": torch.zeros(100), "n": (1, 2)},
            "nan": float("nan"),
            "nested": {"a": [1, None, True]},
            3: "int key",
            "object": object,
        },
    )
    return cases


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "case",
    ["decoder_only", "encoder_decoder_target", "encoder_decoder_source_only", "layers", "aggregated", "hand_made"],
)
def test_round_trip_is_exact(outputs, tmp_path, case, fmt):
    out = outputs[case]
    path = out.save(tmp_path / f"out.{fmt}")
    loaded = FeatureAttributionOutput.load(path)
    assert loaded.equals(out)
    for before, after in zip(out.sequence_attributions, loaded.sequence_attributions):
        for name in ("source_attributions", "target_attributions"):
            a, b = getattr(before, name), getattr(after, name)
            assert (a is None and b is None) or (
                b.dtype == torch.float32
                and torch.equal(a.isnan(), b.isnan())
                and torch.equal(a.nan_to_num(), b.nan_to_num())
            )
        assert after.step_scores.keys() == before.step_scores.keys()
    if case == "encoder_decoder_target":
        assert "deltas" in loaded[0].step_scores and loaded[0].target_attributions is not None
    if case == "encoder_decoder_source_only":
        assert loaded[0].target_attributions is None and loaded[0].source_attributions.dim() == 3
    if case == "layers":
        assert loaded[0].target_attributions.dim() == 4
    if case == "aggregated":
        assert loaded[0].source_attributions.dim() == 2


def test_info_is_stored_as_json_with_short_reprs(outputs, tmp_path):
    loaded = FeatureAttributionOutput.load(outputs["hand_made"].save(tmp_path / "out.json"))
    args = loaded.info["attribution_args"]
    assert args["baselines"] == "tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float32)"
    assert args["big"] == "tensor(shape=[100], dtype=torch.float32)" and args["n"] == [1, 2]
    assert (
        loaded.info["nan"] == "nan"
        and loaded.info["3"] == "int key"
        and loaded.info["nested"] == {"a": [1, None, True]}
    )
    assert loaded.info["object"] == "<class 'object'>"
    assert jsonable(outputs["hand_made"].info) == loaded.info


def test_json_is_standard_and_readable(outputs, tmp_path):
    path = outputs["hand_made"].save(tmp_path / "out.json")
    document = json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    seq = document["sequences"][0]
    assert seq["source_attributions"] == {"dtype": "float32", "shape": [2, 1], "data": [["Infinity"], ["-Infinity"]]}
    assert seq["target_attributions"]["data"] == [[None], [None]]
    assert seq["source"][0] == ['"q" <b>&\\', 5]


@pytest.mark.parametrize("fmt", FORMATS)
def test_float16_storage(outputs, tmp_path, fmt):
    out = outputs["encoder_decoder_target"]
    path = out.save(tmp_path / f"half.{fmt}", scores_precision="float16")
    loaded = FeatureAttributionOutput.load(path)
    assert loaded[0].source_attributions.dtype == torch.float32  # upcast on load
    assert loaded.equals(FeatureAttributionOutput([_rounded(s) for s in out.sequence_attributions], info=out.info))
    if fmt == "safetensors":
        with safetensors.safe_open(str(path), "pt") as handle:
            assert handle.get_tensor("seq0.source_attributions").dtype == torch.float16
            assert json.loads(handle.metadata()[METADATA_KEY])["scores_precision"] == "float16"
    with pytest.warns(UserWarning, match="beyond the float16 range"):
        FeatureAttributionOutput([_scaled(out[0], 1e12)]).save(tmp_path / f"big.{fmt}", scores_precision="float16")
    with pytest.raises(ValueError, match="scores_precision"):
        out.save(tmp_path / f"bad.{fmt}", scores_precision="int8")


def _rounded(seq):
    def half(t):
        return None if t is None else t.half().float()

    return FeatureAttributionSequenceOutput(
        seq.source,
        seq.target,
        half(seq.source_attributions),
        half(seq.target_attributions),
        {k: half(v) for k, v in seq.step_scores.items()},
        {},
        seq.attr_pos_start,
        seq.attr_pos_end,
    )


def _scaled(seq, factor):
    return FeatureAttributionSequenceOutput(
        seq.source,
        seq.target,
        seq.source_attributions * factor,
        None,
        attr_pos_start=seq.attr_pos_start,
        attr_pos_end=seq.attr_pos_end,
    )


def test_overwrite_and_sequence_save(outputs, tmp_path):
    out = outputs["aggregated"]
    path = out.save(tmp_path / "out.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        out.save(path)
    outputs["decoder_only"].save(path, overwrite=True)
    assert FeatureAttributionOutput.load(path).equals(outputs["decoder_only"])
    single = outputs["decoder_only"][1].save(tmp_path / "one.json")
    assert FeatureAttributionOutput.load(single)[0].equals(outputs["decoder_only"][1])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


# -- corrupted and foreign files ---------------------------------------------------------------------


def _header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write_header(path, header, body):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _edit_document(path, edit):
    header, body = _header(path)
    document = json.loads(header["__metadata__"][METADATA_KEY])
    edit(document)
    header["__metadata__"][METADATA_KEY] = json.dumps(document)
    _write_header(path, header, body)


@pytest.fixture
def saved(outputs, tmp_path):
    def make(fmt="safetensors"):
        return outputs["encoder_decoder_target"].save(tmp_path / f"good.{fmt}", overwrite=True)

    return make


def _rejects(path, *fragments):
    with pytest.raises(ValueError) as error:
        FeatureAttributionOutput.load(path)
    message = str(error.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("fmt, cut", [("safetensors", 10), ("safetensors", 1000), ("json", 50)])
def test_truncated(saved, fmt, cut):
    path = saved(fmt)
    path.write_bytes(path.read_bytes()[:-cut])
    _rejects(path, "not a readable safetensors file" if fmt == "safetensors" else "not valid JSON")


def test_metadata_edited_to_inconsistent_shapes(saved):
    path = saved()
    _edit_document(path, lambda d: d["sequences"][0].update(attr_pos_end=d["sequences"][0]["attr_pos_end"] - 1))
    _rejects(path, "sequence 0.source_attributions has shape", "expected [")
    path = saved()
    _edit_document(path, lambda d: d["sequences"][0]["source"].pop())
    _rejects(path, "sequence 0.source_attributions", "tokens")
    path = saved()
    _edit_document(path, lambda d: d["sequences"][0]["source_attributions"].update(shape=[1, 2, 3]))
    _rejects(path, "the metadata says float32 [1, 2, 3]")


def test_metadata_flipped(saved):
    path = saved()
    header, body = _header(path)
    header["__metadata__"][METADATA_KEY] = header["__metadata__"][METADATA_KEY][::-1]
    _write_header(path, header, body)
    _rejects(path, "metadata is not valid JSON")
    path = saved()
    _edit_document(path, lambda d: d.update(format="something-else"))
    _rejects(path, "not a seq-instrument attribution file")
    path = saved()
    _edit_document(path, lambda d: d["sequences"][0]["source"].__setitem__(0, {"token": "x"}))
    _rejects(path, "is not a [token, id] pair")


def test_tensor_key_missing_or_extra(saved):
    path = saved()
    with safetensors.safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file({k: v for k, v in tensors.items() if k != "seq0.step_scores.deltas"}, str(path), metadata=metadata)
    _rejects(path, "tensor 'seq0.step_scores.deltas' is missing from the file")
    save_file({**tensors, "extra": torch.zeros(1)}, str(path), metadata=metadata)
    _rejects(path, "tensors not described by the metadata: ['extra']")
    save_file({**tensors, "seq0.source_attributions": torch.zeros(2, 2)}, str(path), metadata=metadata)
    _rejects(path, "the stored tensor is torch.float32 [2, 2]")


def test_foreign_files(tmp_path):
    other = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, str(other))
    _rejects(other, "not a seq-instrument attribution file", "bias")
    with_metadata = tmp_path / "meta.safetensors"
    save_file({"weight": torch.zeros(2)}, str(with_metadata), metadata={"format": "pt"})
    _rejects(with_metadata, "not a seq-instrument attribution file")
    for name, text in [("random.json", '{"a": 1, "b": [1, 2]}'), ("list.json", "[1, 2, 3]"), ("nan.json", "not json")]:
        (tmp_path / name).write_text(text)
        _rejects(tmp_path / name, "not a seq-instrument attribution file" if name != "nan.json" else "not valid JSON")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _rejects(empty, "not a readable safetensors file")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\x80\x81\xff" * 10)
    _rejects(binary, "not valid JSON")
    with pytest.raises(FileNotFoundError):
        FeatureAttributionOutput.load(tmp_path / "absent.safetensors")


def test_json_tampered_values(saved):
    path = saved("json")
    document = json.loads(path.read_text())
    document["sequences"][0]["source_attributions"]["data"][0][0][0] = "__import__('os')"
    path.write_text(json.dumps(document))
    _rejects(path, "is not a valid float32 value")
    document["sequences"][0]["source_attributions"]["data"][0].pop()
    path.write_text(json.dumps(document))
    _rejects(path, "do not have the recorded shape")
    document["version"] = 99
    path.write_text(json.dumps(document))
    _rejects(path, "unsupported version 99")
