"""Validation samples during training (train.validation): every `every` steps a few images with the current
LoRA → train/samples/step-XXXXXX/<i>-<seed>.png, and to the training loggers (TensorBoard, wandb).

The text encoder is never loaded while training: the cache stage encodes the validation prompts and the
negative prompt with the training set (content-addressed like every caption) and lists them in the cache
index under "validation"; sampling reads them. Sampling draws from its own seeded generators and restores
every global RNG afterwards, so a run with validation trains exactly as one without; the VAE waits on the CPU
and is on the GPU only while sampling. Nothing heavy is imported at module level (stages.py reads it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kolora.core.config import ExperimentConfig
    from kolora.core.rundir import RunDir


def prompt_texts(cfg: ExperimentConfig) -> list[str]:
    """The validation prompts: train.validation.prompts, else the first `count` prompts of render.prompts."""
    v = cfg.train.validation
    if v.prompts:
        return list(v.prompts)
    from kolora.core.prompts import load_prompts

    return [p.prompt for p in load_prompts(cfg.render.prompts, cfg.render.negative_prompt)[:v.count]]


def texts_to_cache(cfg: ExperimentConfig) -> list[str]:
    """What the cache stage encodes for validation (none when it is off): the prompts and the negative prompt."""
    if not cfg.train.validation.every:
        return []
    return [*prompt_texts(cfg), cfg.render.negative_prompt]


def cache_ready(cfg: ExperimentConfig, run: RunDir) -> bool:
    """The cache holds the validation embeddings training will read, or training is complete and needs none
    (turning validation on afterwards reruns nothing; raising train.steps then encodes them first)."""
    wanted = texts_to_cache(cfg)
    if not wanted:
        return True
    try:
        cached = json.loads((run.cache / "index.json").read_text()).get("validation") or {}
    except (OSError, ValueError):
        cached = {}
    if set(wanted) <= set(cached):
        return True
    from kolora.pipeline.registry import is_complete

    return is_complete("train", cfg, run)


def step_dir(run_train: Path, step: int) -> Path:
    return Path(run_train) / "samples" / f"step-{step:06d}"


def sample_names(cfg: ExperimentConfig) -> list[tuple[int, int, str]]:
    """(prompt index, seed, file name) of every sample of one step."""
    return [(i, seed, f"{i}-{seed}.png") for i in range(len(prompt_texts(cfg))) for seed in cfg.train.validation.seeds]


def callbacks(cfg: ExperimentConfig, run: RunDir, weight_dtype) -> list[Any]:
    """The Lightning callback that samples (none when train.validation.every is 0)."""
    if not cfg.train.validation.every:
        return []
    from kolora.train.validation_sampler import ValidationSampler

    return [ValidationSampler(cfg, run, weight_dtype)]
