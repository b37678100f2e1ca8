"""Our `.safetensors` format: the tensors as safetensors tensors, the document in the file's metadata.

    write = safetensors_writer(out, precision="float32")
    write("attributions.safetensors")
    out = load_safetensors(Path("attributions.safetensors"))

Tensors are stored under keys such as `seq0.source_attributions`, `seq0.step_scores.probability`; a
tensor entry of the document names its key (`"key"`). The document is one JSON string in the
safetensors metadata under `"seq_instrument"`, next to `"format"` and `"version"`. Loading checks that
every tensor is described exactly once.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch

from instrument.files.document import FORMAT, VERSION, from_document, tensor_spec, to_document
from instrument.files.problems import InvalidFile, expect
from instrument.outputs import FeatureAttributionOutput

METADATA_KEY = "seq_instrument"


def safetensors_writer(out: FeatureAttributionOutput, precision: str) -> Callable[[str], None]:
    """A function that writes `out` as a safetensors file at the path it is given."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def put(key, value):
        tensors[key] = value
        return {**tensor_spec(value), "key": key}

    document = to_document(out, put, precision)
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        METADATA_KEY: json.dumps(document, ensure_ascii=False, allow_nan=False),
    }

    def write(path: str) -> None:
        save_file(tensors, path, metadata=metadata)

    return write


def looks_like_safetensors(data: bytes) -> bool:
    """True when `data` starts as a safetensors file does: a header length that fits, then a JSON object."""
    if len(data) < 9:
        return False
    header = struct.unpack("<Q", data[:8])[0]
    return header <= len(data) - 8 and data[8:9] == b"{"


def load_safetensors(path: Path) -> FeatureAttributionOutput:
    """The output saved at `path` by `safetensors_writer`; InvalidFile for a foreign or damaged file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata, keys = handle.metadata() or {}, list(handle.keys())
            expect(
                metadata.get("format") == FORMAT and METADATA_KEY in metadata,
                f"not a seq-instrument attribution file (no {METADATA_KEY!r} metadata of format {FORMAT!r}; "
                f"tensors: {sorted(keys)[:5]})",
            )
            stored = {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise InvalidFile(f"not a readable safetensors file ({error})") from None
    expect(metadata.get("version") == str(VERSION), f"unsupported version {metadata.get('version')!r}")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise InvalidFile(f"the {METADATA_KEY!r} metadata is not valid JSON ({error})") from None
    used: set[str] = set()

    def get(spec, where):
        key = spec.get("key")
        expect(isinstance(key, str), f"{where}: no tensor key")
        expect(key in stored, f"{where}: tensor {key!r} is missing from the file")
        expect(key not in used, f"{where}: tensor {key!r} is used twice")
        used.add(key)
        return stored[key]

    out = from_document(document, get)
    expect(used == set(stored), f"tensors not described by the metadata: {sorted(set(stored) - used)}")
    return out
