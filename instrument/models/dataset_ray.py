"""The Ray backend of `attribute_dataset` (`backend="ray"`): shard numbers handed to a pool of actors,
each with its own model, that read their rows and write their shards; the driver records them.

    model.attribute_dataset(data, "out/", backend="ray", ray_actors=4, gpus_per_actor=1)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from instrument.files import shards as files
from instrument.models.dataset import ModelSpec, ShardAttributor, Source, _own_total, _Progress


@dataclasses.dataclass
class ShippedModel:
    """An `AttributionModel`'s parts, to be sent to another process (the model itself holds a weak reference)."""

    model: Any
    tokenizer: Any
    attribution_method: str | None
    method_kwargs: dict

    @classmethod
    def of(cls, model) -> ShippedModel:
        return cls(model.model, model.tokenizer, model.attribution_method, dict(model.method_kwargs))

    def load(self):
        from instrument.models import load_model

        return load_model(self.model, self.attribution_method, tokenizer=self.tokenizer, **self.method_kwargs)


class RayShardWorker:
    """One Ray actor: loads the model once, then attributes and writes the shards it is given."""

    def __init__(self, model, source, fields, directory, shard_size, options):
        self.model = model.load()
        self.source, self.directory, self.shard_size = source, Path(directory), shard_size
        self.attributor = ShardAttributor(self.model, fields, **options)

    def __call__(self, batch: dict) -> dict:
        entries = []
        for k in batch["shard"]:
            k = int(k)
            rows = self.source.slice(k * self.shard_size, (k + 1) * self.shard_size)
            result = self.attributor(rows)
            entry = files.write_shard(self.directory, k, result.out, result.ids, result.texts)
            entry["skipped"] = result.skipped
            entries.append(json.dumps(entry))
        return {"shard": batch["shard"], "entry": entries}


def run_ray(
    model,
    source,
    fields,
    directory,
    shard_size,
    batch_size,
    max_tokens,
    skip_bad_rows,
    aggregate_output,
    kwargs,
    show_progress,
    label,
    ray_address,
    ray_actors,
    gpus_per_actor,
) -> int:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("backend='ray' needs Ray Data: pip install 'seq-instrument[ray]'") from None
    if not source.reiterable:
        source = Source(list(source.data))  # a generator cannot be shipped to the actors
    n_shards = -(-source.count() // shard_size)
    if not ray.is_initialized():
        package_root = str(Path(__file__).resolve().parents[2])
        env = (
            {}
            if ray_address
            else {
                "env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
            }
        )
        ray.init(address=ray_address, runtime_env=env or None, log_to_driver=False)
    if ray_actors is None:
        gpus = ray.cluster_resources().get("GPU", 0)
        ray_actors = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1
    todo = [k for k in range(n_shards) if k not in directory.done]
    progress = _Progress(show_progress, _own_total(source, shard_size, 0, 1, directory.done), label)
    options = {
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "skip_bad_rows": skip_bad_rows,
        "aggregate_output": aggregate_output,
        "kwargs": kwargs,
    }
    try:
        if todo:
            shards = ray.data.from_items([{"shard": k} for k in todo])
            shipped = model if isinstance(model, ModelSpec) else ShippedModel.of(model)
            results = shards.map_batches(
                RayShardWorker,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(ray_actors, len(todo))),
                num_gpus=gpus_per_actor or None,
                fn_constructor_args=(shipped, source, fields, str(directory.path), shard_size, options),
            )
            try:
                for row in results.iter_rows():
                    entry = json.loads(row["entry"])
                    directory.record(int(row["shard"]), entry)
                    progress(len(entry["ids"]) + len(entry["skipped"]), 0)
            except Exception as error:  # an actor's ValueError (a bad row...) arrives wrapped by Ray
                cause = getattr(error, "cause", None)
                if isinstance(cause, (ValueError, TypeError, OSError)):
                    raise cause from None
                raise
    finally:
        progress.close()
    return n_shards
