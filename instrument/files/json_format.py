"""Our portable `.json` format: the document with each tensor's values inline, as standard JSON.

    document = json_document(out, precision="float16")
    document["sequences"][0]["step_scores"]["probability"]     # {"dtype": "float16", "shape": [5], "data": [...]}
    out = from_json_document(json.loads(text))

A tensor entry holds its values as nested lists in `"data"`; NaN is `null`, infinities are the
strings `"Infinity"` / `"-Infinity"` (see `json_values`), so any JSON reader takes the file.
"""

from __future__ import annotations

from typing import Any

from instrument.files.document import DTYPES, from_document, tensor_spec, to_document
from instrument.files.json_values import decode_values, encode_values
from instrument.files.problems import expect
from instrument.outputs import FeatureAttributionOutput


def json_document(out: FeatureAttributionOutput, precision: str) -> dict:
    """The document of `out` with every tensor's values in its `"data"`."""
    return to_document(out, lambda key, value: {**tensor_spec(value), "data": encode_values(value)}, precision)


def from_json_document(document: Any) -> FeatureAttributionOutput:
    """The output a parsed `.json` file describes; InvalidFile for a foreign or damaged document."""

    def get(spec, where):
        expect("data" in spec, f"{where}: no 'data'")
        return decode_values(spec["data"], spec["shape"], DTYPES[spec["dtype"]], where)

    return from_document(document, get)
