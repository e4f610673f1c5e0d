"""What the cluster itself allows, asked of Slurm before anything is queued (`submit`, its --dry-run, `resume`,
`sweep --cluster`, `validate --cluster`): the partitions it has (sinfo) and its largest job array
(`scontrol show config`: MaxArraySize). sbatch would refuse either only at queueing time, after the jobs
before it in the graph were queued. A client that is missing or does not answer skips the partition check
and leaves the array check at Slurm's default limit.
"""

from __future__ import annotations

import math
import re

from kolora.core.config import ExperimentConfig
from kolora.core.errors import ConfigError
from kolora.launch.cluster import JOBS, ClusterProfile
from kolora.launch.monitor import slurm_client
from kolora.launch.plan import JobPlan, plan_jobs

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize: array indices 0-1000
CLIENT_TIMEOUT_S = 10


def max_array_size() -> tuple[int, bool]:
    """(MaxArraySize, whether Slurm said so): an array's task indices run up to MaxArraySize - 1."""
    proc = slurm_client(["scontrol", "show", "config"], timeout=CLIENT_TIMEOUT_S)
    if proc is not None and proc.returncode == 0:
        m = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)\s*$", proc.stdout, re.M)
        if m:
            return int(m[1]), True
    return DEFAULT_MAX_ARRAY_SIZE, False


def cluster_partitions() -> set[str] | None:
    """The cluster's partition names (hidden ones included: `--all`), None when sinfo does not answer."""
    proc = slurm_client(["sinfo", "-h", "--all", "-o", "%P"], timeout=CLIENT_TIMEOUT_S)
    if proc is None or proc.returncode != 0:
        return None
    names = {line.strip().removesuffix("*") for line in proc.stdout.splitlines() if line.strip()}
    return names or None


def partition_problems(profile: ClusterProfile, source: str, known: set[str], jobs=tuple(JOBS)) -> list[str]:
    """One line per profile field naming a partition that `known` lacks (a job may list several, a,b)."""
    unknown: dict[tuple[str, str], list[str]] = {}
    for job in jobs:
        partition = profile.resources(job).partition
        field = f"jobs.{job}.partition" if getattr(profile.jobs, job).partition else "defaults.partition"
        for name in (partition or "").split(","):
            if name and name not in known:
                unknown.setdefault((field, name), []).append(job)
    return [f"{field} in {source}: partition {name!r} (job{'s' if len(used) > 1 else ''} {', '.join(used)}) is "
            f"not a partition of this cluster, which has {', '.join(sorted(known))} (sinfo); use one of those"
            for (field, name), used in unknown.items()]


def _array_problem(plan: JobPlan, tasks: int, limit: str, source: str, allowed: int) -> str:
    if plan.job == "render":
        tiles, per_task = plan.extra_info["tiles"], plan.extra_info["tiles_per_task"]
        return (f"jobs.render.tiles_per_task in {source}: the render job would be an array of {tasks} tasks "
                f"({tiles} tiles of render.prompts, {per_task} per task), more than {limit} allows; raise "
                f"jobs.render.tiles_per_task to {math.ceil(tiles / allowed)} or more")
    return (f"filter.shards: the filter job would be an array of {tasks} tasks (one per shard), more than {limit} "
            f"allows; set filter.shards (or raise filter.shard_size) so that there are at most {allowed} shards")


def check_cluster(cfg: ExperimentConfig, profile: ClusterProfile, source: str, variants: int | None = None) -> None:
    """ConfigError naming every problem (the field, its file, the numbers and the fix). `variants`: a sweep,
    whose train job is an array of one task per variant and which has no render array of its own."""
    problems = []
    jobs = ("filter", "train", "grid") if variants else tuple(JOBS)
    known = cluster_partitions()
    if known is not None:
        problems += partition_problems(profile, source, known, jobs)
    allowed, asked = max_array_size()
    limit = (f"this cluster's MaxArraySize {allowed}" if asked else
             f"MaxArraySize {allowed} (Slurm's default: `scontrol show config` did not answer)")
    if variants:
        if variants > allowed:
            problems.append(f"--vary: the sweep's {variants} variants make its train job an array of {variants} "
                            f"tasks, more than {limit} allows; split the sweep into sweeps of at most {allowed} "
                            "variants")
    else:
        problems += [_array_problem(p, p.array_tasks, limit, source, allowed)
                     for p in plan_jobs(cfg, profile) if p.array_tasks > allowed]
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"the run does not fit the cluster ({len(problems)} problems):\n  " + "\n  ".join(problems))
