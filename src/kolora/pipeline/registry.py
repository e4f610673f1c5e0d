"""The stage registry: every stage of a run, in order, with the config fields its output depends on, the
files outside the run that enter its key by content, what it writes, how to tell it is done, whether it
stops on a signal, and which Slurm job runs it. `pipeline`, the Slurm launcher, `status` and `resume`
read only this module; no other module lists stages or their files.

A stage's **key** is a hash of its input fields, the fingerprints of its external files and the keys of
the stages it reads from. A stage is complete when its marker holds the current key and its outputs are on
disk. Everything not listed as an input is operational (OPERATIONAL says why each is harmless) and never
makes a stage rerun. Training's `continues` fields (train.steps) are part of its output but not of its
checkpoints: raising them continues from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kolora.core import hashing
from kolora.models import fingerprint

if TYPE_CHECKING:
    from kolora.core.config import ExperimentConfig
    from kolora.core.rundir import RunDir


@dataclass(frozen=True)
class Stage:
    name: str
    job: str  # the Slurm job (cluster profile `jobs.<job>`) that runs it
    where: Literal["cpu", "gpu", "gpu array"]
    after: tuple[str, ...]  # stages whose outputs it reads: their keys enter its key
    inputs: tuple[str, ...]  # config fields whose values enter its key
    content: tuple[str, ...]  # path fields whose files enter its key by content fingerprint
    outputs: tuple[str, ...]  # what it owns in the run directory
    done: Callable[[ExperimentConfig, RunDir], bool]  # its outputs are on disk (given a matching marker)
    stoppable: bool  # stops cleanly between units of work on a stop signal (the job is requeued)
    # What happens to outputs made for other inputs: "replace" = set aside, dropped once the stage succeeds
    # (put back if it fails); "keep" = moved to superseded/<stage>-<key>/ and kept (GPU hours); "keyed" =
    # outputs are named by their own key, nothing is stale by name (render tiles).
    on_change: Literal["replace", "keep", "keyed"] = "replace"
    continues: tuple[str, ...] = ()  # fields in the output's key but not in its checkpoints' (resume extends)
    keeps_partial: bool = False  # a failed attempt's partial work (checkpoints, tiles, shards) stays for the rerun

    @property
    def module(self) -> str:
        return {"train": "kolora.train.loop", "grid": "kolora.render.grid"}.get(self.name, f"kolora.{self.name}.stage")


def _file(rel: str) -> Callable[[Any, Any], bool]:
    return lambda cfg, run: (run.root / rel).is_file()


def _cache_done(cfg, run) -> bool:
    """The index, no entry found damaged since (training reads verify them), and the validation prompts'
    embeddings while training still needs them."""
    from kolora.cache.entry import DAMAGED
    from kolora.train.validation import cache_ready

    return ((run.root / "cache/index.json").is_file() and not (run.root / "cache" / DAMAGED).is_file()
            and cache_ready(cfg, run))


def _render_done(cfg, run) -> bool:
    from kolora.render.tiles import missing_tiles

    return not missing_tiles(cfg, run)


def _evaluate_done(cfg, run) -> bool:
    return not cfg.evaluate.enabled or (run.root / "eval" / "scores.json").is_file()


# The model enters a key as one fingerprint of all its files (fingerprint.model), never by its paths.
MODEL_FIELDS = ("model.path", "model.layout", "model.variant", "model.vae_path", "model.tokenizer_path",
                "model.unet_config", "model.vae_config")

STAGES: tuple[Stage, ...] = (
    Stage("ingest", job="filter", where="cpu", after=(),
          inputs=("data.source", "data.dataset_id", "data.subset", "data.split", "data.text_column",
                  "data.image_column", "data.caption", "data.limit", "data.synthetic.count", "data.synthetic.seed",
                  "data.synthetic.min_side", "data.synthetic.max_side", "data.allow_external_paths",
                  "data.max_image_bytes"),
          content=("data.path",), outputs=("data",), done=_file("data/metadata.jsonl"), stoppable=True),
    # filter.shards > 1 (or shard_size) makes its job an array of CPU tasks, one per shard (kolora.filter.shards)
    Stage("filter", job="filter", where="cpu", after=("ingest",), inputs=("filter.ops",), content=(),
          outputs=("filter", "trainset"), done=_file("trainset/train/metadata.csv"), stoppable=True,
          keeps_partial=True),
    Stage("cache", job="train", where="gpu", after=("filter",),
          inputs=("cache.max_sequence_length", "cache.vae_dtype", "train.resolution", "train.center_crop",
                  "train.precision", "train.buckets"), content=MODEL_FIELDS,
          outputs=("cache/index.json", "cache/report.json"), done=_cache_done, stoppable=True),
    Stage("train", job="train", where="gpu", after=("cache",),
          inputs=("train.rank", "train.alpha", "train.target_modules", "train.lr", "train.batch_size",
                  "train.precision", "train.gradient_checkpointing", "train.seed", "train.deterministic",
                  "train.min_snr_gamma", "train.noise_offset", "train.caption_dropout", "train.ema_decay",
                  "train.dora", "train.optimizer", "cpu_threads", "train.buckets", "train.timesteps"),
          content=(), outputs=("train", "lora"), done=_file("lora/pytorch_lora_weights.safetensors"),
          stoppable=True, on_change="keep", continues=("train.steps",), keeps_partial=True),
    Stage("render", job="render", where="gpu array", after=(),
          inputs=("render.negative_prompt", "render.cfg", "render.steps", "render.width", "render.height",
                  "render.lora_scale", "render.dtype", "cache.max_sequence_length", "render.base_tiles"),
          content=("render.prompts", "render.lora", *MODEL_FIELDS),
          outputs=("render",), done=_render_done, stoppable=True, on_change="keyed", keeps_partial=True),
    Stage("grid", job="grid", where="cpu", after=("render",),
          inputs=("grid.columns", "grid.rows", "grid.captions", "grid.tile_size"), content=("grid.font",),
          outputs=("grid.png",), done=_file("grid.png"), stoppable=False),
    Stage("evaluate", job="grid", where="cpu", after=("render",),
          inputs=("evaluate.enabled", "scorers.clip", "scorers.chinese_clip", "scorers.aesthetic", "scorers.language"),
          content=("scorers.dir",), outputs=("eval",), done=_evaluate_done, stoppable=False),
    # reads train/metrics.csv, train/samples/ and eval/scores.json (when present) as well
    Stage("report", job="grid", where="cpu", after=("grid", "evaluate"), inputs=(), content=(),
          outputs=("report",), done=_file("report/report.html"), stoppable=False),
)

# Fields added after runs were made, with the value that means "as before": at that value a field is left
# out of its stages' keys, so the runs made before it existed stay complete (no retraining on an upgrade).
SINCE: dict[str, Any] = {"train.buckets": False, "train.min_snr_gamma": None, "train.noise_offset": 0.0,
                         "train.caption_dropout": 0.0, "train.ema_decay": None, "train.dora": False,
                         "train.optimizer": "adamw", "train.timesteps": "per_batch", "data.allow_external_paths": False,
                         "data.max_image_bytes": 256 * 2**20, "render.base_tiles": None}

# Fields that never make a stage rerun: the stage they concern ("" = the run) and why no output depends on them.
OPERATIONAL: dict[str, tuple[str, str]] = {
    "name": ("", "the run's folder"),
    "seed": ("", "recorded in the manifest; every stage has its own seed field"),
    "model.tiny": ("", "builds the tiny demo model when model.path is missing; its files are fingerprinted"),
    "filter.np": ("filter", "Data-Juicer worker processes; the kept set does not depend on them"),
    "filter.executor": ("filter", "Data-Juicer's executor (default or Ray); same ops, same kept set"),
    "filter.fast_ops": ("filter", "header-only versions of the shape/aspect ops: same stats, same kept samples"),
    "filter.shards": ("filter", "slices filtered (parquet/ModelScope rows ingested) separately and merged in order: "
                      "same data, report and kept set"),
    "filter.shard_size": ("filter", "the shard count from the dataset's size: same report, same kept set"),
    "cache.batch_size": ("cache", "how many samples the encoders take at once"),
    "cache.device": ("cache", "where the encoders run (cpu and cuda entries differ by rounding)"),
    "cache.dir": ("cache", "where the content-addressed entries live (shared across runs)"),
    "train.checkpoint_every": ("train", "how often training state is saved"),
    "train.checkpoint_minutes": ("train", "how often training state is saved"),
    "train.keep_checkpoints": ("train", "how many checkpoints are kept"),
    "train.num_workers": ("train", "data loader processes; the sample order is a function of (seed, step)"),
    "train.accelerator": ("train", "cpu or gpu; a run may continue on the other (results differ by rounding)"),
    "train.validation.every": ("train", "validation samples (train/samples/): their RNG is their own"),
    "train.validation.prompts": ("train", "validation samples only"),
    "train.validation.count": ("train", "validation samples only"),
    "train.validation.seeds": ("train", "validation samples only"),
    "train.validation.steps": ("train", "validation samples only"),
    "train.validation.size": ("train", "validation samples only"),
    "train.wandb": ("train", "where training logs go (wandb), besides TensorBoard"),
    "render.device": ("render", "where tiles render (cpu and cuda differ by rounding; render.dtype is an input)"),
    "scorers.tiny": ("", "builds tiny scorer models when scorers.dir lacks them; their files are fingerprinted"),
    "evaluate.device": ("evaluate", "where the scorers run (cpu and cuda scores differ by rounding)"),
}

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def output_folders() -> set[str]:
    """The run-directory folders the stages own (data, filter, trainset, cache, train, lora, render)."""
    return {o.split("/")[0] for s in STAGES for o in s.outputs if "." not in o.split("/")[0]}


def get(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(NAMES)}")
    return BY_NAME[name]


def jobs() -> dict[str, tuple[str, ...]]:
    """Slurm job → its stages, in pipeline order (each job `afterok` on the one before)."""
    out: dict[str, tuple[str, ...]] = {}
    for s in STAGES:
        out[s.job] = (*out.get(s.job, ()), s.name)
    return out


def job_of(stage: str) -> str:
    return get(stage).job


# ---- keys ------------------------------------------------------------------------------------------------
def field_value(cfg: ExperimentConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    if hasattr(node, "model_dump"):
        return node.model_dump(mode="json")
    return [x for x in node] if isinstance(node, list) else (str(node) if isinstance(node, Path) else node)


def _content(cfg: ExperimentConfig, dotted: str) -> Any:
    """A path field's file(s) by content; the model's fields together as one model fingerprint."""
    if dotted.startswith("model."):
        return fingerprint.model(cfg.model)
    if dotted == "data.path":
        return hashing.dataset(cfg.data)
    if dotted == "scorers.dir":
        return fingerprint.scorers(cfg.scorers)
    value = field_value(cfg, dotted)
    if value is None:
        return None
    path = Path(value)
    if dotted == "render.lora":
        from kolora.formats.lora import resolve_file

        path = resolve_file(path)
    return hashing.file_sha256(path) if path.is_file() else {"missing": str(path.name)}


class Keys:
    """The keys of one config's stages in one run directory, each computed once."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self._memo: dict[str, str | None] = {}

    def inputs(self, name: str) -> dict[str, Any]:
        """What the stage's work depends on (its checkpoints too): the key before `continues` fields."""
        s = get(name)
        fields = {f: field_value(self.cfg, f) for f in s.inputs}
        fields = {f: v for f, v in fields.items() if not (f in SINCE and v == SINCE[f])}
        out: dict[str, Any] = {"stage": name, "fields": fields}
        contents = {}
        for f in s.content:
            kind = "model" if f.startswith("model.") else f
            contents[kind] = contents.get(kind) or _content(self.cfg, f)
        out["content"] = contents
        out["after"] = {a: self.output(a) for a in s.after}
        if name == "render":
            from kolora.render.tiles import base_tiles, base_tiles_on, tiles

            out["tiles"] = [t.key for t in tiles(self.cfg, self.run)]
            if base_tiles_on(self.cfg):
                out["base_tiles"] = [t.key for t in base_tiles(self.cfg, self.run)]
        return out

    def work(self, name: str) -> str | None:
        """Key of the stage's work (None: cannot be known yet, e.g. render before its LoRA exists)."""
        if f"work:{name}" not in self._memo:
            inputs = self.inputs(name)
            unknown = any(v is None for v in inputs["after"].values()) or None in inputs.get("tiles", [])
            self._memo[f"work:{name}"] = None if unknown else hashing.digest(inputs)[:16]
        return self._memo[f"work:{name}"]

    def output(self, name: str) -> str | None:
        """Key of the stage's output: its work key plus the `continues` fields (train.steps)."""
        work = self.work(name)
        s = get(name)
        if work is None or not s.continues:
            return work
        return hashing.digest([work, {f: field_value(self.cfg, f) for f in s.continues}])[:16]


# ---- completion -------------------------------------------------------------------------------------------
def marker_file(run: RunDir, stage: str) -> Path:
    return run.root / ".complete" / f"{stage}.json"


def read_marker(run: RunDir, stage: str) -> dict[str, Any] | None:
    try:
        info = json.loads(marker_file(run, stage).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def is_complete(stage: str, cfg: ExperimentConfig, run: RunDir, keys: Keys | None = None) -> bool:
    """The marker holds the current key *and* the outputs are on disk (a deleted tile or LoRA makes the stage
    run again, and only for what is missing)."""
    info = read_marker(run, stage)
    if info is None:
        return False
    keys = keys or Keys(cfg, run)
    key = keys.output(stage)
    return key is not None and info.get("key") == key and get(stage).done(cfg, run)


def mark_complete(stage: str, run: RunDir, key: str, **summary: Any) -> None:
    from kolora.core.rundir import atomic_write_json, now

    atomic_write_json(marker_file(run, stage), {"key": key, "finished": now(), **summary})


def complete_stages(run: RunDir) -> list[str]:
    return sorted(p.stem for p in (run.root / ".complete").glob("*.json"))


# ---- progress ---------------------------------------------------------------------------------------------
def progress(run: RunDir) -> dict[str, Any]:
    """What the stages have durably written so far (finished stages, newest checkpoint step, tiles, cache
    entries): two equal values mean a job attempt between them achieved nothing."""
    def count(folder: Path) -> int:
        try:
            with os.scandir(folder) as entries:
                return sum(1 for e in entries if not e.name.startswith("."))
        except OSError:
            return 0

    steps = [int(m.group(1)) for p in (run.train / "checkpoints").glob("step=*.ckpt")
             if (m := re.fullmatch(r"step=(\d+)\.ckpt", p.name))]
    store = cache_store_of(run)
    return {"complete": complete_stages(run), "checkpoint_step": max(steps, default=None),
            "tiles": sum(not p.name.startswith(".") for f in (run.render, run.render / "base") for p in f.glob("*.png")),
            "cache_entries": count(store / "text") + count(store / "latents")}


def cache_store(cfg: ExperimentConfig, run: RunDir) -> Path:
    """Where the cache's content-addressed entries live: cache.dir (shared across runs) or <run>/cache."""
    return Path(cfg.cache.dir) if cfg.cache.dir else run.cache


def cache_store_of(run: RunDir) -> Path:
    """The entry store named by the run's cache index (or the run's own cache folder)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return Path(json.loads((run.cache / "index.json").read_text())["store"] or run.cache)
    return run.cache


# ---- documentation ----------------------------------------------------------------------------------------
def rerun_table() -> str:
    """The README's "what reruns when" table, from this registry (a test keeps the README equal to it)."""
    rows = ["| stage | job | reruns when these change | these files, by content | never reruns for |",
            "|---|---|---|---|---|"]
    for s in STAGES:
        own = ([f"`{f}`" for f in s.inputs] + [f"`{f}` (continues from the newest checkpoint)" for f in s.continues]
               + [f"output of {a}" for a in s.after])
        content = [f"`{f}`" for f in s.content if f not in MODEL_FIELDS]
        if set(MODEL_FIELDS) <= set(s.content):
            content.append("the model (`model.*`)")
        if s.name == "render":
            content.append("the run's LoRA (per tile: its prompt, negative prompt and seed)")
        ops = [f"`{f}`" for f, (stage, _) in OPERATIONAL.items() if stage == s.name]
        rows.append(f"| {s.name} | {s.job} ({s.where}) | {', '.join(own) or '-'} | {', '.join(content) or '-'} | "
                    f"{', '.join(ops) or '-'} |")
    return "\n".join(rows)
