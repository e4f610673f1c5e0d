"""A small captioned image dataset made on the spot, for the demo and the tests (no downloads).

Images are coloured shapes on coloured backgrounds (something a LoRA can learn), captioned like
"二次元, a red circle on a blue background". Sizes cycle through kinds chosen against the tutorial's two
filters scaled to `large = 2 * min_side` (the demo: min_side 32 -> the 64x64 shape filter):

    ok       both sides in [large, max_side], aspect ratio well inside 0.5-2.0   -> kept
    small    a square with side < large                                          -> dropped by the shape filter
    wide     both sides >= large, width > 2.2 x height                           -> dropped by the aspect filter
    tall     the same, turned                                                    -> dropped by the aspect filter
    tiny     random sides with at least one < large                              -> dropped by the shape filter

Half the images are "ok". `wide`/`tall` need max_side >= 4.4 * min_side (the demo's 32/160 has it); with
narrower ranges they are clamped to max_side and may fail both filters. Everything is deterministic in `seed`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

# PIL: imported in the functions that use them (a login node's CLI starts without them)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "pink": (245, 150, 190), "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond")
KINDS = ("ok", "small", "ok", "wide", "ok", "tall", "ok", "tiny")


def _size(kind: str, rng: random.Random, min_side: int, max_side: int) -> tuple[int, int]:
    large = 2 * min_side
    top = max(max_side, large)
    if kind == "ok":
        while True:
            w, h = rng.randint(large, top), rng.randint(large, top)
            if 0.6 <= w / h <= 1.7:
                return w, h
    if kind == "small":
        side = rng.randint(min_side, large - 1)
        return side, side
    if kind in ("wide", "tall"):
        short = rng.randint(large, max(large, int(top / 2.2)))
        long = min(top, rng.randint(math.ceil(short * 2.2), max(math.ceil(short * 2.2), top)))
        return (long, short) if kind == "wide" else (short, long)
    # tiny: random, at least one side below `large`
    w, h = rng.randint(min_side, top), rng.randint(min_side, large - 1)
    return (w, h) if rng.random() < 0.5 else (h, w)


def _draw(size: tuple[int, int], shape: str, fg, bg, mode: str = "RGB"):
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new(mode, size, bg)
    d = ImageDraw.Draw(img)
    r = 0.35 * min(w, h)
    cx, cy = w / 2, h / 2
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    return img


def make_synthetic(out_dir: Path | str, count: int, seed: int = 0, min_side: int = 32,
                   max_side: int = 160, masks: bool = False) -> list[tuple[Path, str]]:
    """Write `count` images named 000000.jpg/.png ... into `out_dir`; return [(path, caption)] in order. masks:
    also a loss mask 000000_mask.png ... beside each (the shape 255, the background 64)."""
    if min_side < 1 or max_side < min_side:
        raise ValueError(f"synthetic sizes need 1 <= min_side <= max_side, got {min_side}, {max_side}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    items: list[tuple[Path, str]] = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        size = _size(kind, rng, min_side, max_side)
        fg_name, bg_name = rng.sample(names, 2)
        shape = rng.choice(SHAPES)
        img = _draw(size, shape, COLOURS[fg_name], COLOURS[bg_name])
        if i % 3 == 2:
            path = out / f"{i:06d}.png"
            img.save(path, format="PNG")
        else:
            path = out / f"{i:06d}.jpg"
            img.save(path, format="JPEG", quality=90)
        if masks:
            _draw(size, shape, 255, 64, mode="L").save(out / f"{i:06d}_mask.png", format="PNG")
        items.append((path, f"二次元, a {fg_name} {shape} on a {bg_name} background"))
    return items
