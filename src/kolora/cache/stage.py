"""cache: text embeddings and VAE latents of the training set, content-addressed, so training never loads
the text encoder or the VAE encoder.

With center crop and no random flip the tutorial's per-step encoding is deterministic, so caching gives
exactly the same training while ChatGLM3-6B (12.5 GB fp16) leaves the GPU.

Layout: STORE/text/<sha256>.safetensors (prompt_embeds [seq, 4096], pooled [4096]),
        STORE/latents/<sha256>.safetensors (latents [4, h/8, w/8], already scaled by the VAE's factor),
        STORE/masks/<sha256>.safetensors (mask [1, h/8, w/8] float16: a sample's loss mask, kolora.cache.masks),
        <run>/cache/index.json (one entry per training sample → its two keys and its add_time_ids, and STORE;
                                a masked sample's mask_key too),
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
import logging
import tempfile
import uuid
from pathlib import Path
from typing import Any

from kolora.cache import buckets, masks
from kolora.cache import entry as cache_entry
from kolora.cache.entry import cache_store
from kolora.cache.shards import Journal, journal_folder, report_shard, wait_for_shards
from kolora.cache.validation import texts_to_cache
from kolora.core import devices, interrupt
from kolora.core import shards as core_shards
from kolora.core.config import ExperimentConfig
from kolora.core.errors import RunFailure
from kolora.core.numerics import nonfinite_count
from kolora.core.rundir import RunDir, atomic_write_json, fsync_dir
from kolora.core.stage import StageContext
from kolora.ingest.sources import NoAlpha
from kolora.models import fingerprint
from kolora.models import kolors as models

# PIL, numpy, torch: imported in the functions that use them (a login node's CLI starts without them)

log = logging.getLogger(__name__)


def read_trainset(run: RunDir) -> list[dict[str, str]]:
    meta = run.trainset / "train" / "metadata.csv"
    if not meta.is_file():
        raise RunFailure(f"{meta} is missing: run the filter stage first")
    with open(meta, encoding="utf-8-sig", newline="") as f:
        rows = [dict(r) for r in csv.DictReader(f)]
    for r in rows:
        r["path"] = str((meta.parent / r["file_name"]).resolve())
        if r.get("mask"):  # the filter wrote the column for a dataset with masks
            r["mask_path"] = str((meta.parent / r["mask"]).resolve())
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
        **({"source": row["source"]} if row.get("source") else {}),  # data.sources: its repeats (train.samples)
    }
    if sizes is not None:
        _bucket_entry(entry, row["path"], sizes, center, img_hash)
    alpha = cfg.data.mask == "alpha"
    mask_source = row["path"] if alpha else row.get("mask_path") if cfg.data.mask == "auto" else None
    if mask_source:
        _mask_entry(entry, row["path"], mask_source, alpha, img_hash, res, center)
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


def _mask_entry(entry: dict[str, Any], image: str, source: str, alpha: bool, img_hash: str, res: int,
                center: bool) -> None:
    """A masked sample: its mask's key (its source and the image's geometry, kolora.cache.masks) and what
    encoding it needs (taken out before the entry is journaled)."""
    plan = entry.get("_plan")
    if plan is None:  # the square crop: its geometry from the image's size (the header only)
        from PIL import Image

        with Image.open(image) as im:
            width, height = im.size
        plan = masks.square_plan(width, height, res, center, entry["latent_key"])
    source_hash = img_hash if alpha else _sha(Path(source).read_bytes())
    entry["mask_key"] = _sha(*masks.identity(source_hash, alpha, plan))
    entry["_mask"] = (source, alpha, plan)


def _encode_texts(cfg, files, todo: list[tuple[str, str]], text_dir: Path, device: str, after_batch) -> None:
    import torch

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


def run(ctx: StageContext) -> dict[str, Any]:
    """Cache this rank's shard of the training set (samples i with i % world == rank that the journal does not
    hold yet), journaling each batch; rank 0 then waits for the other ranks (files in `barrier`, a folder
    unique to this attempt) and writes cache/index.json and cache/report.json. Stops between batches on the
    stop signal (Interrupted); the next attempt, on any number of ranks, continues from the journal. Entries
    found in the store are verified; a bad one is moved aside and encoded again. `force` (--force) encodes
    every entry of this run again, in a shared store too; entries only other runs use are not touched."""
    cfg, run, progress, rank, world, force = ctx.cfg, ctx.run, ctx.progress, ctx.rank, ctx.world, ctx.force
    barrier = ctx.extra.get("barrier")
    rows = read_trainset(run)
    if not rows:
        raise RunFailure(f"{run.trainset}/train/metadata.csv has no samples: nothing to cache")
    if world > 1 and barrier is None:
        raise ValueError("cache.run: a sharded cache (world > 1) needs a barrier folder")
    store = cache_store(cfg, run)
    ident = fingerprint.model(cfg.model)
    journal = Journal(journal_folder(run.cache, ctx.key, store), rank)
    attempt = Path(barrier).name if barrier else uuid.uuid4().hex[:12]
    resumed = len(journal.state()[0]) if rank == 0 else None
    try:
        stats = _cache_shard(cfg, rows, rank, world, store, ident, journal, attempt, progress, force)
    except interrupt.Interrupted:
        if rank > 0:
            report_shard(barrier, rank, "interrupted")
        raise
    except BaseException as e:
        if rank > 0:
            report_shard(barrier, rank, "failed", f"{type(e).__name__}: {e}"[:500])
        raise
    if rank > 0:
        report_shard(barrier, rank, "done")
        return {"rank": rank, "world": world, **stats}
    if world > 1:
        wait_for_shards(barrier, world)
    return _merge(cfg, run, rows, journal, store, ident, attempt,
                  {"resumed_samples": resumed, "ranks": world, "device": stats["device"]})


def _write_masks(pending: dict[int, dict[str, Any]], mask_dir: Path, reusable, rank: int) -> dict[int, str]:
    """The masks of the pending entries that have one and are not in the store (kolora.cache.masks); returns
    {row: why} for those whose mask does not decode (their samples are skipped). Stops between masks on a stop
    request: those written are found in the store next time."""
    failed: dict[int, str] = {}
    undecodable = _decode_errors()
    for i, e in pending.items():
        if "mask_key" not in e:
            continue
        path = mask_dir / f"{e['mask_key']}.safetensors"
        if reusable(path, f"the mask of image {e['file_name']}"):
            continue
        source, alpha, plan = e["_mask"]
        try:
            mask = masks.load(source, alpha, plan)
        except NoAlpha:
            raise
        except undecodable as err:
            failed[i] = f"its mask does not decode: {_reason(err)}"
            continue
        cache_entry.write(path, {"mask": mask})
        if interrupt.requested():
            raise interrupt.Interrupted(f"cache rank {rank}: stopped ({interrupt.requested()}) while writing masks; "
                                        "the next attempt finds those written in the store")
    return failed


def _line(i: int, entry: dict[str, Any]) -> dict[str, Any]:
    entry = dict(entry)
    plan = entry.pop("_plan", None)
    entry.pop("_mask", None)
    line: dict[str, Any] = {"row": i, "entry": entry}
    if plan is not None:  # buckets: for the summary's histogram and kept fractions
        line["plan"] = [*plan.original, *plan.bucket, *plan.resized, plan.top, plan.left]
    return line


def _cache_shard(cfg: ExperimentConfig, rows: list[dict[str, str]], rank: int, world: int, store: Path,
                 ident: str, journal: Journal, attempt: str, progress, force: bool) -> dict[str, Any]:
    """This rank's shard: the entries the journal lacks (all with `force`), encoded batch by batch and journaled."""
    text_dir, lat_dir, mask_dir = store / "text", store / "latents", store / "masks"

    def present(line: dict[str, Any]) -> bool:
        e = line["entry"]
        return (text_dir / f"{e['text_key']}.safetensors").is_file() and \
            (lat_dir / f"{e['latent_key']}.safetensors").is_file() and \
            ("mask_key" not in e or (mask_dir / f"{e['mask_key']}.safetensors").is_file())

    def reusable(path: Path, of: str) -> bool:
        """An entry found in the store is reused when it verifies; a bad one is moved aside, named, and encoded
        again. --force encodes every one again."""
        if not path.is_file():
            return False
        try:
            cache_entry.read(path, of)
        except cache_entry.BadCacheEntry as e:
            if e.reason == "missing":  # another writer just replaced it
                return False
            aside = cache_entry.quarantine(path, e.reason)
            log.warning("cache: %s (%s) %s; moved aside to %s, encoding it again", path, of, e.problem, aside)
            journal.append([{"repaired": str(path), "of": of, "problem": e.problem, "aside": str(aside)}])
            return False
        return not force

    cached = {} if force else journal.state()[0]
    mine = [i for i in core_shards.interleaved(len(rows), world, rank) if not (i in cached and present(cached[i]))]
    sizes = buckets.for_config(cfg) if cfg.train.buckets else None
    pending: dict[int, dict[str, Any]] = {}
    skips = []
    for i in mine:  # hashing reads every image of the shard once
        try:
            pending[i] = _entry(cfg, rows[i], ident, sizes)
        except _decode_errors() as e:
            skips.append({"row": i, "skipped": f"cannot be read: {_reason(e)}"})
    # masks first (cheap, on the CPU): every entry journaled below has its mask in the store
    for i, why in _write_masks(pending, mask_dir, reusable, rank).items():
        del pending[i]
        skips.append({"row": i, "skipped": why})
    journal.append(skips)

    texts = {e["text_key"]: e["text"] for e in pending.values()}
    if rank == 0:
        texts[text_key(cfg, ident, "")] = ""  # the empty caption, once: what caption dropout trains on
        # train.validation's prompts (and negative prompt): sampling during training never loads the encoder
        texts.update({text_key(cfg, ident, t): t for t in texts_to_cache(cfg)})
    by_latent: dict[str, list[int]] = {}
    for i, e in pending.items():
        by_latent.setdefault(e["latent_key"], []).append(i)
    image_of = {e["text_key"]: e["file_name"] for e in pending.values()}

    def caption(key: str, text: str) -> str:
        if key in image_of:
            return f"the caption of image {image_of[key]}: {text[:60]!r}"
        return f"caption {text[:60]!r}" if text else "the empty caption"

    todo_text = sorted((k, t) for k, t in texts.items()
                       if not reusable(text_dir / f"{k}.safetensors", caption(k, t)))
    todo_lat = sorted((key, rows[idx[0]]["path"], rows[idx[0]]["file_name"]) for key, idx in by_latent.items()
                      if not reusable(lat_dir / f"{key}.safetensors",
                                      f"the latents of image {rows[idx[0]]['file_name']}"))
    device = devices.pick(cfg.cache.device)
    total, done, skipped = len(todo_text) + len(todo_lat), 0, len(skips)

    def advanced(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)
        if interrupt.requested():  # after a batch is on disk and journaled: every attempt advances
            raise interrupt.Interrupted(
                f"cache rank {rank}: stopped ({interrupt.requested()}) after {done} of {total} encodings; "
                "the journal keeps them, the next attempt continues")

    def texts_written(keys: list[str]) -> None:
        journal.append([{"encoded": "text", "keys": keys, "attempt": attempt}])
        advanced(len(keys))

    def latents_written(keys: list[str], failed: dict[str, str]) -> None:
        nonlocal skipped
        lines: list[dict[str, Any]] = [{"encoded": "latent", "keys": keys, "attempt": attempt}] if keys else []
        lines += [_line(i, pending[i]) for key in keys for i in by_latent[key]]
        lines += [{"row": i, "skipped": why} for key, why in failed.items() for i in by_latent[key]]
        skipped += sum(len(by_latent[key]) for key in failed)
        journal.append(lines)
        advanced(len(keys) + len(failed))

    if todo_text:
        _encode_texts(cfg, models.resolve(cfg.model), todo_text, text_dir, device, texts_written)
    encoding = {key for key, _, _ in todo_lat}
    found = [key for key in by_latent if key not in encoding]  # verified above
    journal.append([_line(i, pending[i]) for key in found for i in by_latent[key]])
    if todo_lat:
        plans = {e["latent_key"]: e["_plan"] for e in pending.values() if "_plan" in e}
        _encode_latents(cfg, models.resolve(cfg.model), todo_lat, lat_dir, device, latents_written,
                              plans or None)
    return {"encoded_texts": len(todo_text), "encoded_images": len(todo_lat), "skipped": skipped, "device": device}


def _merge(cfg: ExperimentConfig, run: RunDir, rows: list[dict[str, str]], journal: Journal, store: Path,
           ident: str, attempt: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, every shard done: the index (training reads it), the report of what was skipped and why."""
    cached, skipped, encoded = journal.state(attempt)
    missing = [i for i in range(len(rows)) if i not in cached and i not in skipped]
    if missing:
        raise RunFailure(f"cache: {len(missing)} samples (first: {rows[missing[0]]['file_name']}) are in no rank's "
                         f"journal ({journal.path}); run the cache stage again")
    entries = [cached[i]["entry"] for i in sorted(cached)]
    repaired = journal.repaired()
    report = {"samples": len(rows), "cached": len(entries),
              "skipped": [{"image": rows[i]["file_name"], "reason": why} for i, why in sorted(skipped.items())],
              **({"repaired": repaired} if repaired else {})}
    atomic_write_json(run.cache / "report.json", report)
    for item in report["skipped"]:
        log.warning("cache: skipped %s: %s", item["image"], item["reason"])
    if not entries:
        raise RunFailure(f"cache: none of the {len(rows)} images in {run.trainset}/train could be read; "
                         f"{run.cache / 'report.json'} says why for each")
    text_dir, lat_dir = store / "text", store / "latents"
    empty_key = text_key(cfg, ident, "")
    validation = {t: text_key(cfg, ident, t) for t in texts_to_cache(cfg)}
    mask_dir = store / "masks"
    for name, path in [("", text_dir / f"{empty_key}.safetensors")] + [
            (f"validation prompt {t!r}", text_dir / f"{k}.safetensors") for t, k in validation.items()] + [
            (e["file_name"], d / f"{e[k]}.safetensors") for e in entries
            for d, k in ((text_dir, "text_key"), (lat_dir, "latent_key"), (mask_dir, "mask_key")) if k in e]:
        if not path.is_file():
            raise RunFailure(f"cache: the entry {path} (of {name or 'the empty caption'}) disappeared from the "
                             "store after it was journaled; run the cache stage again")
    for d in (text_dir, lat_dir, mask_dir):
        if d.is_dir():
            fsync_dir(d)
    atomic_write_json(run.cache / "index.json", {"resolution": cfg.train.resolution,
                                                 "max_sequence_length": cfg.cache.max_sequence_length,
                                                 # null: <run>/cache, wherever the run folder moves
                                                 "store": str(cfg.cache.dir) if cfg.cache.dir else None,
                                                 "empty_text_key": empty_key, "entries": entries,
                                                 **({"validation": validation} if validation else {})})
    (run.cache / cache_entry.DAMAGED).unlink(missing_ok=True)  # every entry this run uses verified again
    journal.remove()
    texts = {e["text_key"] for e in entries} | {empty_key} | set(validation.values())
    latents = {e["latent_key"] for e in entries}
    enc_t, enc_l = len(encoded["text"] & texts), len(encoded["latent"] & latents)
    summary = {"samples": len(entries), "skipped": len(skipped), "encoded": enc_t + enc_l,
               "reused": len(texts) + len(latents) - enc_t - enc_l, "encoded_texts": enc_t, "encoded_images": enc_l,
               "store": str(store), **extra, **({"repaired": repaired} if repaired else {})}
    masked = sum("mask_key" in e for e in entries)
    if masked:
        summary["masked_samples"] = masked
    plans = [buckets.Plan((p[0], p[1]), (p[2], p[3]), (p[4], p[5]), p[6], p[7])
             for i in sorted(cached) if (p := cached[i].get("plan"))]
    if plans:
        summary.update(_bucket_summary(plans, cfg.train.resolution))
    return summary


def _bucket_summary(plans: list[buckets.Plan], resolution: int) -> dict[str, Any]:
    """Samples per bucket, and the mean share of each original image the training crop keeps, beside what the
    square crop to resolution² would keep of the same images."""
    hist: dict[str, int] = {}
    for p in sorted(plans, key=lambda p: p.bucket[0] / p.bucket[1]):
        hist[buckets.name(p.bucket)] = hist.get(buckets.name(p.bucket), 0) + 1
    kept = sum(p.kept_fraction for p in plans) / len(plans)
    square = sum(buckets.square_kept_fraction(*p.original, resolution) for p in plans) / len(plans)
    return {"buckets": hist, "kept_fraction": round(kept, 4), "center_crop_kept_fraction": round(square, 4)}
