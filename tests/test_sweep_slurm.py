"""`kolora sweep --cluster` for real on the dev Slurm cluster: one submission (prep → cache → a train array with a
task per variant → sheet), two runs, the cache encoded once, sweep.html with both, and array tasks preempted
mid-training by a gpu-urgent job that are requeued and resume from their checkpoint (each step trained once).
Waits fail when nothing advances for slurmkit.STALL_S, not after a total time."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from slurmkit import DEMO, LOCAL, kolora, run_progress, sacct, wait_for

pytestmark = [pytest.mark.slurm]

STEPS = 150
LONG = ["--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=10", "--set", "render.steps=2"]


def attempts(env, job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-j", job_id, "--format=State"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def metric_steps(run: Path) -> list[int]:
    with open(run / "train" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_sweep_on_slurm_shares_the_cache_and_survives_preemption(env, tmp_path):
    runs = tmp_path / "runs"
    proc = kolora(env, "sweep", DEMO, "--cluster", LOCAL, "--runs-dir", runs, "--name", "sw", *LONG,
                  "--vary", "train.lr=1e-3,3e-3")
    assert proc.returncode == 0, proc.stderr
    sweep = runs / "sw"
    entry = json.loads((sweep / "sweep.json").read_text())["slurm"]
    jobs, task_ids = entry["jobs"], entry["task_ids"]
    assert set(jobs) == {"prep", "cache", "train", "sheet"} and len(task_ids) == 2
    variants = [sweep / name for name in task_ids]
    try:
        def state() -> tuple:
            rows = sacct(env, list(jobs.values()))
            return (tuple((r["JobID"], r["State"]) for r in rows), *(run_progress(v) for v in variants))

        def checkpointed() -> bool:
            ended = [r for r in sacct(env, list(jobs.values())) if r["State"].startswith(("FAILED", "CANCELLED"))]
            if ended:
                pytest.fail(f"sweep jobs ended early: {ended}")
            return all(list((v / "train" / "checkpoints").glob("step=*.ckpt")) for v in variants)

        wait_for("a first checkpoint in both variants", checkpointed, state, poll_s=1)
        # gpu-urgent wants both GPUs: the running train array tasks (partition gpu, PreemptMode=REQUEUE) yield
        urgent = subprocess.run(["sbatch", "--parsable", "-p", "gpu-urgent", "--gres=gpu:2", "-J", "urgent",
                                 "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 5"],
                                env=env, capture_output=True, text=True, timeout=30)
        assert urgent.returncode == 0, urgent.stderr

        def sheet_done() -> bool:
            rows = {r["JobID"]: r["State"] for r in sacct(env, [jobs["sheet"]])}
            if rows.get(jobs["sheet"], "").startswith(("FAILED", "CANCELLED")):
                pytest.fail(f"the sheet job ended {rows}: {kolora(env, 'status', sweep).stdout}")
            return rows.get(jobs["sheet"]) == "COMPLETED"

        wait_for("the sweep's comparison sheet", sheet_done, state, poll_s=3)
    finally:
        kolora(env, "cancel", "sw", "--runs-dir", runs, timeout=60)  # a sweep's jobs, if the test failed

    # preempted tasks were requeued and resumed: every step trained exactly once, both runs complete
    requeued = {tid: attempts(env, tid) for tid in task_ids.values()}
    assert all(states[-1] == "COMPLETED" for states in requeued.values()), requeued
    preempted = [tid for tid, states in requeued.items() if len(states) >= 2]
    assert preempted, f"no train array task was preempted: {requeued}"
    logs = "\n".join(p.read_text(errors="replace") for tid in preempted
                     for p in Path(entry["folder"]).glob(f"{tid}_*_log.err"))
    assert "preemption" in logs and "requeued job" in logs, logs[-3000:]
    for run in variants:
        assert metric_steps(run) == list(range(1, STEPS + 1)), run.name
        assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and (run / "grid.png").is_file()

    # the cache encoded once: the second variant adopted the first's entries
    cache = [json.loads((v / "manifest.json").read_text())["stages"]["cache"]["summary"] for v in variants]
    assert cache[0]["encoded"] > 0 and cache[1]["encoded"] == 0, cache
    page = (sweep / "sweep.html").read_text()
    assert all(v.name in page for v in variants) and (sweep / "sweep.png").is_file()

    status = kolora(env, "status", "sw", "--runs-dir", runs, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "best so far" in status.stdout and status.stdout.count("COMPLETED") >= 4 + 2, status.stdout
    one = kolora(env, "status", variants[1], timeout=60)  # a variant is a normal submitted run
    assert one.returncode == 0 and "tiles 8/8, base model 8/8" in one.stdout, one.stdout + one.stderr
