"""What runs inside each Slurm job: load the frozen config and call `kolora.pipeline.runner.run_stage` for the job's stages.

submitit pickles a `StageJob` (plain values only) and calls it in the job, once per array task for render
(`task_index`) and once per srun task for a DDP train job. It is a submitit `Checkpointable` whose checkpoint
is "run the same call again": every stage resumes from what it already wrote (train from its last checkpoint,
render only the missing tiles), so a requeued job continues where the previous attempt stopped.

Nothing here imports torch or the stage modules at import time: the job's first action is to set the
hub-offline environment, before any library that might download is imported.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.core.config import load_config
from kolora.core.interrupt import Interrupted, requested
from kolora.core.offline import OFFLINE_ENV
from kolora.core.rundir import RunDir, atomic_write_text, file_lock
from kolora.core.runlock import RunLocked, job_heartbeat
from kolora.launch.cluster import JOBS
from kolora.launch.container import ContainerConfig, exec_argv, forward_env
from kolora.launch.monitor import still_queued
from kolora.launch.supervise import JobFailed, job_end_time, slurm_job_id, supervise
from kolora.pipeline import runner
from kolora.pipeline.keys import Keys, is_complete, progress
from kolora.pipeline.registry import NAMES, get
from kolora.sweep.index import refresh_for_run
from kolora.train.distributed import free_port, rendezvous_host

# torch: imported in the functions that use them (a login node's CLI starts without them)

log = logging.getLogger("kolora.launch")


def job_environment(run_root: Path, hf_home: Path | None = None, modelscope_cache: Path | None = None,
                    extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every job: the profile's extra variables, library caches (default: inside the run
    directory) and, last so that nothing turns them off, the hub-offline variables: no downloads on a
    compute node."""

    env = dict(extra or {})
    env["HF_HOME"] = str(hf_home or Path(run_root) / ".hf_home")
    env["MODELSCOPE_CACHE"] = str(modelscope_cache or Path(run_root) / ".modelscope")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.update(OFFLINE_ENV)
    return env


def _setup_logging() -> None:
    if not logging.getLogger().handlers:  # before Lightning is imported, so that it logs through us
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "filelock", "fsspec", "PIL", "matplotlib", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _process_group(rank: int) -> dict[str, Any] | None:
    """The DDP process group Lightning left initialized (it stays up until exit), as proof that this rank
    trained together with the others."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        log.warning("train rank %d: no torch.distributed process group after training", rank)
        return None
    info = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "rank": dist.get_rank()}
    log.info("train rank %d: DDP process group %s, rank %d of world %d", rank, info["backend"], info["rank"],
             info["world_size"])
    return info


@dataclass(frozen=True)
class Decision:
    """Rank 0's word to the other ranks of a DDP job before a stage, written to the stage's go file as JSON:
    `action` run / skip / stop / fail; for train's run also the rendezvous `port` and `resume_step`, the
    checkpoint step every rank resumes from (0: from the start). A go file written before the JSON format
    ("run 12345") still reads: without a resume_step each rank finds the newest checkpoint itself."""

    action: str
    port: int | None = None
    resume_step: int | None = None

    ACTIONS = ("run", "skip", "stop", "fail")

    def __post_init__(self) -> None:
        if self.action not in self.ACTIONS:
            raise ValueError(f"unknown decision {self.action!r} (expected one of {', '.join(self.ACTIONS)})")

    def dumps(self) -> str:
        fields = {"action": self.action, "port": self.port, "resume_step": self.resume_step}
        return json.dumps({k: v for k, v in fields.items() if v is not None}) + "\n"

    @classmethod
    def parse(cls, text: str, source: Path | str = "go file") -> Decision:
        try:
            if text.lstrip().startswith("{"):
                data = json.loads(text)
                return cls(data["action"], data.get("port"), data.get("resume_step"))
            action, *port = text.split()  # the format before JSON: "ACTION [PORT]"
            return cls(action, int(port[0]) if port else None)
        except (ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"{source}: not a decision of rank 0 ({e}): {text[:200]!r}") from None


class StageJob:
    """One job of a submission: `stages` in order (a render array task: its share of the tiles).

    Called by submitit in the job (`__call__`, host side): it supervises a child process that runs the
    stages (`run_here`), owning signals and requeue (launch.supervise)."""

    def __init__(self, run_root: str, config_file: str, folder: str, stamp: str, job: str,
                 stages: tuple[str, ...], task_count: int = 1, tasks_per_node: int = 1, nodes: int = 1,
                 env: dict[str, str] | None = None, time_limit_s: int = 3600, signal_lead_s: int = 120,
                 max_requeues: int = 10, container: dict[str, Any] | None = None,
                 binds: list[str] | None = None, python: list[str] | None = None):
        self.run_root = run_root
        self.config_file = config_file  # the submission's frozen copy: the job runs exactly what was submitted
        self.folder = folder
        self.stamp = stamp
        self.job = job
        self.stages = tuple(stages)
        self.task_count = task_count
        self.tasks_per_node = tasks_per_node
        self.nodes = nodes  # as submitted: a node range's MAX (the global batch is planned for it)
        self.env = dict(env or {})
        self.time_limit_s = time_limit_s
        self.signal_lead_s = signal_lead_s
        self.max_requeues = max_requeues
        self.container = container  # a profile's `container:` section (plain dict), or None
        self.binds = list(binds or [])  # host folders the stage needs inside the container
        # The stage's interpreter: this Python on the host, the image's `python` in a container.
        self.python = list(python or (["python"] if container else [sys.executable]))

    def spec(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}

    @property
    def nodes_now(self) -> int:
        """The nodes this attempt of the job runs on, as Slurm allocated them: a `nodes: MIN-MAX` job (or one
        requeued after a node failure) may get fewer than it asked for. The submitted count outside Slurm."""
        value = os.environ.get("SLURM_JOB_NUM_NODES", "").strip()
        return int(value) if value.isdigit() and int(value) >= 1 else self.nodes

    @property
    def world(self) -> int:
        """The processes of this attempt: one per GPU (task) of each node it got."""
        return self.tasks_per_node * self.nodes_now

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _planned(self) -> dict[str, Any]:
        """What a DDP stage needs to know when this attempt got fewer nodes than the job's MAX: the world its
        global batch is planned for (kolora.train accumulates the difference)."""
        planned = self.tasks_per_node * self.nodes
        return {"planned_world": planned} if planned != self.world else {}

    def __call__(self, task_index: int = 0) -> dict[str, Any]:


        os.environ.update(self.env)
        _setup_logging()
        rank = int(os.environ.get("SLURM_PROCID", "0")) if self.distributed else 0
        try:
            # the run lock is this submission's (a `kolora run` started meanwhile makes the job fail, naming it);
            # its heartbeat shows the jobs are alive
            with job_heartbeat(self.run_root, self.stamp, queued=still_queued):
                return supervise(self.child_command(task_index), signal_lead_s=self.signal_lead_s,
                                 max_requeues=self.max_requeues, counter=Path(self.run_root) / "slurm" / "timeouts.json",
                                 key=f"{self.stamp}/{self.job}/{task_index}", rank=rank, env=self.env,
                                 result_dir=Path(self.folder), end_time=job_end_time(slurm_job_id()),
                                 progress=functools.partial(progress, RunDir(self.run_root)),
                                 attempts=Path(self.run_root) / "slurm" / "attempts.jsonl")
        except (JobFailed, RunLocked):
            if rank == 0:
                self._cancel_downstream()
            raise

    def child_command(self, task_index: int, environ: dict[str, str] | None = None) -> list[str]:
        """The stage process's argument list (the result file is appended by supervise): plain Python, or
        `apptainer exec` with the run's binds, the job's environment and the Slurm variables Lightning reads."""

        command = [*self.python, "-m", "kolora.launch.child", json.dumps(self.spec()), str(task_index)]
        if not self.container:
            return command
        container = ContainerConfig.model_validate(self.container)
        # what the profile sets explicitly (container.env) wins over what the host happens to have
        forwarded = {name: value for name, value in
                     forward_env(environ, container.forward_env_prefixes.prefixes()).items()
                     if name not in container.env}
        return exec_argv(container, binds=self.binds, workdir=self.run_root, env={**self.env, **forwarded},
                         command=command)

    def run_here(self, task_index: int = 0) -> dict[str, Any]:
        """The stages themselves (in the child process)."""
        os.environ.update(self.env)
        _setup_logging()

        rank = int(os.environ.get("SLURM_PROCID", "0")) if self.distributed else 0
        if self.distributed and "MASTER_ADDR" not in self.env:
            # one inherited from the submitting shell would be wrong here: every rank meets on the job's first node
            host = rendezvous_host(os.environ)
            if host:
                os.environ["MASTER_ADDR"] = host
            else:
                os.environ.pop("MASTER_ADDR", None)
        log.info("kolora job %s (stages %s, task %d/%d, rank %d on %s) run %s; HF_HOME=%s HF_HUB_OFFLINE=%s",
                 self.job, "+".join(self.stages), task_index, self.task_count, rank, socket.gethostname(),
                 self.run_root, os.environ.get("HF_HOME"), os.environ.get("HF_HUB_OFFLINE"))
        run = RunDir(self.run_root)
        try:
            cfg = load_config(self.config_file)
            if self.distributed and rank > 0:
                return self._follow(cfg, run, rank)
            return self._run(cfg, run, task_index)
        except Interrupted:
            # a stop request (preemption/time limit) at a consistent point: not a failure, so the later jobs
            # stay queued; the host requeues this job.
            raise

    # ------------------------------------------------------------------------------------------------------
    def _run(self, cfg, run, task_index: int) -> dict[str, Any]:

        results: dict[str, Any] = {}
        for stage in self.stages:
            s = get(stage)
            placement: dict[str, Any] = {}
            if s.parallel == "tasks" or (s.parallel == "shards" and self.task_count > 1):
                placement = {"shard": task_index, "shards": self.task_count}
            if s.parallel == "shards" and self.task_count > 1:
                results[stage] = self._run_shared(stage, cfg, run, placement)
                continue
            try:
                if s.parallel in ("ranks", "ddp") and self.distributed:
                    placement = {"rank": 0, "world": self.world, "devices": self.tasks_per_node,
                                 "nodes": self.nodes_now, "extra": self._release_followers(cfg, run, stage)}
                    if s.parallel == "ddp":
                        placement["extra"].update(self._planned())
                elif s.parallel == "ddp" and self._planned():  # one process left of a node range: no DDP
                    placement = {"extra": self._planned()}
                results[stage] = summary = runner.run_stage(stage, cfg, run, **placement)
            except Exception as e:
                if self.distributed:  # the other ranks wait for rank 0's word on what it has not decided yet
                    word = Decision("stop" if isinstance(e, Interrupted) else "fail")
                    for later in self.stages:
                        if get(later).parallel in ("ranks", "ddp"):
                            self._decide(later, word, overwrite=False)
                raise
            log.info("stage %s: %s", stage, "complete, skipped" if summary.get("skipped") else
                     ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict | list)))
            if s.parallel == "ddp" and self.distributed and not summary.get("skipped"):
                run.record_stage(stage, distributed=_process_group(0))
        if NAMES[-1] in self.stages:  # the job that finishes the run: the runs dir's page lists it complete
            refresh_for_run(run.root)
        return results

    def _run_shared(self, stage: str, cfg, run, placement: dict[str, Any]) -> dict[str, Any]:
        """A stage in an array of shards: its preparation of outputs made for other inputs once, before any
        shard, then every task runs its shard; a stage that makes one slice of this array (an ingest source
        read whole) runs once (the first task to take the lock; the others find it complete)."""

        sharded = get(stage).slice_count(cfg, self.task_count) > 1
        with file_lock(run.root / ".locks" / f"{stage}.lock"):
            if not sharded:
                summary = runner.run_stage(stage, cfg, run)
            else:
                keys = Keys(cfg, run)
                if not is_complete(stage, cfg, run, keys):
                    for note in runner.prepare(stage, cfg, run, keys):
                        log.warning("%s", note)
        if sharded:
            summary = runner.run_stage(stage, cfg, run, **placement)
        log.info("stage %s (task %s): %s", stage, placement.get("shard", "-") if sharded else "-", summary)
        return summary

    # DDP: rank 0 decides and prepares each stage and writes its decision to a go file (launch.jobs.Decision);
    # the other ranks wait for it and follow it, never their own stop flag: only rank 0 knows whether the stage
    # is about to start. Every rank caches its shard of the samples (rank 0 then writes the index), then all
    # join Lightning's process group in train.run (rank and world size come from Slurm's srun variables).
    # The train decision also carries the rendezvous port rank 0 found free on its node (MASTER_PORT:
    # Lightning's default, 15000 + the job id's last 4 digits, collides for two jobs on one node whose ids share
    # them) and the checkpoint step every rank resumes from, so that no rank lists the (possibly NFS-cached)
    # checkpoint folder by itself.
    def _go_file(self, stage: str = "train") -> Path:
        job_id = os.environ.get("SLURM_JOB_ID", "local")
        return Path(self.folder) / f".{stage}-go-{job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"

    def _release_followers(self, cfg, run, stage: str) -> dict[str, Any]:
        """Rank 0: decide `stage` for every rank and write the decision; returns what its own run needs of it
        (StageContext.extra). A stop requested by then (during the cache merge, say) becomes the decision: every rank stops
        here (Interrupted; rank 0's host requeues), rather than loading models and meeting in the rendezvous
        for a stage that would stop at its first step."""

        s, keys = get(stage), Keys(cfg, run)
        barrier = {"barrier": str(self._go_file(stage))} if s.parallel == "ranks" else {}
        if is_complete(stage, cfg, run, keys):  # what run_stage will decide
            self._decide(stage, Decision("skip"))
            return barrier
        # settle the outputs of other inputs now, not inside run_stage while the others already read them
        for note in runner.prepare(stage, cfg, run, keys):
            log.warning("%s", note)
        decision = Decision("run")
        if s.parallel == "ddp":

            decision = Decision("run", port=free_port(),
                                resume_step=s.resume_step(cfg, run, keys.work(stage)) if s.resume_step else None)
        if requested():  # the last moment before the other ranks commit to the stage
            self._decide(stage, Decision("stop"))
            raise Interrupted(f"rank 0: stopped ({requested()}) before {stage}; every rank stops with it")
        if decision.port is not None:
            os.environ["MASTER_PORT"] = str(decision.port)
        self._decide(stage, decision)
        return {**barrier, **({} if decision.resume_step is None else {"resume_step": decision.resume_step})}

    def _decision_file(self, stage: str) -> Path:
        # ranks meeting at a file barrier: a folder, also their barrier (kolora.cache.shards)

        return self._go_file(stage) / "decision" if get(stage).parallel == "ranks" else self._go_file(stage)

    def _decide(self, stage: str, decision: Decision, overwrite: bool = True) -> None:

        path = self._decision_file(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite or not path.is_file():
            atomic_write_text(path, decision.dumps())

    def _wait_go(self, rank: int, stage: str, poll_s: float = 1.0) -> Decision:
        """A rank > 0: rank 0's decision on `stage` (run/skip; Interrupted on stop, RuntimeError on fail).

        This rank's own stop flag does not end the wait: rank 0 got the same signal and decides for everyone
        (stop, or run and stop at the stage's first safe point). A rank 0 that dies ends the job step with it
        (srun --kill-on-bad-exit); the wait's bound, the job's time limit, only keeps a follower from waiting
        past the job when something else goes wrong."""

        go = self._decision_file(stage)
        deadline = time.monotonic() + self.time_limit_s
        told = False
        while not go.is_file():
            if requested() and not told:
                log.warning("rank %d: stop requested (%s) while waiting for rank 0's decision on %s; following "
                            "rank 0's decision", rank, requested(), stage)
                told = True
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: rank 0 did not decide {stage} within the job's time limit "
                                   f"({self.time_limit_s} s; {go})")
            time.sleep(poll_s)
        decision = Decision.parse(go.read_text(), go)
        if decision.port is not None:
            os.environ["MASTER_PORT"] = str(decision.port)
        if decision.action == "fail":
            raise RuntimeError(f"rank {rank}: rank 0 failed before {stage}; see the rank 0 log")
        if decision.action == "stop":
            raise Interrupted(f"rank {rank}: rank 0 stopped on a signal before {stage}")
        return decision

    def _follow(self, cfg, run, rank: int) -> dict[str, Any]:
        """A rank > 0: each of the job's stages that spreads over ranks, as rank 0 decided it."""

        results: dict[str, Any] = {}
        world = self.world
        for stage in self.stages:
            s = get(stage)
            if s.parallel not in ("ranks", "ddp"):
                continue
            go = self._wait_go(rank, stage)
            if go.action == "skip":
                results[stage] = {"skipped": True}
                continue
            extra: dict[str, Any] = {}
            if s.parallel == "ranks":
                extra["barrier"] = str(self._go_file(stage))
            else:
                extra.update(self._planned())
                if go.resume_step is not None:  # rank 0's checkpoint, not this rank's view of the folder
                    extra["resume_step"] = go.resume_step
            # only rank 0 records the stage (manifest, completion marker): this rank just computes
            summary = runner.run_stage(stage, cfg, run, follower=True, rank=rank, world=world, devices=self.tasks_per_node,
                                nodes=self.nodes_now, extra=extra)
            log.info("%s rank %d: %s", stage, rank,
                     {k: v for k, v in summary.items() if not isinstance(v, dict | list)})
            if s.parallel == "ddp":
                _process_group(rank)
            results[stage] = summary
        return results

    def _cancel_downstream(self) -> None:

        try:
            sub = RunDir(self.run_root).read_manifest()["slurm"]["submissions"][self.stamp]
            order = list(JOBS)
            later = order[order.index(self.job) + 1:]
            ids = [sub["jobs"][j]["job_id"] for j in later if j in sub.get("jobs", {})]
            if ids:
                log.info("cancelling the jobs after %s: %s", self.job, " ".join(ids))
                subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)
        except (KeyError, OSError, ValueError, subprocess.SubprocessError) as e:
            log.warning("could not cancel the downstream jobs: %s", e)
