"""The validation prompts' embeddings: the cache stage encodes them with the training set (content-addressed
like every caption) and lists them in the cache index under "validation", so that training's validation
samples never load the text encoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from kolora.core.prompts import load_prompts

if TYPE_CHECKING:
    from kolora.core.config import ExperimentConfig
    from kolora.core.rundir import RunDir


def prompt_texts(cfg: ExperimentConfig) -> list[str]:
    """The validation prompts: train.validation.prompts, else the first `count` prompts of render.prompts."""
    v = cfg.train.validation
    if v.prompts:
        return list(v.prompts)
    return [p.prompt for p in load_prompts(cfg.render.prompts, cfg.render.negative_prompt)[:v.count]]


def texts_to_cache(cfg: ExperimentConfig) -> list[str]:
    """What the cache stage encodes for validation (none when it is off): the prompts and the negative prompt."""
    if not cfg.train.validation.every:
        return []
    return [*prompt_texts(cfg), cfg.render.negative_prompt]


def cache_ready(cfg: ExperimentConfig, run: RunDir, complete: Callable[[str], bool]) -> bool:
    """The cache holds the validation embeddings training will read, or training is complete and needs none
    (turning validation on afterwards reruns nothing; raising train.steps then encodes them first)."""
    wanted = texts_to_cache(cfg)
    if not wanted:
        return True
    try:
        cached = json.loads((run.cache / "index.json").read_text()).get("validation") or {}
    except (OSError, ValueError):
        cached = {}
    return set(wanted) <= set(cached) or complete("train")
