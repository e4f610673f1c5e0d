"""Training logs the field's viewers read: TensorBoard event files in train/tensorboard/ (beside metrics.csv),
and wandb when `train.wandb` names a project and the wandb package is installed.

Per optimizer step k (after its update, as in metrics.csv): loss, lr, step time and, on CUDA, the step's peak
GPU memory; validation images come from kolora.train.validation_sampler. A resumed run's writer purges what an earlier attempt
logged after the checkpoint it resumes from, so every step appears once in TensorBoard.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import lightning as L
import torch

from kolora.core.config import ExperimentConfig
from kolora.core.errors import InputError
from kolora.core.rundir import RunDir

# wandb (train.wandb only) and Lightning's loggers: imported where a logger is made

TENSORBOARD_DIR = "tensorboard"  # under train/


def loggers(cfg: ExperimentConfig, run: RunDir, start_step: int) -> list[Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    purge = {"purge_step": start_step + 1} if start_step else {}
    _after_earlier_event_files(run.train / TENSORBOARD_DIR)
    out: list[Any] = [TensorBoardLogger(save_dir=str(run.train), name=TENSORBOARD_DIR, version="",
                                        default_hp_metric=False, **purge)]
    wandb = wandb_logger(cfg, run)
    return out + ([wandb] if wandb else [])


def _after_earlier_event_files(folder) -> None:
    """TensorBoard reads a folder's event files in name order, and a name is the creation second, host, pid and
    a per-process counter: an attempt resumed within the second of the one before it, in the same process,
    could sort before it ("...10" < "...9") and lose its steps to the purge. Wait into the next second."""
    seconds = [int(parts[3]) for p in folder.glob("events.out.tfevents.*")
               if len(parts := p.name.split(".")) > 3 and parts[3].isdigit()]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)


def wandb_mode(environ: dict[str, str] | None = None) -> str:
    """wandb's mode: WANDB_MODE when set, else offline inside a Slurm job (compute nodes rarely reach the
    internet; `wandb sync` uploads later) and online elsewhere."""
    environ = os.environ if environ is None else environ
    return environ.get("WANDB_MODE") or ("offline" if "SLURM_JOB_ID" in environ else "online")


def wandb_logger(cfg: ExperimentConfig, run: RunDir):
    if not cfg.train.wandb:
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise InputError(f"train.wandb: {cfg.train.wandb!r} asks for wandb logging, but the wandb package is not "
                         "installed; install it (pip install wandb) or remove train.wandb") from None
    from lightning.pytorch.loggers import WandbLogger

    # one wandb run per kolora run, continued by every attempt (requeues, resumes)
    run_id = hashlib.sha256(str(run.root.resolve()).encode()).hexdigest()[:16]
    return WandbLogger(project=cfg.train.wandb, name=cfg.name, id=run_id, resume="allow", save_dir=str(run.train),
                       offline=wandb_mode() == "offline")


class StepScalars(L.Callback):
    """loss, lr, step time and (on CUDA) the step's peak GPU memory, to every logger, once per optimizer step."""

    def __init__(self) -> None:
        self.started, self.step = 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step != trainer.global_step:  # the first micro-batch of an optimizer step
            self.step = trainer.global_step
            self.started = time.perf_counter()
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # a micro-batch of gradient accumulation
            return
        # the global batch's loss as metrics.csv has it (the MetricsCSV callback runs before this one)
        rows = next((c.rows for c in trainer.callbacks if type(c).__name__ == "MetricsCSV"), None)
        if rows and int(rows[-1]["step"]) == trainer.global_step:  # its lr too: the lr the step used
            loss, lr = float(rows[-1]["loss"]), float(rows[-1]["lr"])
        else:
            loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
            lr = trainer.optimizers[0].param_groups[0]["lr"]
        metrics = {"loss": loss, "lr": lr,
                   "step_time_s": time.perf_counter() - self.started}
        if pl_module.device.type == "cuda":
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def callbacks() -> list[L.Callback]:
    return [StepScalars()]
