"""train: a LoRA on the Kolors UNet from cached embeddings and latents (Lightning + peft).

The objective is the tutorial's (DiffSynth 1.1.9): scaled-linear betas up to 0.014 over 1100 steps, one
uniform timestep per (global) batch (train.timesteps: per_sample draws one per sample, as diffusers' and
kohya's scripts do), epsilon target, MSE, AdamW, constant lr (by default). The samples of step k, their
noise and the timestep are pure functions of (seed, k) and of each sample's position in the run's sample
sequence, whatever the number of GPUs (kolora.train.samples, kolora.train.objective): a run resumed from any checkpoint,
on as many GPUs or fewer (kolora.train.distributed), continues as if it had never stopped.

Outputs: train/checkpoints/ (Lightning checkpoints holding only the LoRA tensors + optimizer + loop state),
train/metrics.csv (one row per optimizer step), lora/pytorch_lora_weights.safetensors (rank/alpha inside).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers.optimization import get_scheduler

from kolora.core import interrupt
from kolora.core.config import SCHEDULE_DEFAULTS, TrainConfig
from kolora.core.devices import is_cuda, pick
from kolora.core.errors import InputError, RunFailure
from kolora.core.rundir import atomic_write_json, atomic_write_text
from kolora.core.stage import StageContext
from kolora.formats import lora as lora_io
from kolora.models import kolors as models
from kolora.train import checkpoint as ckpt_io
from kolora.train import distributed, objective, validation_sampler
from kolora.train import logs as trainlogs
from kolora.train import metrics as train_metrics
from kolora.train.ema import LoraEMA
from kolora.train.samples import (
    BucketSampler,
    CachedSamples,
    Positioned,
    RankShare,
    StepSampler,
    sample_repeats,
    source_counts,
)
from kolora.train.validation import LAST_LORA_DIR, SELECTION_FILE

# bitsandbytes (8-bit AdamW), prodigyopt (Prodigy) and Lightning's Slurm environment: imported only where an
# option or a job needs them

log = logging.getLogger("kolora.train.loop")
LORA_FILE = "pytorch_lora_weights.safetensors"


# Schedules whose learning rate at step k depends on train.steps: a checkpoint continues only the same total
TOTAL_SHAPED = frozenset({"cosine", "cosine_with_restarts", "linear", "polynomial"})


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw8bit":  # bitsandbytes' 8-bit states: a quarter of AdamW's optimizer memory, GPU only
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # AdamW's decoupled weight decay (torch's default, 0.01, as kolora's AdamW); bias correction and the
        # warmup safeguard on, as diffusers' DreamBooth LoRA scripts set them for diffusion models
        return Prodigy(params, lr=lr, weight_decay=0.01, decouple=True, use_bias_correction=True,
                       safeguard_warmup=True)
    return torch.optim.AdamW(params, lr=lr)


def make_schedule(tcfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """train.lr_scheduler as diffusers builds it, over train.steps optimizer steps."""
    return get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                         num_training_steps=tcfg.steps, num_cycles=tcfg.lr_num_cycles, power=tcfg.lr_power)


def check_schedule_total(tcfg: TrainConfig, checkpoint: Path, meta: dict[str, Any]) -> None:
    """A checkpoint continues a total-shaped schedule (cosine, linear, ...) only over the total it was built for:
    over another one, the learning rates of the steps it already trained would no longer be the run's."""
    built_for = meta.get("schedule_steps")
    if tcfg.lr_scheduler not in TOTAL_SHAPED or built_for == tcfg.steps:
        return
    raise InputError(
        f"train.steps: {tcfg.steps}, but the checkpoint to continue from, {checkpoint}, was trained under "
        f"train.lr_scheduler: {tcfg.lr_scheduler} over {built_for} steps, a schedule that train.steps shapes: "
        f"continuing it over {tcfg.steps} would change the learning rates of the steps it already took. Keep "
        f"train.steps: {built_for}; or train from scratch over {tcfg.steps} steps (kolora run ... --stage train "
        "--force discards this training); or choose a schedule train.steps does not shape (constant_with_warmup, "
        "constant), which also trains from scratch (the schedule is an input of training) but then continues "
        "freely when train.steps changes")


def check_options(tcfg: TrainConfig, accelerator: str) -> None:
    """Options this machine cannot run, refused before training starts (the message names field and fix)."""
    if tcfg.optimizer == "prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            raise InputError("train.optimizer: prodigy needs the prodigyopt package, which this environment "
                             "lacks; install it (pip install prodigyopt) or use train.optimizer: adamw") from None
    if tcfg.optimizer != "adamw8bit":
        return
    if accelerator != "gpu":
        raise InputError("train.optimizer: adamw8bit (bitsandbytes' 8-bit AdamW) runs on a GPU only and this "
                         "training runs on a CPU; use train.optimizer: adamw here, or run on a GPU node")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError("train.optimizer: adamw8bit needs the bitsandbytes package, which this environment "
                         "lacks; install it (pip install bitsandbytes) or use train.optimizer: adamw") from None


def option_warnings(tcfg: TrainConfig) -> list[str]:
    """Options that run but are likely not meant."""
    if tcfg.optimizer == "prodigy" and not 0.1 <= tcfg.lr <= 10:
        return [f"train.optimizer: prodigy with train.lr {tcfg.lr:g}: Prodigy estimates its own step size and "
                "train.lr scales it, so 1.0 is its usual value (an AdamW lr such as 1e-4 leaves the LoRA nearly "
                "untrained); set train.lr: 1.0 unless this is meant"]
    return []


class NonFiniteLoss(RunFailure):
    """Training met a nan/inf loss: it stops there, before that step's update reaches any checkpoint."""


class LoRATrainer(L.LightningModule):
    def __init__(self, unet, tcfg: TrainConfig, config_digest: str, ckpt_dir: Path | None = None,
                 empty_caption: dict[str, torch.Tensor] | None = None, batch: distributed.GlobalBatch | None = None,
                 loader=None):
        super().__init__()
        self.batch = batch or distributed.GlobalBatch(tcfg.batch_size, 1, 1)
        self.loader = loader  # (rank, world) → this rank's DataLoader, built once the strategy knows the rank
        self.unet = unet
        self.tcfg = tcfg
        self.config_digest = config_digest
        self.ckpt_dir = ckpt_dir
        self.empty_caption = empty_caption or {}  # the empty caption's cached embeddings (caption dropout)
        self.noise_scheduler = models.training_scheduler()
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone(), persistent=False)
        # Checkpoints carry only the LoRA tensors (not the 2.6 B frozen UNet weights): load non-strictly.
        self.strict_loading = False

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        # every rank's RNG states (all ranks save together: Checkpointer.save), by global rank
        rng = distributed.gather_objects(self.trainer, ckpt_io.rng_state())
        checkpoint["kolora"] = {"rank": self.tcfg.rank, "alpha": self.tcfg.alpha,
                                "config_digest": self.config_digest, "rng": rng[0], "rng_ranks": rng,
                                "batch": self.batch.record(),
                                "schedule_steps": self.tcfg.steps}  # the total its lr schedule was built for

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        note = ckpt_io.restore_rank_rng(checkpoint["kolora"], self.global_rank, self.trainer.world_size,
                                        self.tcfg.seed)
        if note:
            log.warning("resume: %s", note)
        distributed.rescale_loop_progress(checkpoint, self.batch.accumulate)

    def on_train_start(self) -> None:
        if self.trainer.is_global_zero and self.ckpt_dir is not None:

            atomic_write_json(self.ckpt_dir.parent / distributed.BATCH_FILE, self.batch.record())

    def train_dataloader(self):
        return self.loader(self.global_rank, self.trainer.world_size)

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.tcfg.optimizer, params, self.tcfg.lr)
        if self.tcfg.lr_scheduler == "constant":  # no scheduler at all: the tutorial's training, bit for bit
            return optimizer
        # stepped by Lightning after each optimizer step (not each micro-batch); its state is in the checkpoints
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": make_schedule(self.tcfg, optimizer), "interval": "step"}}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        latents, t = batch["latents"], self.tcfg
        d = objective.draw(t.seed, self.global_step, batch["position"].tolist(), tuple(latents.shape),
                           self.noise_scheduler.config.num_train_timesteps, t.noise_offset, t.caption_dropout,
                           per_sample_timesteps=t.timesteps == "per_sample")
        noise = d.noise.to(latents.device, latents.dtype)
        timesteps = d.timestep.expand(latents.shape[0]).to(latents.device)
        a = self.alphas_cumprod.to(latents.device)[timesteps].float()
        noisy = (a.sqrt().view(-1, 1, 1, 1) * latents.float() + (1 - a).sqrt().view(-1, 1, 1, 1) * noise.float()
                 ).to(latents.dtype)
        embeds, pooled = objective.drop_captions(batch, d.drop, self.empty_caption.get("prompt_embeds"),
                                                 self.empty_caption.get("pooled"))
        pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"]}).sample
        loss = objective.loss(pred, noise, a, t.min_snr_gamma, batch.get("mask"))
        # loggers get it from trainlogs.StepScalars, at the step count metrics.csv uses (after the update)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, batch_size=latents.shape[0], logger=False)
        return loss

    def on_before_backward(self, loss: torch.Tensor) -> None:
        finite_here = bool(torch.isfinite(loss.detach()))
        # One decision for all ranks (a rank raising alone would leave the others in the next all-reduce).
        if self.trainer.strategy.reduce_boolean_decision(finite_here, all=True):
            return
        step = self.global_step + 1
        newest = ckpt_io.checkpoints(self.ckpt_dir) if self.ckpt_dir else []
        kept = (f"the last good checkpoint, {newest[0][1]} (step {newest[0][0]}), is kept and a rerun resumes "
                "from it" if newest else "no checkpoint was written yet")
        value = f"{self._step_loss(loss):.6g}"
        what = (f"the loss at step {step} is {value} (not finite)" if not finite_here else
                f"the loss at step {step} is not finite on another rank (this rank's: {value})")
        raise NonFiniteLoss(
            f"train: {what}; training stopped before that step's update, and {kept}. Likely causes: float16 "
            f"overflow in the UNet (set train.precision: bf16-mixed), too high a learning rate (train.lr "
            f"{self.tcfg.lr:g}), or non-finite cached inputs (rerun the cache stage with --force)")

    def _step_loss(self, loss: torch.Tensor) -> float:
        """The loss training_step returned, from what reaches on_before_backward: Lightning divided it by the
        accumulation count and, under 16-mixed, the gradient scaler multiplied it by its scale (65536 at first)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else 1.0
        return float(loss.detach().float()) * self.trainer.accumulate_grad_batches / scale


class MetricsCSV(L.Callback):
    """train/metrics.csv with one row per optimizer step. Rows are written with each checkpoint (so the
    file and the newest checkpoint agree) and at the end; on resume, rows past the checkpoint are dropped."""

    FIELDS = ["step", "loss", "lr", "time"]  # time: wall clock (Unix seconds) at the end of the step

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.writer = True
        self.step, self.losses, self.lr = 0, [], None

    def on_train_start(self, trainer, pl_module) -> None:
        self.writer = trainer.is_global_zero  # under DDP only rank 0 keeps the file
        self.step = trainer.global_step
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= trainer.global_step]
        self._flush()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # the lr this step uses: by on_train_batch_end Lightning has stepped the schedule to the next step's
        self.lr = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        if trainer.global_step == self.step:  # a micro-batch of gradient accumulation
            return
        self.step = trainer.global_step
        lr = self.lr if self.lr is not None else trainer.optimizers[0].param_groups[0]["lr"]
        # the global batch's loss: the mean over this rank's micro-batches (Lightning's outputs are divided by
        # the accumulation), then over the ranks (a collective every rank reaches at this same step)
        loss = sum(self.losses) * trainer.accumulate_grad_batches / len(self.losses)
        self.losses = []
        if trainer.world_size > 1:
            loss = float(trainer.strategy.reduce(torch.tensor(loss, device=pl_module.device), reduce_op="mean"))
        self.rows.append({"step": trainer.global_step, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
                          "time": f"{time.time():.3f}"})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._flush()

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self.writer:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.FIELDS)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


class StepProgress(L.Callback):
    """Progress as optimizer steps out of train.steps: to the caller's callback (the `kolora run` bar), else to
    the log every tenth of the way. (Lightning's own bar counts epochs, and shows `Epoch 0/-2` for a run
    bounded by steps.)"""

    def __init__(self, total: int, progress=None):
        self.total, self.progress, self.every = total, progress, max(1, total // 10)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.progress is not None:
            self.progress(step, self.total)
        elif trainer.is_global_zero and (step % self.every == 0 or step == self.total):
            log.info("train: step %d/%d", step, self.total)


class Checkpointer(L.Callback):
    """Checkpoints every N steps and/or M minutes, and at once when a stop was requested (signal); keeps the
    newest K. Under DDP the decision is rank 0's, broadcast after every optimizer step, so all ranks save and
    stop at the same step (kolora.train.distributed.StepDecision). (Lightning's ModelCheckpoint takes steps *or* a
    time interval, not both, and has no notion of a stop request, hence this small callback.)"""

    def __init__(self, ckpt_dir: Path, every_steps: int, every_minutes: float | None, keep: int, last: int):
        self.dir, self.keep = Path(ckpt_dir), keep
        # the final step is always saved: raising train.steps later continues from it
        self.decide = distributed.StepDecision(every_steps, every_minutes, last)
        self.step = 0
        self.stopped = False  # rank 0 decided to stop early: every rank leaves fit() at this step

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # a micro-batch of gradient accumulation: no step yet
            return
        self.step = trainer.global_step
        save, stop = self.decide(trainer)
        if save:
            self.save(trainer)
        if stop:
            trainer.should_stop = self.stopped = True

    def save(self, trainer) -> None:
        step = trainer.global_step
        # Every rank calls save_checkpoint (it holds a collective under DDP); only rank 0 writes the file.
        trainer.save_checkpoint(str(self.dir / f"step={step:06d}.ckpt"))
        self.decide.saved()
        if trainer.is_global_zero:
            for _, old in ckpt_io.checkpoints(self.dir)[self.keep:]:
                old.unlink(missing_ok=True)


def option_metadata(tcfg: TrainConfig) -> dict[str, str]:
    """The training options that are on, for the LoRA file's metadata (what made these weights)."""
    on = {"min_snr_gamma": tcfg.min_snr_gamma, "noise_offset": tcfg.noise_offset or None,
          "caption_dropout": tcfg.caption_dropout or None, "ema_decay": tcfg.ema_decay,
          "dora": tcfg.dora or None, "optimizer": tcfg.optimizer if tcfg.optimizer != "adamw" else None,
          "timesteps": tcfg.timesteps if tcfg.timesteps != "per_batch" else None,
          "lokr_factor": tcfg.lokr_factor if tcfg.lokr_factor != -1 else None,
          "block_ranks": json.dumps(tcfg.block_ranks, sort_keys=True) if tcfg.block_ranks else None,
          "block_alphas": json.dumps(tcfg.block_alphas, sort_keys=True) if tcfg.block_alphas else None,
          **{k: getattr(tcfg, k) for k, default in SCHEDULE_DEFAULTS.items() if getattr(tcfg, k) != default}}
    return {f"kolora.{k}": str(v) for k, v in on.items() if v is not None}


def resolve_precision(precision: str, accelerator: str) -> tuple[str, str | None]:
    """Lightning precision for this machine, and a note when it had to substitute."""
    want = "32-true" if precision in ("32", "32-true") else precision
    if accelerator == "cpu" and want == "16-mixed":
        return "32-true", "16-mixed precision needs a GPU; training in 32-true on this CPU"
    return want, None


def run(ctx: StageContext) -> dict[str, Any]:
    """Train; resume from the newest valid checkpoint, or with extra["resume_step"] (a DDP job's step chosen by
    rank 0, 0 for none) from exactly that one."""
    cfg, run, progress, devices, num_nodes = ctx.cfg, ctx.run, ctx.progress, ctx.devices, ctx.nodes
    resume_step = ctx.extra.get("resume_step")
    tcfg = cfg.train
    for name in ("lightning.pytorch", "lightning.fabric"):  # hardware banners and tips, not our business
        logging.getLogger(name).setLevel(logging.WARNING)
    device = pick(tcfg.accelerator)  # this rank's own GPU (or the CPU), current before the first CUDA call
    accel = "gpu" if is_cuda(device) else "cpu"
    check_options(tcfg, accel)
    for warning in option_warnings(tcfg):
        log.warning(warning)
    precision, note = resolve_precision(tcfg.precision, accel)
    if note:
        log.warning(note)
    weight_dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision, torch.float32)

    files = models.resolve(cfg.model)
    unet = models.load_unet(files, weight_dtype).train()
    # the LoRA A matrices' gaussian init (torch); python and numpy too, so that a run's other random draws are
    # reproducible and a resumed run continues them (the checkpoints' RNG states)
    ckpt_io.seed_rng(tcfg.seed)
    adapter = lora_io.AdapterOptions.of(tcfg)
    lora_io.add_lora(unet, tcfg.rank, tcfg.alpha, tcfg.target_modules, dora=tcfg.dora, options=adapter)
    for p in unet.parameters():  # LoRA weights train in float32 whatever the base dtype
        if p.requires_grad:
            p.data = p.data.float()
    if tcfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    data = CachedSamples(run.cache)
    ckpt_dir = run.train / "checkpoints"
    # Checkpoints belong to the training's inputs without train.steps: a run given more steps continues.
    digest = ctx.key
    if resume_step is None:
        found = ckpt_io.newest_valid(ckpt_dir, digest, max_step=tcfg.steps)
    else:  # rank 0's choice, never another checkpoint: the ranks would diverge
        found = ckpt_io.load_step(ckpt_dir, resume_step, digest) if resume_step else None
    resume, start_step = (found[0], int(found[1]["global_step"])) if found else (None, 0)
    if found:
        check_schedule_total(tcfg, resume, found[1]["kolora"])
    beyond = [step for step, _ in ckpt_io.checkpoints(ckpt_dir) if step > tcfg.steps]
    if beyond:
        log.warning("train.steps=%d is below the newest checkpoint (step %d): %s; the checkpoints after step %d "
                    "stay, and raising train.steps again continues from them", tcfg.steps, max(beyond),
                    f"the LoRA is the step-{tcfg.steps} state from its checkpoint" if start_step == tcfg.steps else
                    f"training continues from step {start_step} to {tcfg.steps}", tcfg.steps)
    elif resume:
        log.info("resuming from %s (step %d of %d)", resume, start_step, tcfg.steps)
    elif earlier := train_metrics.all_rows(run.root):
        log.warning("train.steps=%d: no checkpoint of the earlier training (metrics.csv reaches step %d) is left in "
                    "%s; training starts again from step 0", tcfg.steps, max(r["step"] for r in earlier), ckpt_dir)
    world = devices * num_nodes
    # a job started on fewer nodes than its range's MAX: the global batch is the MAX's from the first step
    planned = ctx.extra.get("planned_world", world)
    recorded = found[1]["kolora"].get("batch") if found else distributed.GlobalBatch(tcfg.batch_size, planned,
                                                                                       1).record()
    batch = distributed.GlobalBatch.resumed(recorded, tcfg.batch_size, world,
                                            str(resume) if found else f"the job's planned {planned} processes")
    if batch.accumulate > 1:
        log.info("training on %d processes: %d micro-batches per step keep the %s global batch of %d", world,
                 batch.accumulate, "checkpoint's" if found else "planned", batch.size)
    repeats = sample_repeats(data.entries, cfg.data.repeats(), run.cache / "index.json")
    if tcfg.buckets:
        sizes = [e.get("bucket") for e in data.entries]
        if None in sizes:
            raise RunFailure(f"train.buckets is on but {run.cache / 'index.json'} has no buckets (cached with "
                             "train.buckets off): rerun the cache stage (kolora run --stage cache --force)")
        sequence = BucketSampler(sizes, batch.size, tcfg.steps, tcfg.seed, start_step, repeats)
    else:
        sequence = StepSampler(len(data), tcfg.steps * batch.size, tcfg.seed, start=start_step * batch.size,
                               repeats=repeats)

    def loader(rank: int, world_size: int) -> torch.utils.data.DataLoader:
        if world_size != world:
            raise RunFailure(f"train: Lightning formed a process group of {world_size}, kolora planned {world}")
        share = RankShare(sequence, tcfg.steps, start_step, tcfg.batch_size, world, rank, batch.accumulate)
        # its own generator: the seed it draws for its workers when it starts iterating must not come from the
        # global one, which a resumed run has restored to the checkpoint's state by then
        return torch.utils.data.DataLoader(Positioned(data), batch_size=tcfg.batch_size, sampler=share,
                                           num_workers=tcfg.num_workers, drop_last=False,
                                           generator=torch.Generator().manual_seed(tcfg.seed),
                                           worker_init_fn=interrupt.shield_worker if tcfg.num_workers else None)

    module = LoRATrainer(unet, tcfg, digest, ckpt_dir, data.empty_caption() if tcfg.caption_dropout else None,
                         batch, loader)

    def save_lora(path: Path, step: int) -> None:
        """The UNet's adapter as it is now → `path`, in the run LoRA's format (its metadata names `step`)."""
        lora_io.save_lora(unet, path, tcfg.rank, tcfg.alpha, tcfg.target_modules, dora=tcfg.dora, options=adapter,
                          extra_metadata={"kolora.steps": str(step), "kolora.core.config": cfg.digest(),
                                          "kolora.global_batch": str(batch.size), **option_metadata(tcfg)})

    ema = LoraEMA(tcfg.ema_decay) if tcfg.ema_decay else None
    plugins = distributed.cluster_plugins(os.environ)
    checkpointer = Checkpointer(ckpt_dir, tcfg.checkpoint_every, tcfg.checkpoint_minutes, tcfg.keep_checkpoints,
                                tcfg.steps)
    trainer = L.Trainer(
        # devices/num_nodes > 1: DDP, one process per device started by srun (the launcher's multi-GPU jobs)
        **distributed.placement(device, devices, num_nodes),
        precision=precision, max_steps=tcfg.steps, max_epochs=-1, accumulate_grad_batches=batch.accumulate,
        use_distributed_sampler=False,  # kolora.train.samples deals each rank its share of the global order
        # torch's deterministic algorithms (warn where an op has none), cuDNN deterministic, no autotuning
        deterministic="warn" if tcfg.deterministic else None, benchmark=False if tcfg.deterministic else None,
        logger=trainlogs.loggers(cfg, run, start_step), default_root_dir=str(run.train),
        plugins=[*plugins, ckpt_io.AtomicCheckpointIO()],
        enable_model_summary=False, enable_checkpointing=False, enable_progress_bar=False,
        # the EMA is updated before the checkpointer saves that step
        callbacks=[StepProgress(tcfg.steps, progress), MetricsCSV(run.train / "metrics.csv"), *([ema] if ema else []),
                   checkpointer, *trainlogs.callbacks(),
                   *validation_sampler.callbacks(cfg, run, weight_dtype, save_lora)],
        num_sanity_val_steps=0, log_every_n_steps=1,
    )
    distributed.keep_signals_out(trainer)
    # Whoever launched us may already route signals to interrupt.request (the Slurm job wrapper does, and
    # `kolora run` for Ctrl-C too); called any other way SIGUSR2/SIGTERM still stop training cleanly at the next
    # step with a checkpoint.
    # Our sampler restarts at the resumed step by construction, which Lightning cannot know.
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
    with interrupt.handle():
        trainer.fit(module, ckpt_path=str(resume) if resume else None)
    if checkpointer.stopped and trainer.global_step < tcfg.steps:  # rank 0's decision, the same on every rank
        why = interrupt.requested() or "rank 0 was asked to stop"
        kept = ckpt_io.step_path(ckpt_dir, trainer.global_step)
        raise interrupt.Interrupted(f"training stopped at step {trainer.global_step}/{tcfg.steps} ({why}); "
                                    f"checkpoint {kept.stem} kept in {ckpt_dir}")

    out = run.lora / LORA_FILE
    if trainer.is_global_zero:
        with ema.applied(module) if ema else contextlib.nullcontext():
            save_lora(out, tcfg.steps)
        # a selection made from an earlier final LoRA is void (the select stage runs again: its key follows ours)
        shutil.rmtree(run.root / LAST_LORA_DIR, ignore_errors=True)
        (run.root / SELECTION_FILE).unlink(missing_ok=True)
    trainer.strategy.barrier("kolora-lora-saved")
    # the LoRA's step: a run re-run with a lower train.steps keeps the rows of its later steps
    rows = [r for r in csv.DictReader(open(run.train / "metrics.csv")) if int(r["step"]) <= trainer.global_step]
    return {"steps": trainer.global_step, "resumed_from_step": start_step, "precision": precision,
            "world_size": world, "accumulate": batch.accumulate, "global_batch": batch.size,
            "last_loss": float(rows[-1]["loss"]) if rows else None, "lora": str(out),
            "trainable_params": sum(p.numel() for p in unet.parameters() if p.requires_grad),
            **({"sources": source_counts(data.entries, cfg.data.repeats())} if repeats else {})}
