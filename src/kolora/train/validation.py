"""Validation samples during training (train.validation): every `every` steps a few images with the current
LoRA → train/samples/step-XXXXXX/<i>-<seed>.png, and to the training loggers (TensorBoard, wandb). Where the
samples are and what they are named; kolora.train.validation_sampler draws them.

When evaluate.select chooses the run's LoRA among the validation steps (kolora.evaluate.selection), each step's
folder also holds the LoRA that drew its samples (pytorch_lora_weights.safetensors: the LoRA alone, not a
training checkpoint), and step-000000/ the base model's samples (the LoRA's zero init). The selection's files,
train/scores.csv and lora/selection.json, are named here too: the report reads them.

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


SCORES_FILE = Path("train") / "scores.csv"  # step, prompt, seed, scorer, value
SCORES_COLUMNS = ("step", "prompt", "seed", "scorer", "value")
SELECTION_FILE = Path("lora") / "selection.json"
LAST_LORA_DIR = Path("lora") / "last"  # the final step's LoRA while the run's is another step's
STEP_LORA = "pytorch_lora_weights.safetensors"


def keeps_step_loras(cfg: ExperimentConfig) -> bool:
    """Whether training keeps each validation step's LoRA and samples the base model at step 0: when evaluate.select
    will choose among the steps (at `last`, the default, training writes exactly what it wrote before)."""
    return bool(cfg.train.validation.every) and cfg.evaluate.select != "last"


def step_lora(run_train: Path, step: int) -> Path:
    return step_dir(run_train, step) / STEP_LORA


def step_dir(run_train: Path, step: int) -> Path:
    return Path(run_train) / "samples" / f"step-{step:06d}"


def sample_names(cfg: ExperimentConfig) -> list[tuple[int, int, str]]:
    """(prompt index, seed, file name) of every sample of one step."""
    return [(i, seed, f"{i}-{seed}.png") for i in range(len(prompt_texts(cfg))) for seed in cfg.train.validation.seeds]
