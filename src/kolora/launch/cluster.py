"""Cluster profiles: slurm/clusters/<name>.yaml, one per cluster, validated like the experiment config.

A profile says, for each job of the stage graph, where and with what it runs:

    filter  = ingest + filter   (CPU)       train = cache + train   (GPU; N GPUs per node → DDP, one task per GPU)
    render  = render, one array job          grid  = grid          (CPU)

Each job's resources are `defaults` overlaid with `jobs.<job>`; unset values fall back to Slurm's own
defaults (partition, memory) or to kolora's (time 60 min, 1 CPU, no GPU, 1 node). Every validation problem
becomes one ConfigError whose message names the field (`jobs.train.gpus`, ...).

Trust: a profile is admin input. `setup` lines are copied verbatim into the sbatch scripts and `python` is
the job's interpreter command, so a profile can run anything on the cluster under the submitting user;
keep profiles in the repository and review them like code. All other values are checked to be plain
values (no line breaks, no shell syntax where Slurm does not need any) and reach sbatch as `#SBATCH`
options written by submitit, never through a shell string built by kolora.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from kolora.core.config import read_yaml_mapping
from kolora.core.errors import ConfigError
from kolora.core.schema import Section, describe_validation_error, format_problems
from kolora.launch.container import ContainerConfig
from kolora.pipeline.registry import NAMES
from kolora.train.distributed import accumulation_steps

# The Slurm jobs a run is queued as (a profile's `jobs.<job>` sections), each with the stages it runs in
# pipeline order, each `afterok` on the one before. Consecutive stages on the same kind of machine share a job:
# no queue wait between them, and the cache's GPU job is the one that trains. select (on a CPU: it scores the
# validation samples) ends the train job on its rank 0, so the render job finds the LoRA it chose.
JOBS: dict[str, tuple[str, ...]] = {"filter": ("ingest", "filter"), "train": ("cache", "train", "select"),
                                    "render": ("render",), "grid": ("grid", "evaluate", "report")}
if tuple(s for job in JOBS.values() for s in job) != NAMES:
    raise AssertionError(f"launch.cluster.JOBS must run every registered stage once, in order: {NAMES}")


def job_of(stage: str) -> str:
    """The Slurm job that runs `stage`."""
    return next(job for job, stages in JOBS.items() if stage in stages)

# sbatch options the launcher sets itself: a profile's `extra` may not set them (use the named field instead)
RESERVED_OPTIONS = {
    "job-name": "(set by kolora: kolora-<run>-<job>)", "output": "(submitit's log files)",
    "error": "(submitit's log files)", "array": "(jobs.render.tiles_per_task and array_throttle)",
    "dependency": "(the stage graph)", "kill-on-invalid-dep": "(always yes)", "partition": "partition",
    "time": "time", "nodes": "nodes", "ntasks-per-node": "(one task per GPU: gpus)", "ntasks": "(gpus and nodes)",
    "cpus-per-task": "cpus", "mem": "mem", "gres": "gpus / gpu_type / gres", "gpus-per-node": "gpus",
    "account": "account", "qos": "qos", "constraint": "constraint", "signal": "signal_lead_s",
    "open-mode": "(append: logs survive requeues)", "chdir": "(kolora jobs need no working directory)",
    "requeue": "(always set: kolora requeues preempted and timed-out jobs itself)",
    "no-requeue": "(kolora requeues preempted and timed-out jobs; max_requeues 0 turns that off)",
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+,:-]*$")  # partition lists, account, qos, gpu type
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.&|,\[\]*():!-]+$")
_MEM = re.compile(r"^[0-9]+[KMGT]?$")
_OPTION = re.compile(r"^[a-z][a-z0-9]*([-_][a-z0-9]+)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_NODES = re.compile(r"^(?P<min>\d+)(?:-(?P<max>\d+))?$")
NODES_FORM = "a node count (2) or a range MIN-MAX as sbatch takes it (\"1-2\")"


def parse_time(value: int | str) -> int:
    """A Slurm time limit → whole minutes (rounded up). Accepts minutes as a number, or Slurm's forms
    MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if isinstance(value, bool):
        raise ValueError("must be minutes (e.g. 90) or a Slurm time like '1:30:00' or '2-00:00:00'")
    if isinstance(value, int):
        minutes = value
    else:
        m = _TIME.fullmatch(str(value).strip())
        if not m:
            raise ValueError("must be minutes (e.g. 90) or a Slurm time like '1:30:00' or '2-00:00:00'")
        d, a, b, c = (int(x) if x is not None else None for x in m.group("d", "a", "b", "c"))
        if d is not None:  # D-HH[:MM[:SS]]
            seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:  # HH:MM:SS
            seconds = a * 3600 + b * 60 + c
        elif b is not None:  # MM:SS
            seconds = a * 60 + b
        else:  # MM
            seconds = a * 60
        minutes = math.ceil(seconds / 60)
    if minutes < 1:
        raise ValueError("must be at least 1 minute")
    return minutes


def parse_nodes(value: int | str) -> tuple[int, int]:
    """A node count or Slurm's MIN-MAX range (`--nodes=1-2`: the job starts on as many as are free, at least
    MIN) → (min, max). ValueError saying what is wrong otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"must be {NODES_FORM}")
    if isinstance(value, int):
        low = high = value
    else:
        m = _NODES.fullmatch(str(value).strip())
        if not m:
            raise ValueError(f"must be {NODES_FORM}, not {value!r}")
        low, high = int(m["min"]), int(m["max"] or m["min"])
    if low < 1:
        raise ValueError(f"must be at least 1 node, not {value!r}")
    if low > high:
        raise ValueError(f"{value!r}: MIN must not exceed MAX (write \"{high}-{low}\")")
    return low, high


def node_request(low: int, high: int) -> int | str:
    """What sbatch --nodes gets: the count, or MIN-MAX for a range."""
    return high if low == high else f"{low}-{high}"


def _plain(v: str | None, what: str = "value") -> str | None:
    if v is not None and _CONTROL.search(v):
        raise ValueError(f"{what} must be one line without control characters")
    return v


class JobResources(Section):
    """What one job asks Slurm for. None = inherit (from `defaults`, then Slurm/kolora defaults)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | str | None = None  # minutes, or a Slurm time string ('4:00:00', '1-00:00:00')
    cpus: int | None = Field(None, ge=1)  # per task
    mem: str | None = None  # per node, Slurm syntax: 16G, 64000M, 0 (= all of the node's memory)
    gpus: int | None = Field(None, ge=0)  # per node; train with gpus > 1 (or nodes > 1) runs DDP
    gpu_type: str | None = None  # e.g. a100 → --gres=gpu:a100:N
    # memory of one of the job's GPUs, as the vendor names it (80 for an A100-80GB; nvidia-smi's MiB / 1024):
    # validate/submit refuse a config whose estimated peak (kolora.launch.memplan) does not fit. None: not checked
    gpu_mem_gb: float | None = Field(None, gt=0)
    gpu_option: Literal["gres", "gpus-per-node"] | None = None  # how the GPUs are asked for (default gres)
    gres: str | None = None  # other generic resources, appended to the GPU request (e.g. 'nvme:100')
    constraint: str | None = None  # node features, e.g. 'a100|h100'
    # train only: a count, or Slurm's "MIN-MAX" (the job starts on what is free; the global batch is the MAX's)
    nodes: int | str | None = None
    setup: list[str] | None = None  # extra shell lines for this job, after the profile's `setup` (trusted)
    extra: dict[str, str | int | bool] | None = None  # other sbatch options: {exclusive: true, mail-type: END}

    @field_validator("partition", "account", "qos", "gpu_type")
    @classmethod
    def _word(cls, v: str | None) -> str | None:
        if v is not None and not _WORD.fullmatch(v):
            raise ValueError("must be a Slurm name (letters, digits, . _ - @ + , :), no spaces")
        return v

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes(cls, v: Any) -> int | str | None:
        return None if v is None else node_request(*parse_nodes(v))

    @field_validator("gpu_mem_gb", mode="before")
    @classmethod
    def _gpu_mem(cls, v: Any) -> Any:
        if isinstance(v, bool) or isinstance(v, str) and v.strip().upper().endswith(("G", "GB")):
            raise ValueError("must be the GPU's memory in GB as a plain number, e.g. 80 for an A100-80GB")
        return v

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        if v is not None:
            if not isinstance(v, int | str):
                raise ValueError("must be minutes (e.g. 90) or a Slurm time like '1:30:00' or '2-00:00:00'")
            parse_time(v)
        return v

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> str | None:
        if v is None:
            return None
        if isinstance(v, int) and not isinstance(v, bool) and v != 0:
            raise ValueError(f"needs a unit: write {v}M for megabytes (what Slurm assumes for a bare number) or "
                             f"e.g. {max(1, round(v / 1024))}G")
        v = str(v).strip().upper().removesuffix("B")
        if not _MEM.fullmatch(v):
            raise ValueError("must be Slurm memory like 16G, 64000M or 0 (all of the node's memory)")
        return v

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, v: str | None) -> str | None:
        if v is not None and not _CONSTRAINT.fullmatch(v):
            raise ValueError("must be a Slurm feature expression like 'a100|h100' or 'gpu&ib' (no spaces)")
        return v

    @field_validator("gres")
    @classmethod
    def _gres(cls, v: str | None) -> str | None:
        if v is not None:
            if not _WORD.fullmatch(v):
                raise ValueError("must be Slurm gres like 'nvme:100' (no spaces)")
            if any(part.split(":")[0] == "gpu" for part in v.split(",")):
                raise ValueError("ask for GPUs with `gpus` (and `gpu_type`), not in gres")
        return v

    @field_validator("setup")
    @classmethod
    def _setup(cls, v: list[str] | None) -> list[str] | None:
        for line in v or []:
            _plain(line, "each setup line")
        return v

    @field_validator("extra")
    @classmethod
    def _extra(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        problems = []
        for key, value in (v or {}).items():
            norm = key.replace("_", "-")
            if not _OPTION.fullmatch(key):
                problems.append(f"{key!r} is not an sbatch long option name (e.g. mail-type, exclusive)")
            elif norm in RESERVED_OPTIONS:
                problems.append(f"{key!r} is set by kolora; use {RESERVED_OPTIONS[norm]}")
            elif value is False:
                problems.append(f"{key}: false is not an sbatch value; leave the option out instead")
            elif isinstance(value, str) and _CONTROL.search(value):
                problems.append(f"{key}: must be one line without control characters")
        if problems:
            raise ValueError("\n".join(problems))
        return v


class RenderResources(JobResources):
    # tiles rendered by one array task: they share one model load (≈ 18 GB read, a minute or more), which
    # would otherwise cost more than the tile itself (tens of seconds at 1024², 50 steps)
    tiles_per_task: int = Field(4, ge=1)
    array_throttle: int = Field(4, ge=1)  # at most this many array tasks run at once (--array=0-N%throttle)


class Jobs(Section):
    filter: JobResources = JobResources()
    train: JobResources = JobResources()
    render: RenderResources = RenderResources()
    grid: JobResources = JobResources()



class ClusterProfile(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = None
    # The job's interpreter as an argument list (default: this Python, sys.executable), e.g.
    # [apptainer, exec, --nv, /shared/kolora.sif, python]. Needs kolora, submitit and cloudpickle inside.
    python: list[str] | None = None
    # Where submitit's job folders (scripts, pickles, logs) go; default <run>/slurm. Each submission gets a
    # fresh <job_folder>/<run name>/<stamp>/ (never reuse one: submitit would read stale results).
    job_folder: Path | None = None
    # Library caches of the jobs (HF_HOME, MODELSCOPE_CACHE); default inside the run directory. Jobs run
    # with the hub-offline variables set whatever these say: models and datasets must be on disk already.
    hf_home: Path | None = None
    modelscope_cache: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)  # extra environment variables for every job
    setup: list[str] = Field(default_factory=list)  # shell lines before every job (module loads); trusted
    signal_lead_s: int = Field(120, ge=0)  # USR2 this long before the time limit (submitit checkpoints then)
    max_requeues: int = Field(10, ge=0)  # submitit's max_num_timeout: requeues after timeout/preemption
    defaults: JobResources = JobResources()
    jobs: Jobs = Jobs()
    # Run every stage inside an Apptainer image (kolora.launch.container); the job's host process keeps signals and
    # requeue (scontrol is not in the image), the stage runs as its child inside `apptainer exec`.
    container: ContainerConfig | None = None

    @field_validator("python")
    @classmethod
    def _python(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v or not all(isinstance(x, str) and x for x in v):
                raise ValueError("must be a non-empty list of arguments, e.g. [/opt/venv/bin/python]")
            for x in v:
                _plain(x, "each argument")
        return v

    @field_validator("setup")
    @classmethod
    def _setup(cls, v: list[str]) -> list[str]:
        for line in v:
            _plain(line, "each setup line")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"{key!r} is not an environment variable name")
            _plain(str(value), f"env.{key}")
        return {k: str(x) for k, x in v.items()}

    @field_validator("job_folder", "hf_home", "modelscope_cache")
    @classmethod
    def _path(cls, v: Path | None) -> Path | None:
        if v is not None:
            _plain(str(v), "the path")
        return v

    @model_validator(mode="after")
    def _jobs_fit(self) -> ClusterProfile:
        """Every cross-field problem at once (a profile is fixed in one go, not one error per try)."""
        problems = [f"jobs.{name}.nodes: only the train job can use more than one node"
                    for name in ("filter", "render", "grid") if getattr(self.jobs, name).nodes not in (None, 1)]
        if self.defaults.nodes not in (None, 1):
            problems.append("defaults.nodes: only the train job can use more than one node; set jobs.train.nodes")
        train = self.resources("train")
        if problem := node_range_problem(train.gpus, train.min_nodes, train.nodes):
            problems.append(f"jobs.train.nodes: {problem}")
        if self.jobs.render.gpus not in (None, 0, 1):
            problems.append("jobs.render.gpus: an array task renders on one GPU (0 or 1); "
                            "raise array_throttle to use more GPUs at once")
        for job in JOBS:
            r = self.resources(job)
            if r.gpus == 0 and (r.gpu_type or r.gpu_option):
                problems.append(f"jobs.{job}: gpu_type/gpu_option given but no gpus")
            if r.time_min * 60 <= self.signal_lead_s:
                problems.append(f"jobs.{job}: time {r.time_min} min is not longer than signal_lead_s "
                                f"({self.signal_lead_s} s): the job would be told to stop as it starts; raise "
                                "its time or lower signal_lead_s")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # --------------------------------------------------------------------------------------------------
    def resources(self, job: str) -> ResolvedResources:
        """`defaults` overlaid with `jobs.<job>` (fields set in the job win; `extra` and `setup` add up)."""
        base = self.defaults.model_dump()
        own = getattr(self.jobs, job).model_dump()
        merged = {k: own[k] if own.get(k) is not None else base.get(k) for k in own}
        merged["extra"] = {**(base.get("extra") or {}), **(own.get("extra") or {})}
        merged["setup"] = [*self.setup, *(base.get("setup") or []), *(own.get("setup") or [])]
        min_nodes, nodes = parse_nodes(merged["nodes"] or 1)
        return ResolvedResources(
            partition=merged["partition"], account=merged["account"], qos=merged["qos"],
            time_min=parse_time(merged["time"]) if merged["time"] is not None else 60,
            cpus=merged["cpus"] or 1, mem=merged["mem"], gpus=merged["gpus"] or 0, gpu_type=merged["gpu_type"],
            gpu_option=merged["gpu_option"], gres=merged["gres"], constraint=merged["constraint"],
            gpu_mem_gb=merged["gpu_mem_gb"],
            nodes=nodes, min_nodes=min_nodes, setup=merged["setup"], extra=merged["extra"],
            tiles_per_task=own.get("tiles_per_task", 4), array_throttle=own.get("array_throttle", 1),
        )


class ResolvedResources(BaseModel):
    partition: str | None
    account: str | None
    qos: str | None
    time_min: int
    cpus: int
    mem: str | None
    gpus: int
    gpu_type: str | None
    gpu_option: str | None  # None: gres
    gpu_mem_gb: float | None  # None: unknown (no GPU memory check)
    gres: str | None
    constraint: str | None
    nodes: int  # the most nodes the job runs on (a range's MAX): what the global batch is planned for
    setup: list[str]
    extra: dict[str, Any]
    tiles_per_task: int = 1
    array_throttle: int = 1
    min_nodes: int = 0  # a range's MIN; 0: a fixed count (= nodes)

    def model_post_init(self, context: Any) -> None:
        self.min_nodes = self.min_nodes or self.nodes

    @property
    def node_request(self) -> int | str:
        """sbatch's --nodes: the count, or MIN-MAX."""
        return node_request(self.min_nodes, self.nodes)

    def worlds(self) -> list[int]:
        """Every number of processes the job can train with: one per GPU of each node it may start on."""
        return [max(self.gpus, 1) * n for n in range(self.min_nodes, self.nodes + 1)]


def node_range_problem(gpus: int, min_nodes: int, max_nodes: int) -> str | None:
    """Why a train job on MIN..MAX nodes cannot keep one global batch (planned for MAX nodes) on every node
    count it may start on; None when it can. The global batch stays the same by gradient accumulation, which
    needs the planned world to be a whole multiple of every world (the same rule as a resume on fewer GPUs)."""

    per_node = max(gpus, 1)
    planned = per_node * max_nodes
    odd = [n for n in range(min_nodes, max_nodes + 1)
           if accumulation_steps(planned, 1, per_node * n) is None]
    if not odd:
        return None
    # MAX - 1 divides MAX only for MAX 2: "1-2" is the one range there is, besides a fixed count
    return (f"\"{min_nodes}-{max_nodes}\" with {per_node} GPU(s) per node: an attempt on {odd[0]} node(s) "
            f"({per_node * odd[0]} processes) cannot keep the global batch planned for {max_nodes} nodes ({planned} "
            "processes) with whole gradient-accumulation steps. Every node count of the range must divide its MAX: "
            f"use {max_nodes} (a fixed count) or \"1-2\"")


def find_profile(name_or_path: str | Path) -> Path:
    """A profile file, given as a path or as a name looked up in ./slurm/clusters and the checkout's."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"cluster profile {p} is a folder; give a profile file in it (e.g. "
                          "slurm/clusters/example-university.yaml) or a profile name such as local")
    if p.suffix == "" and p.parent == Path("."):
        for base in (Path.cwd() / "slurm" / "clusters", Path(__file__).resolve().parents[3] / "slurm" / "clusters"):
            cand = base / f"{p.name}.yaml"
            if cand.is_file():
                return cand
    raise ConfigError(f"cluster profile {name_or_path} does not exist (give a path, or a name from slurm/clusters/ "
                      "such as local; copy slurm/clusters/example-university.yaml for your cluster)")


def load_profile(name_or_path: str | Path) -> ClusterProfile:
    path = find_profile(name_or_path)
    raw = read_yaml_mapping(path, "profile fields (name, jobs, ...)")
    raw.setdefault("name", path.stem)
    base = path.parent.resolve()
    for key in ("job_folder", "hf_home", "modelscope_cache"):  # relative paths: against the profile's folder
        if isinstance(raw.get(key), str) and raw[key]:
            q = Path(raw[key]).expanduser()
            raw[key] = str(q if q.is_absolute() else (base / q).resolve())
    container = raw.get("container")
    if isinstance(container, dict) and isinstance(container.get("image"), str):
        q = Path(container["image"]).expanduser()
        container["image"] = str(q if q.is_absolute() else (base / q).resolve())
    try:
        profile = ClusterProfile.model_validate(raw)
    except ValidationError as e:
        problems = describe_validation_error(e, ClusterProfile)
        raise ConfigError(format_problems(str(path), "cluster profile", problems)) from None
    return profile
