"""Validation samples during training (train.validation): every `every` steps a few images with the current
LoRA → train/samples/step-XXXXXX/<i>-<seed>.png, and to the training loggers (TensorBoard, wandb). Where the
samples are and what they are named; kolora.train.validation_sampler draws them.

The text encoder is never loaded while training: sampling reads the validation prompts' embeddings from the
cache (kolora.cache.validation). Sampling draws from its own seeded generators and restores
every global RNG afterwards, so a run with validation trains exactly as one without; the VAE waits on the CPU
and is on the GPU only while sampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kolora.cache.validation import prompt_texts

if TYPE_CHECKING:
    from kolora.core.config import ExperimentConfig


def step_dir(run_train: Path, step: int) -> Path:
    return Path(run_train) / "samples" / f"step-{step:06d}"


def sample_names(cfg: ExperimentConfig) -> list[tuple[int, int, str]]:
    """(prompt index, seed, file name) of every sample of one step."""
    return [(i, seed, f"{i}-{seed}.png") for i in range(len(prompt_texts(cfg))) for seed in cfg.train.validation.seeds]
