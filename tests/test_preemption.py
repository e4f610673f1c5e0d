"""Training survives preemption, time limits, `scontrol requeue` and a cancel + `kolora resume`, for real on the
dev Slurm cluster, and ends with a LoRA bit-identical to an uninterrupted in-process run.

Training is made long enough (STEPS) that every interruption lands mid-run: each test waits for a first
checkpoint before interrupting. Every wait has a deadline.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurmkit import DEMO, LOCAL, kolora, sacct, submit

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cancel_leftovers")]

STEPS = 1500
LONG = ["--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=50", "--set", "render.steps=2"]
NAME = "preempt"  # same name everywhere: the LoRA's metadata carries the config digest, which includes it


def lora_sha(run: Path) -> str:
    return hashlib.sha256((run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()


def metric_steps(run: Path) -> list[int]:
    with open(run / "train" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> Path:
    """The same config, uninterrupted, in one process."""
    runs = tmp_path_factory.mktemp("reference")
    proc = subprocess.run([sys.executable, "-m", "kolora.cli", "run", DEMO, "--runs-dir", str(runs), "--name", NAME,
                           *LONG], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / NAME


def train_job(run: Path) -> str:
    slurm = json.loads((run / "manifest.json").read_text())["slurm"]
    return slurm["submissions"][slurm["latest"]]["jobs"]["train"]["job_id"]


def wait_for_checkpoint(env, run: Path, job_id: str, timeout: float = 240) -> None:
    """Until the training job runs and has written its first checkpoint (so an interruption is mid-run)."""
    deadline = time.monotonic() + timeout
    while True:
        if list((run / "train" / "checkpoints").glob("step=*.ckpt")):
            return
        state = [r["State"] for r in sacct(env, [job_id])]
        if any(s.startswith(("FAILED", "CANCELLED", "COMPLETED")) for s in state):
            pytest.fail(f"training job {job_id} ended ({state}) before its first checkpoint")
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint in {run}/train/checkpoints within {timeout} s (job {job_id}: {state})")
        time.sleep(1)


def wait_grid(env, run: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "grid.png").is_file():
        status = kolora(env, "status", run, timeout=60)
        if "FAILED" in status.stdout or "CANCELLED" in status.stdout:
            pytest.fail(f"the run failed:\n{status.stdout}\n{status.stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"no grid.png after {timeout} s:\n{status.stdout}")
        time.sleep(3)


def attempts(env, job_id: str) -> list[str]:
    """Every execution of the job Slurm accounted for (requeues included)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-j", job_id, "--format=State"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def job_log(run: Path, job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (run / "slurm").rglob(f"{job_id}_*_log.err"))


def check_result(run: Path, reference: Path) -> None:
    assert lora_sha(run) == lora_sha(reference), "the interrupted run's LoRA differs from the uninterrupted one"
    assert metric_steps(run) == list(range(1, STEPS + 1)), "each step exactly once in metrics.csv"


def test_preempted_by_a_higher_priority_partition(env, tmp_path, reference):
    runs = tmp_path / "runs"
    submit(env, runs, NAME, *LONG)
    run = runs / NAME
    job = train_job(run)
    wait_for_checkpoint(env, run, job)
    # gpu-urgent (PriorityTier 10) wants both GPUs: the training job on `gpu` (PreemptMode=REQUEUE) must yield.
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "gpu-urgent", "--gres=gpu:2", "-J", "urgent",
                             "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 5"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert urgent.returncode == 0, urgent.stderr
    wait_grid(env, run, timeout=420)
    check_result(run, reference)
    states = attempts(env, job)
    assert len(states) >= 2 and states[-1] == "COMPLETED", states
    log = job_log(run, job)
    assert "SIGUSR2" in log and "preemption" in log and "requeued job" in log, log[-3000:]
    assert sacct(env, [urgent.stdout.strip()])[0]["State"] == "COMPLETED"


def test_time_limit_shorter_than_training_requeues_until_done(env, tmp_path, reference):
    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["signal_lead_s"] = 30
    profile["max_requeues"] = 30
    profile["jobs"]["train"]["time"] = 1  # minute: USR2 comes 0-30 s after start (even while the step starts), then we requeue
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(profile))
    runs = tmp_path / "runs"
    submit(env, runs, NAME, *LONG, profile=str(path))
    run = runs / NAME
    job = train_job(run)
    wait_grid(env, run, timeout=540)
    check_result(run, reference)
    states = attempts(env, job)
    assert len(states) >= 2 and states[-1] == "COMPLETED", states
    assert "time limit" in job_log(run, job)
    counts = json.loads((run / "slurm" / "timeouts.json").read_text())
    assert max(counts.values()) == len(states) - 1


def test_scontrol_requeue_resumes_from_the_last_checkpoint(env, tmp_path, reference):
    runs = tmp_path / "runs"
    submit(env, runs, NAME, *LONG)
    run = runs / NAME
    job = train_job(run)
    wait_for_checkpoint(env, run, job)
    out = subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    wait_grid(env, run, timeout=420)
    check_result(run, reference)
    assert len(attempts(env, job)) >= 2
    assert "SIGTERM" in job_log(run, job)


def test_cancelled_run_resumes_only_what_is_missing(env, tmp_path, reference):
    runs = tmp_path / "runs"
    sub, _ = submit(env, runs, NAME, *LONG)
    run = runs / NAME
    wait_for_checkpoint(env, run, train_job(run))
    assert kolora(env, "cancel", NAME, "--runs-dir", runs, timeout=90).returncode == 0
    time.sleep(2)
    assert not (run / "grid.png").exists()
    resumed = kolora(env, "resume", NAME, "--runs-dir", runs, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    slurm = json.loads((run / "manifest.json").read_text())["slurm"]
    latest = slurm["submissions"][slurm["latest"]]
    assert latest["resume"] and "filter" not in latest["jobs"], latest["jobs"].keys()  # ingest+filter were done
    assert latest["jobs"]["train"]["dependency"] is None
    wait_grid(env, run, timeout=420)
    check_result(run, reference)
    assert "resuming from" in job_log(run, latest["jobs"]["train"]["job_id"])
    again = kolora(env, "resume", NAME, "--runs-dir", runs, timeout=60)
    assert again.returncode == 1 and "nothing to resume" in again.stderr


def test_requeued_render_task_renders_only_its_missing_tiles(env, tmp_path):
    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["jobs"]["render"]["tiles_per_task"] = 8  # one task renders all eight tiles (≈ 2-3 s each here)
    path = tmp_path / "one-task.yaml"
    path.write_text(yaml.safe_dump(profile))
    runs = tmp_path / "runs"
    sub, _ = submit(env, runs, "render-requeue", "--set", "train.steps=5", "--set", "render.steps=60",
                    "--set", "render.width=256", "--set", "render.height=256", profile=str(path))
    run = runs / "render-requeue"
    task = sub["jobs"]["render"]["task_ids"][0]
    deadline = time.monotonic() + 300
    while not list((run / "render").glob("*.png")):
        if time.monotonic() > deadline:
            pytest.fail(f"no tile after 300 s: {kolora(env, 'status', run).stdout}")
        time.sleep(0.5)
    out = subprocess.run(["scontrol", "requeue", task], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    before = {p.name: p.stat().st_mtime_ns for p in (run / "render").glob("*.png")}
    wait_grid(env, run, timeout=300)
    after = {p.name: p.stat().st_mtime_ns for p in (run / "render").glob("*.png")}
    assert len(after) == 8
    assert all(after[name] == mtime for name, mtime in before.items()), "a finished tile was rendered again"
    log = job_log(run, task.split("_")[0])
    stopped = re.search(r"render task 0 stopped after (\d+) of 8 tiles", log)
    finished = re.findall(r"rendered=(\d+), already_done=(\d+)", log)
    assert stopped and finished, log[-3000:]
    done_first = int(stopped.group(1))
    rendered, already = map(int, finished[-1])
    assert already == done_first >= 1 and rendered == 8 - done_first  # counted: only the missing ones
    assert len(attempts(env, task)) >= 2
