"""Render tiles: one per (prompt, seed) of the prompt set, named by a key of everything its pixels depend on
(prompt, negative prompt, seed, the render fields, the LoRA's bytes and scale, the model, the text length),
so an edited prompt re-renders exactly its tile and tiles are reused across runs and sweep variants.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.core import hashing
from kolora.core.config import ExperimentConfig, field_value
from kolora.core.prompts import load_prompts
from kolora.core.rundir import RunDir
from kolora.formats.lora import resolve_file
from kolora.models import fingerprint

# Render's config inputs: every tile's key holds them (but the negative prompt, per prompt, and base_tiles).
RENDER_FIELDS = ("render.negative_prompt", "render.cfg", "render.steps", "render.width", "render.height",
                 "render.lora_scale", "render.dtype", "cache.max_sequence_length", "render.base_tiles")


@dataclass(frozen=True)
class Tile:
    index: int
    item: Any  # prompts.PromptItem
    key: str | None  # None while the LoRA it depends on does not exist
    base: bool = False  # rendered with the base model (no LoRA), in render/base/

    @property
    def name(self) -> str | None:
        return None if self.key is None else f"{self.index:03d}-{self.item.seed}-{self.key[:12]}.png"

    def path(self, run: RunDir) -> Path | None:
        return None if self.name is None else (run.render / "base" if self.base else run.render) / self.name


def lora_file(cfg: ExperimentConfig, run: RunDir) -> Path:
    """The LoRA render uses: render.lora (a file or export folder), else the run's own."""

    return resolve_file(cfg.render.lora) if cfg.render.lora else run.lora / "pytorch_lora_weights.safetensors"


def tiles(cfg: ExperimentConfig, run: RunDir) -> list[Tile]:
    """Every (prompt, seed) of the prompt set, keyed by what its pixels depend on: prompt, negative prompt,
    seed and the render fields, the LoRA's bytes and scale, the model, the text length."""

    common = {f: field_value(cfg, f) for f in RENDER_FIELDS if f not in ("render.negative_prompt", "render.base_tiles")}
    common["model"] = fingerprint.model(cfg.model)
    lora = lora_file(cfg, run)
    lora_sha = hashing.file_sha256(lora) if lora.is_file() else None
    out = []
    for i, item in enumerate(load_prompts(cfg.render.prompts, cfg.render.negative_prompt)):
        key = None if lora_sha is None else hashing.digest(
            [common, lora_sha, item.prompt, item.negative_prompt, item.seed])
        out.append(Tile(i, item, key))
    return out


def base_tiles_on(cfg: ExperimentConfig) -> bool:
    return cfg.evaluate.enabled if cfg.render.base_tiles is None else cfg.render.base_tiles


def base_tiles(cfg: ExperimentConfig, run: RunDir) -> list[Tile]:
    """The same prompts and seeds rendered with the base model (LoRA scale 0: no LoRA loaded), keyed by the
    render fields, the model, the prompt, negative prompt and seed: not by any LoRA, so every run of the same
    model and render settings (every variant of a sweep) has the same base tiles."""

    common = {f: field_value(cfg, f) for f in RENDER_FIELDS
              if f not in ("render.negative_prompt", "render.base_tiles", "render.lora_scale")}
    common["model"] = fingerprint.model(cfg.model)
    return [Tile(i, item, hashing.digest(["base", common, item.prompt, item.negative_prompt, item.seed]), True)
            for i, item in enumerate(load_prompts(cfg.render.prompts, cfg.render.negative_prompt))]


def all_tiles(cfg: ExperimentConfig, run: RunDir) -> list[Tile]:
    """The tiles render makes: the LoRA's, then the base model's when base tiles are on."""
    return tiles(cfg, run) + (base_tiles(cfg, run) if base_tiles_on(cfg) else [])


def missing_tiles(cfg: ExperimentConfig, run: RunDir, wanted: list[Tile] | None = None) -> list[Tile]:
    wanted = all_tiles(cfg, run) if wanted is None else wanted
    return [t for t in wanted if t.name is None or not t.path(run).is_file()]


def tile_files(folder: Path) -> list[Path]:
    """The finished tiles in a folder: not the temp files (".<name>.<random>.kolora-tmp.png") of a tile
    being written, which glob("*.png") also matches."""
    return sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))


def stale_tiles(cfg: ExperimentConfig, run: RunDir) -> list[Path]:
    """Tiles in render/ (and render/base/) that the current config does not show (other prompts, LoRA...)."""
    names = {t.name for t in tiles(cfg, run)}
    base = {t.name for t in base_tiles(cfg, run)} if base_tiles_on(cfg) else set()
    return ([p for p in tile_files(run.render) if p.name not in names]
            + [p for p in tile_files(run.render / "base") if p.name not in base])


def prune_stale_tiles(cfg: ExperimentConfig, run: RunDir) -> int:
    """Remove stale tiles once every wanted tile exists: no render task is writing then, and tiles are
    named by key, so this never races a task (two tasks finishing together remove the same files)."""
    removed = 0
    for p in stale_tiles(cfg, run):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    return removed
