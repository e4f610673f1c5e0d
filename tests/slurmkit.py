"""Shared helpers for the tests that run against the dev Slurm cluster (slurm/devcluster)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
LOCAL = str(REPO / "slurm" / "clusters" / "local.yaml")
FAST = ["--set", "train.steps=10"]  # the pixel comparison runs the same overrides in process
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def kolora(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kolora.cli", *map(str, args)], env=env, capture_output=True,
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


def wait_ended(env: dict[str, str], ids: list[str], count: int, timeout: float) -> dict[str, dict[str, str]]:
    """Wait until sacct has COUNT rows for the jobs, all ended and with their partition recorded."""
    deadline = time.monotonic() + timeout
    while True:
        rows = sacct(env, ids)
        if len(rows) == count and all(r["State"].startswith(ENDED) and r["Partition"] for r in rows):
            return {r["JobID"]: r for r in rows}
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for jobs {ids} to end: {rows}")
        time.sleep(2)
