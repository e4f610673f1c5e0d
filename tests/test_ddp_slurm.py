"""2-task DDP training on the dev Slurm cluster (2 fake GPUs, gloo on the CPU): preempted by a `gpu-urgent` job
while it checkpoints after nearly every step, it ends with the LoRA of an uninterrupted 2-process run, bit for
bit; resumed on 1 task after a cancel, within test_ddp.TOLERANCE of it; stopped between the cache merge and
the train decision, every rank stops, the job is requeued and training completes.

The uninterrupted reference is the same run's config trained again by 2 gloo processes without Slurm
(tests/ddp_worker.py) on a copy of the run's cache: same code path, same config digest, no interruption.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from slurmkit import LOCAL, kolora, run_progress, sacct, submit, wait_for
from test_ddp import TOLERANCE, lora_tensors, max_rel_diff, metric_steps, train_ranks

from kolora.core.rundir import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cancel_leftovers")]

STEPS = 120
DDP = ["--set", f"train.steps={STEPS}", "--set", "train.batch_size=1", "--set", "train.checkpoint_every=1000",
       "--set", "train.checkpoint_minutes=0.0001", "--set", "render.steps=2"]


@pytest.fixture
def two_gpu_profile(tmp_path) -> str:
    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["jobs"]["train"]["gpus"] = 2
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def _train_job(run: Path) -> str:
    slurm = json.loads((run / "manifest.json").read_text())["slurm"]
    return slurm["submissions"][slurm["latest"]]["jobs"]["train"]["job_id"]


def _attempts(env, job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-j", job_id, "--format=State"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _wait_checkpoint(env, run: Path, job_id: str) -> None:
    def checkpointed() -> bool:
        if list((run / "train" / "checkpoints").glob("step=*.ckpt")):
            return True
        states = [r["State"] for r in sacct(env, [job_id])]
        if any(s.startswith(("FAILED", "CANCELLED", "COMPLETED")) for s in states):
            pytest.fail(f"training job {job_id} ended ({states}) before its first checkpoint")
        return False

    wait_for(f"a first checkpoint in {run}", checkpointed, lambda: run_progress(run), poll_s=0.5)


def _wait_trained(env, run: Path, job_id: str) -> None:
    def trained() -> bool:
        states = [r["State"] for r in sacct(env, [job_id])]
        if states and states[-1] in ("FAILED", "CANCELLED", "TIMEOUT"):
            pytest.fail(f"training job {job_id} ended {states}")
        return (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and states == ["COMPLETED"]

    wait_for(f"the training job {job_id} to complete", trained, lambda: (sacct(env, [job_id]), run_progress(run)))


def _uninterrupted_twin(run: Path, dst: Path) -> RunDir:
    """The run's config and cache, trained again by 2 processes without interruption."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("train", "lora", "render", "slurm", "grid.png"))
    twin = RunDir(dst)
    ranks = train_ranks(twin, 2)
    assert all(p.returncode == 0 for p in ranks), [p.stderr[-3000:] for p in ranks]
    return twin


def _job_log(run: Path, job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (run / "slurm").rglob(f"{job_id}_*_log.err"))


def test_preempted_two_task_training_ends_bit_identical(env, tmp_path, two_gpu_profile):
    runs = tmp_path / "runs"
    submit(env, runs, "ddp-preempt", *DDP, profile=two_gpu_profile)
    run = runs / "ddp-preempt"
    job = _train_job(run)
    _wait_checkpoint(env, run, job)
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "gpu-urgent", "--gres=gpu:2", "-J", "urgent",
                             "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 2"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert urgent.returncode == 0, urgent.stderr
    _wait_trained(env, run, job)
    kolora(env, "cancel", "ddp-preempt", "--runs-dir", runs, timeout=60)  # render and grid: not the point here
    log = _job_log(run, job)
    states = _attempts(env, job)
    assert len(states) >= 2 and states[-1] == "COMPLETED", (states, log[-3000:])
    assert "preemption" in log and "requeued job" in log and "rank 1 leaves the requeue to rank 0" in log
    assert log.count("requeued job") == len(states) - 1  # one requeue per preemption: rank 0's
    assert metric_steps(RunDir(run)) == list(range(1, STEPS + 1))
    checkpoints = json.loads((run / "manifest.json").read_text())["stages"]["train"]
    assert checkpoints["status"] == "complete"

    twin = _uninterrupted_twin(run, tmp_path / "twin" / "ddp-preempt")
    sha = [hashlib.sha256((r / "lora" / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()
           for r in (run, twin.root)]
    assert sha[0] == sha[1], "the preempted 2-task run's LoRA differs from the uninterrupted 2-process run"


@pytest.mark.slow  # ≈ 3 graphs' worth of work; tests/test_ddp.py covers the same elastic path without Slurm
def test_two_task_run_resumed_on_one_task_matches_within_tolerance(env, tmp_path, two_gpu_profile):
    runs = tmp_path / "runs"
    submit(env, runs, "ddp-elastic", *DDP, profile=two_gpu_profile)
    run = runs / "ddp-elastic"
    _wait_checkpoint(env, run, _train_job(run))
    assert kolora(env, "cancel", "ddp-elastic", "--runs-dir", runs, timeout=90).returncode == 0
    refused = kolora(env, "resume", "ddp-elastic", "--runs-dir", runs, "--gpus", "3", timeout=60)
    assert refused.returncode != 0 and "global batch of 2" in refused.stderr, refused.stderr
    resumed = kolora(env, "resume", "ddp-elastic", "--runs-dir", runs, "--gpus", "1", timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    job = _train_job(run)
    _wait_trained(env, run, job)
    kolora(env, "cancel", "ddp-elastic", "--runs-dir", runs, timeout=60)
    summary = json.loads((run / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert (summary["world_size"], summary["accumulate"], summary["global_batch"]) == (1, 2, 2)
    assert summary["resumed_from_step"] > 0
    assert metric_steps(RunDir(run)) == list(range(1, STEPS + 1))
    twin = _uninterrupted_twin(run, tmp_path / "twin" / "ddp-elastic")
    diff = max_rel_diff(lora_tensors(RunDir(run)), lora_tensors(twin))
    print(f"\n2 tasks on Slurm, cancelled at step {summary['resumed_from_step']}, resumed on 1 task: max relative "
          f"|Δ| {diff:.2e} from the uninterrupted 2-process run")
    assert diff <= TOLERANCE


def _manifest_stage(run: Path, stage: str) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text()).get("stages", {}).get(stage, {})
    except (OSError, ValueError):  # not written yet
        return {}


def _attempts_of(run: Path, job: str) -> list[dict]:
    path = run / "slurm" / "attempts.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [a for a in map(json.loads, lines) if a["slurm_job"] == job]


@pytest.mark.slow  # a filter job, then the cache, a requeue (≈ 11 s on the dev cluster) and a short training
def test_a_stop_between_the_cache_merge_and_the_train_decision_requeues_every_rank(env, tmp_path, two_gpu_profile):
    """The stop lands where rank 0 has merged the cache index but not yet told the other rank whether to train.

    Rank 0 is held at that point by a real contender: the test holds the run's manifest lock (as another job of
    the run recording its stage would), which rank 0 needs to record the cache stage right after the merge.
    Meanwhile rank 1 has finished its cache shard and waits for rank 0's train decision, and both get the stop
    signal (USR2 to the job's steps, as a preemption or time limit sends it). Rank 0 must stop every rank there:
    with each rank going its own way, rank 1 left and rank 0 waited in the DDP rendezvous until the time limit
    ended the job without a requeue."""
    runs = tmp_path / "runs"
    # cache.batch_size 1: a journaled batch per image widens the window between "cache running" and the merge,
    # in which the test takes the lock
    sub, _ = submit(env, runs, "ddp-gap", "--set", "train.steps=4", "--set", "train.checkpoint_every=2",
                    "--set", "render.steps=2", "--set", "cache.batch_size=1", profile=two_gpu_profile)
    run = runs / "ddp-gap"
    job = _train_job(run)

    def job_alive() -> None:
        states = [r["State"] for r in sacct(env, [job])]
        if any(s.startswith(("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT")) for s in states):
            pytest.fail(f"train job {job} ended {states}:\n{_job_log(run, job)[-3000:]}")

    def cache_running() -> bool:
        job_alive()
        if (run / "cache" / "index.json").exists():
            pytest.fail("the cache merged before the test could hold the manifest lock")
        return _manifest_stage(run, "cache").get("status") == "running"  # rank 0 is in the cache stage

    wait_for("rank 0 to start the cache stage", cache_running, lambda: (sacct(env, [job]), run_progress(run)),
             poll_s=0.1)
    with RunDir(run).manifest():
        def merged() -> bool:
            job_alive()
            return (run / "cache" / "index.json").is_file()

        wait_for("rank 0 to merge the cache index", merged, lambda: (sacct(env, [job]), run_progress(run)))
        assert _manifest_stage(run, "cache")["status"] == "running"  # rank 0 waits for the lock to record it
        sent = subprocess.run(["scancel", "--signal=USR2", job], env=env, capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr
        folder = Path(sub["folder"])

        def both_signalled() -> bool:
            job_alive()
            rank0 = (folder / f"{job}_0_log.err").read_text(errors="replace")
            rank1 = (folder / f"{job}_1_log.err").read_text(errors="replace")
            # rank 1, waiting for the train decision, saw its own stop flag (it leaves, or keeps waiting)
            return "job received SIGUSR2" in rank0 and bool(
                re.search(r"rank 1: stop(ped| requested) \(SIGUSR2\) while waiting for rank 0", rank1))

        wait_for("the stop signal to reach both ranks", both_signalled, lambda: (sacct(env, [job]), run_progress(run)),
                 poll_s=0.2)
        released = time.time()

    def requeued() -> dict | None:
        stopped = [a for a in _attempts_of(run, job) if a["restart"] == 0]
        return stopped[0] if stopped else None

    stopped = wait_for("rank 0 to stop and requeue the job", requeued, lambda: (sacct(env, [job]), run_progress(run)))
    _wait_trained(env, run, job)
    kolora(env, "cancel", "ddp-gap", "--runs-dir", runs, timeout=60)  # render and grid: not the point here

    log = _job_log(run, job)
    assert stopped["exit"] == 75 and "SIGUSR2" in stopped["signals"], (stopped, log[-3000:])
    assert "cache" in stopped["progress_after"]["complete"] and stopped["progress_after"]["checkpoint_step"] is None
    print(f"\nstopped between cache and train: rank 0 left {stopped['ended'] - released:.1f} s after the lock was "
          f"released; {len(_attempts(env, job))} attempts")
    assert stopped["ended"] - released < 120  # it stopped at the decision, not at the job's time limit
    assert "rank 0: stopped (SIGUSR2) before train" in log and "requeued job" in log, log[-3000:]
    assert "rank 1: rank 0 stopped on a signal before train" in log and "rank 1 leaves the requeue to rank 0" in log
    states = _attempts(env, job)
    assert len(states) == 2 and states[-1] == "COMPLETED", states
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "complete"
    assert manifest["stages"]["train"]["distributed"] == {"backend": "gloo", "world_size": 2, "rank": 0}
    assert metric_steps(RunDir(run)) == [1, 2, 3, 4]
