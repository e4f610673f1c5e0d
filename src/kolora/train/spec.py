"""The train stage as the registry sees it (kolora.core.stage.Stage); kolora.train.loop does the work."""

from kolora.core.stage import Stage, file_exists

# kolora.train.checkpoint (torch): imported in the functions that use them (a login node's CLI starts without them)


def resume_step(cfg, run, key: str) -> int:
    """The step of the checkpoint training continues from (0: none), as the loop finds it: what rank 0 of a
    DDP job chooses once for every rank, so that no rank lists the checkpoint folder by itself."""
    from kolora.train import checkpoint

    found = checkpoint.newest_valid(run.train / "checkpoints", key, max_step=cfg.train.steps)
    return int(found[1]["global_step"]) if found else 0


STAGE = Stage(
    "train", entry="kolora.train.loop:run", runs_on="gpu", parallel="ddp", after=("cache",),
    inputs=("train.rank", "train.alpha", "train.target_modules", "train.lr", "train.batch_size",
            "train.precision", "train.gradient_checkpointing", "train.seed", "train.deterministic",
            "train.min_snr_gamma", "train.noise_offset", "train.caption_dropout", "train.ema_decay",
            "train.dora", "train.optimizer", "cpu_threads", "train.buckets", "train.timesteps",
            "train.adapter", "train.lokr_factor", "train.block_ranks", "train.block_alphas",
            "train.lr_scheduler", "train.warmup_steps", "train.lr_num_cycles", "train.lr_power",
            "data.sources.repeats"),
    content=(), outputs=("train", "lora"), done=file_exists("lora/pytorch_lora_weights.safetensors"),
    stoppable=True, on_change="keep", continues=("train.steps",), keeps_partial=True, resume_step=resume_step)
