"""render: every (prompt, seed) of the prompt set through KolorsPipeline + the LoRA → render/<index>-<seed>.png.

`task_index`/`task_count` split the tiles round-robin so that one Slurm array task renders only its share.
Tiles that exist are skipped (a requeued task renders only what is missing), and each tile is written
atomically, so a half-written PNG never appears under its final name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kolora import interrupt
from kolora.config import ExperimentConfig, PromptItem, load_prompts
from kolora.errors import RunFailure
from kolora.lora import LoraFileError
from kolora.rundir import RunDir, atomic_path


def tile_name(index: int, seed: int) -> str:
    return f"{index:03d}-{seed}.png"


def tiles(cfg: ExperimentConfig) -> list[tuple[int, PromptItem, str]]:
    items = load_prompts(cfg.render.prompts, cfg.render.negative_prompt)
    return [(i, p, tile_name(i, p.seed)) for i, p in enumerate(items)]


def missing_tiles(cfg: ExperimentConfig, run: RunDir) -> list[str]:
    return [name for _, _, name in tiles(cfg) if not (run.render / name).is_file()]


def lora_path(cfg: ExperimentConfig, run: RunDir) -> Path:
    from kolora.lora import resolve_file

    return resolve_file(cfg.render.lora) if cfg.render.lora else run.lora / "pytorch_lora_weights.safetensors"


def build_pipeline(cfg: ExperimentConfig, lora_file: Path | None, device: str, dtype):
    from diffusers import KolorsPipeline

    from kolora import lora, models

    files = models.resolve(cfg.model)
    pipe = KolorsPipeline(vae=models.load_vae(files, dtype), text_encoder=models.load_text_encoder(files, dtype),
                          tokenizer=models.load_tokenizer(files), unet=models.load_unet(files, dtype),
                          scheduler=models.make_scheduler(files))
    if lora_file is not None:
        lora.load_into_pipeline(pipe, lora_file, scale=cfg.render.lora_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _device_dtype(cfg: ExperimentConfig):
    import torch

    device = cfg.render.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.render.dtype
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


def render_tile(pipe, cfg: ExperimentConfig, item: PromptItem, device: str):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(item.seed)
    return pipe(prompt=item.prompt, negative_prompt=item.negative_prompt, guidance_scale=cfg.render.cfg,
                num_inference_steps=cfg.render.steps, height=cfg.render.height, width=cfg.render.width,
                generator=generator, max_sequence_length=cfg.cache.max_sequence_length).images[0]


def run(cfg: ExperimentConfig, run: RunDir, task_index: int = 0, task_count: int = 1,
        progress=None) -> dict[str, Any]:
    if not 0 <= task_index < task_count:
        raise ValueError(f"task_index {task_index} is outside 0..{task_count - 1}")
    mine = [t for t in tiles(cfg) if t[0] % task_count == task_index]
    todo = [t for t in mine if not (run.render / t[2]).is_file()]
    if todo:
        lf = lora_path(cfg, run)
        if not lf.is_file():
            raise RunFailure(f"LoRA {lf} is missing: run the train stage first, or set render.lora")
        device, dtype = _device_dtype(cfg)
        try:
            pipe = build_pipeline(cfg, lf, device, dtype)
        except LoraFileError as e:
            raise LoraFileError(f"render.lora: {e}") if cfg.render.lora else e from None
        for n, (_, item, name) in enumerate(todo, 1):
            image = render_tile(pipe, cfg, item, device)
            with atomic_path(run.render / name) as tmp:
                image.save(tmp, format="PNG")
            if progress:
                progress(n, len(todo))
            if interrupt.requested() is not None and n < len(todo):
                raise interrupt.Interrupted(f"render task {task_index} stopped after {n} of {len(todo)} tiles "
                                            f"({interrupt.requested()}); the rest render when it runs again")
    return {"task": task_index, "tasks": task_count, "tiles": len(mine), "rendered": len(todo),
            "already_done": len(mine) - len(todo)}
