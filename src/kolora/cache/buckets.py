"""Aspect-ratio buckets (train.buckets): SDXL-style training sizes around resolution² pixels.

Without buckets every image is resized so its short side is `resolution` and cropped to a square, which
throws away the ends of wide and tall images. With buckets each image goes to the size (w, h) whose aspect
ratio is closest to its own, is resized just enough to cover it and cropped to it, and the UNet gets SDXL's
micro-conditioning for that sample: original size, crop top-left, target size.

The bucket list is a pure function of (resolution, aspect-ratio range): sizes on a grid of `bucket_step`
pixels, each the largest with w·h ≤ resolution², from the square to the range's ends (for 1024 and 0.5–2.0:
1024×1024, 1088×960 … 1408×704 and the transposes, as in SDXL's published list). Nothing here imports torch:
the config checks use it, and the sampler lives in kolora.train.loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kolora.core.errors import ConfigError

# PIL, numpy, torch: imported in the functions that use them (a login node's CLI starts without them)

# image_aspect_ratio_filter's own defaults (Data-Juicer), for an op given without min_ratio/max_ratio
DJ_MIN_RATIO, DJ_MAX_RATIO = 0.333, 3.0
# Without an aspect-ratio op: the tutorial's range
DEFAULT_RANGE = (0.5, 2.0)
ASPECT_OPS = ("image_aspect_ratio_filter", "image_aspect_ratio_header_filter")


def bucket_step(resolution: int) -> int:
    """The grid bucket sides lie on: 64 px (SDXL's) from resolution 1024 up; below, resolution/16 rounded down
    to a multiple of 8 (at least 8, the VAE's factor), so small resolutions (the tiny demo's 64) still get
    several buckets instead of only the square."""
    return min(64, max(8, resolution // 16 // 8 * 8))


def bucket_sizes(resolution: int, min_ratio: float, max_ratio: float, step: int | None = None) -> list[tuple[int, int]]:
    """(w, h) sizes, multiples of `step`, each the largest h for its w with w·h ≤ resolution² (and the
    transposes), whose w/h lies in [min_ratio, max_ratio]; ordered by aspect ratio (tall to wide)."""
    step = step or bucket_step(resolution)
    area = resolution * resolution
    widest = max(max_ratio, 1 / min_ratio)
    landscape = []
    w = resolution // step * step
    while True:
        h = area // w // step * step
        if h < step or w / h > widest:
            break
        landscape.append((w, h))
        w += step
    sizes = {s for w, h in landscape for s in ((w, h), (h, w)) if min_ratio <= s[0] / s[1] <= max_ratio}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def ratio_range(ops: list[dict[str, dict[str, Any]]]) -> tuple[float, float]:
    """The aspect ratios the filter keeps: from its image_aspect_ratio_filter op(s) (several: the range they
    all keep), else 0.5–2.0."""
    found = [args or {} for op in ops for name, args in op.items() if name in ASPECT_OPS]
    if not found:
        return DEFAULT_RANGE
    lo = max(float(a.get("min_ratio", DJ_MIN_RATIO)) for a in found)
    hi = min(float(a.get("max_ratio", DJ_MAX_RATIO)) for a in found)
    return lo, hi


def for_config(cfg) -> list[tuple[int, int]]:
    """The run's bucket list; ConfigError naming the fields when the range leaves none."""

    lo, hi = ratio_range(cfg.filter.ops)
    res = cfg.train.resolution
    if not (0 < lo <= hi):
        raise ConfigError(f"train.buckets: the image_aspect_ratio_filter range in filter.ops is {lo:g}–{hi:g}; "
                          "buckets need 0 < min_ratio <= max_ratio (fix the op's min_ratio/max_ratio)")
    sizes = bucket_sizes(res, lo, hi)
    if not sizes:
        raise ConfigError(f"train.buckets: no {bucket_step(res)}-pixel bucket of at most {res}² pixels has an "
                          f"aspect ratio in {lo:g}–{hi:g} (filter.ops' image_aspect_ratio_filter); widen "
                          "min_ratio/max_ratio, or set train.buckets: false")
    return sizes


def closest(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio: 2:1 and 1:2 are equally far
    from square); the first in `sizes` order on a tie."""
    r = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - r))


@dataclass(frozen=True)
class Plan:
    """How one image becomes its bucket: resize to `resized`, crop `bucket` at (top, left)."""

    original: tuple[int, int]  # (w, h) as stored
    bucket: tuple[int, int]  # (w, h)
    resized: tuple[int, int]  # (w, h), covers the bucket
    top: int
    left: int

    @property
    def time_ids(self) -> list[int]:
        """SDXL's add_time_ids, as diffusers' SDXL/Kolors pipelines build them: original_size +
        crops_coords_top_left + target_size, each (h, w)."""
        (ow, oh), (bw, bh) = self.original, self.bucket
        return [oh, ow, self.top, self.left, bh, bw]

    @property
    def kept_fraction(self) -> float:
        """The share of the original image's area that the crop keeps."""
        return self.bucket[0] * self.bucket[1] / (self.resized[0] * self.resized[1])


def offsets(width: int, height: int, crop_w: int, crop_h: int, center: bool, key: str) -> tuple[int, int]:
    """(top, left) of a crop_w × crop_h crop in a width × height image: centred, or the content-hash offset
    kolora.cache.stage.crop_offsets uses for the square crop (cacheable, varied across images)."""
    if center:
        return (height - crop_h) // 2, (width - crop_w) // 2
    r = int(key[:8], 16)
    return r % (height - crop_h + 1), (r // 7) % (width - crop_w + 1)


def plan(width: int, height: int, sizes: list[tuple[int, int]], center: bool, key: str) -> Plan:
    bw, bh = closest(width, height, sizes)
    scale = max(bw / width, bh / height)  # covers the bucket: one side fits, the other is cropped
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    top, left = offsets(rw, rh, bw, bh, center, key)
    return Plan((width, height), (bw, bh), (rw, rh), top, left)


def square_kept_fraction(width: int, height: int, resolution: int) -> float:
    """What the square crop (buckets off) keeps of the same image: resolution² of the image resized so its
    short side is `resolution`, as kolora.cache.stage.load_image_tensor does."""
    scale = resolution / min(width, height)
    return resolution * resolution / (max(resolution, round(width * scale)) * max(resolution, round(height * scale)))


def load_tensor(path: str, p: Plan):
    """The image resized and cropped to its bucket, as [-1, 1] CHW float32 (load_image_tensor's steps)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != p.original:
            raise ValueError(f"{path} is {im.width}×{im.height}, planned as {p.original[0]}×{p.original[1]}")
        im = im.resize(p.resized, Image.BILINEAR)
        im = im.crop((p.left, p.top, p.left + p.bucket[0], p.top + p.bucket[1]))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def name(size: tuple[int, int] | list[int]) -> str:
    return f"{size[0]}x{size[1]}"
