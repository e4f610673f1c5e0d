"""render: every (prompt, seed) of the prompt set through KolorsPipeline + the LoRA → render/<tile>.png.

Tiles are named by their index, seed and key (kolora.render.tiles: everything their pixels depend on), so a
changed prompt or LoRA re-renders exactly the affected tiles, an unchanged tile is never rendered twice, and
array tasks never write or remove each other's files. `task_index`/`task_count` split the tiles round-robin
so that one Slurm array task renders only its share. Tiles are written atomically.

With base tiles on (render.base_tiles, or evaluate.enabled), each task also renders its share of the same
prompts and seeds with the base model (no LoRA) into render/base/, for evaluate's LoRA-vs-base comparison.
Their keys hold no LoRA, so with a shared cache.dir they are kept in <cache.dir>/base-tiles/ and every other
run of the same model and render settings (another lr, a sweep variant) links them instead of rendering.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from kolora.cache.entry import cache_store
from kolora.core import devices, interrupt
from kolora.core.config import ExperimentConfig
from kolora.core.errors import RunFailure
from kolora.core.prompts import PromptItem
from kolora.core.rundir import RunDir, atomic_path, fsync_dir
from kolora.core.stage import StageContext
from kolora.formats import interchange, pixels
from kolora.formats.lora import LoraFileError
from kolora.models import kolors as models
from kolora.render.tiles import Tile, base_tiles, base_tiles_on, lora_file, tiles

# diffusers, torch: imported in the functions that use them (a login node's CLI starts without them)


def build_pipeline(cfg: ExperimentConfig, lora_file: Path | None, device: str, dtype, text_encoder: bool = True):
    """KolorsPipeline with the LoRA; `text_encoder=False`: UNet + VAE only, for prompts encoded beforehand
    (encode_prompts), which is what the render stage uses."""
    from diffusers import KolorsPipeline

    files = models.resolve(cfg.model)
    pipe = KolorsPipeline(vae=models.load_vae(files, dtype), tokenizer=models.load_tokenizer(files),
                          text_encoder=models.load_text_encoder(files, dtype) if text_encoder else None,
                          unet=models.load_unet(files, dtype), scheduler=models.make_scheduler(files))
    if lora_file is not None:
        interchange.load_into_pipeline(pipe, lora_file, scale=cfg.render.lora_scale)
    pipe.set_progress_bar_config(disable=True)
    if devices.is_cuda(device):
        pipe.vae.enable_tiling()  # decodes above the VAE's sample size (1024) in tiles; no change at or below it
    return pipe.to(device)


def _device_dtype(cfg: ExperimentConfig):
    import torch

    device = devices.pick(cfg.render.device)
    dtype = cfg.render.dtype
    if dtype == "auto":
        dtype = "float16" if devices.is_cuda(device) else "float32"
    return device, getattr(torch, dtype)


class UnusableTile(RunFailure):
    """A tile decoded to something that is no picture (nan pixels, one flat colour): no PNG is written for it."""


def render_tile(pipe, cfg: ExperimentConfig, item: PromptItem, device: str, embeds: dict[str, Any] | None = None,
                label: str | None = None):
    """One tile: from the prompt text, or from `embeds` (encode_prompts) with a pipeline that has no text
    encoder. Both give the same pixels: the embeddings come from the same encode_prompt call.
    UnusableTile (naming `label`, the tile) when the pixels are not finite or all one colour."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(item.seed)
    text = dict(embeds) if embeds is not None else {"prompt": item.prompt, "negative_prompt": item.negative_prompt}
    # as numbers first: PIL would write nan pixels as a black tile
    image = pipe(**text, guidance_scale=cfg.render.cfg, num_inference_steps=cfg.render.steps,
                 height=cfg.render.height, width=cfg.render.width, generator=generator,
                 max_sequence_length=cfg.cache.max_sequence_length, output_type="np").images[0]
    problem = pixels.problem(image)
    if problem:
        raise UnusableTile(f"render: {label or f'the tile of seed {item.seed}'} {problem}, so no PNG was written "
                           f"for it (the tiles before it are kept). {_fix(pipe)}")
    return pipe.image_processor.numpy_to_pil(image)[0]


def _fix(pipe) -> str:
    """What to change, given the dtypes this pipeline rendered in."""
    import torch

    if pipe.unet.dtype == torch.float16:
        decoded = "in float32 (upcast)" if pipe.vae.config.force_upcast else "in float16"
        return (f"The render ran in float16 and the VAE decoded {decoded}: set render.dtype: float32 (or "
                "bfloat16), out of reach of a float16 overflow in the UNet or the stock SDXL VAE; the fp16-fix VAE "
                "(model.vae_path: its folder, e.g. models/sdxl-vae-fp16-fix) is the one VAE that decodes in float16. "
                "If render.dtype: float32 gives this too, the LoRA is broken: look for a diverged loss in "
                "train/metrics.csv, or lower render.lora_scale")
    return (f"The render ran in {str(pipe.unet.dtype).removeprefix('torch.')}, so this is no float16 overflow: the "
            "LoRA or the model is broken (look for a diverged loss in train/metrics.csv, lower render.lora_scale, "
            "or check the model files: kolora check models MODEL_PATH)")


def encode_prompts(cfg: ExperimentConfig, items: list[PromptItem], device: str, dtype) -> list[dict[str, Any]]:
    """The text embeddings of every tile this task renders, computed before the UNet is loaded; the text
    encoder (ChatGLM3-6B: 12.5 GB in float16) is freed afterwards, so it never shares the GPU with the UNet."""
    import torch

    encoder = models.prompt_encoder(models.resolve(cfg.model), dtype, device)
    out = []
    for item in items:
        with torch.no_grad():
            pe, ne, pp, npp = encoder.encode_prompt(
                item.prompt, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=cfg.render.cfg > 1, negative_prompt=item.negative_prompt,
                max_sequence_length=cfg.cache.max_sequence_length)
        out.append({"prompt_embeds": pe, "pooled_prompt_embeds": pp, "negative_prompt_embeds": ne,
                    "negative_pooled_prompt_embeds": npp})
    del encoder
    models.free_gpu(device)
    return out


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _shared_base(cfg: ExperimentConfig, run: RunDir, tile: Tile) -> Path | None:
    """Where a base tile is shared across runs: <cache.dir>/base-tiles/<key>.png (with a shared cache only)."""
    return cache_store(cfg, run) / "base-tiles" / f"{tile.key}.png" if tile.base and cfg.cache.dir else None


def _reuse(cfg: ExperimentConfig, run: RunDir, tile: Tile) -> bool:
    """A tile already rendered under another index (the prompt set was reordered), or a base tile another run
    rendered: link it to its name here."""
    assert tile.key is not None
    found = list(tile.path(run).parent.glob(f"*-{tile.key[:12]}.png"))
    shared = _shared_base(cfg, run, tile)
    for p in found + ([shared] if shared is not None and shared.is_file() else []):
        with contextlib.suppress(OSError):
            _link(p, tile.path(run))
            return True
    return False


@contextlib.contextmanager
def _named_by_render_lora(cfg: ExperimentConfig):
    """A LoRA file problem names render.lora when that field chose the file (else it is the run's own LoRA)."""
    try:
        yield
    except LoraFileError as e:
        raise LoraFileError(f"render.lora: {e}") if cfg.render.lora else e from None


def _render_tiles(cfg: ExperimentConfig, run: RunDir, lf: Path | None, todo: list[Tile], done_before: int,
                  total: int, task_index: int, progress) -> None:
    """Render `todo` (all LoRA tiles, or all base tiles: lf None) with one pipeline, stopping between tiles on
    a stop request."""
    device, dtype = _device_dtype(cfg)
    if lf is not None:
        with _named_by_render_lora(cfg):
            interchange.read_tensors(lf)  # a broken LoRA stops before the text encoder loads (minutes for Kolors)
    embeds = encode_prompts(cfg, [t.item for t in todo], device, dtype)
    with _named_by_render_lora(cfg):
        pipe = build_pipeline(cfg, lf, device, dtype, text_encoder=False)
    for n, (tile, tile_embeds) in enumerate(zip(todo, embeds, strict=True), done_before + 1):
        label = (f"tile {tile.path(run).relative_to(run.root)} (prompt {tile.index}, seed {tile.item.seed}, "
                 f"{'base model' if tile.base else 'LoRA'})")
        image = render_tile(pipe, cfg, tile.item, device, tile_embeds, label=label)
        tile.path(run).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(tile.path(run)) as tmp:
            image.save(tmp, format="PNG")
        shared = _shared_base(cfg, run, tile)
        if shared is not None:
            with contextlib.suppress(OSError):
                _link(tile.path(run), shared)
        if progress:
            progress(n, total)
        if interrupt.requested() is not None and n < total:
            raise interrupt.Interrupted(f"render task {task_index} stopped after {n} of {total} tiles "
                                        f"({interrupt.requested()}); the rest render when it runs again")
    del pipe
    models.free_gpu(device)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, run, progress = ctx.cfg, ctx.run, ctx.progress
    task_index, task_count = ctx.shard or 0, ctx.shards or 1
    if not 0 <= task_index < task_count:
        raise ValueError(f"task_index {task_index} is outside 0..{task_count - 1}")
    lf = lora_file(cfg, run)
    if not lf.is_file():
        raise RunFailure(f"LoRA {lf} is missing: run the train stage first, or set render.lora")
    base = base_tiles(cfg, run) if base_tiles_on(cfg) else []
    mine = [t for t in tiles(cfg, run) + base if t.index % task_count == task_index]
    todo = [t for t in mine if not t.path(run).is_file()]
    reused = [t for t in todo if _reuse(cfg, run, t)]
    todo = [t for t in todo if t not in reused]
    lora_todo = [t for t in todo if not t.base]
    base_todo = [t for t in todo if t.base]
    # one pipeline per kind: the LoRA tiles' pixels never depend on whether base tiles rendered beside them
    if lora_todo:
        _render_tiles(cfg, run, lf, lora_todo, 0, len(todo), task_index, progress)
    if base_todo:
        _render_tiles(cfg, run, None, base_todo, len(lora_todo), len(todo), task_index, progress)
    fsync_dir(run.render)
    if base:
        fsync_dir(run.render / "base")
    return {"task": task_index, "tasks": task_count, "tiles": len(mine), "rendered": len(todo),
            "reused": len(reused), "already_done": len(mine) - len(todo) - len(reused),
            **({"base_tiles": sum(t.base for t in mine)} if base else {})}
