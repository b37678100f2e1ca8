"""`instrument attribute-dataset`: a whole data set (read with Hugging Face `datasets`) into resumable shards.

$ instrument attribute-dataset -m gpt2 -a saliency -d json --files prompts.jsonl -in prompt -o out/
$ torchrun --nproc_per_node 4 -m instrument attribute-dataset -m gpt2 -d imdb --split "test[:1000]" -in text -o out/
$ instrument attribute-dataset ... --backend ray --ray_address auto --gpus_per_actor 1

Inseq's flags (-d, --config, --dir, --files, --split, --revision, -in, -gen, --dataset_kwargs, also spelled
--dataset_name, --input_text_field...) and every flag of `instrument attribute` (-o is the output
directory). Running the same command again finishes an interrupted job (see `instrument.models.dataset`).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from instrument.cli import _json, add_attribute_flags


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_command(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "attribute-dataset",
        help="attribute a whole data set into resumable shards (one process, torchrun or Ray)",
        description="Attribute every row of a Hugging Face data set (or local json/csv/parquet/text files) into "
        "shards in the -o directory; the same command again finishes an interrupted job. E.g. "
        "`instrument attribute-dataset -m demo-lm -d json --files data.jsonl -in input -o out/`.",
    )
    data = parser.add_argument_group("data set (Hugging Face datasets.load_dataset)")
    data.add_argument(
        "-d",
        "--dataset",
        "--dataset_name",
        dest="dataset_name",
        required=True,
        help="a hub name, or a builder: json, csv, parquet, text",
    )
    data.add_argument(
        "--config", "--dataset_config", dest="dataset_config", default=None, help="the data set's configuration"
    )
    data.add_argument(
        "--dir", "--dataset_dir", dest="dataset_dir", default=None, help="the directory of the data files"
    )
    data.add_argument(
        "--files", "--dataset_files", dest="dataset_files", nargs="+", default=None, metavar="FILE", help="data files"
    )
    data.add_argument(
        "--split", "--dataset_split", dest="dataset_split", default="train", help="split, e.g. train or 'test[:100]'"
    )
    data.add_argument(
        "--revision",
        "--dataset_revision",
        dest="dataset_revision",
        default=None,
        help="the data set's revision on the hub",
    )
    data.add_argument(
        "--auth",
        "--dataset_auth_token",
        dest="dataset_auth_token",
        default=None,
        help="a hub token for a private data set",
    )
    data.add_argument(
        "-in",
        "--input",
        "--input_text_field",
        dest="input_text_field",
        default=None,
        help="the field of the input texts (default: 'text' or 'input')",
    )
    data.add_argument(
        "-gen",
        "--generated",
        "--generated_text_field",
        dest="generated_text_field",
        default=None,
        help="the field of the targets (default: generate them)",
    )
    data.add_argument(
        "--dataset_kwargs", type=_json, default={}, metavar="JSON", help="more keyword arguments of load_dataset"
    )
    data.add_argument("--streaming", action="store_true", help="stream the rows (for corpora larger than memory)")
    add_attribute_flags(parser)
    batch = parser._option_string_actions["--batch_size"]
    batch.type, batch.default = _batch_size, 8
    batch.help = "examples per batch, or 'auto' (sized from free memory; on the CPU, length buckets); default 8"
    parser._option_string_actions["--save_path"].help = "the output directory (shards and manifest.json); required"
    parser._option_string_actions["--hide"].help = "accepted for `attribute`'s sake: nothing is printed here"
    parser._option_string_actions["--overwrite"].help = "start over: delete the shards and manifest in -o first"
    run = parser.add_argument_group("running")
    run.add_argument("--shard_size", type=_positive, default=64, help="rows per shard (and length-sorting window)")
    run.add_argument("--max_tokens_per_batch", type=_positive, default=None, help="padded tokens per batch at most")
    run.add_argument(
        "--skip_bad_rows", action="store_true", help="skip rows without usable texts (listed in the manifest)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--backend", choices=("local", "ray"), default="local", help="one process/torchrun, or Ray")
    run.add_argument("--ray_address", default=None, help="the Ray cluster (e.g. auto); default: start a local one")
    run.add_argument("--ray_actors", type=_positive, default=None, help="actors (model replicas) of the Ray backend")
    run.add_argument("--gpus_per_actor", type=float, default=0, help="GPUs per Ray actor (default 0: CPU)")
    run.add_argument(
        "--gpus_per_replica",
        type=_positive,
        default=None,
        help="under torchrun: GPUs per rank, the model spread over them with a device_map",
    )
    parser.set_defaults(run=run_dataset)
    return parser


def load_rows(args: argparse.Namespace):
    """The data set of the command's flags (`datasets.load_dataset`); ValueError naming what failed."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "attribute-dataset reads data sets with Hugging Face datasets: pip install 'seq-instrument[datasets]'"
        ) from None
    datasets.disable_progress_bars()
    for name in args.dataset_files or []:
        if not any(c in name for c in "*?[") and "://" not in name and not Path(name).exists():
            raise ValueError(f"--files: no such file: {name}")
    split, take = args.dataset_split, None
    sliced = re.fullmatch(r"(\w+)\[(\d*):(\d*)\]", split or "")
    if args.streaming and sliced:  # streaming data sets take no slice in the split name: skip/take instead
        split = sliced.group(1)
        take = (int(sliced.group(2) or 0), int(sliced.group(3)) if sliced.group(3) else None)
    where = args.dataset_name + (f" ({', '.join(args.dataset_files)})" if args.dataset_files else "")
    try:
        data = datasets.load_dataset(
            args.dataset_name,
            args.dataset_config,
            data_dir=args.dataset_dir,
            data_files=args.dataset_files,
            split=split,
            revision=args.dataset_revision,
            token=args.dataset_auth_token,
            streaming=args.streaming,
            **args.dataset_kwargs,
        )
    except Exception as error:  # datasets raises many kinds (DatasetGenerationError, DatasetNotFoundError...)
        cause = error.__cause__ or error
        raise ValueError(f"cannot load the data set {where}: {type(cause).__name__}: {cause}") from None
    if isinstance(data, dict) or type(data).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise ValueError(f"--split: choose one split of {where} ({list(data)})")
    if take is not None:
        start, stop = take
        data = data.skip(start) if start else data
        data = data.take(stop - start) if stop is not None else data
    if not args.streaming and len(data) == 0:
        raise ValueError(f"the split {args.dataset_split!r} of {where} is empty")
    return data


def _dataset_info(args) -> dict:
    return {
        "name": args.dataset_name,
        "config": args.dataset_config,
        "dir": args.dataset_dir,
        "files": args.dataset_files,
        "split": args.dataset_split,
        "revision": args.dataset_revision,
        "streaming": args.streaming,
        "kwargs": args.dataset_kwargs,
    }


def run_dataset(args: argparse.Namespace) -> None:
    import torch
    import transformers

    from instrument.models.dataset import ModelSpec, attribute_dataset, replica_placement
    from methods import get_method

    get_method(args.attribution_method)  # an unknown name fails before the data and model load
    transformers.utils.logging.disable_progress_bar()
    if args.generated_texts:
        raise ValueError("-g/--generated_texts: give the targets as a field of the data set with -gen FIELD")
    if args.save_path is None:
        raise ValueError("attribute-dataset writes a directory of shards: give it with -o DIR")
    if args.viz_path is not None and args.viz_path.exists() and not args.overwrite:
        if not (args.save_path / "manifest.json").exists():  # on a rerun the view is made again
            raise ValueError(f"{args.viz_path} exists; pass --overwrite to replace it")
    data = load_rows(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model_kwargs, device = dict(args.model_kwargs), args.device
    if args.gpus_per_replica is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        model_kwargs.update(replica_placement(local_rank, args.gpus_per_replica, count))
        device = None
    elif world > 1 and torch.cuda.is_available() and device in (None, "cuda"):
        device = f"cuda:{local_rank}"
    first_gpu = local_rank * (args.gpus_per_replica or 1)
    started = _start_distributed(world, device, first_gpu)
    try:
        if args.backend == "ray":
            if args.gpus_per_actor > 1:
                model_kwargs.setdefault("device_map", "auto")  # over the GPUs Ray gives the actor
            elif args.gpus_per_actor > 0 and device is None:
                device = "cuda"
            model = ModelSpec(args.model, args.attribution_method, device, model_kwargs)
        else:
            import instrument

            model = instrument.load_model(args.model, args.attribution_method, device=device, model_kwargs=model_kwargs)
        kwargs = dict(
            attributed_fn=args.attributed_fn,
            step_scores=args.step_scores,
            attribute_target=args.attribute_target,
            attr_pos_start=args.attr_pos_start,
            attr_pos_end=args.attr_pos_end,
            generation_args=args.generation_kwargs,
            **args.attribution_kwargs,
            **({"approximation_method": args.approximation_method} if args.approximation_method else {}),
        )
        attribute_dataset(
            model,
            data,
            args.save_path,
            input_text_field=args.input_text_field,
            generated_text_field=args.generated_text_field,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            max_tokens_per_batch=args.max_tokens_per_batch,
            overwrite=args.overwrite,
            skip_bad_rows=args.skip_bad_rows,
            show_progress=not args.quiet,
            viz_path=args.viz_path,
            aggregate_output=args.aggregate_output,
            backend=args.backend,
            ray_address=args.ray_address,
            ray_actors=args.ray_actors,
            gpus_per_actor=args.gpus_per_actor,
            dataset_info=_dataset_info(args),
            **kwargs,
        )
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _start_distributed(world: int, device, first_gpu: int) -> bool:
    """Under torchrun or `accelerate launch` (WORLD_SIZE > 1): the process group, NCCL on GPUs (each rank on
    its first GPU), gloo on the CPU."""
    import torch

    if world <= 1 or torch.distributed.is_initialized():
        return False
    on_gpu = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if on_gpu:
        torch.cuda.set_device(first_gpu)  # NCCL's collectives run on the current device
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    return True
