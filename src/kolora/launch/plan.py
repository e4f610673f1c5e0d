"""Stage graph + cluster profile → what each Slurm job asks for. Pure: no Slurm, no submitit executor.

The same JobPlan feeds `kolora submit` (executor.update_parameters(**plan.params)) and `--dry-run`
(submitit's own sbatch writer on the same parameters), so what --dry-run prints is what gets queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolora.core.config import ExperimentConfig
from kolora.core.prompts import load_prompts
from kolora.filter import shards as filter_shards
from kolora.launch import memplan
from kolora.launch.cluster import JOBS, ClusterProfile, ResolvedResources, job_of
from kolora.launch.memplan import GPU_STAGES
from kolora.models import kolors as models
from kolora.pipeline.registry import get

# submitit: imported in the functions that use them (a login node's CLI starts without them)


@dataclass
class JobPlan:
    job: str                      # filter | train | render | grid
    stages: tuple[str, ...]       # pipeline stages it runs, in order
    params: dict[str, Any]        # SlurmExecutor parameters (the dependency is added at submit time)
    after: str | None             # the job this one waits for (afterok)
    resources: ResolvedResources
    array_tasks: int = 0          # render, sharded filter: number of array tasks (0: not an array)
    tasks_per_node: int = 1       # train: one task per GPU when it runs DDP
    extra_info: dict[str, Any] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.tasks_per_node * self.resources.nodes > 1


def job_name(run_name: str, job: str) -> str:
    return f"kolora-{run_name}-{job}"


def format_minutes(minutes: int) -> str:
    d, rest = divmod(minutes, 24 * 60)
    h, m = divmod(rest, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h}:{m:02d}:00"


def gpu_request(r: ResolvedResources, per_node: bool = False) -> dict[str, Any]:
    """The submitit parameters asking for the job's GPUs (and other gres). `per_node`: DDP asks with
    --gpus-per-node unless the profile chose gres explicitly."""
    out: dict[str, Any] = {}
    gres = [r.gres] if r.gres else []
    if r.gpus:
        typed = f"{r.gpu_type}:{r.gpus}" if r.gpu_type else str(r.gpus)
        if r.gpu_option == "gpus-per-node" or (per_node and r.gpu_option is None):
            out["gpus_per_node"] = typed if r.gpu_type else r.gpus
        else:
            gres.insert(0, f"gpu:{typed}")
    if gres:
        out["gres"] = ",".join(gres)
    return out


def render_task_count(cfg: ExperimentConfig, tiles_per_task: int) -> tuple[int, int]:
    """(tiles, array tasks): one task per `tiles_per_task` tiles (render splits them round-robin)."""

    n = len(load_prompts(cfg.render.prompts, cfg.render.negative_prompt))
    return n, max(1, math.ceil(n / tiles_per_task))


def plan_jobs(cfg: ExperimentConfig, profile: ClusterProfile) -> list[JobPlan]:
    plans: list[JobPlan] = []
    previous: str | None = None
    for job, stages in JOBS.items():
        r = profile.resources(job)
        params: dict[str, Any] = {
            "job_name": job_name(cfg.name, job), "time": r.time_min, "nodes": r.node_request, "cpus_per_task": r.cpus,
            "signal_delay_s": profile.signal_lead_s, "wckey": None,
            # a job whose dependency failed is cancelled, not left PENDING (also where the cluster's
            # DependencyParameters lacks kill_invalid_depend)
            # --requeue: kolora's host process requeues after preemption/time limit; on a site whose default
            # is JobRequeue=0, `scontrol requeue` would fail without it and the graph be cancelled
            "additional_parameters": {**r.extra, "kill-on-invalid-dep": "yes", "requeue": True},
        }
        for key in ("partition", "account", "qos", "mem", "constraint"):
            if getattr(r, key) is not None:
                params[key] = getattr(r, key)
        kinds = {get(s).parallel for s in stages}  # how the job's stages spread: it decides the job's shape
        ddp = "ddp" in kinds and (r.gpus > 1 or r.nodes > 1)
        params.update(gpu_request(r, per_node=ddp))
        if r.setup:
            params["setup"] = list(r.setup)
        plan = JobPlan(job=job, stages=stages, params=params, after=previous, resources=r)
        if ddp:
            # DDP: one task per GPU under srun (--nodes K --ntasks-per-node N --gpus-per-node N); Lightning
            # reads rank and world size from Slurm and checks ntasks-per-node = devices, nnodes = num_nodes
            # (with --nodes MIN-MAX the job's own node count: launch.jobs reads SLURM_JOB_NUM_NODES)
            plan.tasks_per_node = max(r.gpus, 1)
            params["srun_args"] = ["--kill-on-bad-exit=1"]  # one rank failing must not leave the others waiting
            if r.min_nodes < r.nodes:
                # A node range with a task count makes Slurm allocate MIN nodes (the job's task count caps its
                # node count). So the allocation asks per node only (GPUs, memory, and every task's CPUs as one
                # task's), which Slurm fills up to MAX free nodes, and srun starts the tasks of each node.
                params["cpus_per_task"] = r.cpus * plan.tasks_per_node
                params["srun_args"] += [f"--ntasks-per-node={plan.tasks_per_node}", f"--cpus-per-task={r.cpus}"]
            else:
                params["ntasks_per_node"] = plan.tasks_per_node
        shards = filter_shards.planned_count(cfg) if "shards" in kinds else 1
        if shards > 1:
            # one CPU task per shard; the task that finds every shard done merges (kolora.filter.shards)
            plan.array_tasks = shards
            # all shards at once: Slurm starts as many as the partition has CPUs for
            plan.extra_info = {"shards": shards}
            params["array_parallelism"] = shards
        if "tasks" in kinds:
            tiles, tasks = render_task_count(cfg, r.tiles_per_task)
            plan.array_tasks = tasks
            plan.extra_info = {"tiles": tiles, "tiles_per_task": r.tiles_per_task, "throttle": r.array_throttle}
            params["array_parallelism"] = r.array_throttle
        plans.append(plan)
        previous = job
    return plans


def sbatch_script(plan: JobPlan, folder: Path, python: str, dependency: str | None) -> str:
    """The sbatch script submitit writes for this job (with `dependency` as given)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(plan.params)
    if dependency:
        params["dependency"] = dependency
    map_count = plan.array_tasks if plan.array_tasks > 1 else None
    command = " ".join([python, "-u -m submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=map_count, **params)


def describe(plan: JobPlan) -> dict[str, str]:
    """One row of the --dry-run / submit table."""
    r = plan.resources
    gpus = str(r.gpus) + (f" ({r.gpu_type})" if r.gpu_type else "") if r.gpus else "0"
    if plan.array_tasks:
        throttle = min(plan.array_tasks, plan.params.get("array_parallelism", r.array_throttle))
        array = f"0-{plan.array_tasks - 1}%{throttle}" if plan.array_tasks > 1 else "1 task"
    else:
        array = "-"
    return {"job": plan.job, "stages": "+".join(plan.stages), "partition": r.partition or "(default)",
            "time": format_minutes(r.time_min), "cpus": str(r.cpus), "mem": r.mem or "(default)", "gpus": gpus,
            "nodes x tasks": f"{r.node_request}x{plan.tasks_per_node}", "array": array,
            "after": f"afterok:{plan.after}" if plan.after else "-"}


def table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(r.get(c, "").ljust(width[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)


# What an attempt of a requeued job needs before it can make progress: start Python, torch and CUDA, read the
# weights it loads, restore the checkpoint and reach the next safe point. Rough on purpose (no GPU is measured
# here): a fixed start-up plus the weights at a shared file system's pessimistic read rate.
STARTUP_FIXED_S = 60
WEIGHT_READ_MB_S = 200
LOADED_BY_JOB = {"train": ("unet",), "render": ("text_encoder", "unet", "vae")}


def _weight_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")
                   and p.is_file())
    return 0


def startup_estimate(cfg: ExperimentConfig, job: str) -> tuple[float, int]:
    """(seconds, weight bytes): what an attempt of `job` spends before its first checkpoint or tile."""
    try:
        files = models.resolve(cfg.model)
    except Exception:  # a model not built yet (tiny demo) or not found: preflight reports the latter
        return float(STARTUP_FIXED_S), 0
    size = sum(_weight_bytes(Path(getattr(files, part))) for part in LOADED_BY_JOB.get(job, ()))
    return STARTUP_FIXED_S + size / (WEIGHT_READ_MB_S * 1e6), size


def attempt_window_warnings(cfg: ExperimentConfig, profile: ClusterProfile) -> list[str]:
    """One line per requeued job whose time limit minus signal_lead_s leaves too little time to load the models
    and reach a checkpoint: such a job would be requeued again and again while making little or no progress."""
    warnings = []
    for job in LOADED_BY_JOB:
        window = profile.resources(job).time_min * 60 - profile.signal_lead_s
        need, size = startup_estimate(cfg, job)
        if window >= 2 * need:
            continue
        what = (f"jobs.{job}: time {profile.resources(job).time_min} min − signal_lead_s {profile.signal_lead_s} s "
                f"leaves {window} s per attempt; starting and loading {size / 1e9:.1f} GB of weights takes about "
                f"{need:.0f} s")
        verdict = ("so an attempt is stopped before its first checkpoint" if window < need else
                   "so most of each attempt goes to start-up")
        warnings.append(f"{what}, {verdict}. Raise jobs.{job}.time (or lower signal_lead_s) in the cluster "
                        "profile.")
    return warnings


# GPU memory: each GPU stage's estimated peak (kolora.launch.memplan) against its job's jobs.<job>.gpu_mem_gb.
def has_gpu_mem_limits(profile: ClusterProfile) -> bool:

    return any(profile.resources(job_of(s)).gpu_mem_gb is not None for s in GPU_STAGES)


def _smaller(size: int) -> int:
    return max(8, size * 3 // 4 // 8 * 8)


def _variant(cfg: ExperimentConfig, changes: dict[str, Any]) -> ExperimentConfig:
    def changed(section, path: list[str], value: Any):
        head, *rest = path
        return section.model_copy(update={head: changed(getattr(section, head), rest, value) if rest else value})

    for dotted, value in changes.items():
        cfg = changed(cfg, dotted.split("."), value)
    return cfg


def gpu_memory_remedies(cfg: ExperimentConfig, stage: str, total: float, limit: float, job: str,
                        lora_params: int = 0) -> list[str]:
    """What would bring `stage` (estimated `total` GiB) under `limit`: the config changes that help, each
    estimated, the most effective first; then a bigger GPU; then 8-bit AdamW where it alone would do."""
    t = cfg.train
    candidates: list[dict[str, Any]] = []
    if stage == "train":
        candidates += [{"train.batch_size": 1}] if t.batch_size > 1 else []
        candidates += [{"train.gradient_checkpointing": True}] if not t.gradient_checkpointing else []
        candidates += [{"train.resolution": _smaller(t.resolution)}]
        candidates += [{"train.precision": "bf16-mixed"}] if t.precision in ("32", "32-true") else []
        # the validation sample phase: its UNet batch and VAE decoder scale with the sampling size
        candidates += [{"train.validation.size": _smaller(t.validation.size or t.resolution)}] \
            if t.validation.every else []
    elif stage == "cache":
        candidates += [{"cache.batch_size": 1}] if cfg.cache.batch_size > 1 else []
        candidates += [{"train.resolution": _smaller(t.resolution)}]
    else:
        candidates += [{"render.dtype": "bfloat16"}] if cfg.render.dtype == "float32" else []
        candidates += [{"render.width": _smaller(cfg.render.width), "render.height": _smaller(cfg.render.height)}]
    measured = []
    for change in candidates:
        after = memplan.estimate(_variant(cfg, change))[stage].total_gib
        if after < total - 0.05:
            sets = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())
            sets += " (or 16-mixed)" if "train.precision" in change else ""
            measured.append((after, f"{sets} → {after:.1f} GiB ({'fits' if after <= limit else 'not enough alone'})"))
    lines = [text for _, text in sorted(measured)]
    lines.append(f"a GPU with at least {math.ceil(total)} GB: jobs.{job}.partition / gpu_type / constraint naming one, "
                 f"and jobs.{job}.gpu_mem_gb its size")
    saved = lora_params * (memplan.ADAMW_STATE_BYTES - memplan.ADAM8BIT_STATE_BYTES) / memplan.GIB
    if stage == "train" and t.optimizer == "adamw" and total - saved <= limit:
        lines.append(f"--set train.optimizer=adamw8bit → {total - saved:.1f} GiB (fits; bitsandbytes, on the GPU)")
    return lines


def gpu_memory_check(cfg: ExperimentConfig, profile: ClusterProfile,
                     source: str = "the cluster profile") -> tuple[list[str], list[str]]:
    """(one line per GPU stage: its job, estimate and the job's gpu_mem_gb, the train stage's followed by one line
    per phase; one refusal per stage that does not fit, naming the job, the numbers, the peak phase and the
    remedies)."""

    estimates = memplan.estimate(cfg)
    devices = {"cache": ("cache.device", cfg.cache.device), "render": ("render.device", cfg.render.device),
               "train": ("train.accelerator", cfg.train.accelerator)}
    lines, refusals = [], []
    for stage in memplan.GPU_STAGES:
        job = job_of(stage)
        r, e = profile.resources(job), estimates[stage]
        limit, head = r.gpu_mem_gb, f"gpu memory: {stage} (job {job}): {e.describe()}"
        if r.gpus == 0 or devices[stage][1] == "cpu":
            why = f"jobs.{job} asks for no GPU" if r.gpus == 0 else f"{devices[stage][0]} is cpu"
            lines.append(f"{head}; {why}: runs on the CPU")
        elif limit is None:
            lines.append(f"{head}; set jobs.{job}.gpu_mem_gb to check")
        elif e.total_gib <= limit:
            tight = " (less than 10 % to spare)" if e.total_gib > 0.9 * limit else ""
            lines.append(f"{head}; fits jobs.{job}.gpu_mem_gb {limit:g}{tight}")
        else:
            lines.append(f"{head}; does NOT fit jobs.{job}.gpu_mem_gb {limit:g}")
            fixes = gpu_memory_remedies(cfg, stage, e.total_gib, limit, job, e.lora_params)
            refusals.append(f"jobs.{job}.gpu_mem_gb in {source}: the {stage} stage needs about {e.describe()} of "
                            f"GPU memory, its peak in the {e.peak_phase} ({e.assumptions}), more than the "
                            f"{limit:g} GB of job {job}'s GPU. Remedies, the most effective first:\n"
                            + "\n".join(f"  - {x}" for x in fixes))
        if stage == "train":  # its phases hold different things: each on a line of its own
            lines += [f"    {stage} · {name}: {phase.describe()}{' ← peak' if name == e.peak_phase else ''}"
                      for name, phase in e.phases.items()]
    return lines, refusals
