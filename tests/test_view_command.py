"""`instrument view DIR`: the local server over a 1,000-example attributions directory (list, search, paging,
one example per page reading only its shard, `..` refused, read-only).

    server = make_server(directory, port=0); GET /api/examples?q=...; GET /example/899
"""

import http.client
import json
import threading
import time

import numpy as np
import pytest
import torch

import instrument
from instrument.cli import build_parser, main
from instrument.files import shards
from instrument.files.shards import make_manifest, write_manifest, write_shard
from instrument.views.server import make_server

N_EXAMPLES, PER_SHARD = 1000, 100


def tiny(index):
    """A decoder-only example: 3 prompt tokens, 2 generated, scores seeded by `index`."""
    generator = torch.Generator().manual_seed(index)
    scores = torch.rand(5, 2, generator=generator)
    scores[3:, 0], scores[4:, 1] = float("nan"), float("nan")
    tokens = [instrument.TokenWithId(f"t{index}_{k}", 10 * index + k) for k in range(5)]
    return instrument.FeatureAttributionSequenceOutput(
        [], tokens, None, scores, {"probability": torch.rand(2, generator=generator)}, attr_pos_start=3, attr_pos_end=5
    )


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset")
    entries = []
    for k in range(N_EXAMPLES // PER_SHARD):
        indices = range(k * PER_SHARD, (k + 1) * PER_SHARD)
        out = instrument.FeatureAttributionOutput([tiny(i) for i in indices], info={"attribution_method": "saliency"})
        texts = [[f"input text {i}", f"generated text {i}"] for i in indices]
        entries.append(write_shard(folder, k, out, [f"row-{i}" for i in indices], texts))
    write_manifest(folder, make_manifest("tiny-model", "saliency", {}, {}, entries, complete=True))
    return folder


@pytest.fixture(scope="module")
def server(directory):
    server = make_server(directory, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def get(server, path, method="GET"):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request(method, path)
    response = connection.getresponse()
    body = response.read().decode("utf-8")
    connection.close()
    return response.status, body


def test_list_search_and_paging(server):
    assert server.server_address[0] == "127.0.0.1"
    status, body = get(server, "/api/examples?page=3")
    found = json.loads(body)
    assert status == 200 and found["total"] == N_EXAMPLES and found["pages"] == 20 and found["page"] == 3
    assert [item["index"] for item in found["items"]] == list(range(150, 200))
    assert found["items"][0] == {
        "index": 150,
        "id": "row-150",
        "input": "input text 150",
        "generated": "generated text 150",
    }
    found = json.loads(get(server, "/api/examples?q=TEXT%20917")[1])
    assert found["total"] == 1 and found["items"][0]["id"] == "row-917"
    assert json.loads(get(server, "/api/examples?q=row-99")[1])["total"] == 11  # row-99, row-990 .. row-999
    status, page = get(server, "/")
    assert status == 200 and "api/examples" in page and "1000 examples in 10 shards" in page
    assert "http://" not in page and "https://" not in page


def test_900th_example_opens_fast_and_reads_only_its_shard(server, directory, monkeypatch):
    read = []
    load, checksum = shards.load_file, shards.file_sha256
    monkeypatch.setattr(shards, "load_file", lambda path: read.append(path.name) or load(path))
    monkeypatch.setattr(shards, "file_sha256", lambda path: read.append(path.name) or checksum(path))
    started = time.perf_counter()
    status, page = get(server, "/example/899")
    elapsed = time.perf_counter() - started
    assert status == 200 and elapsed < 1.0, elapsed
    assert set(read) == {"shard-00008.safetensors"}  # example 899 is in the 9th shard; no other was opened
    data = json.loads(page.split('class="si-data">')[1].split("</script>")[0])
    view = data["examples"][0]["views"]["tokens"]
    assert [label for label, _, _ in view["rows"]] == [f"t899_{k}" for k in range(5)]
    expected = tiny(899).target_attributions
    expected = expected / expected.abs().nansum(0)  # shown normalised per step ("scores")
    got = np.array([[np.nan if v is None else v for v in row] for row in view["values"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
    assert data["examples"][0]["input"] == "input text 899" and data["header"]["model"] == "tiny-model"
    assert get(server, "/example/1000")[0] == 404


@pytest.mark.parametrize(
    "path", ["/../manifest.json", "/example/..%2F..%2Fmanifest.json", "/%2e%2e/%2e%2e/etc/passwd", "/a/../.."]
)
def test_refuses_paths_outside_the_directory(server, path):
    status, body = get(server, path)
    assert status == 403 and "outside" in body


def test_read_only_and_unknown_routes(server):
    assert get(server, "/manifest.json")[0] == 404  # files are never served by path
    assert get(server, "/", method="POST")[0] == 501
    assert get(server, "/", method="HEAD")[0] == 200


def test_cli_view_command(tmp_path, capsys):
    args = build_parser().parse_args(["view", str(tmp_path)])
    assert args.host == "127.0.0.1" and args.port == 8000 and callable(args.run)
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert "No attributions directory" in capsys.readouterr().err
