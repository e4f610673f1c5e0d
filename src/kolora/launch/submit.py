"""Queue a run's job graph with submitit: filter → train → render array → grid, each `afterok` on the one before.

`submit` checks everything first (the caller has run `pipeline.preflight`; here: Slurm clients, no jobs of
the run still queued), then queues. Job folders are fresh per submission (<run>/slurm/<stamp>/, or the
profile's job_folder): submitit reads results by job id, and a reused folder could hand back a stale one.
The job ids, folders and resources go into the run's manifest under "slurm".
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.core.config import ExperimentConfig, dump_config
from kolora.core.errors import RunFailure
from kolora.core.rundir import RunDir, atomic_write_text
from kolora.core.runlock import acquire, claim_for_submission
from kolora.launch.cluster import ClusterProfile
from kolora.launch.container import image_digest, required_binds
from kolora.launch.jobs import StageJob, job_environment
from kolora.launch.monitor import all_job_ids, scancel, squeue, still_queued
from kolora.launch.plan import JobPlan, describe, plan_jobs, sbatch_script, table
from kolora.launch.supervise import boot_command
from kolora.pipeline import runner
from kolora.pipeline.keys import Keys, is_complete

# submitit: imported in the functions that use them (a login node's CLI starts without them)


class LaunchError(RunFailure):
    """Submission refused or failed; nothing of this submission is left in the queue."""


@dataclass
class Submission:
    run: RunDir
    stamp: str
    folder: Path
    plans: list[JobPlan]
    jobs: dict[str, dict[str, Any]]
    seconds: float


def new_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def submission_folder(profile: ClusterProfile, run: RunDir, stamp: str) -> Path:
    base = Path(profile.job_folder) / run.root.name if profile.job_folder else run.slurm
    return base / stamp


def python_command(profile: ClusterProfile) -> str:
    """The job's interpreter as the shell words submitit puts in the sbatch script, started with the stop
    signals blocked until kolora's handlers are in place (launch.supervise.BOOT)."""

    return shlex.join(boot_command(list(profile.python) if profile.python else [sys.executable]))


def check_slurm_clients() -> None:
    missing = [c for c in ("sbatch", "srun", "squeue", "scancel") if shutil.which(c) is None]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not found on PATH: run `kolora submit` on a Slurm login node "
                          "(on the dev cluster: make cluster-up; source .devcluster/env.sh)")


def queued_jobs(run: RunDir) -> list[str]:
    """Job ids of this run (any submission) that Slurm still has in its queue."""

    ids = all_job_ids(run.read_manifest())
    return sorted({row["base"] for row in squeue(ids)}) if ids else []


def stage_job(plan: JobPlan, run: RunDir, config_file: Path, folder: Path, stamp: str, profile: ClusterProfile,
              cfg: ExperimentConfig, image_digest: str | None = None):

    env = job_environment(run.root, profile.hf_home, profile.modelscope_cache, profile.env)
    container, binds = None, []
    if profile.container is not None:

        container = profile.container.model_dump(mode="json")
        binds = [str(b) for b in required_binds(
            cfg, run.root, extra=[profile.hf_home, profile.modelscope_cache, folder, config_file.parent])]
        env["KOLORA_IMAGE"] = str(profile.container.image)
        if image_digest:
            env["KOLORA_IMAGE_DIGEST"] = image_digest
    return StageJob(run_root=str(run.root), config_file=str(config_file), folder=str(folder), stamp=stamp,
                    container=container, binds=binds,
                    job=plan.job, stages=plan.stages, task_count=max(plan.array_tasks, 1),
                    tasks_per_node=plan.tasks_per_node, nodes=plan.resources.nodes, env=env,
                    time_limit_s=plan.resources.time_min * 60, signal_lead_s=profile.signal_lead_s,
                    max_requeues=profile.max_requeues)


def incomplete_plans(plans: list[JobPlan], cfg: ExperimentConfig, run: RunDir) -> list[JobPlan]:
    """The jobs that still have work: a job whose stages are all complete is dropped, and a job whose
    predecessor was dropped starts without a dependency."""

    keys = Keys(cfg, run)
    kept = [p for p in plans if not all(is_complete(s, cfg, run, keys) for s in p.stages)]
    names = {p.job for p in kept}
    for p in kept:
        if p.after not in names:
            p.after = None
    return kept


def submit(cfg: ExperimentConfig, profile: ClusterProfile, runs_dir: Path, profile_file: Path | None = None,
           check: bool = True, only_incomplete: bool = False) -> Submission:
    """Validate (pipeline.preflight unless check=False: the caller did), then queue the four jobs
    (`only_incomplete`: only those with work left — `kolora resume`)."""
    from kolora.launch.executor import RangeSlurmExecutor  # submitit: only when queueing


    t0 = time.perf_counter()
    if check:
        runner.preflight(cfg)
    plans = plan_jobs(cfg, profile)
    check_slurm_clients()
    run = RunDir(Path(runs_dir) / cfg.name)
    if re.search(r"[\x00-\x1f\x7f]", str(submission_folder(profile, run, "x"))):
        raise LaunchError(f"the job folder {submission_folder(profile, run, '')} has control characters in its "
                          "path: sbatch scripts cannot name it; use another --runs-dir or job_folder")
    busy = queued_jobs(run)
    if busy:
        raise LaunchError(f"run {cfg.name} still has jobs in the queue ({' '.join(busy)}): wait for them, or "
                          f"`kolora cancel {cfg.name}` first (or submit with another --name)")
    if only_incomplete:
        plans = incomplete_plans(plans, cfg, run)
        if not plans:
            raise LaunchError(f"run {cfg.name}: every stage is complete, nothing to resume ({run.grid_file})")
    stamp = new_stamp()
    # the run lock while queueing: no `kolora run` or second submission writes the run meanwhile; then it is
    # handed to the queued jobs, so that a `kolora run` is refused while they live
    with acquire(run.root, "submission", stamp=stamp, queued=still_queued):
        run = runner.open_run(cfg, runs_dir)
        folder = submission_folder(profile, run, stamp)
        folder.mkdir(parents=True)
        config_file = folder / "config.yaml"
        atomic_write_text(config_file, dump_config(cfg))
        python = python_command(profile)
        digest = None
        if profile.container is not None:

            digest = image_digest(profile.container.image) if Path(profile.container.image).is_file() else None

        queued: list[str] = []
        jobs: dict[str, dict[str, Any]] = {}
        try:
            for plan in plans:
                executor = RangeSlurmExecutor(folder=folder, max_num_timeout=profile.max_requeues, python=python)
                params = dict(plan.params)
                if plan.after:
                    params["dependency"] = f"afterok:{jobs[plan.after]['job_id']}"
                executor.update_parameters(**params)
                fn = stage_job(plan, run, config_file, folder, stamp, profile, cfg, digest)
                if plan.array_tasks:
                    submitted = executor.map_array(fn, list(range(plan.array_tasks)))
                else:
                    submitted = [executor.submit(fn)]
                job_id = submitted[0].job_id.split("_")[0]
                queued.append(job_id)
                jobs[plan.job] = {"job_id": job_id, "stages": list(plan.stages), "task_ids": [j.job_id for j in submitted],
                                  "array": bool(plan.array_tasks and len(submitted) > 1),
                                  "dependency": params.get("dependency"), "resources": describe(plan),
                                  "tasks_per_node": plan.tasks_per_node, **plan.extra_info}
        except Exception as e:
            if queued:
                scancel(queued)
            detail = getattr(e, "stderr", None) or e
            raise LaunchError(f"submission failed at job {plan.job}: {detail}"
                              + (f"; cancelled the jobs already queued ({' '.join(queued)})" if queued else "")) from e

        seconds = round(time.perf_counter() - t0, 2)
        with run.manifest() as m:
            slurm = m.setdefault("slurm", {})
            slurm.setdefault("submissions", {})[stamp] = {
                "submitted": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "profile": profile.name,
                "profile_file": str(profile_file) if profile_file else None, "folder": str(folder),
                "config_digest": cfg.digest(), "python": python, "jobs": jobs, "submit_s": seconds,
                "image": str(profile.container.image) if profile.container else None, "image_digest": digest,
                "resume": only_incomplete,
            }
            slurm["latest"] = stamp
            slurm["jobs"] = {job: info["job_id"] for job, info in jobs.items()}
        claim_for_submission(run.root, stamp, queued, queued=still_queued)
    return Submission(run=run, stamp=stamp, folder=folder, plans=plans, jobs=jobs, seconds=seconds)


def dry_run(cfg: ExperimentConfig, profile: ClusterProfile, runs_dir: Path) -> str:
    """The sbatch parameters of every job, as submitit would write them; queues nothing, writes nothing."""

    plans = plan_jobs(cfg, profile)
    run = RunDir(Path(runs_dir) / cfg.name)
    folder = submission_folder(profile, run, "STAMP")
    python = python_command(profile)
    out = [f"kolora submit --dry-run: run {cfg.name} on cluster profile {profile.name} (nothing queued)",
           f"job folder: {folder}", "", table([describe(p) for p in plans]), ""]
    for plan in plans:
        dependency = f"afterok:{plan.after.upper()}_JOB_ID" if plan.after else None
        script = sbatch_script(plan, folder, python, dependency)
        body = [line for line in script.splitlines() if line.startswith("#SBATCH") or line.strip()
                and not line.startswith(("#!", "# Parameters"))]
        out += [f"# ---- {plan.job}: {' + '.join(plan.stages)}", *body]
        job = stage_job(plan, run, folder / "config.yaml", folder, "STAMP", profile, cfg)
        out += [f"# stage process: {shlex.join(job.child_command(0, environ={}))} RESULT_FILE", ""]
    return "\n".join(out)


def format_submitted(sub: Submission) -> str:

    rows = []
    for plan in sub.plans:
        info = sub.jobs[plan.job]
        row = describe(plan)
        rows.append({"job": plan.job, "stages": row["stages"], "job id": info["job_id"] +
                     (f"_[{row['array']}]" if info["array"] else ""), "partition": row["partition"],
                     "gpus": row["gpus"], "after": (info["dependency"] or "-")})
    return "\n".join([f"run {sub.run.root.name}: queued {len(sub.jobs)} jobs (checked and queued in "
                      f"{sub.seconds:.1f} s); job folder {sub.folder}", table(rows),
                      f"follow with: kolora status {sub.run.root.name}   (kolora logs / kolora cancel)"])
