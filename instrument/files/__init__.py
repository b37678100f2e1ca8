"""Saving and loading attributions: one `.safetensors` file (default), a portable `.json` file, or Inseq's JSON.

    from instrument.files import load, save
    save(out, "attributions.safetensors")                      # refuses to overwrite unless overwrite=True
    save(out, "attributions.json", scores_precision="float16")
    load("attributions.safetensors").equals(out)

Modules: `saving` (`save`, `load`: format choice, gzip detection, atomic writes), `document` (the
JSON document both of our formats hold), `safetensors_format` and `json_format` (where its tensors
go), `inseq_format` (Inseq's JSON, read and written), `json_values` (values as standard JSON),
`problems` (the error a bad file raises), `shards` (a data set's directory of shards and manifest,
`open_attributions`).
"""

from instrument.files.saving import FORMATS, load, save

__all__ = ["FORMATS", "load", "save"]
