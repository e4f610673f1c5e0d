"""The cache stage over ranks, and its journal: what each rank has cached so far, appended as it goes, so that a stop (time
limit, preemption) loses at most the batch in flight and the next attempt — on any number of ranks —
continues with the samples that are missing.

Layout: <run>/cache/journal/<identity>/part-<rank>.jsonl, one JSON object per line, written with one
O_APPEND write + fsync per batch (never a rewrite: at 300,000 samples the index is written once, at the end):
  {"row": i, "entry": {...}}               sample i (its metadata.csv row) is cached: its index entry
  {"row": i, "skipped": "reason"}          sample i could not be cached (its image does not decode)
  {"encoded": "text"|"latent", "keys": [...], "attempt": A}  entries encoded by attempt A (the summary)
  {"repaired": path, "of": "...", "problem": "...", "aside": path}  a bad entry found in the store, moved aside
The identity hashes the stage's work key and the entry store: a journal made for other inputs, or for
another cache.dir, is never read. A torn last line (killed mid-write) is ignored. Rank 0 merges the parts
into cache/index.json once every rank's shard is done, then removes the journal.

Ranks meet through files in a per-attempt barrier folder (the job folder, shared by all ranks): each rank
> 0 writes rank-<r>.json (done / interrupted / failed) when its shard ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolora.cache.validation import texts_to_cache
from kolora.core import interrupt
from kolora.core.errors import RunFailure
from kolora.core.rundir import atomic_write_json, fsync_dir

if TYPE_CHECKING:
    from kolora.core.config import ExperimentConfig
    from kolora.core.rundir import RunDir

log = logging.getLogger("kolora.cache.stage")


def folder(run_cache: Path, work_key: str | None, store: Path) -> Path:
    identity = hashlib.sha256(f"{work_key}\0{Path(store).resolve()}".encode()).hexdigest()[:16]
    return Path(run_cache) / "journal" / identity


class Journal:
    """One rank's appender plus a reader of every rank's lines."""

    def __init__(self, path: Path, rank: int):
        self.path = Path(path)
        self.part = self.path / f"part-{rank}.jsonl"

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        fd = os.open(self.part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for part in sorted(self.path.glob("part-*.jsonl")):
            for line in part.read_bytes().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        out.append(record)
        return out

    def state(self, attempt: str | None = None
              ) -> tuple[dict[int, dict[str, Any]], dict[int, str], dict[str, set[str]]]:
        """(row → its line, row → skip reason, kind → keys `attempt` encoded): a row cached by any line is
        cached, even if an earlier attempt skipped it."""
        cached: dict[int, dict[str, Any]] = {}
        skipped: dict[int, str] = {}
        encoded: dict[str, set[str]] = {"text": set(), "latent": set()}
        for r in self.records():
            if "entry" in r:
                cached[r["row"]] = r
            elif "skipped" in r:
                skipped[r["row"]] = r["skipped"]
            elif r.get("encoded") in encoded and r.get("attempt") == attempt:
                encoded[r["encoded"]].update(r["keys"])
        return cached, {i: why for i, why in skipped.items() if i not in cached}, encoded

    def repaired(self) -> list[dict[str, Any]]:
        """The bad entries any attempt of this cache run moved aside (each is encoded again)."""
        return [{k: r[k] for k in ("repaired", "of", "problem", "aside")} for r in self.records() if "repaired" in r]

    def remove(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)  # every identity's journal: the index is written


# ---- ranks meeting in a barrier folder -----------------------------------------------------------------
def report_shard(barrier: Path | str, rank: int, status: str, detail: str = "") -> None:
    atomic_write_json(Path(barrier) / f"rank-{rank}.json", {"status": status, "detail": detail})


def wait_for_shards(barrier: Path | str, world: int, poll_s: float = 1.0) -> None:
    """Rank 0: until every other rank's shard is done. Stops on the stop signal (the other ranks got it too);
    fails when a rank failed."""
    pending = set(range(1, world))
    while pending:
        for rank in sorted(pending):
            path = Path(barrier) / f"rank-{rank}.json"
            if not path.is_file():
                continue
            info = json.loads(path.read_text())
            if info["status"] == "failed":
                raise RunFailure(f"cache: rank {rank} failed on its shard ({info['detail']}); see its log")
            if info["status"] == "interrupted":
                raise interrupt.Interrupted(f"cache: rank {rank} stopped on a signal; the journal keeps its work")
            pending.discard(rank)
        if pending:
            if interrupt.requested():
                raise interrupt.Interrupted(f"cache: stopped ({interrupt.requested()}) while waiting for ranks "
                                            f"{sorted(pending)}; the journal keeps what every rank cached")
            time.sleep(poll_s)


# ---- the stage ------------------------------------------------------------------------------------------
def run_shard(cfg: ExperimentConfig, run: RunDir, key: str, rows: list[dict[str, str]], rank: int, world: int,
              barrier: str | None, progress, force: bool = False) -> dict[str, Any]:
    """kolora.cache.stage.run: this rank's shard, then (rank 0) the merge. `force`: encode every entry this shard
    uses again, even those a shared store holds (other runs' entries are not touched)."""
    from kolora.cache.entry import cache_store
    from kolora.models import fingerprint
    store = cache_store(cfg, run)
    ident = fingerprint.model(cfg.model)
    journal = Journal(folder(run.cache, key, store), rank)
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


def _line(i: int, entry: dict[str, Any]) -> dict[str, Any]:
    entry = dict(entry)
    plan = entry.pop("_plan", None)
    line: dict[str, Any] = {"row": i, "entry": entry}
    if plan is not None:  # buckets: for the summary's histogram and kept fractions
        line["plan"] = [*plan.original, *plan.bucket, *plan.resized, plan.top, plan.left]
    return line


def _cache_shard(cfg: ExperimentConfig, rows: list[dict[str, str]], rank: int, world: int, store: Path,
                 ident: str, journal: Journal, attempt: str, progress, force: bool) -> dict[str, Any]:
    from kolora.cache import buckets
    from kolora.cache import entry as cache_entry
    from kolora.cache import stage as cache
    from kolora.core import devices
    from kolora.models import kolors as models
    text_dir, lat_dir = store / "text", store / "latents"

    def present(line: dict[str, Any]) -> bool:
        e = line["entry"]
        return (text_dir / f"{e['text_key']}.safetensors").is_file() and \
            (lat_dir / f"{e['latent_key']}.safetensors").is_file()

    cached = {} if force else journal.state()[0]
    mine = [i for i in range(rank, len(rows), world) if not (i in cached and present(cached[i]))]
    sizes = buckets.for_config(cfg) if cfg.train.buckets else None
    pending: dict[int, dict[str, Any]] = {}
    skips = []
    for i in mine:  # hashing reads every image of the shard once
        try:
            pending[i] = cache._entry(cfg, rows[i], ident, sizes)
        except cache._decode_errors() as e:
            skips.append({"row": i, "skipped": f"cannot be read: {cache._reason(e)}"})
    journal.append(skips)

    texts = {e["text_key"]: e["text"] for e in pending.values()}
    if rank == 0:
        texts[cache.text_key(cfg, ident, "")] = ""  # the empty caption, once: what caption dropout trains on
        # train.validation's prompts (and negative prompt): sampling during training never loads the encoder
        texts.update({cache.text_key(cfg, ident, t): t for t in texts_to_cache(cfg)})
    by_latent: dict[str, list[int]] = {}
    for i, e in pending.items():
        by_latent.setdefault(e["latent_key"], []).append(i)
    image_of = {e["text_key"]: e["file_name"] for e in pending.values()}

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
        cache._encode_texts(cfg, models.resolve(cfg.model), todo_text, text_dir, device, texts_written)
    encoding = {key for key, _, _ in todo_lat}
    found = [key for key in by_latent if key not in encoding]  # verified above
    journal.append([_line(i, pending[i]) for key in found for i in by_latent[key]])
    if todo_lat:
        plans = {e["latent_key"]: e["_plan"] for e in pending.values() if "_plan" in e}
        cache._encode_latents(cfg, models.resolve(cfg.model), todo_lat, lat_dir, device, latents_written,
                              plans or None)
    return {"encoded_texts": len(todo_text), "encoded_images": len(todo_lat), "skipped": skipped, "device": device}


def _merge(cfg: ExperimentConfig, run: RunDir, rows: list[dict[str, str]], journal: Journal, store: Path,
           ident: str, attempt: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, every shard done: the index (training reads it), the report of what was skipped and why."""
    from kolora.cache import buckets
    from kolora.cache import entry as cache_entry
    from kolora.cache import stage as cache
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
    empty_key = cache.text_key(cfg, ident, "")
    validation = {t: cache.text_key(cfg, ident, t) for t in texts_to_cache(cfg)}
    for name, path in [("", text_dir / f"{empty_key}.safetensors")] + [
            (f"validation prompt {t!r}", text_dir / f"{k}.safetensors") for t, k in validation.items()] + [
            (e["file_name"], d / f"{e[k]}.safetensors") for e in entries
            for d, k in ((text_dir, "text_key"), (lat_dir, "latent_key"))]:
        if not path.is_file():
            raise RunFailure(f"cache: the entry {path} (of {name or 'the empty caption'}) disappeared from the "
                             "store after it was journaled; run the cache stage again")
    for d in (text_dir, lat_dir):
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
    plans = [buckets.Plan((p[0], p[1]), (p[2], p[3]), (p[4], p[5]), p[6], p[7])
             for i in sorted(cached) if (p := cached[i].get("plan"))]
    if plans:
        summary.update(cache._bucket_summary(plans, cfg.train.resolution))
    return summary
