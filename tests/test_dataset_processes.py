"""Data-set jobs across processes: a job killed with SIGKILL and run again, torchrun with 2 ranks (gloo), Ray.

Each gives the output of one uninterrupted process exactly, and `model.attribute`'s to 1e-6 relative.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dataset_helpers import assert_all_close

import instrument
from instrument.cli import main

from tiny_models import CORPUS, tiny_model

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": " ".join(line.split()[: 2 + i % 3]), "answer": line} for i, line in enumerate(CORPUS[:16])]
N_STEPS = 16
SHARDS = 8


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The model on disk, the data file, the command's arguments (without -o) and one uninterrupted run."""
    pytest.importorskip("datasets")
    base = tmp_path_factory.mktemp("job")
    hf_model, tokenizer = tiny_model("gpt2")
    hf_model.save_pretrained(base / "model")
    tokenizer.save_pretrained(base / "model")
    (base / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    args = ["attribute-dataset", "-m", str(base / "model"), "-a", "integrated_gradients", "--quiet"]
    args += [
        "--attribution_kwargs",
        json.dumps({"n_steps": N_STEPS}),
        "-d",
        "json",
        "--files",
        str(base / "data.jsonl"),
    ]
    args += ["-in", "prompt", "-gen", "answer", "--shard_size", "2", "-bs", "2"]
    args += ["--dataset_kwargs", json.dumps({"cache_dir": str(base / "cache")})]
    assert main([*args, "-o", str(base / "whole")]) == 0
    model = instrument.load_model(str(base / "model"), "integrated_gradients")
    expected = model.attribute(
        [r["prompt"] for r in ROWS], [r["answer"] for r in ROWS], n_steps=N_STEPS, show_progress=False
    )
    whole = instrument.FeatureAttributionOutput.load(base / "whole")
    assert_all_close(whole, expected)
    return {"args": args, "whole": whole, "base": base, "model": model}


def environment():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def wait_for(condition, process, what, timeout=180):
    started = time.monotonic()
    while not condition():
        assert process.poll() is None, f"the job ended before {what}"
        assert time.monotonic() - started < timeout, f"no {what} after {timeout} s"
        time.sleep(0.01)


def shards_in(path: Path) -> list:
    """The shard entries of a manifest or progress file; [] before it exists."""
    try:
        data = json.loads(path.read_text())  # written whole (a rename), so never read half
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return data["shards"] if isinstance(data, dict) else data


def same_as_whole(directory, job):
    out = instrument.FeatureAttributionOutput.load(directory)
    assert out.equals(job["whole"])  # exactly
    assert instrument.open_attributions(directory).ids == list(range(len(ROWS)))


@pytest.mark.slow
def test_killed_job_resumes_to_the_uninterrupted_output(job, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "instrument", *job["args"], "-o", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, env=environment(), stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(shards_in(out / "manifest.json")) >= 2, process, "two shards")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 2 <= len(manifest["shards"]) < SHARDS
    kept = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in manifest["shards"]}
    (out / ".shard-00007.safetensors.x1y2.tmp").write_bytes(b"left by a kill")  # a shard being written
    if "shard-00006.safetensors" not in kept:
        (out / "shard-00006.safetensors").write_bytes(b"not recorded")
    rerun = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    same_as_whole(out, job)
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept  # done shards were not redone
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [
        f"shard-{k:05d}.safetensors" for k in range(SHARDS)
    ]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [v.split(b"=", 1)[1] for v in variables if v.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.slow
def test_torchrun_two_ranks_and_a_dead_rank(job, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "instrument", *job["args"], "-o", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(shards_in(out / ".progress-1.json")) >= 1, process, "a shard of rank 1")
        rank1 = [pid for pid in _children(process.pid) if _rank_of(pid) == 1]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)  # rank 1 dies; torchrun stops rank 0
        assert process.wait(timeout=120) != 0
    finally:
        process.kill()
        process.wait()
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    for rank in (0, 1):  # disjoint shards: rank r takes the shards k with k % 2 == r
        assert all(int(e["file"][6:11]) % 2 == rank for e in shards_in(out / f".progress-{rank}.json"))
    rerun = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    same_as_whole(out, job)
    assert not list(out.glob(".progress-*"))


@pytest.mark.slow
def test_ray_backend_finishes_a_job_one_process_started(job, tmp_path):
    ray = pytest.importorskip("ray")
    model = job["model"]
    data = [{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS]
    out = tmp_path / "out"
    shutil.copytree(job["base"] / "whole", out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:3], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    for k in range(3, SHARDS):
        (out / f"shard-{k:05d}.safetensors").unlink()
    started = time.monotonic()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
    )
    try:
        ds = model.attribute_dataset(
            data,
            out,
            input_text_field="prompt",
            generated_text_field="answer",
            shard_size=2,
            batch_size=2,
            n_steps=N_STEPS,
            show_progress=False,
            backend="ray",
            ray_actors=2,
            dataset_info=manifest["arguments"]["dataset"],  # the same arguments as the command's
        )
    finally:
        ray.shutdown()
    print(f"Ray: {time.monotonic() - started:.1f} s")
    assert ds.complete
    same_as_whole(out, job)
