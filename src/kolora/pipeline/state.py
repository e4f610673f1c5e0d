"""What a run is doing, read from its manifest and its run lock: a stage the manifest says is running whose lock
holder is gone (kill -9, an out-of-memory kill, a crashed node, Slurm jobs that ended) is "stopped". The one
place that decides it: `kolora status` of a run or a sweep, and the line `kolora run` / `kolora resume` print
when they continue a stopped run. Reads only.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.core.rundir import RunDir
from kolora.core.runlock import (
    LOCK,
    Queued,
    describe,
    lock_job_ids,
    process_alive,
    read_lock,
    stale_given,
    unknown_queue,
)
from kolora.pipeline.registry import NAMES

CUT_SHORT = ("running", "interrupted", "partial")  # manifest statuses of a stage that has not finished


@dataclass(frozen=True)
class RunState:
    """What a run is doing (run_state): `state` is one of running, stopped (cut short: its process or jobs are
    gone; `kolora run` / `kolora resume` continues it), failed, complete, incomplete (stages left to run, none
    cut short), not started, unknown (squeue does not answer for its jobs). `stage`: the stage it runs, was
    stopped in, failed in, or runs next."""

    state: str
    stage: str | None
    detail: str  # in words, one line
    complete: tuple[str, ...]  # the stages the manifest records complete

    def line(self) -> str:
        return f"{self.detail}; complete: {', '.join(self.complete) or 'none'}"

    def label(self) -> str:
        return f"{self.state} ({self.stage})" if self.stage else self.state

    def continuing(self, name: str) -> str:
        """What `kolora run` / `kolora resume` say when they take up a stopped run."""
        return f"kolora: continuing stopped run {name}: {self.line()}"


def stopped_before(run_root: Path | str, queued: Queued = unknown_queue) -> RunState | None:
    """The state of the run at `run_root` when it was stopped (cut short), else None; read by `kolora run`,
    `kolora resume` and an in-process sweep before they take its lock, to say what they continue."""
    run = RunDir(run_root)
    if not run.manifest_file.is_file():
        return None
    state = run_state(run, queued=queued)
    return state if state.state == "stopped" else None


def run_state(run: RunDir, manifest: dict[str, Any] | None = None, stale_after_s: float = 300,
              queued: Queued = unknown_queue) -> RunState:
    """Decide from the manifest and the run lock: a stage recorded running (or interrupted, or partial) is
    running only while the lock's holder lives (its process on this host; its heartbeat from another host;
    for a submission, its Slurm jobs in squeue). The one place that decides it: `kolora status` of a run or a
    sweep, and the line `kolora run` / `kolora resume` print when they continue a stopped run. Reads only."""
    manifest = run.read_manifest() if manifest is None else manifest
    entries = {s: (manifest.get("stages") or {}).get(s) or {} for s in NAMES}
    status = {s: e.get("status") for s, e in entries.items()}
    complete = tuple(s for s in NAMES if status[s] == "complete")
    if len(complete) == len(NAMES):
        return RunState("complete", None, "every stage is complete", complete)
    # the stage that ran last, among those that did not finish (a stage started later is the one that counts)
    last = max((s for s in NAMES if status[s] in (*CUT_SHORT, "failed")), default=None,
               key=lambda s: (str(entries[s].get("started") or ""), NAMES.index(s)))
    alive, holder = _holder(run, manifest, stale_after_s, queued)
    if alive is None:
        return RunState("unknown", last, f"cannot tell whether it runs: {holder}", complete)
    if alive:
        running = last if last is not None and status[last] == "running" else None
        return RunState("running", running, (f"stage {running} running" if running else "running")
                        + f", by {holder}", complete)
    if last is not None and status[last] == "failed":
        error = str(entries[last].get("error") or "").strip().splitlines()
        return RunState("failed", last, f"stage {last} failed" + (f": {error[0]}" if error else ""), complete)
    if last is not None:
        if status[last] == "interrupted":
            error = str(entries[last].get("error") or "").strip().splitlines()
            why = f"stage {last} was interrupted" + (f": {error[0]}" if error else "")
        else:
            verb = "was running" if status[last] == "running" else "was left partial (some of its tasks done)"
            why = f"stage {last} {verb} when {holder}"
        return RunState("stopped", last, why, complete)
    if not any(status.values()):
        return RunState("not started", None, "no stage has run yet", complete)
    upcoming = next(s for s in NAMES if status[s] != "complete")
    return RunState("incomplete", upcoming, f"not running; stage {upcoming} has not run", complete)


def _holder(run: RunDir, manifest: dict[str, Any], stale_after_s: float, queued: Queued) -> tuple[bool | None, str]:
    """Whether the run lock's holder may be alive (None: squeue does not answer for its jobs), with who holds
    it, or how it went away (the end of "stage X was running when ...")."""
    found = read_lock(run.root / LOCK)
    if found is None:  # every live writer holds the lock: a `kolora run`, a submission's queued jobs
        slurm = manifest.get("slurm") or {}
        ids = [str(j["job_id"]) for j in ((slurm.get("submissions") or {}).get(slurm.get("latest")) or {})
               .get("jobs", {}).values() if isinstance(j, dict) and j.get("job_id")]
        listed = queued(ids) if ids else set()
        if listed is None:
            return None, f"no run lock, and squeue did not answer for its Slurm jobs ({' '.join(ids)})"
        if listed:
            return True, f"Slurm jobs {' '.join(sorted(listed))}"
        return False, "its process ended (no process holds the run lock)"
    info = found[1]
    ids = lock_job_ids(info)
    listed = queued(ids) if ids else None
    if ids and listed is None:  # a pending job sends no heartbeat: without squeue, nothing tells
        return None, f"squeue did not answer for the Slurm jobs of {describe(info)}"
    reason = stale_given(info, stale_after_s, listed)
    if reason is None:
        return True, describe(info)
    if info.get("damaged"):
        return False, f"its writer left a damaged run lock ({reason})"
    if ids:
        return False, f"its Slurm jobs ended ({reason})"
    where = f"pid {info.get('pid')} on host {info.get('host')}"
    if info.get("host") == socket.gethostname() and not process_alive(info.get("pid")):
        return False, f"its process died ({where})"
    return False, f"its process stopped sending heartbeats ({where}: {reason})"
