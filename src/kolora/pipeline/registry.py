"""The stage registry: every stage of a run, in pipeline order. Each stage declares itself in its package's
`spec.py` (kolora.core.stage.Stage: its inputs, outputs, completeness check, how it parallelises, its entry
point); this module lists them, and says which config fields never make any stage rerun (OPERATIONAL) and
which fields added later leave keys made before them unchanged (SINCE). Keys and completion: kolora.pipeline.keys.
"""

from __future__ import annotations

from typing import Any

from kolora.cache import spec as cache
from kolora.core.stage import MODEL_FIELDS, Stage
from kolora.evaluate import spec as evaluate
from kolora.filter import spec as filter_
from kolora.ingest import spec as ingest
from kolora.render import spec as render
from kolora.report import spec as report
from kolora.train import spec as train

STAGES: tuple[Stage, ...] = (ingest.STAGE, filter_.STAGE, cache.STAGE, train.STAGE, evaluate.SELECT, render.RENDER,
                             render.GRID, evaluate.STAGE, report.STAGE)

# Fields added after runs were made, with the value that means "as before": at that value a field is left
# out of its stages' keys, so the runs made before it existed stay complete (no retraining on an upgrade).
SINCE: dict[str, Any] = {"train.buckets": False, "train.min_snr_gamma": None, "train.noise_offset": 0.0,
                         "train.caption_dropout": 0.0, "train.ema_decay": None, "train.dora": False,
                         "train.optimizer": "adamw", "train.timesteps": "per_batch", "data.allow_external_paths": False,
                         "data.max_image_bytes": 256 * 2**20, "render.base_tiles": None,
                         "train.adapter": "lora", "train.lokr_factor": -1, "train.block_ranks": {},
                         "train.block_alphas": {},
                         "data.mask": "auto", "data.synthetic.masks": False,
                         "train.lr_scheduler": "constant", "train.warmup_steps": 0, "train.lr_num_cycles": 1,
                         "train.lr_power": 1.0, "data.captions": "keep", "data.caption_model": None,
                         "data.caption_language": "en", "data.caption_prefix": None, "evaluate.select": "last",
                         # data.sources: none (data's one source)
                         "data.sources.path": [], "data.sources.repeats": [], "data.sources.filter_ops": [],
                         **{f"data.sources.{f}": [] for f in ingest.SOURCE_INPUTS},
                         "card.license": "other", "card.trigger": None, "card.tags": [],
                         "scorers.rewards": [], "scorers.pickscore": "yuvalkirstain/PickScore_v1",
                         "scorers.pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                         "scorers.hps": "xswu/HPSv2", "scorers.hps_version": "v2.1",
                         "scorers.imagereward": "THUDM/ImageReward"}

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


def get(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(NAMES)}")
    return BY_NAME[name]


PARALLEL_WORDS = {"none": "", "tasks": " (array tasks)", "shards": " (array of shards)", "ranks": " (every rank)",
                  "ddp": " (DDP ranks)"}


# ---- documentation ----------------------------------------------------------------------------------------
def rerun_table() -> str:
    """The README's "what reruns when" table, from this registry (a test keeps the README equal to it)."""
    rows = ["| stage | runs on | reruns when these change | these files, by content | never reruns for |",
            "|---|---|---|---|---|"]
    for s in STAGES:
        own = ([f"`{f}`" for f in s.inputs] + [f"`{f}` (continues from the newest checkpoint)" for f in s.continues]
               + [f"output of {a}" for a in s.after])
        content = [f"`{f}`" for f in s.content if f not in MODEL_FIELDS]
        if set(MODEL_FIELDS) <= set(s.content):
            content.append("the model (`model.*`)")
        if s.extra_key_note:
            content.append(s.extra_key_note)
        ops = [f"`{f}`" for f, (stage, _) in OPERATIONAL.items() if stage == s.name]
        rows.append(f"| {s.name} | {s.runs_on}{PARALLEL_WORDS[s.parallel]} | {', '.join(own) or '-'} | {', '.join(content) or '-'} | "
                    f"{', '.join(ops) or '-'} |")
    return "\n".join(rows)
