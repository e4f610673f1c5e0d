"""Stop requests: a signal handler only sets a flag; the training loop checkpoints at the next step
boundary and the stage raises `Interrupted`, which the launcher turns into a requeue.

In a command run from a terminal (`kolora run`, `kolora sweep` in process: `for_command`) Ctrl-C is a stop
request too: it says so at once, the stage stops at its next safe point (a stage without one finishes first)
and a second Ctrl-C raises `StopNow` wherever the process is.

Kept free of heavy imports: the launcher's job wrapper installs the handlers before the stage imports torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

_requested: str | None = None
_stopping_now = False
_running: tuple[str, bool] | None = None  # (stage, stops part-way) while `running` says so, for Ctrl-C's answer
_owner: int | None = None  # the process that installed the handlers: a forked worker leaves signals to it


class Interrupted(Exception):
    """The stage stopped early at a consistent point (checkpoint saved / tiles written); run it again to
    continue. `stage`: the stage it stopped (set by the runner)."""

    stage: str | None = None


class StopNow(BaseException):
    """A second Ctrl-C: leave at once, wherever the process is; what is on disk stays (outputs are atomic).
    Not an Exception, so no `except Exception` of a stage or library takes it for a failure of its own, and not
    a KeyboardInterrupt, which Lightning turns into `sys.exit(1)`."""

    stage: str | None = None
    kept: str | None = None  # what the run has on disk, for the message (set by the runner)


def request(reason: str) -> None:
    global _requested
    _requested = reason


def requested() -> str | None:
    return _requested


def clear() -> None:
    global _requested
    _requested = None


@contextlib.contextmanager
def handle(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Route `signals` to `request()` for the duration of the block (main thread only; elsewhere a no-op).

    The Slurm job wrapper starts this process with the stop signals *blocked* (launch.supervise), so that one
    arriving while Python is still importing stays pending instead of killing it: they are unblocked here,
    once the handler is in place, and a pending one is delivered to it at that moment."""
    global _owner
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in signals}
    owner, _owner = _owner, os.getpid()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _owner = owner


@contextlib.contextmanager
def for_command() -> Iterator[None]:
    """A whole command run from a terminal or an interactive allocation: Ctrl-C (SIGINT) requests a stop like
    the stop signals, and a second one stops at once. Starts and ends with no stop requested, so that commands
    run one after another in one process (a sweep's variants, tests) do not inherit one.

    Not for Slurm jobs (launch.child): there SIGINT keeps its default, as the host process forwards only the
    stop signals. A SIGINT this process was started ignoring (a background job of a shell script) stays ignored,
    as the shell meant: the terminal's Ctrl-C is for the script's foreground job."""
    global _stopping_now
    clear()
    _stopping_now = False
    ctrl_c = () if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else (signal.SIGINT,)
    try:
        with handle((*STOP_SIGNALS, *ctrl_c)):
            yield
    finally:
        clear()
        _stopping_now = False


@contextlib.contextmanager
def running(stage: str, stops_part_way: bool) -> Iterator[None]:
    """Name the stage running now, for what Ctrl-C answers (whether it will stop part-way or after it)."""
    global _running
    before, _running = _running, (stage, stops_part_way)
    try:
        yield
    finally:
        _running = before


def _on_signal(signum: int, frame) -> None:
    global _stopping_now
    if os.getpid() != _owner or _stopping_now:  # a forked worker (its parent decides), or already leaving
        return
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and _requested is not None:
        _stopping_now = True  # what runs from here on (a stage's cleanup, the run lock's release) is not cut
        raise StopNow(f"{name} while stopping on {_requested}")
    if signum == signal.SIGINT:
        if _running is None:
            where = "stopping before the next stage"
        elif _running[1]:
            where = f"stopping {_running[0]} at its next safe point"
        else:
            where = f"{_running[0]} cannot stop part-way: stopping once it finishes"
        _say(f"Ctrl-C: {where} (Ctrl-C again to stop at once)")
    request(name)


def _say(line: str) -> None:
    # os.write, not print: a handler that interrupted a write to sys.stderr must not write to it again
    with contextlib.suppress(OSError):
        os.write(2, f"\nkolora: {line}\n".encode())


WORKER_BLOCKED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def shield_worker(_worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: the stop signals stay blocked in it. Slurm signals every process
    of a step (preemption, scancel, the time limit) and a terminal's Ctrl-C reaches the whole process group;
    torch's worker dies on a SIGTERM not sent by its parent, and the training with it ("DataLoader worker
    killed") instead of checkpointing. The training process alone decides when to stop; its workers end
    with it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_BLOCKED)
