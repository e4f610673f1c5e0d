"""Stop requests: a signal handler only sets a flag; the training loop checkpoints at the next step
boundary and the stage raises `Interrupted`, which the launcher turns into a requeue.

Kept free of heavy imports: the launcher's job wrapper installs the handlers before the stage imports torch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_requested: str | None = None


class Interrupted(Exception):
    """The stage stopped early at a consistent point (checkpoint saved / tiles written); run it again to
    continue."""


def request(reason: str) -> None:
    global _requested
    _requested = reason


def requested() -> str | None:
    return _requested


def clear() -> None:
    global _requested
    _requested = None


@contextlib.contextmanager
def handle(signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> Iterator[None]:
    """Route `signals` to `request()` for the duration of the block (main thread only; elsewhere a no-op).

    The Slurm job wrapper starts this process with the stop signals *blocked* (launch.supervise), so that one
    arriving while Python is still importing stays pending instead of killing it: they are unblocked here,
    once the handler is in place, and a pending one is delivered to it at that moment."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in signals:
        previous[s] = signal.signal(s, lambda signum, frame: request(signal.Signals(signum).name))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


WORKER_BLOCKED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def shield_worker(_worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: the stop signals stay blocked in it. Slurm signals every process
    of a step (preemption, scancel, the time limit) and a terminal's Ctrl-C reaches the whole process group;
    torch's worker dies on a SIGTERM not sent by its parent, and the training with it ("DataLoader worker
    killed") instead of checkpointing. The training process alone decides when to stop; its workers end
    with it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_BLOCKED)
