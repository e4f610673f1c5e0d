"""Tests against the real single-machine Slurm started by `make cluster-up` (slurm/devcluster/up.sh).

They find the cluster through <state>/env.sh ($KOLORA_DEVCLUSTER, else .devcluster/ in the checkout) and are
skipped when it is missing or does not answer. Every wait has a deadline. Run them one at a time (not under
pytest-xdist): the concurrency and preemption tests need the node's 4 CPUs and 2 GPUs to themselves.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
EXPORT_LINE = re.compile(r"export ([A-Za-z_][A-Za-z0-9_]*)=(.*)")


@dataclass(frozen=True)
class Cluster:
    env: dict[str, str]


def env_file() -> Path:
    root = os.environ.get("KOLORA_DEVCLUSTER")
    return (Path(root).resolve() if root else REPO / ".devcluster") / "env.sh"


def parse_env_sh(path: Path) -> dict[str, str]:
    """The `export KEY=VALUE` lines that up.sh writes (optionally quoted values; other lines are ignored)."""
    values = {}
    for line in path.read_text().splitlines():
        match = EXPORT_LINE.fullmatch(line.strip())
        if match:
            key, value = match.groups()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key] = value
    return values


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    path = env_file()
    if not path.is_file():
        pytest.skip(f"no dev cluster: {path} does not exist (start one with `make cluster-up`)")
    env = {**os.environ, **parse_env_sh(path)}
    if "SLURM_CONF" not in env:
        pytest.skip(f"{path} sets no SLURM_CONF")
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%a"], env=env, capture_output=True, text=True, timeout=20
        )
    except FileNotFoundError:
        pytest.skip("no dev cluster: sinfo is not installed (run `make cluster-up`)")
    except subprocess.TimeoutExpired:
        pytest.skip("no dev cluster: sinfo did not answer within 20 s (run `make cluster-up`)")
    if proc.returncode != 0 or "up" not in proc.stdout.split():
        pytest.skip(f"no dev cluster answering at {env['SLURM_CONF']}: sinfo said {proc.stderr.strip()!r}")
    return Cluster(env=env)


def slurm(cluster: Cluster, *args: str, timeout: float = 30) -> str:
    proc = subprocess.run(list(args), env=cluster.env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
    return proc.stdout


_script_numbers = itertools.count()


def submit(cluster: Cluster, folder: Path, body: str, *sbatch_args: str) -> str:
    """sbatch a bash script with BODY, run in FOLDER; returns the job id."""
    script = folder / f"job{next(_script_numbers)}.sh"
    script.write_text("#!/bin/bash\n" + body + "\n")
    out = slurm(cluster, "sbatch", "--parsable", f"--chdir={folder}", "--time=5", *sbatch_args, str(script))
    return out.strip().split(";")[0]


def wait_until(what: str, probe: Callable[[], object], timeout: float = 60, every: float = 0.5) -> object:
    """Call PROBE until it returns something truthy; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def accounting(cluster: Cluster, job_id: str) -> list[dict[str, str]]:
    """sacct's allocation rows for a job (one per array task)."""
    fields = ["JobID", "State", "Partition", "ExitCode", "AllocTRES"]
    out = slurm(cluster, "sacct", "-X", "-n", "-P", "-j", job_id, f"--format={','.join(fields)}")
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]


def wait_ended(cluster: Cluster, job_id: str, tasks: int = 1, timeout: float = 60) -> list[dict[str, str]]:
    """Wait until sacct reports TASKS rows for the job, all in a final state and complete: a short job's
    record shows its final state at once but its Partition only a few seconds later."""

    def ended() -> list[dict[str, str]] | None:
        rows = accounting(cluster, job_id)
        done = len(rows) == tasks and all(row["State"].startswith(ENDED) and row["Partition"] for row in rows)
        return rows if done else None

    return wait_until(f"job {job_id} to end in sacct", ended, timeout)  # type: ignore[return-value]


def queue_state(cluster: Cluster, job_id: str) -> str:
    return slurm(cluster, "squeue", "-h", "-j", job_id, "-o", "%T").strip()


def test_gpu_job_sees_a_gpu_and_is_accounted(cluster: Cluster, tmp_path: Path) -> None:
    job = submit(
        cluster,
        tmp_path,
        'echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"',
        "--partition=gpu",
        "--gres=gpu:1",
        f"--output={tmp_path}/%j.out",
    )
    [row] = wait_ended(cluster, job)
    assert row["State"] == "COMPLETED", row
    assert row["Partition"] == "gpu"
    assert "gres/gpu=1" in row["AllocTRES"]
    assert re.fullmatch(r"CUDA_VISIBLE_DEVICES=[01]\n", (tmp_path / f"{job}.out").read_text())


def test_cpu_and_two_gpu_jobs_run_at_once(cluster: Cluster, tmp_path: Path) -> None:
    # each job waits (at most 60 s) until all three have started: they only complete if they ran side by side
    barrier = (
        'echo "${CUDA_VISIBLE_DEVICES-none}" > "started.$SLURM_JOB_ID"\n'
        "shopt -s nullglob\n"
        "for _ in $(seq 600); do started=(started.*); (( ${#started[@]} >= 3 )) && exit 0; sleep 0.1; done\n"
        "exit 1"
    )
    jobs = [
        submit(cluster, tmp_path, barrier, "--partition=cpu"),
        submit(cluster, tmp_path, barrier, "--partition=gpu", "--gres=gpu:1"),
        submit(cluster, tmp_path, barrier, "--partition=gpu", "--gres=gpu:1"),
    ]
    for job in jobs:
        [row] = wait_ended(cluster, job, timeout=90)
        assert row["State"] == "COMPLETED", row
    seen = [(tmp_path / f"started.{job}").read_text().strip() for job in jobs]
    assert seen[0] == "none"
    assert sorted(seen[1:]) == ["0", "1"]  # two jobs, two different GPUs


def test_job_with_failed_dependency_is_cancelled(cluster: Cluster, tmp_path: Path) -> None:
    # held until the dependent job exists, so the dependency fails while the second job waits on it
    first = submit(cluster, tmp_path, "exit 3", "--hold")
    second = submit(cluster, tmp_path, "echo ran > ran.txt", f"--dependency=afterok:{first}")
    slurm(cluster, "scontrol", "release", first)
    [row] = wait_ended(cluster, first)
    assert row["State"] == "FAILED" and row["ExitCode"] == "3:0", row
    [row] = wait_ended(cluster, second)
    # cancelled by the cluster's DependencyParameters=kill_invalid_depend, not PENDING forever
    assert row["State"].startswith("CANCELLED"), row
    assert not (tmp_path / "ran.txt").exists()


def test_array_throttle_runs_one_task_at_a_time(cluster: Cluster, tmp_path: Path) -> None:
    job = submit(
        cluster,
        tmp_path,
        'date +%s.%N > "$SLURM_ARRAY_TASK_ID.start"; sleep 1; date +%s.%N > "$SLURM_ARRAY_TASK_ID.end"',
        "--array=0-2%1",
        f"--output={tmp_path}/%A_%a.out",
    )
    rows = wait_ended(cluster, job, tasks=3, timeout=90)
    assert sorted(row["JobID"] for row in rows) == [f"{job}_{task}" for task in range(3)]
    assert all(row["State"] == "COMPLETED" for row in rows), rows
    spans = sorted(
        (float((tmp_path / f"{task}.start").read_text()), float((tmp_path / f"{task}.end").read_text()))
        for task in range(3)
    )
    for (_, previous_end), (next_start, _) in itertools.pairwise(spans):
        assert next_start >= previous_end, spans  # %1: never two tasks at once


def test_gpu_urgent_preempts_and_gpu_job_is_requeued(cluster: Cluster, tmp_path: Path) -> None:
    # The victim holds both GPUs. On preemption it gets its --signal (USR2) at once, requeues itself and exits
    # (exiting 0 without requeueing would end it COMPLETED and lose the rest of its work); it then runs again
    # with SLURM_RESTART_COUNT=1 after the urgent job.
    victim_body = (
        'echo "start restart=${SLURM_RESTART_COUNT:-0}" >> victim.log\n'
        '[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && exit 0\n'
        "sleep 300 & sleeper=$!\n"  # in the background, so that the trap runs at once
        "trap 'echo USR2 >> victim.log; scontrol requeue \"$SLURM_JOB_ID\"; kill $sleeper; exit 0' USR2\n"
        'wait "$sleeper"\n'
        "exit 1"
    )
    victim = submit(
        cluster, tmp_path, victim_body, "--partition=gpu", "--gres=gpu:2", "--signal=B:USR2@60", "--time=10"
    )
    wait_until(f"job {victim} to run", lambda: queue_state(cluster, victim) == "RUNNING", timeout=60)
    urgent = submit(cluster, tmp_path, "echo urgent > urgent.txt", "--partition=gpu-urgent", "--gres=gpu:1")
    [row] = wait_ended(cluster, urgent, timeout=90)
    assert row["State"] == "COMPLETED" and row["Partition"] == "gpu-urgent", row
    [row] = wait_ended(cluster, victim, timeout=90)
    assert row["State"] == "COMPLETED", row
    assert (tmp_path / "victim.log").read_text().split("\n") == [
        "start restart=0",
        "USR2",
        "start restart=1",
        "",
    ]
