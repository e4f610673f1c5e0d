"""A run's stages in order, in this process: the one loop of `kolora run` and of every variant of an in-process
sweep. Between stages it honours a stop request (kolora.core.interrupt); each stage runs through
`runner.run_stage`. What the person running it sees is the caller's `StageDisplay` (kolora.cli.display draws
progress bars); this module only reports."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from kolora.core import interrupt
from kolora.core.config import ExperimentConfig
from kolora.core.rundir import RunDir
from kolora.pipeline import registry
from kolora.pipeline.keys import Keys, is_complete
from kolora.pipeline.keys import progress as written_so_far
from kolora.pipeline.runner import run_stage

Progress = Callable[[int, int], None]  # (done, total) units of work of the running stage


class StageDisplay(Protocol):
    def running(self, n: int, count: int, stage: str) -> AbstractContextManager[Progress]:
        """Shown while stage `n` of `count` runs; gives the stage's progress callback."""
        ...

    def finished(self, n: int, count: int, stage: str, summary: dict[str, Any]) -> None:
        """Stage `n` of `count` finished (or was complete: `skipped` in its summary)."""
        ...

    def unstopped(self, why: str, stage: str) -> None:
        """A stop request (`why`) came during the last stage, which finished: nothing was left to stop."""
        ...


def run_all(cfg: ExperimentConfig, run: RunDir, selected: tuple[str, ...], force: bool,
            display: StageDisplay) -> dict[str, dict[str, Any]]:
    """Run the `selected` stages (all when empty) in pipeline order; returns each one's summary. A stop request
    ends it before the next stage (Interrupted); a second one cuts the stage short (StopNow, which then tells
    what the run kept)."""
    stages = selected or registry.NAMES
    summaries: dict[str, dict[str, Any]] = {}
    for n, stage in enumerate(stages, 1):
        if why := interrupt.requested():  # a stage that cannot stop part-way finished first
            raise interrupt.Interrupted(f"stopped on {why} before {stage}; the stages before it are complete")
        with display.running(n, len(stages), stage) as progress, \
                interrupt.running(stage, registry.get(stage).stoppable):
            try:
                summaries[stage] = run_stage(stage, cfg, run, force=force, progress=progress)
            except interrupt.StopNow as e:
                with contextlib.suppress(Exception):  # telling what is kept must not turn the stop into an error
                    e.kept = _kept(cfg, run)
                raise
        display.finished(n, len(stages), stage, summaries[stage])
    if why := interrupt.requested():
        display.unstopped(why, stages[-1])
    return summaries


def _kept(cfg: ExperimentConfig, run: RunDir) -> str:
    """What the run has on disk for this config, in a few words (for a stop that cut a stage short)."""
    keys = Keys(cfg, run)
    complete = [s for s in registry.NAMES if is_complete(s, cfg, run, keys)]
    written = written_so_far(run)
    parts = [f"{', '.join(complete)} complete" if complete else "no stage complete"]
    if written["checkpoint_step"] is not None:
        parts.append(f"newest checkpoint step {written['checkpoint_step']}")
    if written["tiles"]:
        parts.append(f"{written['tiles']} tiles")
    return "; ".join(parts)
