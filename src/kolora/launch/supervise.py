"""The host side of every Slurm job: the one owner of signals and requeue.

The job process (started by submitit) runs the stage in a *child* process — plain `python -m
kolora.launch.child`, or the same inside `apptainer exec` when the profile has a container — and:
- catches the stop signals (the profile's USR2 before the time limit or on preemption, SIGTERM) and forwards
  them to the child, whose handler only sets a flag: training checkpoints at the next step boundary, render
  stops after the current tile, and the child exits with EXIT_INTERRUPTED;
- then requeues the job itself with `scontrol requeue` (which exists on the host, not in the image):
  preemptions always, time limits up to the profile's `max_requeues`. A preempted job that exited 0 during
  GraceTime would end COMPLETED and never come back, hence the explicit requeue.
  Under DDP only rank 0's host requeues (once); the other ranks exit 0, since a non-zero exit would make srun
  (--kill-on-bad-exit) kill rank 0 before its `scontrol requeue`. A job cancelled meanwhile is never requeued.
- A SIGTERM alone (`scontrol requeue` by hand, `scancel`, GraceTime=0 preemption) is Slurm's decision: the
  child checkpoints and the job leaves; Slurm requeues or cancels it.
- A node that dies under a multi-node job takes its ranks with it; the others' collectives fail at once (a
  reset connection) or at the process group's timeout, and the child exits EXIT_PEER_LOST. That is no failure
  of the run yet: the supervisor waits (bounded by Slurm's own SlurmdTimeout) for Slurm's verdict on the
  job's nodes. A node down, drained or not responding, or Slurm ending the job (its NODE_FAIL requeue), is a
  node failure: the attempt is recorded as such, rank 0 requeues the job if Slurm has not, and no later job
  of the run is cancelled. The requeued job resumes from the last checkpoint on the nodes it gets.

A stop signal must never find a process without its handler: SIGUSR2's default action kills it, and Slurm
sends the time-limit warning at its first ~30 s tick once the job is within `signal_lead_s` + 30 s of its end,
which for a short limit can be the moment the step starts (a job that died like that ends FAILED, not
requeued). So every job step starts through `BOOT`, which blocks the stop signals before the real interpreter
runs; the mask is inherited across exec and by the child, and each process unblocks them once its handler is in
place (here, and in interrupt.handle), so an early signal waits instead of killing. A warning Slurm sent before
the step existed is lost altogether, hence the fallback timer: no USR2 by `signal_lead_s` before the job's end
time, and the supervisor acts as if it had come.

submitit's own handlers (which would call `scontrol` and `sys.exit` in the middle of a training step) are
replaced for the duration of the job; Lightning's SLURM auto-requeue is off (train.py).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kolora.core.interrupt import STOP_SIGNALS

log = logging.getLogger("kolora.launch")

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped at a consistent point on request; run again to continue
EXIT_PEER_LOST = 76  # a collective lost another rank (launch.child): maybe a node died; Slurm's verdict decides

# The first program of every job step (`python -S -I -c BOOT REAL_COMMAND...`, a few ms to start): block the
# stop signals, then exec the real command, which inherits the mask. Written by hand because neither srun nor
# submitit can start a task with signals blocked, and coreutils' `env --block-signal` is missing on RHEL 8.
BOOT = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR2, signal.SIGTERM)); "
        "os.execvp(sys.argv[1], sys.argv[1:])")


def boot_command(words: list[str]) -> list[str]:
    """`words` (the job's interpreter) started through BOOT. A command that is not itself a Python
    interpreter (e.g. `apptainer exec IMAGE python`) has none to run BOOT with and is left as it is."""
    if not words or not re.fullmatch(r"python[0-9.]*", Path(words[0]).name):
        return list(words)
    return [words[0], "-S", "-I", "-c", BOOT, *words]


class JobFailed(RuntimeError):
    pass


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: the array task's own id for array jobs."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def parse_slurm_duration(text: str) -> int | None:
    """squeue's %L (time left): [D-]HH:MM:SS, MM:SS or SS → seconds; UNLIMITED/INVALID → None."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(?:(\d+):)?(\d+)", text.strip())
    if not m:
        return None
    d, a, b, s = (int(x) if x else 0 for x in m.groups())
    if m.group(3) is None:  # MM:SS or SS
        h, mnt = 0, a
    else:
        h, mnt = a, b
    return ((d * 24 + h) * 60 + mnt) * 60 + s


def _squeue_field(job_id: str, fmt: str) -> str | None:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", fmt], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip().splitlines()
    return line[0].strip() if line else None


def failed_nodes(nodelist: str) -> list[str]:
    """The nodes of `nodelist` (Slurm's compact form) that Slurm reports down, drained, failing or not
    responding (sinfo's `*` suffix: missed heartbeats); [] when it cannot tell."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-n", nodelist, "-o", "%N %T"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    bad = set()
    for line in out.stdout.splitlines():
        name, _, state = line.strip().partition(" ")
        if "*" in state or re.match(r"(down|drain|fail|no_respond|unknown)", state.lower()):
            bad.add(name)
    return sorted(bad)


def slurmd_timeout_s(default: int = 300) -> int:
    """Slurm's SlurmdTimeout: how long it takes to declare a silent node down."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return default
    match = re.search(r"^SlurmdTimeout\s*=\s*(\d+)", out.stdout, re.M)
    return int(match.group(1)) if match else default


def node_verdict(job_id: str, nodelist: str, received: list[int], wait_s: float, poll_s: float = 2.0) -> str | None:
    """After a rank lost its peers: what Slurm says within `wait_s` — a node of the job down / drained / not
    responding, the job no longer running (Slurm requeued it on NODE_FAIL, or cancelled it), or a stop signal
    (Slurm ending the step). None: every node stayed up, so a rank failed on its own."""
    deadline = time.monotonic() + wait_s
    while True:
        if received:
            return f"Slurm stopped the job ({'+'.join(signal.Signals(s).name for s in received)})"
        bad = failed_nodes(nodelist)
        if bad:
            return f"node failure: {','.join(bad)}"
        state = _squeue_field(job_id, "%T")
        if state not in ("RUNNING", "COMPLETING", None):
            return f"job {state} by Slurm"
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def job_end_time(job_id: str | None) -> float | None:
    """When Slurm will end this job (epoch seconds): SLURM_JOB_END_TIME where Slurm sets it (23.02+), else
    squeue's %e (local time); None when unknown (not under Slurm, no time limit)."""
    value = os.environ.get("SLURM_JOB_END_TIME", "")
    if value.isdigit():
        return float(value)
    if job_id is None:
        return None
    text = _squeue_field(job_id, "%e") or ""
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:  # N/A, Unknown, NONE
        return None


def cancelled(job_id: str) -> bool:
    """Whether Slurm's accounting says the job was cancelled (scancel); False when it cannot tell."""
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                             text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    states = out.stdout.split("\n")
    last = [line for line in states if line.strip()]
    return bool(last) and last[-1].startswith("CANCELLED")


def requeue(job_id: str) -> bool:
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        log.warning("scontrol requeue %s: %s", job_id, (out.stderr or out.stdout).strip())
    return out.returncode == 0


def _bump_timeouts(counter: Path, key: str) -> int:
    """Count this job's time-limit requeues in the run directory (survives requeues; one file per run)."""

    counter.parent.mkdir(parents=True, exist_ok=True)
    with open(counter, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        data = json.loads(f.read() or "{}")
        data[key] = data.get(key, 0) + 1
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data, indent=1))
        return data[key]


def record_attempt(path: Path | None, entry: dict[str, Any]) -> None:
    """One JSON line per job attempt, the history of a requeued job: a single O_APPEND write."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry, default=str) + "\n").encode())
    finally:
        os.close(fd)


def supervise(command: list[str], *, signal_lead_s: int, max_requeues: int, counter: Path, key: str,
              rank: int = 0, env: dict[str, str] | None = None, result_dir: Path | None = None,
              end_time: float | None = None, progress: Callable[[], Any] | None = None,
              attempts: Path | None = None) -> dict[str, Any]:
    """Run `command` (whose last argument is where it writes its JSON result) as the child, forward stop
    signals, and requeue when the child stopped because of one. Returns the child's result.

    `end_time` (epoch seconds, the job's): if no SIGUSR2 came by `signal_lead_s` before it, act as if one had.
    `progress()` summarises what the job has durably written (checkpoints, tiles, finished stages): an attempt
    stopped by its time limit without changing it is not requeued, since the next one would do the same.
    `attempts`: a JSON-lines file that gets one entry per attempt."""
    received: list[int] = []
    started = time.time()
    before = progress() if progress is not None and rank == 0 else None
    attempt = {"job": key, "slurm_job": slurm_job_id(), "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
               "rank": rank, "started": round(started, 3), "progress_before": before}
    child: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        received.append(signum)
        log.warning("job received %s: asking the stage to stop at its next safe point",
                    signal.Signals(signum).name)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def deadline(signum, frame) -> None:
        if signal.SIGUSR2 not in received:
            log.warning("no SIGUSR2 from Slurm %d s before the time limit (a warning sent before the job step "
                        "started is lost): stopping as if it had come", signal_lead_s)
            forward(signal.SIGUSR2, frame)

    # Until `child` exists the stop signals stay blocked (they already are when the job started through BOOT):
    # one that comes in the meantime is delivered, and forwarded, as soon as they are unblocked. The child
    # starts with them blocked too and unblocks them once its own handler is in place (interrupt.handle).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, deadline)
    try:
        # The result file lives where the child can write it (the job folder is bound into a container).
        if result_dir is not None:
            Path(result_dir).mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(prefix=".kolora-result-", dir=result_dir)
        result_file = Path(tmp.name) / "result.json"
        child = subprocess.Popen([*command, str(result_file)], env={**os.environ, **(env or {})})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if end_time is not None:
            signal.setitimer(signal.ITIMER_REAL, max(end_time - signal_lead_s - time.time(), 0.01))
        rc = child.wait()  # PEP 475: retried after each signal handler returns
        lost = None
        nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
        if rc != 0 and slurm_job_id() and int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) > 1:
            # a lost peer, said by the child, or the child killed by a signal: NCCL's watchdog aborts the
            # process (SIGABRT) when a collective's peer is gone, without a Python exception to classify
            if (rc == EXIT_PEER_LOST or rc < 0) and not received:
                wait_s = slurmd_timeout_s() + 60
                log.warning("the stage lost another rank: waiting up to %d s for Slurm's word on nodes %s", wait_s,
                            nodelist)
                lost = node_verdict(slurm_job_id(), nodelist, received, wait_s)
            elif bad := failed_nodes(nodelist):  # Slurm's stop came first: say why in the attempt's record
                lost = f"node failure: {','.join(bad)}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        for s, h in previous.items():
            signal.signal(s, h)
    after = progress() if progress is not None and rank == 0 else None
    attempt.update(ended=round(time.time(), 3), seconds=round(time.time() - started, 1), exit=rc,
                   signals=[signal.Signals(s).name for s in received], progress_after=after,
                   nodes=os.environ.get("SLURM_JOB_NODELIST"))
    if lost:
        attempt["node_failure"] = lost
    if rank == 0:
        record_attempt(attempts, attempt)
    with tmp:
        if rc == 0 and result_file.is_file():
            return json.loads(result_file.read_text())
    if lost:
        job_id = slurm_job_id()
        state = _squeue_field(job_id, "%T")
        if rank == 0 and state in ("RUNNING", "COMPLETING") and not cancelled(job_id):
            # a node Slurm has not declared down yet: requeue now rather than after SlurmdTimeout
            log.warning("%s; requeueing job %s: %s", lost, job_id, "done" if requeue(job_id) else "failed")
        else:
            log.warning("%s: Slurm requeues the job (state %s); it resumes from its last checkpoint", lost, state)
        sys.exit(EXIT_INTERRUPTED if rank == 0 else 0)
    if rc != EXIT_INTERRUPTED and not received:
        raise JobFailed(f"the stage process exited with status {rc} (its traceback is above in this log)")

    job_id = slurm_job_id()
    names = [signal.Signals(s).name for s in received] or [f"exit {rc}"]
    if rank != 0:
        # All ranks stopped at the same step, after the same checkpoint (train's broadcast decision). Exit 0:
        # a non-zero exit would make srun (--kill-on-bad-exit) kill rank 0 before its `scontrol requeue`.
        log.warning("stage stopped (%s); rank %d leaves the requeue to rank 0", "+".join(names), rank)
        sys.exit(0)
    if job_id is None:
        log.warning("stage stopped (%s) outside Slurm: nothing to requeue", "+".join(names))
        sys.exit(EXIT_INTERRUPTED)
    if signal.SIGUSR2 in received:
        left = parse_slurm_duration(_squeue_field(job_id, "%L") or "")
        timed_out = left is not None and left <= signal_lead_s + 30
        if timed_out and progress is not None and after == before:
            raise JobFailed(
                f"job {job_id} reached its time limit without progress: in {time.time() - started:.0f} s it "
                f"wrote no checkpoint, tile or finished stage ({after}), so another attempt would do the same. "
                f"The job's time limit minus signal_lead_s ({signal_lead_s} s) leaves too little time to load "
                "the models and reach a checkpoint: raise the job's time (or lower signal_lead_s) in the "
                "cluster profile, then `kolora resume`")
        if timed_out:
            n = _bump_timeouts(counter, key)
            if n > max_requeues:
                raise JobFailed(f"job {job_id} reached its time limit {n} times (profile max_requeues = "
                                f"{max_requeues}); raise the time limit, then `kolora resume`")
        why = f"time limit ({left} s left)" if timed_out else "preemption"
    else:
        state = _squeue_field(job_id, "%T")
        if state != "PREEMPTED":
            log.warning("stage stopped on %s (job state %s): Slurm requeues or cancels it", "+".join(names), state)
            sys.exit(EXIT_INTERRUPTED)
        why = "preemption (SIGTERM)"
    if cancelled(job_id):
        # `scontrol requeue` also takes a finished job: requeueing one that was cancelled while it stopped would
        # bring it back PENDING after `kolora cancel` / scancel emptied the queue.
        log.warning("stage checkpointed after %s, but job %s was cancelled meanwhile: not requeued", why, job_id)
        sys.exit(EXIT_INTERRUPTED)
    ok = requeue(job_id)
    log.warning("stage checkpointed after %s; %s job %s", why, "requeued" if ok else "could not requeue", job_id)
    sys.exit(EXIT_INTERRUPTED)
