"""Loss masks (data.mask): each masked sample's mask at its latents' grid, cached beside its latents.

A mask comes from a mask file (the trainset's `mask` column; read as greyscale: white trains, black is
ignored, grey weighs in between, as kohya's mask images) or, with data.mask: alpha, from the image's own alpha
channel (transparent is ignored). It goes through the image's own geometry (kolora.cache.buckets.Plan, the
square crop's too): resized from its full extent to the size the image is resized to, so a mask of another
size than its image is stretched over it, then cropped where the image is. Then it is area-averaged to the
latent grid, one value per 8×8 pixels (the share of that patch that trains; kohya interpolates its masks to the
latents with mode="area" likewise), and stored as float16 [1, h/8, w/8] in STORE/masks/<key>.safetensors. The
key hashes the mask's source and that geometry, so a shared store never serves a stale mask.
"""

from __future__ import annotations

from typing import Any

from kolora.cache import buckets
from kolora.ingest.sources import no_alpha

# PIL, numpy, torch: imported in the functions that use them (a login node's CLI starts without them)

LATENT_FACTOR = 8  # the VAE's downsampling: one latent pixel per 8×8 image pixels


def square_plan(width: int, height: int, resolution: int, center: bool, key: str) -> buckets.Plan:
    """The square crop's geometry as kolora.cache.stage.load_image_tensor applies it (short side resized to
    `resolution`, then a resolution² crop at crop_offsets, whose `key` is the sample's latent key)."""
    scale = resolution / min(width, height)
    resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    top, left = buckets.offsets(*resized, resolution, resolution, center, key)
    return buckets.Plan((width, height), (resolution, resolution), resized, top, left)


def identity(source_hash: str, alpha: bool, p: buckets.Plan) -> tuple[str, ...]:
    """What a mask entry's key hashes: its source's content and kind, and the geometry it goes through."""
    return ("mask", "alpha" if alpha else "file", source_hash,
            *(buckets.name(s) for s in (p.original, p.bucket, p.resized)), f"{p.top},{p.left}")


def load(path: str, alpha: bool, p: buckets.Plan) -> Any:
    """The mask of `path` (a mask file, or with `alpha` the image itself) as float16 [1, h/8, w/8] in [0, 1]
    for a sample of geometry `p`. Decode errors propagate (the cache stage skips the sample, naming why);
    kolora.ingest.sources.NoAlpha when `alpha` and the image has no transparency."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        if alpha:
            if not im.has_transparency_data:
                raise no_alpha(path, im.mode)
            if im.size != p.original:
                raise ValueError(f"{path} is {im.width}×{im.height}, planned as {p.original[0]}×{p.original[1]}")
            channel = im.convert("RGBA").getchannel("A")
        else:
            channel = im.convert("L")
    # float pixels ("F"): the resize and the average are not rounded to 8 bits on the way
    resized = channel.convert("F").resize(p.resized, Image.BILINEAR)
    crop = resized.crop((p.left, p.top, p.left + p.bucket[0], p.top + p.bucket[1]))
    arr = np.asarray(crop, dtype=np.float32) / 255.0
    h, w = arr.shape
    f = LATENT_FACTOR
    grid = arr.reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    return torch.from_numpy(np.clip(grid, 0.0, 1.0)).to(torch.float16).unsqueeze(0).contiguous()
