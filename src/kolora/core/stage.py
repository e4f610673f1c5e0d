"""The stage contract: what a stage declares about itself, and what the runner hands it when it runs.

Each stage package declares its `Stage` values in its own `stage.py` (light: no torch at import time, so the
registry loads on a login node); `kolora.pipeline.registry` lists them in pipeline order. A stage never imports
the pipeline: its key, shard or rank and progress callback arrive in a `StageContext`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kolora.core.config import ExperimentConfig
    from kolora.core.rundir import RunDir

# How a stage spreads over processes; the launcher dispatches on this, never on a stage's name.
#   none   one process
#   tasks  array tasks, each doing its own part independently (render: its share of the tiles)
#   shards array tasks, each doing a slice, merged when every slice is done; outputs made for other inputs are
#          set aside once, before any slice runs (ingest, filter)
#   ranks  every rank of a GPU job takes part (cache: a file barrier; train: a DDP process group)
# The model enters a key as one fingerprint of all its files (kolora.models.fingerprint), never by its paths.
MODEL_FIELDS = ("model.path", "model.layout", "model.variant", "model.vae_path", "model.tokenizer_path",
                "model.unet_config", "model.vae_config")

Parallel = Literal["none", "tasks", "shards", "ranks"]


@dataclass(frozen=True)
class StageContext:
    """What the runner hands a stage's entry point."""

    cfg: ExperimentConfig
    run: RunDir
    key: str | None = None  # the stage's work key (what its checkpoints and shard folders are named by)
    shard: int | None = None  # this array task's index (tasks/shards), None when not part of an array
    shards: int | None = None  # the array's size as planned at submission
    rank: int = 0  # ranks/ddp: this process's global rank, and the number of ranks
    world: int = 1
    devices: int = 1  # ranks/ddp: GPUs per node and nodes
    nodes: int = 1
    progress: Callable[..., Any] | None = None  # progress(done, total, what) for a display; None when headless
    force: bool = False  # --force: run again even when complete (a stage may give it more meaning)
    extra: dict[str, Any] = field(default_factory=dict)  # launcher-decided values: resume_step, barrier


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function" taking a StageContext, imported only when the stage runs
    runs_on: Literal["cpu", "gpu"]
    parallel: Parallel
    after: tuple[str, ...]  # stages whose outputs it reads: their keys enter its key
    inputs: tuple[str, ...]  # config fields whose values enter its key
    content: tuple[str, ...]  # path fields whose files enter its key by content fingerprint
    outputs: tuple[str, ...]  # what it owns in the run directory
    # Its outputs are on disk (given a matching marker); `complete(stage)` asks about another stage.
    done: Callable[[ExperimentConfig, RunDir, Callable[[str], bool]], bool]
    stoppable: bool  # stops cleanly between units of work on a stop signal (the job is requeued)
    # What happens to outputs made for other inputs: "replace" = set aside, dropped once the stage succeeds
    # (put back if it fails); "keep" = moved to superseded/<stage>-<key>/ and kept (GPU hours); "keyed" =
    # outputs are named by their own key, nothing is stale by name (render tiles).
    on_change: Literal["replace", "keep", "keyed"] = "replace"
    continues: tuple[str, ...] = ()  # fields in the output's key but not in its checkpoints' (resume extends)
    keeps_partial: bool = False  # a failed attempt's partial work (checkpoints, tiles, shards) stays for the rerun
    # Key material beyond fields and files, e.g. render's tile keys (None inside = cannot be known yet).
    extra_key: Callable[[ExperimentConfig, RunDir], dict[str, Any]] | None = None
    extra_key_note: str = ""  # what extra_key adds, in words (the README's rerun table)
    # shards: how many slices it makes of an array of n tasks (ingest reads some sources whole: 1).
    slices: Callable[[ExperimentConfig, int], int] | None = None
    # ddp: the checkpoint step every rank resumes from, decided once by rank 0 (given the stage's work key).
    resume_step: Callable[[ExperimentConfig, RunDir, str], int | None] | None = None
    # its outputs may be adopted by another run whose key for it is the same (a sweep's variants share them)
    shareable: bool = False
    # keyed: removes outputs no longer wanted once every wanted one exists; returns how many
    prune: Callable[[ExperimentConfig, RunDir], int] | None = None

    def load(self) -> Callable[[StageContext], dict[str, Any]]:
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)

    def slice_count(self, cfg: ExperimentConfig, tasks: int) -> int:
        return self.slices(cfg, tasks) if self.slices else tasks


def file_exists(rel: str) -> Callable[[Any, Any, Any], bool]:
    """A completeness check: this file of the run directory is there."""
    return lambda cfg, run, complete: (run.root / rel).is_file()
