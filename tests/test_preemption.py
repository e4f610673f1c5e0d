"""Training survives preemption, time limits, `scontrol requeue` and a cancel + `kolora resume`, for real on the
dev Slurm cluster, and ends with a LoRA bit-identical to an uninterrupted in-process run.

Training is made long enough that every interruption lands mid-run: each test waits for a first checkpoint (step
50) before interrupting, with hundreds of steps still to go (MID_RUN_STEPS); the time-limit test needs a training
longer than Slurm's one-minute time-limit granularity (TIME_LIMIT_STEPS). A wait fails when nothing advances (no
job state change, no new checkpoint, metrics row, tile or attempt) for slurmkit.STALL_S, so a slow machine makes a
test slower, not red.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurmkit import DEMO, LOCAL, kolora, run_progress, sacct, submit, wait_for

from kolora.render.tiles import tile_files

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cancel_leftovers")]

MID_RUN_STEPS = 400
TIME_LIMIT_STEPS = 1000
# Every training option that draws randomness or carries state is on, so each interruption below also checks that
# it resumes exactly: buckets, min-SNR, noise offset, caption dropout and the EMA everywhere; DoRA in the time-limit
# case; in the others what DoRA excludes: LoKr with per-block ranks, loss masks, a cosine schedule with warmup and
# Prodigy (whose state and the schedule's must come back from the checkpoint), rendered through peft.
OPTIONS = ["train.buckets=true", "train.min_snr_gamma=5", "train.noise_offset=0.05", "train.caption_dropout=0.1",
           "train.ema_decay=0.99"]
LORA_OPTIONS = ["train.dora=true"]
LYCORIS_OPTIONS = ["train.adapter=lokr", 'train.block_ranks={"mid": 8, "up.0": 2}', "data.synthetic.masks=true",
                   "train.lr_scheduler=cosine", "train.warmup_steps=40", "train.optimizer=prodigy", "train.lr=1"]


def training(steps: int, options: list[str]) -> list[str]:
    # evaluate off: no base-model tiles nor scoring after training (test_launch_slurm runs the whole graph)
    return ["--set", f"train.steps={steps}", "--set", "train.checkpoint_every=50", "--set", "render.steps=2",
            "--set", "evaluate.enabled=false", *(arg for option in options for arg in ("--set", option))]


LONG, LONGEST = training(MID_RUN_STEPS, OPTIONS + LYCORIS_OPTIONS), training(TIME_LIMIT_STEPS, OPTIONS + LORA_OPTIONS)
NAME = "preempt"  # same name everywhere: the LoRA's metadata carries the config digest, which includes it


def lora_sha(run: Path) -> str:
    return hashlib.sha256((run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()


def metric_steps(run: Path) -> list[int]:
    with open(run / "train" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def uninterrupted(env, runs: Path, args: list[str]) -> Path:
    """The same config, uninterrupted, in one process, up to training (the LoRA is what the tests compare)."""
    stages = [arg for stage in ("ingest", "filter", "cache", "train") for arg in ("--stage", stage)]
    proc = subprocess.Popen([sys.executable, "-m", "kolora.cli.main", "run", DEMO, "--runs-dir", str(runs), "--name", NAME,
                             *stages, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the uninterrupted reference run", lambda: proc.poll() is not None,
                 lambda: run_progress(runs / NAME))
    finally:
        proc.kill()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return runs / NAME


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> Path:
    return uninterrupted(env, tmp_path_factory.mktemp("reference"), LONG)


@pytest.fixture(scope="module")
def reference_longest(env, tmp_path_factory) -> Path:
    return uninterrupted(env, tmp_path_factory.mktemp("reference-longest"), LONGEST)


def latest_jobs(run: Path) -> dict[str, dict]:
    slurm = json.loads((run / "manifest.json").read_text())["slurm"]
    return slurm["submissions"][slurm["latest"]]["jobs"]


def train_job(run: Path) -> str:
    return latest_jobs(run)["train"]["job_id"]


def job_states(env, run: Path) -> tuple:
    """Every attempt of every job of the latest submission, as Slurm accounts for them."""
    ids = ",".join(info["job_id"] for info in latest_jobs(run).values())
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-j", ids, "--format=JobID,State"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    return tuple(out.split())


def newest_checkpoint(run: Path) -> int:
    return max((int(p.stem.split("=")[1]) for p in (run / "train" / "checkpoints").glob("step=*.ckpt")), default=0)


def wait_for_checkpoint(env, run: Path, job_id: str, after: int = 0) -> None:
    """Until the training job runs and has written a checkpoint past step `after` (so an interruption is
    mid-run)."""
    def checkpointed() -> bool:
        if newest_checkpoint(run) > after:
            return True
        state = [r["State"] for r in sacct(env, [job_id])]
        if any(s.startswith(("FAILED", "CANCELLED", "COMPLETED")) for s in state):
            pytest.fail(f"training job {job_id} ended ({state}) before its first checkpoint")
        return False

    wait_for(f"a checkpoint past step {after} in {run}/train/checkpoints", checkpointed,
             lambda: (job_states(env, run), run_progress(run)), poll_s=1)


def wait_grid(env, run: Path) -> None:
    """Until grid.png exists and the grid job (grid, then evaluate and report) has left the queue."""
    def finished() -> bool:
        if (run / "grid.png").is_file():
            ids = ",".join(info["job_id"] for info in latest_jobs(run).values())
            queued = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i"], env=env, capture_output=True,
                                    text=True, timeout=30)
            return queued.returncode == 0 and not queued.stdout.strip()
        status = kolora(env, "status", run, timeout=60)
        if "FAILED" in status.stdout or "CANCELLED" in status.stdout:
            pytest.fail(f"the run failed:\n{status.stdout}\n{status.stderr}")
        return False

    wait_for(f"{run}/grid.png", finished, lambda: (job_states(env, run), run_progress(run)), poll_s=3)


def attempts(env, job_id: str) -> list[str]:
    """Every execution of the job Slurm accounted for (requeues included)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-j", job_id, "--format=State"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def job_log(run: Path, job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (run / "slurm").rglob(f"{job_id}_*_log.err"))


def check_result(run: Path, reference: Path, steps: int = MID_RUN_STEPS) -> None:
    assert lora_sha(run) == lora_sha(reference), "the interrupted run's LoRA differs from the uninterrupted one"
    assert metric_steps(run) == list(range(1, steps + 1)), "each step exactly once in metrics.csv"


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
    wait_grid(env, run)
    check_result(run, reference)
    states = attempts(env, job)
    assert len(states) >= 2 and states[-1] == "COMPLETED", states
    log = job_log(run, job)
    assert "SIGUSR2" in log and "preemption" in log and "requeued job" in log, log[-3000:]
    assert sacct(env, [urgent.stdout.strip()])[0]["State"] == "COMPLETED"


def train_attempts(run: Path) -> list[dict]:
    """The supervisor's record of each attempt of the training job (slurm/attempts.jsonl)."""
    lines = (run / "slurm" / "attempts.jsonl").read_text().splitlines()
    return [a for a in map(json.loads, lines) if a["job"].split("/")[1] == "train"]


def time_limit_for(train_s: float) -> tuple[int, int]:
    """(time in minutes, signal_lead_s) such that one attempt never fits the whole training (measured: train_s
    in the reference run, on this machine under its current load) and always has time to progress.

    Slurm sends USR2 at its first ~30 s tick once less than lead (+ up to 30 s) is left, and the supervisor's
    own timer stops the attempt at `lead` before the end at the latest: an attempt runs time − lead − [0, 30] s.
    The longest is set to 80 % of the measured training, the shortest is 30 s less."""
    longest = 0.8 * train_s
    minutes = math.ceil((longest + 30) / 60)
    return minutes, round(minutes * 60 - longest)


def test_time_limit_shorter_than_training_requeues_until_done(env, tmp_path, reference_longest):
    train_s = json.loads((reference_longest / "manifest.json").read_text())["stages"]["train"]["wall_s"]
    minutes, lead = time_limit_for(train_s)
    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["signal_lead_s"] = lead
    profile["max_requeues"] = 30
    profile["jobs"]["train"]["time"] = minutes
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(profile))
    runs = tmp_path / "runs"
    submit(env, runs, NAME, *LONGEST, profile=str(path))
    run = runs / NAME
    job = train_job(run)
    wait_grid(env, run)
    check_result(run, reference_longest, TIME_LIMIT_STEPS)
    states = attempts(env, job)
    assert len(states) >= 2 and states[-1] == "COMPLETED", states
    assert "time limit" in job_log(run, job)
    counts = json.loads((run / "slurm" / "timeouts.json").read_text())
    assert max(counts.values()) == len(states) - 1
    record = train_attempts(run)
    steps = [(a["progress_before"]["checkpoint_step"] or 0, (a["progress_after"]["checkpoint_step"] or 0))
             for a in record]
    print(f"\ntime-limit scenario: reference training {train_s:.0f} s → time {minutes} min, signal_lead_s {lead}; "
          f"{len(record)} attempts; checkpoint step before→after each: {steps}; "
          f"seconds each: {[a['seconds'] for a in record]}")
    assert len(record) == len(states)
    assert all(after > before for before, after in steps[:-1]), steps  # every requeued attempt advanced


def test_scontrol_requeue_twice_resumes_from_the_last_checkpoints(env, tmp_path, reference):
    """Requeued in its first attempt and again in its second, after that one checkpointed on its own."""
    runs = tmp_path / "runs"
    submit(env, runs, NAME, *LONG)
    run = runs / NAME
    job = train_job(run)
    wait_for_checkpoint(env, run, job)
    for attempt in (1, 2):
        out = subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        if attempt == 1:  # until the first attempt has stopped with its checkpoint, then one more checkpoint
            wait_for("the first attempt's end", lambda: train_attempts(run) if (run / "slurm" / "attempts.jsonl")
                     .is_file() else [], lambda: (job_states(env, run), run_progress(run)), poll_s=1)
            stopped_at = train_attempts(run)[0]["progress_after"]["checkpoint_step"]
            wait_for_checkpoint(env, run, job, after=stopped_at)
    wait_grid(env, run)
    check_result(run, reference)
    assert len(attempts(env, job)) >= 3 and len(train_attempts(run)) >= 3
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
    wait_grid(env, run)
    check_result(run, reference)
    assert "resuming from" in job_log(run, latest["jobs"]["train"]["job_id"])
    again = kolora(env, "resume", NAME, "--runs-dir", runs, timeout=60)
    assert again.returncode == 1 and "nothing to resume" in again.stderr


def test_requeued_render_task_renders_only_its_missing_tiles(env, tmp_path):
    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["jobs"]["render"]["tiles_per_task"] = 8  # one task renders all eight tiles (≈ 1-2 s each here)
    path = tmp_path / "one-task.yaml"
    path.write_text(yaml.safe_dump(profile))
    runs = tmp_path / "runs"
    sub, _ = submit(env, runs, "render-requeue", "--set", "train.steps=5", "--set", "render.steps=30",
                    "--set", "render.width=256", "--set", "render.height=256",
                    "--set", "evaluate.enabled=false", profile=str(path))  # LoRA tiles only
    run = runs / "render-requeue"
    task = sub["jobs"]["render"]["task_ids"][0]
    wait_for("a first tile", lambda: tile_files(run / "render"),
             lambda: (job_states(env, run), run_progress(run)), poll_s=0.5)
    out = subprocess.run(["scontrol", "requeue", task], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    before = {p.name: p.stat().st_mtime_ns for p in tile_files(run / "render")}
    wait_grid(env, run)
    after = {p.name: p.stat().st_mtime_ns for p in tile_files(run / "render")}
    assert len(after) == 8
    assert all(after[name] == mtime for name, mtime in before.items()), "a finished tile was rendered again"
    assert len(attempts(env, task)) >= 2
    log = job_log(run, task.split("_")[0])
    # The dev cluster's KillWait (30 s) is far longer than a tile, so the task always stops at its safe point.
    stopped = re.search(r"render task 0 stopped after (\d+) of 8 tiles", log)
    finished = re.findall(r"rendered=(\d+), reused=0, already_done=(\d+)", log)
    assert stopped and len(finished) == 1, log[-3000:]
    done_first = int(stopped.group(1))
    rendered, already = map(int, finished[0])
    assert done_first >= len(before) >= 1
    assert already == done_first and rendered == 8 - done_first  # counted: every tile rendered exactly once
