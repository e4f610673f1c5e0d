"""The run lock: one writer of a run directory at a time, also on NFS and Lustre where flock cannot be trusted.

`<run>/.lock` is created with O_CREAT|O_EXCL (atomic there) and names its owner in JSON: kind ("run": an
in-process `kolora run`; "submission": `kolora submit`), host, pid, user, started, heartbeat (Unix time, refreshed
by a thread while held) and, for a submission, its stamp and Slurm job ids. A submission hands its lock to its
jobs (`claim_for_submission`): it stays after `kolora submit` returns, the jobs refresh it (`job_heartbeat`).
A lock whose owner is certainly gone (see stale_reason) is renamed aside by one breaker at a time, then taken.

kolora.pipeline.state reads what a run is doing from its manifest and this lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from kolora.core.errors import InputError
from kolora.core.rundir import RunDir, RunError, atomic_write_json, fsync_dir

LOCK = ".lock"
log = logging.getLogger("kolora.core.runlock")
_writing = threading.Lock()  # one read-modify-write of a lock file at a time in this process (heartbeat vs claim)
Info = dict[str, Any]


class RunLocked(InputError):
    """The run directory is being written by another `kolora run` or by a live submission."""


def _owner(kind: str, stamp: str | None = None, job_ids: Iterable[str] = ()) -> Info:
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())  # no passwd lookup: containers
    info = {"kind": kind, "host": socket.gethostname(), "pid": os.getpid(), "user": user,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "heartbeat": time.time(),
            "token": secrets.token_hex(8)}  # tells this holder from a later one with the same pid
    if kind == "submission":
        info.update(stamp=stamp, job_ids=[str(j) for j in job_ids])
    return info


def read_lock(path: Path) -> tuple[bytes, Info] | None:
    """(raw bytes, owner) of the lock or None; a lock being written or damaged: its file time as heartbeat."""
    try:
        raw, mtime = path.read_bytes(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    with contextlib.suppress(ValueError):
        if isinstance(info := json.loads(raw), dict):
            return raw, info
    return raw, {"damaged": True, "heartbeat": mtime}


def process_alive(pid: Any) -> bool:
    """False only when process `pid` certainly does not exist on this host."""
    try:
        os.kill(pid, 0)  # signal 0: only asks
    except ProcessLookupError:
        return not (isinstance(pid, int) and pid > 0)
    except (OSError, TypeError, OverflowError):  # EPERM: alive, another user's; no pid: the heartbeat decides
        pass
    return True


# Which of these Slurm job ids are queued or running (None: the queue does not answer). Only the launcher
# knows Slurm: it hands its squeue reader (kolora.launch.monitor.still_queued) to the functions below.
Queued = Callable[[list[str]], "set[str] | None"]


def unknown_queue(ids: list[str]) -> set[str] | None:
    """Without a launcher: nothing is known of any job (the lock's heartbeat decides)."""
    return None


def lock_job_ids(info: Info) -> list[str]:
    """The Slurm jobs a submission's lock was handed to ([] for a `kolora run`)."""
    return [str(j) for j in info.get("job_ids") or []] if info.get("kind") == "submission" else []


def stale_reason(info: Info, stale_after_s: float = 300, queued: Queued = unknown_queue) -> str | None:
    """Why the lock `info` may be broken, or None while its owner may still be alive. A submission with jobs is
    judged by its jobs, not by the pid of `kolora submit` (gone by design)."""
    ids = lock_job_ids(info)
    return stale_given(info, stale_after_s, queued(ids) if ids else None)


def stale_given(info: Info, stale_after_s: float, queued: set[str] | None) -> str | None:
    """stale_reason, given which of the lock's jobs squeue lists (None: squeue did not answer, or no jobs)."""
    if ids := lock_job_ids(info):
        if queued is not None:  # else squeue does not answer: the heartbeat decides
            return None if queued else f"none of its Slurm jobs ({' '.join(ids)}) is queued or running"
    elif info.get("host") == socket.gethostname() and not process_alive(info.get("pid")):
        return f"process {info.get('pid')} on {info.get('host')} has ended"
    heartbeat = info.get("heartbeat")
    age = time.time() - heartbeat if isinstance(heartbeat, int | float) else float("inf")
    return f"no heartbeat for {age:.0f} s" if age > stale_after_s else None


def describe(info: Info) -> str:
    """Who holds a lock, in words."""
    if info.get("damaged"):
        return "an unknown writer (the lock file is not valid JSON: being written, or damaged)"
    where = f"pid {info.get('pid')} on host {info.get('host')}, user {info.get('user')}, started {info.get('started')}"
    if isinstance(heartbeat := info.get("heartbeat"), int | float):
        where += f", last heartbeat {max(time.time() - heartbeat, 0):.0f} s ago"
    if info.get("kind") != "submission":
        return f"`kolora run` ({where})"
    ids = info.get("job_ids")
    return f"submission {info.get('stamp')} " + (f"(Slurm jobs {' '.join(map(str, ids))})" if ids
                                                else f"(being queued by {where})")


def _create(path: Path, owner: Info) -> bool:
    """The O_EXCL creation that decides who holds the lock: True when this call created it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**owner, "heartbeat": time.time()}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written lock left behind (a full disk)
        raise
    fsync_dir(path.parent)
    return True


def _break(path: Path, found: tuple[bytes, Info], owner: Info, reason: str) -> bool:
    """Rename the stale lock `found` aside if it still is what was judged, O_EXCL-create `owner`'s, delete the old
    one; True when `owner`'s was created. One breaker at a time (.lock.breaking, O_EXCL too): a breaker that
    judged an old lock must not set a new owner's aside."""
    breaking = path.with_name(f"{LOCK}.breaking")
    if not _create(breaking, {"pid": os.getpid(), "host": socket.gethostname()}):
        with contextlib.suppress(OSError):  # breaking takes milliseconds: an old one's breaker was killed
            if time.time() - breaking.stat().st_mtime > 30:
                breaking.unlink()
        time.sleep(0.02)
        return False
    try:
        if read_lock(path) != found:
            return False  # changed meanwhile: judge it again
        os.rename(path, moved := path.with_name(f"{LOCK}.stale-{secrets.token_hex(4)}"))
        log.warning("run %s: broke a stale lock of %s (%s)", path.parent.name, describe(found[1]), reason)
        created = _create(path, owner)
        moved.unlink(missing_ok=True)
        return created
    except FileNotFoundError:  # released by its owner meanwhile
        return False
    finally:
        breaking.unlink(missing_ok=True)


def _take(path: Path, owner: Info, stale_after_s: float, mine: Callable[[Info], bool] = lambda info: False,
          queued: Queued = unknown_queue) -> bool:
    """Create the lock as `owner` (True), find it ours already (False), break a stale one, or RunLocked."""
    for attempt in range(100):
        if _create(path, owner):
            return True
        if (found := read_lock(path)) is None:
            continue  # released or broken meanwhile: try again
        if mine(info := found[1]):
            return False
        if (reason := stale_reason(info, stale_after_s, queued)) is not None:
            if _break(path, found, owner, reason):
                return True
        elif info.get("damaged") and attempt < 20:
            time.sleep(0.05)  # its creator may be writing it: look again
        else:
            run, jobs = path.parent.name, info.get("kind") == "submission" and info.get("job_ids")
            raise RunLocked(f"run {run} is being written by {describe(info)}; " + (
                f"wait for its jobs, or `kolora cancel {run}`" if jobs else "wait for it to finish, or stop it")
                + f". If its owner is certainly gone, delete {path}")
    raise RunLocked(f"{path}: could not take the run lock (it kept changing hands); try again")


def _refresh(path: Path, mine: Callable[[Info], bool], job_ids: Iterable[str] = ()) -> Info | None:
    """A new heartbeat (and any new job ids) in the lock if it still is ours; returns the lock as found."""
    with _writing:
        found = read_lock(path)
        if found is None or not mine(info := found[1]):
            return found and found[1]
        info["heartbeat"] = time.time()
        if "job_ids" in info or job_ids:
            info["job_ids"] = sorted({*map(str, info.get("job_ids") or []), *map(str, job_ids)}, key=lambda j: (len(j), j))
        atomic_write_json(path, info)  # replacing is fine: the O_EXCL creation decided the owner
        return info


@contextlib.contextmanager
def _heartbeat(path: Path, mine: Callable[[Info], bool], retake: Callable[[], Any], every_s: float) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                if (info := _refresh(path, mine)) is None:
                    retake()  # the lock vanished (deleted by hand): its owner is alive, so take it again
                elif not mine(info):
                    return log.error("run %s: the run lock was taken over by %s", path.parent.name, describe(info))
            except RunLocked as e:
                return log.error("run %s: lost the run lock: %s", path.parent.name, e)
            except OSError as e:  # a hiccup of the file system: try again at the next beat
                log.warning("run %s: could not refresh the run lock: %s", path.parent.name, e)

    (thread := threading.Thread(target=beat, name=f"kolora-lock-{path.parent.name}", daemon=True)).start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def _submission(stamp: str | None) -> Callable[[Info], bool]:
    return lambda info: info.get("kind") == "submission" and info.get("stamp") == stamp


@contextlib.contextmanager
def acquire(run_root: Path | str, kind: str, *, stamp: str | None = None, job_ids: Iterable[str] = (),
            heartbeat_s: float = 30, stale_after_s: float = 300, queued: Queued = unknown_queue) -> Iterator[Path]:
    """Hold the run lock of `run_root` (yields the lock file) or raise RunLocked. On exit the lock is deleted
    if it still is ours, unless it was handed to a submission's jobs (claim_for_submission, or job_ids here)."""
    assert kind in ("run", "submission"), kind
    root = Path(run_root)
    if root.exists() and not root.is_dir():
        raise RunError(f"{root} is a file, not a run folder; move it away or choose another --name")
    root.mkdir(parents=True, exist_ok=True)
    path, owner = root / LOCK, _owner(kind, stamp, job_ids)
    # a submission is known by its stamp (also after claim_for_submission), a `kolora run` by its token
    mine = _submission(stamp) if kind == "submission" and stamp else lambda info: info.get("token") == owner["token"]
    _take(path, owner, stale_after_s, queued=queued)
    try:
        with _heartbeat(path, mine, lambda: _take(path, owner, stale_after_s, mine, queued), heartbeat_s):
            yield path
    finally:
        with _writing:
            if (found := read_lock(path)) is not None and mine(found[1]) and not found[1].get("job_ids"):
                path.unlink(missing_ok=True)


def claim_for_submission(run_root: Path | str, stamp: str, job_ids: Iterable[str], stale_after_s: float = 300,
                         queued: Queued = unknown_queue) -> None:
    """Hand the run lock to submission `stamp` and its queued jobs: it stays in place after `kolora submit`
    (acquire's exit keeps it) and lapses when none of the jobs is queued or running."""
    path, ids = Path(run_root) / LOCK, [str(j) for j in job_ids]
    if not _take(path, _owner("submission", stamp, ids), stale_after_s, _submission(stamp), queued):
        _refresh(path, _submission(stamp), ids)


@contextlib.contextmanager
def job_heartbeat(run_root: Path | str, stamp: str, *, heartbeat_s: float = 30, stale_after_s: float = 300,
                  queued: Queued = unknown_queue) -> Iterator[Path]:
    """In a Slurm job of submission `stamp`: check the run lock is the submission's (re-created if missing;
    RunLocked when a live `kolora run` or another live submission holds it) and refresh its heartbeat while
    the job runs. The lock stays on exit: the submission's later jobs still need it."""
    ids = [os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or ""]  # this job's own
    with contextlib.suppress(InputError, KeyError, TypeError, AttributeError):  # and the others, if recorded
        ids += [str(j["job_id"]) for j in RunDir(run_root).read_manifest()["slurm"]["submissions"][stamp]["jobs"].values()]
    path, mine, owner = Path(run_root) / LOCK, _submission(stamp), _owner("submission", stamp, dict.fromkeys(filter(None, ids)))
    if not _take(path, owner, stale_after_s, mine, queued):
        _refresh(path, mine, owner["job_ids"])
    with _heartbeat(path, mine, lambda: _take(path, owner, stale_after_s, mine, queued), heartbeat_s):
        yield path


# ---- what a run is doing ---------------------------------------------------------------------------------
