"""The validation sampler (train.validation): a Lightning callback that renders the validation prompts with
the UNet being trained, from the cached embeddings (kolora.train.validation), on rank 0; and, when
evaluate.select chooses among the steps, keeps each step's LoRA beside its samples and samples step 0 (the base
model: every adapter kolora trains starts there)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from kolora.cache.validation import prompt_texts, texts_to_cache
from kolora.core import interrupt
from kolora.core.config import ExperimentConfig
from kolora.core.errors import RunFailure
from kolora.core.rundir import RunDir, atomic_path
from kolora.formats import pixels
from kolora.models import kolors as models
from kolora.train import checkpoint
from kolora.train.samples import CachedSamples
from kolora.train.validation import keeps_step_loras, sample_names, step_dir, step_lora

# diffusers: imported when sampling runs (a run without validation samples never loads its pipeline)

log = logging.getLogger("kolora.train.loop")


class ValidationSampler(L.Callback):
    """Samples at every `train.validation.every`-th step on rank 0 (a step already sampled is skipped)."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir, weight_dtype,
                 save_lora: Callable[[Path, int], None] | None = None):
        self.cfg, self.run, self.weight_dtype = cfg, run, weight_dtype
        self.every = cfg.train.validation.every
        # save_lora(path, step): the LoRA as training is now, in the run LoRA's format
        self.save_lora = save_lora if keeps_step_loras(cfg) else None
        self.names, self.prompts = sample_names(cfg), prompt_texts(cfg)
        self.vae = self.embeds = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.embeds = self._read_embeddings()
        self.vae = self._load_vae(pl_module.device)  # on the CPU
        step = trainer.global_step  # resumed at a sampling step whose samples a stop request cut short
        if step and step % self.every == 0 and not self.done(step):
            self.sample(trainer, pl_module)
        if step == 0 and self.save_lora is not None and not self.done(0):  # the base model, for the selection
            self.sample(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # step 0: micro-batches of the first optimizer step under gradient accumulation
        if trainer.is_global_zero and step and step % self.every == 0 and interrupt.requested() is None:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.vae = self.embeds = None

    def done(self, step: int) -> bool:
        folder = step_dir(self.run.train, step)
        lora = self.save_lora is None or step == 0 or step_lora(self.run.train, step).is_file()
        return lora and all((folder / name).is_file() for _, _, name in self.names)

    def _vae_dtype(self, device):
        # float16 only with a VAE that survives it (the fp16-fix VAE the recipe uses, as cache.vae_dtype says)
        return getattr(torch, self.cfg.cache.vae_dtype) if device.type == "cuda" else torch.float32

    def _load_vae(self, device):
        """The VAE in the dtype it decodes in: float32 where a float16 VAE needs upcasting (models.load_vae
        judges that by its weights), since this sampler decodes itself rather than through the pipeline."""
        vae = models.load_vae(models.resolve(self.cfg.model), self._vae_dtype(device))
        return vae.float() if vae.dtype == torch.float16 and vae.config.force_upcast else vae

    def _read_embeddings(self) -> dict[str, dict[str, Any]]:
        data = CachedSamples(self.run.cache)
        cached = json.loads((self.run.cache / "index.json").read_text()).get("validation") or {}
        missing = [t for t in texts_to_cache(self.cfg) if t not in cached]
        if missing:
            raise RunFailure(f"train.validation: the cache has no embeddings for {missing[0][:60]!r}: rerun the "
                             "cache stage (kolora run CONFIG --stage cache), which encodes the validation prompts")
        return {t: data.text(cached[t], f"validation prompt {t[:60]!r}") for t in texts_to_cache(self.cfg)}

    def sample(self, trainer, pl_module) -> None:
        if self.done(trainer.global_step):
            return
        images = self.render(pl_module, trainer.global_step)
        folder = step_dir(self.run.train, trainer.global_step)
        folder.mkdir(parents=True, exist_ok=True)
        if self.save_lora is not None and trainer.global_step:  # the weights these samples were drawn with
            self.save_lora(step_lora(self.run.train, trainer.global_step), trainer.global_step)
        usable = [(n, image) for n, image in zip(self.names, images, strict=True) if image is not None]
        for (_, _, name), image in usable:
            with atomic_path(folder / name) as tmp:
                image.save(tmp, format="PNG")
        for logger in trainer.loggers:
            log_images(logger, [image for _, image in usable], [n for n, _ in usable], trainer.global_step)

    def render(self, pl_module, step: int | None = None) -> list[Any]:
        """The samples with the UNet as it is now, its RNG, mode and device left as they were; None for a sample
        that decoded to no picture (nan pixels, one flat colour: kolora.formats.pixels), with a warning. Training goes
        on: only rank 0 samples, and a rank that stopped alone would leave the others waiting in an all-reduce."""
        from diffusers import KolorsPipeline

        v, rcfg, unet, device = self.cfg.train.validation, self.cfg.render, pl_module.unet, pl_module.device
        size = v.size or self.cfg.train.resolution
        negative = self.embeds[rcfg.negative_prompt]
        rng, was_training = checkpoint.rng_state(), unet.training
        pipe = KolorsPipeline(vae=self.vae.to(device), text_encoder=None, tokenizer=None, unet=unet.eval(),
                              scheduler=models.make_scheduler(models.resolve(self.cfg.model)))
        pipe.set_progress_bar_config(disable=True)
        images = []
        try:
            # no autocast: the UNet runs in its weight dtype (peft computes the LoRA in float32 and casts back),
            # the VAE in its own (autocast would run the SDXL VAE in float16, which overflows)
            with torch.no_grad():
                for i, seed, name in self.names:
                    text = self.embeds[self.prompts[i]]
                    latents = pipe(
                        prompt_embeds=_batch(text["prompt_embeds"], device, self.weight_dtype),
                        pooled_prompt_embeds=_batch(text["pooled"], device, self.weight_dtype),
                        negative_prompt_embeds=_batch(negative["prompt_embeds"], device, self.weight_dtype),
                        negative_pooled_prompt_embeds=_batch(negative["pooled"], device, self.weight_dtype),
                        guidance_scale=rcfg.cfg, num_inference_steps=v.steps, height=size, width=size,
                        generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
                    # decoded here in the VAE's dtype (the pipeline would feed it latents in the UNet's)
                    decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
                    image = pipe.image_processor.postprocess(decoded, output_type="np")[0]
                    problem = pixels.problem(image)
                    if problem:
                        log.warning(
                            "train.validation: sample %s%s (prompt %d, seed %d) %s; no PNG was written for it. The "
                            "UNet ran in %s and the VAE decoded in %s: a float16 overflow is out of reach with "
                            "train.precision: bf16-mixed; otherwise the LoRA is diverging (see train/metrics.csv)",
                            name, f" of step {step}" if step is not None else "", i, seed, problem,
                            str(self.weight_dtype).removeprefix("torch."), str(self.vae.dtype).removeprefix("torch."))
                    images.append(None if problem else pipe.image_processor.numpy_to_pil(image)[0])
        finally:
            unet.train(was_training)
            self.vae.to("cpu")
            del pipe
            models.free_gpu(device)
            checkpoint.set_rng_state(rng)
        return images


def _batch(tensor, device, dtype):
    return tensor.unsqueeze(0).to(device, dtype)


def log_images(logger, images: list[Any], names: list[tuple[int, int, str]], step: int) -> None:
    """Validation images to a Lightning logger that takes images (TensorBoard, wandb)."""

    experiment = logger.experiment
    for (i, seed, _), image in zip(names, images, strict=True):
        tag = f"validation/{i}-{seed}"
        if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
            experiment.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # wandb
            logger.log_image(key=tag, images=[image], step=step)


def callbacks(cfg: ExperimentConfig, run: RunDir, weight_dtype,
              save_lora: Callable[[Path, int], None] | None = None) -> list[Any]:
    """The Lightning callback that samples (none when train.validation.every is 0)."""
    return [ValidationSampler(cfg, run, weight_dtype, save_lora)] if cfg.train.validation.every else []
