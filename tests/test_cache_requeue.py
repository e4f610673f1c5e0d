"""A time limit reached during the cache stage requeues the train job (cache + train), and the next attempt
continues the cache from its journal instead of starting over — for real on the dev Slurm cluster.

The tiny cache takes seconds, and Slurm checks time limits only every 30 s, so the test makes the limit land
during the cache: once the first batch is journaled it lowers the job's time limit (`scontrol update`) until
less than `signal_lead_s` is left, and delivers the warning signal that slurmctld sends at its next check
(USR2 to the job's steps, as `--signal` does). The supervisor then sees a job within its lead of the end, as
at a real time limit: it counts a timeout and requeues.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from slurmkit import LOCAL, kolora, run_progress, sacct, submit, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cancel_leftovers")]

# Small batches of larger images: the cache lasts many batches, so the stop lands in the middle of it.
CACHE = ["--set", "data.synthetic.count=96", "--set", "cache.batch_size=2", "--set", "train.resolution=512",
         "--set", "train.steps=4", "--set", "train.checkpoint_every=2"]


def _journal(run: Path) -> list[dict]:
    lines = []
    for part in sorted((run / "cache" / "journal").glob("*/part-*.jsonl")):
        for line in part.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line being written
                lines.append(json.loads(line))
    return lines


def _scontrol(env, *args: str) -> None:
    out = subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_time_limit_during_the_cache_requeues_and_the_cache_continues(env, tmp_path):
    profile = yaml.safe_load(Path(LOCAL).read_text())
    lead = profile["signal_lead_s"]
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    runs = tmp_path / "runs"
    sub, _ = submit(env, runs, "cache-limit", *CACHE, profile=str(path))
    run = runs / "cache-limit"
    job = sub["jobs"]["train"]["job_id"]

    def cache_started() -> bool:
        if (run / "cache" / "index.json").exists():
            pytest.fail("the cache finished before the test could stop it: make it longer (CACHE)")
        return any("entry" in r for r in _journal(run))

    wait_for("the cache's first journaled batch of images", cache_started, lambda: (sacct(env, [job]), run_progress(run)),
             poll_s=0.1)
    started = subprocess.run(["squeue", "-h", "-j", job, "-o", "%M"], env=env, capture_output=True, text=True,
                             timeout=30).stdout.strip()
    from kolora.launch.supervise import parse_slurm_duration

    minutes = math.ceil(((parse_slurm_duration(started) or 0) + lead / 2) / 60)
    _scontrol(env, "update", f"JobId={job}", f"TimeLimit={minutes}")  # now less than the lead is left
    left = parse_slurm_duration(subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], env=env,
                                               capture_output=True, text=True, timeout=30).stdout.strip())
    assert left is not None and left <= lead + 30, left
    sent = subprocess.run(["scancel", "--signal=USR2", job], env=env, capture_output=True, text=True, timeout=30)
    assert sent.returncode == 0, sent.stderr

    def requeued() -> bool:
        return any(a["job"].split("/")[1] == "train" and a["exit"] == 75 for a in _attempts(run))

    wait_for("the train job to stop and requeue", requeued, lambda: (sacct(env, [job]), run_progress(run)),
             poll_s=0.5)
    _scontrol(env, "update", f"JobId={job}", f"TimeLimit={profile['jobs']['train'].get('time', 30)}")
    first = [line for line in _journal(run) if "entry" in line]
    assert first and not (run / "cache" / "index.json").exists()  # stopped mid-cache with entries journaled

    def trained() -> bool:
        states = [r["State"] for r in sacct(env, [job])]
        if any(s.startswith(("FAILED", "CANCELLED", "TIMEOUT")) for s in states):
            pytest.fail(f"train job {job} ended {states}:\n{_log(run, job)[-3000:]}")
        return states == ["COMPLETED"]  # the requeued attempt finished cache and training

    wait_for("training after the requeue", trained, lambda: (sacct(env, [job]), run_progress(run)))
    kolora(env, "cancel", "cache-limit", "--runs-dir", runs, timeout=60)  # render and grid are not the point

    log = _log(run, job)
    assert "cache rank 0: stopped (SIGUSR2)" in log and "stage checkpointed after time limit" in log, log[-3000:]
    assert max(json.loads((run / "slurm" / "timeouts.json").read_text()).values()) == 1
    train = [a for a in _attempts(run) if a["job"].split("/")[1] == "train"]
    assert len(train) >= 2 and train[0]["exit"] == 75 and "cache" not in train[0]["progress_after"]["complete"]
    assert train[1]["restart"] == 1 and train[1]["slurm_job"] == job and train[-1]["exit"] == 0  # requeued, done
    assert train[0]["progress_after"]["cache_entries"] > train[0]["progress_before"]["cache_entries"]
    manifest = json.loads((run / "manifest.json").read_text())
    summary = manifest["stages"]["cache"]["summary"]
    index = json.loads((run / "cache" / "index.json").read_text())
    report = json.loads((run / "cache" / "report.json").read_text())
    # the second attempt continued: the samples journaled before the stop were not encoded again
    assert summary["resumed_samples"] == len(first) > 0
    assert summary["encoded_images"] == len({e["latent_key"] for e in index["entries"]}) - len(
        {line["entry"]["latent_key"] for line in first})
    assert len(index["entries"]) == report["samples"] == report["cached"] and not report["skipped"]
    assert not (run / "cache" / "journal").exists()
    assert manifest["stages"]["train"]["status"] == "complete"
    print(f"\ncache time limit: {len(train)} train attempts, {len(first)} samples cached before the stop, "
          f"{summary['encoded_images']} encoded after it, of {summary['samples']}")


def _attempts(run: Path) -> list[dict]:
    path = run / "slurm" / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _log(run: Path, job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (run / "slurm").rglob(f"{job_id}_*_log.err"))
