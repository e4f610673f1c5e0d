"""grid: the storyboard. Tiles in prompt-set order, `columns` per row (the tutorial's 2 × 4), optional
captions under each tile."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

from kolora.core.config import ExperimentConfig
from kolora.core.errors import InputError, RunFailure
from kolora.core.prompts import PromptItem
from kolora.core.rundir import atomic_path
from kolora.core.stage import StageContext
from kolora.render.tiles import missing_tiles, tiles

# PIL: imported in the functions that use them (a login node's CLI starts without them)

# What a one-line caption cannot hold: control characters (a newline makes PIL refuse to measure the text; a
# tab or an escape draws as nothing or a box) and Unicode's line and paragraph separators.
CAPTION_BREAKERS = ("Cc", "Zl", "Zp")


def caption_problems(cfg: ExperimentConfig, prompts: list[PromptItem]) -> list[str]:
    """With grid.captions: prompt, one line per prompt that cannot be drawn as a one-line caption."""
    if cfg.grid.captions != "prompt":
        return []
    out = []
    for i, item in enumerate(prompts, 1):
        found = sorted({ch for ch in item.prompt if unicodedata.category(ch) in CAPTION_BREAKERS})
        if found:
            names = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab"}
            out.append(f"prompt #{i} ({item.prompt[:24]!r}{'...' if len(item.prompt) > 24 else ''}) holds "
                       + ", ".join(f"{names.get(ch) or unicodedata.name(ch, 'a control character').lower()} "
                                   f"{ascii(ch)}" for ch in found))
    return out


def _font(path: Path | None, size: int):
    from PIL import ImageFont

    if path is not None:
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, run = ctx.cfg, ctx.run
    from PIL import Image, ImageDraw

    g = cfg.grid
    all_tiles = tiles(cfg, run)
    cells = g.columns * g.rows
    if len(all_tiles) > cells:
        raise InputError(f"grid: {len(all_tiles)} tiles do not fit grid.columns × grid.rows = {cells}; "
                         "raise grid.rows or grid.columns")
    missing = missing_tiles(cfg, run, all_tiles)
    if missing:
        raise RunFailure(f"grid: {len(missing)} of {len(all_tiles)} tiles missing in {run.render} (e.g. prompt "
                         f"#{missing[0].index + 1}, seed {missing[0].item.seed}): run the render stage first")
    images = []
    for tile in all_tiles:
        with Image.open(run.render / tile.name) as im:
            im = im.convert("RGB")
            images.append(im.resize((g.tile_size, g.tile_size), Image.LANCZOS) if g.tile_size else im.copy())
    w, h = images[0].size
    caption_h = 0 if g.captions == "none" else max(12, h // 8)
    font = _font(g.font, max(8, caption_h * 3 // 4)) if caption_h else None
    sheet = Image.new("RGB", (g.columns * w, g.rows * (h + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (tile, im) in enumerate(zip(all_tiles, images, strict=True)):
        item = tile.item
        x, y = (k % g.columns) * w, (k // g.columns) * (h + caption_h)
        sheet.paste(im.resize((w, h)) if im.size != (w, h) else im, (x, y))
        if caption_h:
            text = f"#{k + 1} seed {item.seed}" if g.captions == "seed" else item.prompt
            draw.text((x + 2, y + h + 1), _fit(draw, text, font, w - 4), fill="black", font=font)
    with atomic_path(run.grid_file) as tmp:
        sheet.save(tmp, format="PNG")
    return {"grid": str(run.grid_file), "tiles": len(images), "size": list(sheet.size)}
