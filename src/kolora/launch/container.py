"""Running a stage inside the kit's Apptainer image (containers/kolora.def).

A cluster profile's `container:` section becomes a `ContainerConfig`; `exec_argv` turns it, the paths a job
needs and the job's environment into the argument list of `apptainer exec`. The Slurm-facing part of a job
(submitit, signal handling, `scontrol requeue`) stays in the host-side job process: scontrol is not inside
the image. The host process runs the stage as a child through this argument list, forwards the stop signal
to it, waits for it to checkpoint and exit, and then requeues.

Flags of the argument list, and why:
  --nv            (when `nv`) the host's NVIDIA driver libraries and devices inside the container.
  --cleanenv      the host environment stays out: a module-loaded PYTHONPATH / LD_LIBRARY_PATH / CONDA_PREFIX
                  would break the image's Python. What the stage needs is passed explicitly with --env
                  (the job environment, plus `forward_env`: GPU selection, Slurm's task variables and the
                  site's network settings, NCCL_* GLOO_* UCX_* FI_* OMPI_* PMIX_*; `forward_env_prefixes` changes
                  the prefixes).
  --bind a:a      every path the stage reads or writes, mounted at the same path, so the frozen config's
                  absolute paths mean the same inside and outside. Nested binds are dropped, parents first.
  --pwd DIR       the working directory inside (the run directory); nothing relies on it, it just makes
                  relative paths in logs and tracebacks land somewhere sensible.
  --env K=V       one per variable, in a stable order (`container.env` first, then the job's, the job's
                  values winning).
  extra_args      verbatim, just before the image (e.g. [--no-home], [--contain], [--nvccli]).
$HOME stays mounted (Apptainer's default) so that tools which insist on ~ keep working; the image sets
PYTHONNOUSERSITE=1 so ~/.local packages are ignored, and puts library caches under KOLORA_CACHE. Add
`--no-home` to `extra_args` to keep home out entirely.

Nothing here runs a shell: every value reaches apptainer as one argument.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kolora.core.config import ExperimentConfig
from kolora.core.errors import ConfigError

log = logging.getLogger("kolora.launch.container")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXECUTABLE = re.compile(r"^(/[^\x00-\x1f\x7f\s]+|[A-Za-z0-9][A-Za-z0-9._+-]*)$")
BIND_OPTIONS = ("ro", "rw")

# Host variables a stage inside the container still needs after --cleanenv: the GPUs Slurm gave the job
# (CUDA_VISIBLE_DEVICES is how they are selected under --nv), Slurm's task variables (Lightning's DDP reads
# rank / world size / node list from them; kolora reads SLURM_JOB_ID and SLURM_RESTART_COUNT), and the
# rendezvous of a torchrun-style launch.
FORWARD_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
               "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
# ...and every variable with one of these prefixes: Slurm's, and the site's network stack as its modules set it
# (NCCL's interface/IB/plugin choice, gloo's GLOO_SOCKET_IFNAME for a CPU process group, UCX, libfabric's
# FI_PROVIDER on Slingshot/EFA, Open MPI and PMIx). Dropped by --cleanenv, a multi-node process group falls back
# to the wrong interface and hangs or crawls.
FORWARD_ENV_PREFIXES = ("SLURM_", "NCCL_", "GLOO_", "UCX_", "FI_", "OMPI_", "PMIX_")
# Without these the stage cannot form its process group: not removable.
REQUIRED_ENV_PREFIXES = ("SLURM_",)


def _plain(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{what} must be one line without control characters (got {value!r})")
    return value


def env_value_problem(name: str, value: str) -> str | None:
    """Why `--env NAME=VALUE` would not reach the container unchanged (None when it would).

    Apptainer parses --env as a key=value map flag: with one '=' the whole argument is taken as is (but
    surrounding double quotes are trimmed); with more than one '=' it is read as CSV, so a comma splits it.
    """
    if not _ENV_NAME.fullmatch(name):
        return f"{name!r} is not an environment variable name"
    if _CONTROL.search(value):
        return f"{name}: the value has a line break or control character"
    if '"' in value:
        return f"{name}: the value has a double quote (apptainer --env would trim or split it)"
    if "=" in value and "," in value:
        return f"{name}: a value with both '=' and ',' is split by apptainer --env"
    return None


@dataclass(frozen=True, order=True)
class Bind:
    """One bind mount: host `src` at container `dst`, with optional `ro`/`rw`."""

    dst: PurePosixPath  # first: sorting by destination mounts parents before children
    src: PurePosixPath
    options: str = ""

    @property
    def read_only(self) -> bool:
        return "ro" in self.options.split(",")

    @property
    def identity(self) -> bool:
        return self.src == self.dst

    def spec(self) -> str:
        return f"{self.src}:{self.dst}" + (f":{self.options}" if self.options else "")


def _absolute(p: str | os.PathLike[str], what: str) -> PurePosixPath:
    text = os.fspath(p)
    _plain(text, what)
    if not text.startswith("/"):
        raise ValueError(f"{what} {text!r} must be an absolute path")
    if "," in text or ":" in text:
        # apptainer splits --bind on ',' (several binds) and ':' (src:dst:options)
        raise ValueError(f"{what} {text!r} cannot be bound: apptainer --bind cannot express ',' or ':' in a path")
    return PurePosixPath(os.path.normpath(text))


def parse_bind(spec: str | os.PathLike[str]) -> Bind:
    """`src[:dst[:opts]]` (a str) or a path (bound at the same path, read-write) → Bind."""
    if not isinstance(spec, str):
        p = _absolute(spec, "bind")
        return Bind(dst=p, src=p)
    _plain(spec, "bind")
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"bind {spec!r}: expected 'src', 'src:dst' or 'src:dst:ro|rw'")
    src = _absolute(parts[0], f"bind {spec!r}: source")
    dst = _absolute(parts[1], f"bind {spec!r}: destination") if len(parts) > 1 and parts[1] else src
    options = parts[2] if len(parts) == 3 else ""
    if len(parts) == 3 and options not in BIND_OPTIONS:
        raise ValueError(f"bind {spec!r}: options must be one of {', '.join(BIND_OPTIONS)} (got {options!r})")
    return Bind(dst=dst, src=src, options="" if options == "rw" else options)


def _inside(child: PurePosixPath, parent: PurePosixPath) -> bool:
    return child != parent and child.is_relative_to(parent)


def merge_binds(specs: Iterable[str | os.PathLike[str]]) -> list[Bind]:
    """Parse, de-duplicate and order bind specs.

    Same destination twice: one bind (read-only only if every request was read-only); different sources for
    one destination are an error. A same-path bind inside another same-path bind is dropped unless it
    would lose write access (rw inside ro stays, mounted after its parent). Parents come before children.
    """
    by_dst: dict[PurePosixPath, Bind] = {}
    for spec in specs:
        b = parse_bind(spec)
        old = by_dst.get(b.dst)
        if old is None:
            by_dst[b.dst] = b
        elif old.src != b.src:
            raise ValueError(f"two binds for {b.dst}: from {old.src} and from {b.src}")
        elif old.read_only and not b.read_only:
            by_dst[b.dst] = b
    binds = sorted(by_dst.values())
    kept = []
    for b in binds:
        covered = b.identity and any(
            p.identity and _inside(b.dst, p.dst) and (not p.read_only or b.read_only) for p in binds)
        if not covered:
            kept.append(b)
    return kept


class ForwardEnvPrefixes(BaseModel):
    """`container.forward_env_prefixes`: change which host variable prefixes reach the stage (default
    FORWARD_ENV_PREFIXES): `add` more (a site's own, e.g. MY_SITE_), `remove` some (e.g. UCX_ when the image
    brings its own UCX that the host's settings would confuse)."""

    model_config = ConfigDict(extra="forbid")

    add: list[str] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)

    @field_validator("add", "remove")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for prefix in v:
            if not isinstance(prefix, str) or not _ENV_NAME.fullmatch(prefix):
                raise ValueError(f"{prefix!r} is not the start of an environment variable name (e.g. NCCL_)")
        return v

    @field_validator("remove")
    @classmethod
    def _removable(cls, v: list[str]) -> list[str]:
        for prefix in v:
            if prefix in REQUIRED_ENV_PREFIXES:
                raise ValueError(f"{prefix} cannot be removed: Lightning's DDP inside the container reads rank, "
                                 "world size and node list from the SLURM_* variables")
            if prefix not in FORWARD_ENV_PREFIXES:
                raise ValueError(f"{prefix} is not forwarded by default (the defaults are "
                                 f"{', '.join(FORWARD_ENV_PREFIXES)}), so there is nothing to remove")
        return v

    @model_validator(mode="after")
    def _not_both(self) -> ForwardEnvPrefixes:
        both = sorted(set(self.add) & set(self.remove))
        if both:
            raise ValueError(f"{', '.join(both)} is both added and removed; keep it in one list")
        return self

    def prefixes(self) -> tuple[str, ...]:
        """The prefixes to forward: the defaults less `remove`, then `add`."""
        kept = [p for p in FORWARD_ENV_PREFIXES if p not in self.remove]
        return tuple(dict.fromkeys([*kept, *self.add]))


class ContainerConfig(BaseModel):
    """A cluster profile's `container:` section: run every stage inside this image."""

    model_config = ConfigDict(extra="forbid")

    image: Path  # a local .sif (or sandbox folder) on a filesystem the compute nodes see
    binds: list[str] = Field(default_factory=list)  # more binds, 'src[:dst[:ro|rw]]' (scratch, shared models)
    nv: bool = True  # --nv: NVIDIA GPUs inside
    extra_args: list[str] = Field(default_factory=list)  # more apptainer exec flags, verbatim (e.g. --no-home)
    env: dict[str, str] = Field(default_factory=dict)  # more variables inside (NCCL_*, OMP_NUM_THREADS, ...)
    executable: str = "apptainer"  # or 'singularity' (SingularityCE takes the same flags), or a full path
    # host variables forwarded by prefix past --cleanenv (FORWARD_ENV_PREFIXES), with additions and removals
    forward_env_prefixes: ForwardEnvPrefixes = Field(default_factory=ForwardEnvPrefixes)

    @field_validator("image")
    @classmethod
    def _image(cls, v: Path) -> Path:
        _plain(str(v), "container.image")
        if not v.is_absolute():
            raise ValueError("must be an absolute path to the image (.sif) on a filesystem the compute nodes "
                             "share; pull or copy it there once on a login node (see README: Containers)")
        return v

    @field_validator("binds")
    @classmethod
    def _binds(cls, v: list[str]) -> list[str]:
        merge_binds(v)  # raises with the offending spec
        return v

    @field_validator("extra_args")
    @classmethod
    def _extra_args(cls, v: list[str]) -> list[str]:
        for arg in v:
            if not isinstance(arg, str) or not arg:
                raise ValueError("each argument must be a non-empty string")
            _plain(arg, "each argument")
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: object) -> dict[str, str]:
        if not isinstance(v, Mapping):
            raise ValueError("must be a mapping of NAME: value")
        out = {}
        for key, value in v.items():
            value = str(value).lower() if isinstance(value, bool) else str(value)
            problem = env_value_problem(str(key), value)
            if problem:
                raise ValueError(problem)
            out[str(key)] = value
        return out

    @field_validator("executable")
    @classmethod
    def _executable(cls, v: str) -> str:
        if not _EXECUTABLE.fullmatch(v):
            raise ValueError("must be a command name (apptainer, singularity) or an absolute path")
        return v


def exec_argv(container: ContainerConfig | None, *, binds: Iterable[str | os.PathLike[str]],
              workdir: str | os.PathLike[str], env: Mapping[str, str], command: list[str]) -> list[str]:
    """The argument list that runs `command` inside the image (or `command` itself without a container)."""
    if container is None:
        return list(command)
    if not command:
        raise ValueError("no command to run in the container")
    pwd = _absolute(workdir, "working directory")
    argv = [container.executable, "exec"]
    if container.nv:
        argv.append("--nv")
    argv.append("--cleanenv")
    for b in merge_binds([*container.binds, *binds]):
        argv += ["--bind", b.spec()]
    argv += ["--pwd", str(pwd)]
    for name, value in {**container.env, **env}.items():
        problem = env_value_problem(name, str(value))
        if problem:
            raise ValueError(f"cannot pass {problem}")
        argv += ["--env", f"{name}={value}"]
    return [*argv, *container.extra_args, str(container.image), *command]


def forward_env(environ: Mapping[str, str] | None = None,
                prefixes: tuple[str, ...] = FORWARD_ENV_PREFIXES) -> dict[str, str]:
    """The host variables a stage needs inside the container (FORWARD_ENV, and those starting with one of
    `prefixes`: a profile's `container.forward_env_prefixes.prefixes()`), in a stable order.

    A variable apptainer --env cannot carry unchanged is left out with a warning rather than mangled.
    """
    environ = os.environ if environ is None else environ
    out = {}
    for name in sorted(environ):
        if name in FORWARD_ENV or name.startswith(tuple(prefixes)):
            problem = env_value_problem(name, environ[name])
            if problem:
                log.warning("not passing %s into the container: %s", name, problem)
                continue
            out[name] = environ[name]
    return out


def image_digest(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """`sha256:<hex>` of the image file (read in chunks: a SIF is gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def check_image(container: ContainerConfig) -> None:
    """Fail before queueing when the image is not there (what the compute nodes will look for)."""
    image = container.image
    if not (image.is_file() or (image.is_dir() and (image / ".singularity.d").is_dir())):
        raise ConfigError(f"container.image: {image} is not an Apptainer image (.sif file or sandbox folder); "
                          "build it with `make container` or pull it (README: Containers)")


def _bind_root(p: Path, what: str) -> Path:
    """The folder to bind for `p`: itself (a folder), its folder (a file), or, when it does not exist yet
    (a tiny model built at run time), its nearest existing ancestor below /."""
    p = Path(os.path.normpath(p))
    if not p.is_absolute():
        raise ConfigError(f"{what}: {p} must be an absolute path to be bound into the container")
    if p.is_dir():
        return p
    if p.exists():
        return p.parent
    for parent in p.parents:
        if parent.exists():
            if parent == Path(parent.anchor):
                break
            return parent
    raise ConfigError(f"{what}: neither {p} nor any folder above it (other than /) exists, so nothing can be "
                      "bound into the container; create the folder or fix the path")


def required_binds(cfg: ExperimentConfig, run_root: str | os.PathLike[str], *,
                   extra: Iterable[str | os.PathLike[str] | None] = ()) -> list[Path]:
    """Every host folder a stage of `cfg` reads or writes, merged (nested ones dropped), parents first.

    The run directory; the model folder and its diffsynth overrides; the dataset; the prompt set's folder; an
    external LoRA; the grid font; plus `extra` (library caches, a job folder outside the run directory).
    Images a jsonl dataset references outside its own folder are not known here: add them to
    `container.binds`.
    """
    wanted: list[tuple[Path, str]] = [(Path(run_root), "run directory"), (cfg.model.path, "model.path"),
                                      (cfg.render.prompts, "render.prompts")]
    for what, value in (("model.vae_path", cfg.model.vae_path), ("model.tokenizer_path", cfg.model.tokenizer_path),
                        ("model.unet_config", cfg.model.unet_config), ("model.vae_config", cfg.model.vae_config),
                        ("data.path", cfg.data.path), ("render.lora", cfg.render.lora), ("grid.font", cfg.grid.font)):
        if value is not None:
            wanted.append((Path(value), what))
    wanted += [(s.path, f"data.sources {s.name!r} path") for s in cfg.data.sources if s.path is not None]
    wanted += [(Path(p), "extra bind") for p in extra if p is not None]
    roots = [_bind_root(p, what) for p, what in wanted]
    return [Path(str(b.src)) for b in merge_binds(roots)]
