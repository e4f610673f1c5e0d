"""Shared helpers for the tests that run against the dev Slurm cluster (slurm/devcluster)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
LOCAL = str(REPO / "slurm" / "clusters" / "local.yaml")
FAST = ["--set", "train.steps=10"]  # the pixel comparison runs the same overrides in process
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def kolora(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kolora.cli.main", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


_submitted: list[tuple[Path, str]] = []  # (runs dir, run name) to cancel after each test


def submit(env: dict[str, str], runs: Path, name: str, *args: str, profile: str = LOCAL) -> tuple[dict, float]:
    started = time.monotonic()
    proc = kolora(env, "submit", DEMO, "--cluster", profile, "--runs-dir", runs, "--name", name, *args)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    _submitted.append((runs, name))
    slurm = json.loads((runs / name / "manifest.json").read_text())["slurm"]
    return slurm["submissions"][slurm["latest"]], seconds


def sacct(env: dict[str, str], ids: list[str]) -> list[dict[str, str]]:
    """One row per job / array task (sacct folds the tasks of a pending array into one row: unfolded here)."""
    fields = ["JobID", "State", "Partition", "AllocTRES", "Start", "End"]
    proc = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), f"--format={','.join(fields)}"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    rows = []
    for line in proc.stdout.splitlines():
        row = dict(zip(fields, line.split("|"), strict=True))
        row["State"] = row["State"].split()[0]
        folded = re.fullmatch(r"(\d+)_\[(\d+)-(\d+)(?:%\d+)?\]", row["JobID"])
        if folded:
            base, first, last = folded.groups()
            rows += [{**row, "JobID": f"{base}_{i}"} for i in range(int(first), int(last) + 1)]
        else:
            rows.append(row)
    return rows


# A wait fails when nothing observable advances for this long (a job state, a checkpoint, a metrics row, a
# tile, a finished stage), not after a total time: a slow or busy machine only makes the test take longer.
STALL_S = float(os.environ.get("KOLORA_TEST_STALL_S", "240"))


def run_progress(run: Path) -> tuple:
    """What a submitted run has durably done so far (see kolora.pipeline.keys.progress) plus its metrics rows and attempts."""
    from kolora.core.rundir import RunDir
    from kolora.pipeline.keys import progress

    metrics = run / "train" / "metrics.csv"
    attempts = run / "slurm" / "attempts.jsonl"

    def lines(path: Path) -> int:
        return len(path.read_text().splitlines()) if path.is_file() else 0

    return (json.dumps(progress(RunDir(run)), sort_keys=True), lines(metrics), lines(attempts))


def wait_for(what: str, done: Callable[[], Any], progress: Callable[[], Any], stall_s: float = STALL_S,
             poll_s: float = 2) -> Any:
    """Poll `done()` until it returns something true; fail when `progress()` has not changed for `stall_s`."""
    last, since = progress(), time.monotonic()
    while not (result := done()):
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            pytest.fail(f"waiting for {what}: nothing advanced for {stall_s:.0f} s (last seen: {now})")
        time.sleep(poll_s)
    return result


def wait_ended(env: dict[str, str], ids: list[str], count: int, run: Path | None = None,
               stall_s: float = STALL_S) -> dict[str, dict[str, str]]:
    """Wait until sacct has COUNT rows for the jobs, all ended and with their partition recorded; fail when
    neither a job's state nor the run's outputs changed for `stall_s`."""
    def ended() -> dict[str, dict[str, str]] | None:
        rows = sacct(env, ids)
        if len(rows) == count and all(r["State"].startswith(ENDED) and r["Partition"] for r in rows):
            return {r["JobID"]: r for r in rows}
        return None

    def progress() -> tuple:
        states = tuple((r["JobID"], r["State"]) for r in sacct(env, ids))
        return (states, run_progress(run) if run is not None else None)

    return wait_for(f"jobs {ids} to end", ended, progress, stall_s)
