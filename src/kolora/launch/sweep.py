"""A sweep on Slurm, one submission of four jobs:

    prep (cpu): ingest + filter of the first variant
      └─ afterok: cache (gpu): the first variant's cache
           └─ afterok: train array (gpu, a task per variant, `%` throttle): the task adopts the first variant's
                ingest/filter/cache (same keys: hard links) and runs the rest of its own pipeline (train,
                render, grid and what follows), each task preempted and requeued on its own
                └─ afterany: sheet (cpu): sweep.html + sweep.png, also when a variant failed

Every job is a normal StageJob (launch.jobs) under launch.supervise, so signals, checkpoints and requeue are
exactly those of `kolora submit`. Each variant's manifest records the jobs that run its stages, so `kolora
status`, `logs`, `cancel` and `resume` work on a variant as on any run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from kolora.core.config import dump_config, load_config
from kolora.core.rundir import RunDir, atomic_write_text
from kolora.core.runlock import acquire, claim_for_submission
from kolora.launch.cluster import JOBS, ClusterProfile
from kolora.launch.jobs import StageJob
from kolora.launch.monitor import scancel, still_queued
from kolora.launch.plan import format_minutes, plan_jobs
from kolora.launch.submit import (
    LaunchError,
    check_slurm_clients,
    new_stamp,
    python_command,
    queued_jobs,
    stage_job,
)
from kolora.pipeline.registry import NAMES
from kolora.pipeline.runner import open_run
from kolora.sweep.index import refresh as refresh_index
from kolora.sweep.plan import Sweep, adopt_shared, write_manifest, write_sheet

# submitit: imported in the functions that use them (a login node's CLI starts without them)


class SweepStageJob(StageJob):
    """A variant's array task: before its stages, adopt the first variant's shared outputs (host side, file
    links only) so that ingest/filter/cache are found complete and skipped."""

    def __init__(self, *args: Any, adopt_from: str | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.adopt_from = adopt_from

    def spec(self) -> dict[str, Any]:  # the child process is a plain StageJob
        spec = super().spec()
        spec.pop("adopt_from", None)
        return spec

    def __call__(self, task_index: int = 0) -> dict[str, Any]:

        if self.adopt_from and int(os.environ.get("SLURM_PROCID", "0")) == 0:

            os.environ.update(self.env)
            adopted = adopt_shared(load_config(self.config_file), RunDir(self.run_root), RunDir(self.adopt_from))
            if adopted:
                print(f"kolora sweep: adopted {', '.join(adopted)} from {self.adopt_from}", flush=True)
        return super().__call__(task_index)


class SweepSheetJob:
    """The last job: the comparison sheet from whatever the variants finished."""

    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir

    def __call__(self) -> dict[str, str]:

        html, png = write_sheet(Path(self.sweep_dir))
        refresh_index(Path(self.sweep_dir).parent)  # the runs dir's page: the sweep's row and its variants
        return {"html": str(html), "png": str(png)}


def array_throttle(profile: ClusterProfile) -> int:
    """The train array's `%` throttle: jobs.train.array_throttle where the profile has one, else the GPU array
    throttle it gives render (jobs.render.array_throttle)."""
    own = getattr(profile.jobs.train, "array_throttle", None)
    return int(own or profile.resources("render").array_throttle)


def _params(plan, name: str, **changes: Any) -> dict[str, Any]:
    inherited = {k: v for k, v in plan.params.items() if k != "array_parallelism"}  # render's, not ours
    return {**inherited, "job_name": name, **changes}


def submit_sweep(sweep: Sweep, profile: ClusterProfile, profile_file: Path | None = None) -> dict[str, Any]:
    """Queue the sweep (the caller ran preflight on every variant). Returns the sweep manifest's slurm entry."""
    from kolora.launch.executor import RangeSlurmExecutor  # submitit: only when queueing


    check_slurm_clients()
    first = sweep.variants[0]
    plans = {p.job: p for p in plan_jobs(first.cfg, profile)}
    busy = {v.name: ids for v in sweep.variants if (ids := queued_jobs(RunDir(v.root(sweep.dir))))}
    if busy:
        raise LaunchError("variants still have jobs in the queue ("
                          + "; ".join(f"{n}: {' '.join(i)}" for n, i in busy.items())
                          + "): wait for them or `kolora cancel` them, or use another --name")
    stamp = new_stamp()
    folder = (Path(profile.job_folder) / sweep.name if profile.job_folder else sweep.dir / "slurm") / stamp
    python = python_command(profile)
    t0 = time.perf_counter()
    # the sweep's folder is a sweep (kolora.sweep.names) before any variant's folder is made in it: a submission
    # that fails below can be retried under the same name
    write_manifest(sweep, launcher="slurm")
    with contextlib.ExitStack() as locks:
        for v in sweep.variants:
            locks.enter_context(acquire(v.root(sweep.dir), "submission", stamp=stamp, queued=still_queued))
        runs = {v.name: open_run(v.cfg, sweep.dir) for v in sweep.variants}
        folder.mkdir(parents=True)
        configs = {}
        for v in sweep.variants:
            configs[v.name] = folder / f"{v.name}.yaml"
            atomic_write_text(configs[v.name], dump_config(v.cfg))
        run0 = runs[first.name]

        def job_for(plan, run, cfg, stages: tuple[str, ...], cls=StageJob, **extra):
            base = stage_job(plan, run, configs[cfg.name], folder, stamp, profile, cfg)
            kw = {k: v for k, v in vars(base).items()}
            kw.update(stages=stages, task_count=1, **extra)
            return cls(**kw)

        queued: list[str] = []
        jobs: dict[str, Any] = {}
        try:
            def submit_one(job: str, fn, params: dict[str, Any]) -> str:
                ex = RangeSlurmExecutor(folder=folder, max_num_timeout=profile.max_requeues, python=python)
                ex.update_parameters(**params)
                job_id = ex.submit(fn).job_id
                queued.append(job_id)
                jobs[job] = job_id
                return job_id

            prep = submit_one("prep", job_for(plans["filter"], run0, first.cfg, ("ingest", "filter")),
                              _params(plans["filter"], f"kolora-{sweep.name}-prep"))
            # one process: the cache stage does not use DDP, whatever the profile gives training
            cache_params = _params(plans["train"], f"kolora-{sweep.name}-cache", dependency=f"afterok:{prep}",
                                   nodes=1)
            for key in ("ntasks_per_node", "srun_args"):
                cache_params.pop(key, None)
            cache = submit_one("cache", job_for(plans["train"], run0, first.cfg, ("cache",), tasks_per_node=1,
                                                nodes=1), cache_params)

            train_time = plans["train"].resources.time_min + plans["render"].resources.time_min
            ex = RangeSlurmExecutor(folder=folder, max_num_timeout=profile.max_requeues, python=python)
            ex.update_parameters(**_params(plans["train"], f"kolora-{sweep.name}-train", time=train_time,
                                           dependency=f"afterok:{cache}", array_parallelism=array_throttle(profile)))
            with ex.batch():
                tasks = [ex.submit(job_for(plans["train"], runs[v.name], v.cfg, tuple(NAMES), SweepStageJob,
                                           time_limit_s=train_time * 60,
                                           adopt_from=str(run0.root) if v is not first else None))
                         for v in sweep.variants]
            task_ids = [t.job_id for t in tasks]
            array_id = task_ids[0].split("_")[0]
            queued.append(array_id)
            jobs["train"] = array_id
            submit_one("sheet", SweepSheetJob(str(sweep.dir)),
                       _params(plans["grid"], f"kolora-{sweep.name}-sheet", dependency=f"afterany:{array_id}"))
        except Exception as e:
            if queued:
                scancel(queued)
            detail = getattr(e, "stderr", None) or e
            raise LaunchError(f"sweep submission failed: {detail}" + (
                f"; cancelled the jobs already queued ({' '.join(queued)})" if queued else "")) from e

        seconds = round(time.perf_counter() - t0, 2)
        common = {"submitted": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "profile": profile.name,
                  "profile_file": str(profile_file) if profile_file else None, "folder": str(folder),
                  "python": python, "resume": False}
        for v, task_id in zip(sweep.variants, task_ids, strict=True):
            _record_variant(runs[v.name], stamp, {**common, "config_file": str(configs[v.name]),
                                                  "config_digest": v.cfg.digest()}, jobs, task_id, v is first)
            claim_for_submission(v.root(sweep.dir), stamp, queued, queued=still_queued)
    entry = {"stamp": stamp, **common, "submit_s": seconds, "jobs": jobs,
             "task_ids": {v.name: t for v, t in zip(sweep.variants, task_ids, strict=True)},
             "throttle": array_throttle(profile), "train_time": format_minutes(train_time)}
    write_manifest(sweep, launcher="slurm", slurm=entry)
    return entry


def _record_variant(run: RunDir, stamp: str, common: dict[str, Any], jobs: dict[str, str], task_id: str,
                    first: bool) -> None:
    """The variant's own view of the submission, in the shape `kolora submit` writes: its array task runs
    its train, render and grid (and everything after); the first variant's prep/cache jobs ran the shared
    stages (other variants adopt them inside their task)."""

    by_job = JOBS
    entry = {"job_id": task_id, "task_ids": [task_id], "array": False, "dependency": f"afterok:{jobs['cache']}"}
    view: dict[str, dict[str, Any]] = {}
    if first:
        view["filter"] = {"job_id": jobs["prep"], "task_ids": [jobs["prep"]], "stages": list(by_job["filter"]),
                          "array": False, "dependency": None}
    for job, stages in by_job.items():
        if job != "filter":
            view[job] = {**entry, "stages": list(stages)}
    with run.manifest() as m:
        slurm = m.setdefault("slurm", {})
        slurm.setdefault("submissions", {})[stamp] = {
            **common, "jobs": view, "sweep": {"name": run.root.parent.name, "jobs": jobs}}
        slurm["latest"] = stamp
        slurm["jobs"] = {job: info["job_id"] for job, info in view.items()}
