"""Sharded filtering (filter.shards: N): the samples of data/metadata.jsonl cut into N contiguous slices, each
filtered on its own (a Slurm array task, or one after another in `kolora run`) into

    filter/shards/<i>-of-<N>/dj/          its Data-Juicer work dir
    filter/shards/<i>-of-<N>/report.json  its samples' report rows, its kept samples, its timings
    filter/shards/<i>-of-<N>/done.json    the completion marker, written last: which samples the shard had

A shard is done when its marker names the same samples as its slice of the current metadata (a rerun after
new ingest output redoes it; the stage's key makes the pipeline set old outputs aside before that). The merge
reads the shards in order, so the kept set, result.jsonl, report.json and trainset/ equal one unsharded pass.
On Slurm the task that finds every shard done merges, under a lock: a task killed or requeued mid-merge
leaves the merge to the next task or to `kolora resume`, which reruns only the shards without a marker.
(Slices, folders, markers and the merge lock: kolora.core.shards, as for sharded ingest.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kolora.core import shards as core_shards
from kolora.core.config import DataConfig, ExperimentConfig, FilterConfig
from kolora.core.errors import ConfigError
from kolora.core.rundir import RunDir, atomic_write_json
from kolora.ingest.sources import Rejected, fills_text, parquet_rows, records


def count(fcfg: FilterConfig, samples: int, task_count: int | None = None) -> int:
    """The shard count: filter.shards, or with filter.shard_size the array's size (`task_count`, planned from
    the dataset's size before ingest) or, in process, ceil(samples / shard_size)."""
    if fcfg.shard_size is None:
        return fcfg.shards
    return task_count or core_shards.count_for_size(samples, fcfg.shard_size)


def planned_count(cfg: ExperimentConfig) -> int:
    """The filter job's array size at submission, before ingest ran: with filter.shard_size, from the size of
    the dataset as ingest will read it (ConfigError when that cannot be known: a hub dataset)."""
    if cfg.filter.shard_size is None:
        return cfg.filter.shards
    size = expected_samples(cfg.data)
    if size is None:
        raise ConfigError(f"filter.shard_size: the size of a data.source {cfg.data.source!r} dataset is not known "
                          "before ingest; set filter.shards: N instead")
    return count(cfg.filter, size)


def expected_samples(d: DataConfig) -> int | None:
    """Records ingest will read (before its own checks), data.limit applied; None when unknown."""
    if d.sources:
        sizes = [expected_samples(one) for _, one in d.per_source()]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]
    if d.source == "synthetic":
        n = d.synthetic.count
    elif d.source == "parquet" and d.path is not None:
        n = parquet_rows(d.path, d.image_column, d.text_column, fills_text(d))
    elif d.source in ("folder", "jsonl"):
        n = sum(not isinstance(r, Rejected) for r in records(d))
    else:
        return None
    return min(n, d.limit) if d.limit else n


def folder(run: RunDir, index: int, shards: int) -> Path:
    return core_shards.folder(run.filter, index, shards)


def identity(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """What a shard was made from: its sample count and a digest of its ids and image (and mask) paths."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.get("id"), s.get("image"), *([s["mask"]] if s.get("mask") else [])],
                            ensure_ascii=False).encode() + b"\n")
    return {"samples": len(samples), "digest": h.hexdigest()[:16]}


def is_done(run: RunDir, index: int, shards: int, samples: list[dict[str, Any]]) -> bool:
    d = folder(run, index, shards)
    return core_shards.is_done(d, identity(samples)) and (d / "report.json").is_file()


def write(run: RunDir, index: int, shards: int, samples: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """The shard's report, then its marker (a shard killed between the two is simply redone)."""
    d = folder(run, index, shards)
    atomic_write_json(d / "report.json", result)
    core_shards.mark_done(d, {"shard": index, "shards": shards, "identity": identity(samples),
                              **core_shards.stamp(), "seconds": result.get("seconds")})


def read_all(run: RunDir, shards: int) -> list[dict[str, Any]]:
    """Every shard's report, in shard order (the order of the samples)."""
    return core_shards.collect(run.filter, shards, lambda d: json.loads((d / "report.json").read_text()))


def clear(run: RunDir, index: int, shards: int) -> None:
    """Before a shard runs: no marker of an earlier attempt stays valid while it is being redone."""
    core_shards.clear_done(folder(run, index, shards))


def missing(run: RunDir, shards: int, samples: list[dict[str, Any]]) -> list[int]:
    return core_shards.missing(shards, lambda i: is_done(run, i, shards, core_shards.part(samples, shards, i)))


def merge_lock(run: RunDir) -> Any:
    """Held while merging: two tasks finishing together merge once (the second finds it merged)."""
    return core_shards.merge_lock(run.filter)


def is_merged(run: RunDir, shards: int) -> bool:
    """The merged outputs of these shards are on disk (report.json is written after every shard merged)."""
    try:
        summary = json.loads((run.filter / "report.json").read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return False
    return summary.get("shards") == shards and (run.trainset / "train" / "metadata.csv").is_file()


def prune(run: RunDir, shards: int) -> None:
    """Shards of another shard count are not read by this merge: removed once it succeeded."""
    core_shards.prune(run.filter, shards)
