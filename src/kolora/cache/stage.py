"""cache: text embeddings and VAE latents of the training set, content-addressed, so training never loads
the text encoder or the VAE encoder.

With center crop and no random flip the tutorial's per-step encoding is deterministic, so caching gives
exactly the same training (notes/kolors-model.md) while ChatGLM3-6B (12.5 GB fp16) leaves the GPU.

Layout: STORE/text/<sha256>.safetensors (prompt_embeds [seq, 4096], pooled [4096]),
        STORE/latents/<sha256>.safetensors (latents [4, h/8, w/8], already scaled by the VAE's factor),
        <run>/cache/index.json (one entry per training sample → its two keys and its add_time_ids, and STORE),
        <run>/cache/report.json (the samples whose image could not be read or decoded, with the reason).
The work is sharded over the train job's ranks and journaled batch by batch (kolora.cache.shards): a stop
loses at most the batch in flight, and the next attempt encodes only what the journal lacks.
With train.buckets each image's latents are at its aspect-ratio bucket's size (kolora.cache.buckets), its entry
names the bucket, and its add_time_ids are that sample's original size, crop and target.
STORE is cache.dir (a lab folder shared by runs) or <run>/cache. Keys hash the content *and* what produced
it (the model's fingerprint, sequence length, resolution, crop), so a shared store never serves a stale
entry, and a second run (another lr, a sweep variant) encodes nothing already there. Writers that race on
one entry write identical bytes through atomic renames. Every entry carries a checksum and is verified when
read (kolora.cache.entry): the cache stage moves a bad one aside and encodes it again.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

from kolora.cache import buckets
from kolora.cache import entry as cache_entry
from kolora.core import devices
from kolora.core.config import ExperimentConfig
from kolora.core.errors import RunFailure
from kolora.core.numerics import nonfinite_count
from kolora.core.rundir import RunDir


def read_trainset(run: RunDir) -> list[dict[str, str]]:
    meta = run.trainset / "train" / "metadata.csv"
    if not meta.is_file():
        raise RunFailure(f"{meta} is missing: run the filter stage first")
    with open(meta, encoding="utf-8-sig", newline="") as f:
        rows = [dict(r) for r in csv.DictReader(f)]
    for r in rows:
        r["path"] = str((meta.parent / r["file_name"]).resolve())
    return rows


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def crop_offsets(width: int, height: int, resolution: int, center: bool, key: str) -> tuple[int, int]:
    """(top, left) of the square crop in an image already resized so its short side is `resolution`."""
    if center:
        return (height - resolution) // 2, (width - resolution) // 2
    # A fixed "random" crop per image (from its content hash): cacheable, and still varied across images.
    r = int(key[:8], 16)
    return r % (height - resolution + 1), (r // 7) % (width - resolution + 1)


def load_image_tensor(path: str, resolution: int, center: bool, key: str):
    """The tutorial's preprocessing: resize short side, crop, to [-1, 1] CHW float32."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                       Image.BILINEAR)
        top, left = crop_offsets(im.width, im.height, resolution, center, key)
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def text_dtype(precision: str):
    """Text embeddings are stored in the dtype training feeds the UNet: under autocast the first layer that
    reads them casts to it anyway, so training is unchanged while an entry is half the size of float32
    (256 × 4096 in float16 = 2 MiB)."""
    import torch

    return {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision, torch.float32)


def compact_text(embeds, pad: int) -> dict[str, Any]:
    """A caption's [seq, hidden] embeddings without the repeats of its padding: ChatGLM pads on the left, and
    every pad position has the same token, position id (0) and attention, so its rows are bit-identical; one
    is kept ("pad_row") with the token rows ("prompt_embeds"). Exact: read_text restores the same tensor. A
    caption whose pad rows differ (never seen) keeps all its rows."""
    import torch

    if pad > 1 and bool((embeds[:pad] == embeds[:1]).all()) and torch.isfinite(embeds[:1]).all():
        return {"pad_row": embeds[:1].contiguous(), "prompt_embeds": embeds[pad:].contiguous()}
    return {"prompt_embeds": embeds.contiguous()}


def read_text(path: Path | str, seq: int, of: str) -> dict[str, Any]:
    """A text entry as training uses it: prompt_embeds [seq, hidden] (pad rows restored) and pooled [hidden];
    verified (cache_entry.read: BadCacheEntry naming the file, `of` — its caption — and the fix)."""
    import torch

    entry = cache_entry.read(path, of)
    pad_row = entry.pop("pad_row", None)
    if pad_row is not None:
        pad = seq - entry["prompt_embeds"].shape[0]
        entry["prompt_embeds"] = torch.cat([pad_row.expand(pad, -1), entry["prompt_embeds"]])
    return entry


def text_entry_bytes(seq: int, hidden: int, dtype, tokens: int | None = None) -> int:
    """Bytes of one text entry as written (header included): a caption of `tokens` tokens (default: all `seq`,
    no padding, the largest entry) at text length `seq`."""
    import tempfile

    import torch

    tokens = seq if tokens is None else tokens
    embeds = torch.cat([torch.zeros(seq - tokens, hidden, dtype=dtype), torch.ones(tokens, hidden, dtype=dtype)])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "entry.safetensors"
        cache_entry.write(path, {**compact_text(embeds, seq - tokens), "pooled": torch.zeros(hidden, dtype=dtype)})
        return path.stat().st_size


class NonFiniteCache(RunFailure):
    """An encoder produced nan/inf: nothing is written for that sample, and training never sees it."""


def _check_finite(tensor, what: str, remedy: str) -> None:
    bad = nonfinite_count(tensor)
    if bad:
        raise NonFiniteCache(f"cache: {what} has {bad} non-finite values (nan/inf) of {tensor.numel()}; {remedy}. "
                             "Nothing was written for it; entries already written are kept.")


def text_key(cfg: ExperimentConfig, ident: str, text: str) -> str:
    stored = str(text_dtype(cfg.train.precision)).removeprefix("torch.")
    return _sha("text", ident, str(cfg.cache.max_sequence_length), stored, text)


# What makes an image uncacheable (it changed on disk after filtering): skipped with the reason, never a crash.
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError)


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (*DECODE_ERRORS, Image.DecompressionBombError)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def _entry(cfg: ExperimentConfig, row: dict[str, str], ident: str,
           sizes: list[tuple[int, int]] | None) -> dict[str, Any]:
    res, center = cfg.train.resolution, cfg.train.center_crop
    img_hash = _sha(Path(row["path"]).read_bytes())
    entry = {
        "file_name": row["file_name"], "text": row["text"],
        "text_key": text_key(cfg, ident, row["text"]),
        "latent_key": _sha("latent", ident, str(res), str(center), cfg.cache.vae_dtype, img_hash),
        # The tutorial's add_time_ids: original size, crop top-left, target size = [h, w, 0, 0, h, w].
        "time_ids": [res, res, 0, 0, res, res],
    }
    if sizes is not None:
        _bucket_entry(entry, row["path"], sizes, center, img_hash)
    return entry


def _entries(cfg: ExperimentConfig, rows: list[dict[str, str]], ident: str) -> list[dict[str, Any]]:
    sizes = buckets.for_config(cfg) if cfg.train.buckets else None
    return [_entry(cfg, r, ident, sizes) for r in rows]


def _bucket_entry(entry: dict[str, Any], path: str, sizes: list[tuple[int, int]], center: bool,
                  img_hash: str) -> None:
    """Buckets on: the entry's latents are its bucket's size and crop (both in the key, so they never share an
    entry with the square crop), and its time_ids are SDXL's micro-conditioning for this sample."""
    from PIL import Image

    with Image.open(path) as im:  # the header only
        width, height = im.size
    p = buckets.plan(width, height, sizes, center, img_hash)
    entry["latent_key"] = _sha(entry["latent_key"], "bucket", buckets.name(p.bucket), buckets.name(p.resized),
                               f"{p.top},{p.left}")
    entry["time_ids"] = p.time_ids
    entry["bucket"] = list(p.bucket)
    entry["_plan"] = p  # for encoding and the summary; taken out before the entry is journaled


def _encode_texts(cfg, files, todo: list[tuple[str, str]], text_dir: Path, device: str, after_batch) -> None:
    import torch

    from kolora.models import kolors as models
    te_dtype = torch.float16 if devices.is_cuda(device) else torch.float32
    stored = text_dtype(cfg.train.precision)
    # diffusers' own encode_prompt, so training sees exactly what rendering computes.
    encoder = models.prompt_encoder(files, te_dtype, device)
    bs, seq = cfg.cache.batch_size, cfg.cache.max_sequence_length
    try:
        for i in range(0, len(todo), bs):
            chunk = todo[i:i + bs]
            texts = [t for _, t in chunk]
            with torch.no_grad():
                embeds, _, pooled, _ = encoder.encode_prompt(
                    texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                    max_sequence_length=seq)
            # the tokenizer's own padding (encode_prompt's call): how many leading rows are padding
            mask = encoder.tokenizer(texts, padding="max_length", max_length=seq, truncation=True)["attention_mask"]
            for j, (key, text) in enumerate(chunk):
                tensors = {"prompt_embeds": embeds[j].to(stored).cpu(),
                           "pooled": pooled[j].to(stored).cpu().contiguous()}
                for name, t in tensors.items():
                    _check_finite(t, f"the {name} of caption {text[:60]!r}",
                                  f"ChatGLM3 overflowed in {te_dtype} or in the stored {stored}: use train.precision "
                                  "bf16-mixed, or cache.device: cpu to encode in float32")
                tensors.update(compact_text(tensors["prompt_embeds"], seq - sum(mask[j])))
                cache_entry.write(text_dir / f"{key}.safetensors", tensors)
            after_batch([key for key, _ in chunk])
    finally:
        del encoder
        models.free_gpu(device)


def _encode_latents(cfg, files, todo: list[tuple[str, str, str]], lat_dir: Path, device: str, after_batch,
                    plans: dict[str, buckets.Plan] | None = None) -> None:
    """`after_batch(written keys, {key: why it could not be read})` after each batch is on disk."""
    import torch

    from kolora.models import kolors as models
    res, center = cfg.train.resolution, cfg.train.center_crop
    vae_dtype = getattr(torch, cfg.cache.vae_dtype)
    vae = models.load_vae(files, vae_dtype).to(device)
    sf = vae.config.scaling_factor
    bs = cfg.cache.batch_size
    plans = plans or {}
    undecodable = _decode_errors()
    # One bucket per batch (images of different sizes cannot be stacked); buckets off: one group, as before.
    groups: dict[Any, list[tuple[str, str, str]]] = {}
    for item in todo:
        groups.setdefault(plans[item[0]].bucket if plans else None, []).append(item)
    try:
        for chunk in [items[i:i + bs] for items in groups.values() for i in range(0, len(items), bs)]:
            pixels, good, failed = [], [], {}
            for key, path, name in chunk:
                try:
                    pixels.append(buckets.load_tensor(path, plans[key]) if plans
                                  else load_image_tensor(path, res, center, key))
                    good.append((key, name))
                except undecodable as e:
                    failed[key] = f"does not decode: {_reason(e)}"
            if good:
                with torch.no_grad():
                    # The latent distribution's mean (DiffSynth's encoder is deterministic too).
                    lat = vae.encode(torch.stack(pixels).to(device, vae_dtype)).latent_dist.mean * sf
            for j, (key, name) in enumerate(good):
                latent = lat[j].float().cpu().contiguous()
                _check_finite(latent, f"the latents of {name}",
                              f"the SDXL VAE overflows in {cfg.cache.vae_dtype}: set cache.vae_dtype: float32 (the "
                              "default), or model.vae_path to the fp16-fix VAE (`kolora fetch models` downloads it)")
                cache_entry.write(lat_dir / f"{key}.safetensors", {"latents": latent})
            after_batch([key for key, _ in good], failed)
    finally:
        del vae
        models.free_gpu(device)


def run(cfg: ExperimentConfig, run: RunDir, progress=None, rank: int = 0, world: int = 1,
        barrier: str | None = None, force: bool = False) -> dict[str, Any]:
    """Cache this rank's shard of the training set (samples i with i % world == rank that the journal does not
    hold yet), journaling each batch; rank 0 then waits for the other ranks (files in `barrier`, a folder
    unique to this attempt) and writes cache/index.json and cache/report.json. Stops between batches on the
    stop signal (Interrupted); the next attempt, on any number of ranks, continues from the journal. Entries
    found in the store are verified; a bad one is moved aside and encoded again. `force` (--force) encodes
    every entry of this run again, in a shared store too; entries only other runs use are not touched."""
    from kolora.cache import shards as cache_shards
    rows = read_trainset(run)
    if not rows:
        raise RunFailure(f"{run.trainset}/train/metadata.csv has no samples: nothing to cache")
    if world > 1 and barrier is None:
        raise ValueError("cache.run: a sharded cache (world > 1) needs a barrier folder")
    return cache_shards.run_shard(cfg, run, rows, rank, world, barrier, progress, force)


def _bucket_summary(plans: list[buckets.Plan], resolution: int) -> dict[str, Any]:
    """Samples per bucket, and the mean share of each original image the training crop keeps, beside what the
    square crop to resolution² would keep of the same images."""
    hist: dict[str, int] = {}
    for p in sorted(plans, key=lambda p: p.bucket[0] / p.bucket[1]):
        hist[buckets.name(p.bucket)] = hist.get(buckets.name(p.bucket), 0) + 1
    kept = sum(p.kept_fraction for p in plans) / len(plans)
    square = sum(buckets.square_kept_fraction(*p.original, resolution) for p in plans) / len(plans)
    return {"buckets": hist, "kept_fraction": round(kept, 4), "center_crop_kept_fraction": round(square, 4)}
