"""`kolora submit / status / logs / cancel` for real, against the dev Slurm cluster (slurm/devcluster).

Found through <state>/env.sh ($KOLORA_DEVCLUSTER, else .devcluster/ in the checkout) and skipped when it is not
up. Every wait fails when nothing advances for a while (slurmkit.STALL_S), not after a total time. The kolora commands run as subprocesses with the cluster's environment, as a
user would run them; the jobs inherit that environment (SLURM_CONF) through sbatch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from slurmkit import DEMO, FAST, LOCAL, kolora, run_progress, submit, wait_ended, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cancel_leftovers")]



def job_ids(sub: dict) -> dict[str, str]:
    return {job: info["job_id"] for job, info in sub["jobs"].items()}


def squeue(env: dict[str, str], ids: list[str]) -> str:
    return subprocess.run(["squeue", "-h", "-j", ",".join(ids)], env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def ts(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def test_failed_filter_cancels_the_rest(env: dict[str, str], tmp_path: Path) -> None:
    # passes every check before queueing; at run time the filter keeps nothing and the filter job fails
    runs = tmp_path / "runs"
    sub, _ = submit(env, runs, "fails", "--set", "filter.ops=[{image_shape_filter: {min_width: 100000}}]")
    ids = job_ids(sub)
    rows = wait_ended(env, list(ids.values()), 1 + 1 + 4 + 1, runs / "fails")
    assert rows[ids["filter"]]["State"] == "FAILED"
    for job in ("train", "grid"):
        assert rows[ids[job]]["State"] == "CANCELLED", (job, rows)  # not PENDING forever
    assert [rows[f"{ids['render']}_{i}"]["State"] for i in range(4)] == ["CANCELLED"] * 4
    assert not squeue(env, list(ids.values()))

    status = kolora(env, "status", "fails", "--runs-dir", runs)
    assert status.returncode == 1, status.stdout + status.stderr
    log = Path(sub["folder"]) / f"{ids['filter']}_0_log.err"
    assert f"FAILED: stage filter (job {ids['filter']}, FAILED): FilterError" in status.stdout
    assert f"log: {log}" in status.stdout and log.is_file()
    logs = kolora(env, "logs", "fails", "--runs-dir", runs, "--stream", "err")  # default: the failed job
    assert logs.returncode == 0 and "FilterError: filter: no sample kept" in logs.stdout


def test_cancel_empties_the_queue(env: dict[str, str], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sub, _ = submit(env, runs, "cancelled")
    ids = list(job_ids(sub).values())
    assert squeue(env, ids)
    proc = kolora(env, "cancel", "cancelled", "--runs-dir", runs, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"run cancelled: cancelled {' '.join(sorted(ids))}"
    assert not squeue(env, ids)  # `kolora cancel` returns once the queue has let go of them
    rows = wait_ended(env, ids, 1 + 1 + 4 + 1)
    assert {r["State"] for r in rows.values()} == {"CANCELLED"}
    assert kolora(env, "cancel", "cancelled", "--runs-dir", runs).stdout.strip() == "run cancelled: no job in the queue"


def test_submit_runs_the_whole_graph(env: dict[str, str], tmp_path: Path) -> None:
    runs = tmp_path / "slurm-runs"
    sub, submit_s = submit(env, runs, "dag", *FAST)
    ids = job_ids(sub)
    render = ids["render"]
    throttle = subprocess.run(["scontrol", "show", "job", render], env=env, capture_output=True, text=True,
                              timeout=30).stdout
    assert "ArrayTaskThrottle=2" in throttle  # the profile's throttle, as Slurm holds it
    started = time.monotonic()
    # the same config in one process (another name, another runs dir) while the cluster works
    reference = subprocess.Popen([sys.executable, "-m", "kolora.cli.main", "run", DEMO, "--runs-dir", tmp_path / "local",
                                  "--name", "ref", *FAST], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        rows = wait_ended(env, list(ids.values()), 1 + 1 + 4 + 1, runs / "dag")
        dag_s = time.monotonic() - started
        wait_for("the in-process reference run", lambda: reference.poll() is not None,
                 lambda: run_progress(tmp_path / "local" / "ref"))
        _, err = reference.communicate()
    finally:
        reference.kill()
    assert reference.returncode == 0, err.decode()[-3000:]
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows

    filt, train, grid = rows[ids["filter"]], rows[ids["train"]], rows[ids["grid"]]
    tasks = [rows[f"{render}_{i}"] for i in range(4)]
    assert filt["Partition"] == "cpu" and grid["Partition"] == "cpu"
    assert train["Partition"] == "gpu" and "gres/gpu=1" in train["AllocTRES"]
    assert all(t["Partition"] == "gpu" and "gres/gpu=1" in t["AllocTRES"] for t in tasks)
    # afterok order: each job starts after the one before ended; grid last
    assert ts(train["Start"]) >= ts(filt["End"])
    assert min(ts(t["Start"]) for t in tasks) >= ts(train["End"])
    assert ts(grid["Start"]) >= max(ts(t["End"]) for t in tasks)
    # never more than the throttle (2) array tasks at once
    spans = [(ts(t["Start"]), ts(t["End"])) for t in tasks]
    running = [sum(s <= start < e for s, e in spans) for start, _ in spans]
    assert max(running) <= 2, spans
    assert "#SBATCH --array=0-3%2\n" in (Path(sub["folder"]) / f"{render}_submission.sh").read_text()

    # same seeds, same pixels as `kolora run`
    slurm_grid = np.asarray(Image.open(runs / "dag" / "grid.png"))
    local_grid = np.asarray(Image.open(tmp_path / "local" / "ref" / "grid.png"))
    assert slurm_grid.shape == local_grid.shape and np.array_equal(slurm_grid, local_grid)

    status = json.loads(kolora(env, "status", "dag", "--runs-dir", runs, "--json").stdout)
    assert status["done"] and not status["failed"] and status["grid"] == str(runs / "dag" / "grid.png")
    detail = {j["job"]: j["detail"] for j in status["jobs"]}
    assert (detail["filter"]["kept"], detail["filter"]["dropped"]) == (24, 24)
    assert detail["train"]["step"] == detail["train"]["total_steps"] == 10
    assert detail["train"]["cache_encoded"] > 0 and detail["train"]["cache_reused"] == 0
    assert (detail["render"]["tiles_done"], detail["render"]["tiles_total"]) == (16, 16)  # 8 LoRA + 8 base-model tiles (the demo evaluates)

    # jobs ran hub-offline with their caches inside the run directory
    filter_log = (Path(sub["folder"]) / f"{ids['filter']}_0_log.err").read_text()
    assert f"HF_HOME={runs / 'dag' / '.hf_home'} HF_HUB_OFFLINE=1" in filter_log
    logs = kolora(env, "logs", "dag", "--runs-dir", runs, "--stage", "render", "--task", "3", "--stream", "err")
    assert logs.returncode == 0 and "kolora job render (stages render, task 3/4" in logs.stdout
    print(f"\nkolora submit: {submit_s:.2f} s; whole graph on the dev cluster: {dag_s:.0f} s")


def test_multi_gpu_training_runs_ddp_under_srun(env: dict[str, str], tmp_path: Path) -> None:
    """2 GPUs per node → 2 srun tasks, Lightning DDP (gloo on this CPU-only box), checkpoints included."""
    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["jobs"]["train"]["gpus"] = 2
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(profile))
    runs = tmp_path / "runs"
    sub, _ = submit(env, runs, "ddp", "--set", "train.steps=6", "--set", "train.checkpoint_every=2",
                    profile=str(path))
    ids = job_ids(sub)
    rows = wait_ended(env, [ids["train"]], 1, runs / "ddp")
    kolora(env, "cancel", "ddp", "--runs-dir", runs, timeout=60)  # render and grid are not what this is about
    assert rows[ids["train"]]["State"] == "COMPLETED", rows
    assert "gres/gpu=2" in rows[ids["train"]]["AllocTRES"]
    manifest = json.loads((runs / "ddp" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["distributed"] == {"backend": "gloo", "world_size": 2, "rank": 0}
    assert manifest["stages"]["train"]["status"] == "complete"
    for rank in (0, 1):
        log = (Path(sub["folder"]) / f"{ids['train']}_{rank}_log.err").read_text()
        assert f"train rank {rank}: DDP process group gloo, rank {rank} of world 2" in log
    # the cache ran on both ranks, each on its shard; rank 0 merged them
    assert "cache rank 1: {'rank': 1, 'world': 2" in (Path(sub["folder"]) / f"{ids['train']}_1_log.err").read_text()
    assert manifest["stages"]["cache"]["summary"]["ranks"] == 2
    assert sorted(p.name for p in (runs / "ddp" / "train" / "checkpoints").glob("*.ckpt"))[-1] == "step=000006.ckpt"
    assert not squeue(env, list(ids.values()))
