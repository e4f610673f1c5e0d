"""Sharded ingest: a parquet or ModelScope source read as N contiguous row ranges when the filter is sharded
(the filter job's array tasks each take one; `kolora run` takes them one after another), into

    data/shards/<i>-of-<N>/images/       the range's images (hard links, copies or written bytes)
    data/shards/<i>-of-<N>/metadata.jsonl its samples (ids local to the shard), rejected.jsonl, done.json

and merged, in row order, into the same data/ one unsharded pass writes: ids renumbered, images hard-linked
to data/images/<id>.<ext>, metadata.jsonl last. A shard folder appears whole (kolora.core.rundir.atomic_dir) with
its marker, which names the stage's input key and the rows: a rerun redoes only the ranges without one
(ranges, folders, markers and locks: kolora.core.shards).

Array tasks need not run at once (a throttled array, a busy CPU partition), so a task never waits for a task
that may not have started: after its own range it takes every range nobody has done, each under its own
lock, waiting only on a lock a running task holds (core.shards.take_turns). The task that finds every range
done merges, under a lock.
Sources other than parquet and ModelScope are cheap to ingest (hard links) and are read in one pass, as is
any source with data.limit (which stops after its first samples).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from kolora.core import interrupt
from kolora.core import shards as core_shards
from kolora.core.config import ExperimentConfig
from kolora.core.rundir import RunDir, atomic_dir
from kolora.ingest.safe_paths import PathGuard
from kolora.ingest.samples import COUNTS, guard, read_samples, summary, take, write_lists
from kolora.ingest.sources import fills_text, no_sample_error, parquet_rows
from kolora.ingest.tables import TableSource

SHARDED_SOURCES = ("parquet", "modelscope")


def count(cfg: ExperimentConfig, task_count: int | None = None) -> int:
    """Ranges to read: the filter array's task count on Slurm, filter.shards in process (with
    filter.shard_size: from a parquet source's row count); 1 for other sources, with data.limit or with
    data.sources (read one after another in one pass)."""
    d = cfg.data
    if d.sources or d.source not in SHARDED_SOURCES or d.limit:
        return 1
    if task_count:
        return task_count
    if cfg.filter.shard_size is None:
        return cfg.filter.shards
    if d.source != "parquet":  # a hub dataset's size is known only once it is loaded
        return 1
    return core_shards.count_for_size(parquet_rows(d.path, d.image_column, d.text_column, fills_text(d)),
                                      cfg.filter.shard_size)


def folder(run: RunDir, index: int, shards: int) -> Path:
    return core_shards.folder(run.data, index, shards)


def is_done(run: RunDir, index: int, shards: int, identity: dict[str, Any]) -> bool:
    return core_shards.is_done(folder(run, index, shards), identity)


def is_merged(run: RunDir) -> bool:
    return (run.data / "metadata.jsonl").is_file()


def run(cfg: ExperimentConfig, run: RunDir, shards: int, task_index: int | None, key: str) -> dict[str, Any]:
    """Read the ranges nobody has read yet (this task's first), then merge when every range is done."""
    t0 = time.perf_counter()
    if is_merged(run):  # a task that starts after the merge (a requeue, a throttled array)
        core_shards.remove(run.data)
        return {"shard": task_index, "shards": shards, "ran": [], "merged": "by another task"}
    source = TableSource(cfg, run)
    total = source.rows()

    def identity(i: int) -> dict[str, Any]:
        return {"key": key, "shard": i, "shards": shards, "rows": list(core_shards.bounds(total, shards, i))}

    path_guard = guard(cfg, run)

    def read_if_not_done(i: int) -> bool:
        if is_merged(run) or is_done(run, i, shards, identity(i)):
            return False
        _read_range(cfg, run, source, path_guard, i, shards, identity(i))
        return True

    ran = core_shards.take_turns(run.data, shards, task_index or 0, read_if_not_done)
    with core_shards.merge_lock(run.data):
        if is_merged(run):  # the lock files this task made after the merge go too
            core_shards.remove(run.data)
            return {"shard": task_index, "shards": shards, "ran": ran, "merged": "by another task"}
        missing = core_shards.missing(shards, lambda i: is_done(run, i, shards, identity(i)))
        if missing:  # only when a range's files vanished under a running task: its rerun reads it
            raise RuntimeError(f"ingest: ranges {missing} of {shards} are not done; run the stage again")
        return {**_merge(cfg, run, shards, source.where, t0), "shard": task_index, "ran": ran, "merged": True}


def _read_range(cfg: ExperimentConfig, run: RunDir, source: TableSource, path_guard: PathGuard | None,
                index: int, shards: int, identity: dict[str, Any]) -> None:
    if interrupt.requested() is not None:
        raise interrupt.Interrupted(f"ingest stopped before range {index} of {shards} on "
                                    f"{interrupt.requested()}; the ranges done are kept")
    counts = dict.fromkeys(COUNTS, 0)
    start, end = identity["rows"]
    with atomic_dir(folder(run, index, shards)) as work:
        (work / "images").mkdir()
        samples, rejected = take(source.records((start, end)), work, cfg.data, path_guard, counts, None)
        for s in samples:  # relative to the shard folder: it moves into place when complete
            for col in ("image", "mask"):
                if col in s:
                    path = s[col]
                    s[col] = str(path.relative_to(work)) if path.is_relative_to(work) else str(path)
        write_lists(work, samples, rejected)
        core_shards.mark_done(work, {"identity": identity, "counts": counts, **core_shards.stamp()})


def _merge(cfg: ExperimentConfig, run: RunDir, shards: int, where: str, t0: float) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    counts = dict.fromkeys(COUNTS, 0)
    parts = [(part, json.loads((part / core_shards.DONE).read_text())["counts"])
             for _, part in core_shards.in_order(run.data, shards)]
    # data/masks/ only for a dataset with masks, as one unsharded pass makes it
    has_masks = any(c.get("masks") for _, c in parts)
    masks_dir = atomic_dir(run.data / "masks") if has_masks else contextlib.nullcontext(None)
    with atomic_dir(run.data / "images") as images, masks_dir as masks:
        for part, part_counts in parts:
            for name, n in part_counts.items():
                counts[name] = counts.get(name, 0) + n
            for s in read_samples(part / "metadata.jsonl"):
                sid = f"{len(samples):06d}"
                sample = {"id": sid, "text": s["text"]}
                for col, folder, name in (("image", images, "images"), ("mask", masks, "masks")):
                    if col not in s:
                        continue
                    path = s[col]
                    if not os.path.isabs(path):  # taken into the shard folder: same inode, the final name
                        src = part / path
                        os.link(src, folder / f"{sid}{src.suffix}")
                        path = str(run.data / name / f"{sid}{src.suffix}")
                    sample[col] = [path] if col == "image" else path
                samples.append(sample)
            rejected += read_samples(part / "rejected.jsonl")
        if not samples:
            raise no_sample_error(cfg.data, where, rejected)
    write_lists(run.data, samples, rejected)
    core_shards.remove(run.data)  # the lock files with it: tasks after this find it merged
    return summary(cfg.data, where, len(samples), len(rejected), counts, t0, shards=shards)
