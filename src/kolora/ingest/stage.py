"""Stage `ingest`: any supported dataset -> run/data/ in the tutorial's Data-Juicer input format.

Outputs (replaced as a whole on every run, so a rerun never mixes old and new files):
    data/images/<id>.<ext>   the images (hard links to local files where possible, else copies / written bytes)
    data/masks/<id>.<ext>    the loss masks, taken likewise, of the samples that have one (data.mask: auto)
    data/metadata.jsonl      {"id": "000000", "text": "<caption>", "image": ["/abs/path"]} per sample (and
                             "mask": "/abs/path" when it has one)
    data/rejected.jsonl      {"source": "<file>:<line>", "reason": "..."} per source record that cannot be a sample

Whether an image file is readable is *not* decided here: a sample whose file is missing keeps the path it
names, and the filter stage's header pass reports it ("missing file"), so every record ends up in the report.
With data.mask: alpha each image's header is opened, and one without an alpha channel stops the stage naming it.
Which paths may be taken at all is (kolora.ingest.safe_paths): inside the dataset root unless
data.allow_external_paths, regular files only, at most data.max_image_bytes; others go to rejected.jsonl.
A stop request (kolora.core.interrupt) ends the stage between records; the rerun redoes it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kolora.core.config import ExperimentConfig
from kolora.core.rundir import RunDir, atomic_dir
from kolora.core.stage import StageContext
from kolora.ingest import shards as ingest_shards
from kolora.ingest.samples import COUNTS, guard, summary, take, write_lists
from kolora.ingest.sources import Record, Rejected, no_sample_error, records
from kolora.ingest.synthetic import make_synthetic
from kolora.ingest.tables import TableSource


def _records(cfg: ExperimentConfig, work: Path, run: RunDir,
             generated: Path | None = None) -> tuple[Iterator[Record | Rejected], str]:
    """cfg.data's records and where they come from; synthetic images are drawn into `generated` (default:
    work/images, where they stay under their ids)."""
    d = cfg.data
    if d.source == "synthetic":
        s = d.synthetic
        count = min(s.count, d.limit) if d.limit else s.count

        items = make_synthetic(generated or work / "images", count, s.seed, s.min_side, s.max_side, s.masks)
        return (Record(f"synthetic:{i}", cap, path=p) for i, (p, cap) in enumerate(items)), "synthetic"
    if d.source == "modelscope":
        source = TableSource(cfg, run)
        return source.records(), source.where
    return records(d), str(d.path)


def run(ctx: StageContext) -> dict[str, Any]:
    """Read cfg.data's source into run.data (images/, metadata.jsonl, rejected.jsonl); return a summary.
    A parquet or ModelScope source is read in shards when the filter is sharded (kolora.ingest.shards)."""
    cfg, run = ctx.cfg, ctx.run
    shards = ingest_shards.count(cfg, ctx.shards)
    if shards > 1:
        return ingest_shards.run(cfg, run, shards, ctx.shard, ctx.key)
    t0 = time.perf_counter()
    d = cfg.data
    counts = dict.fromkeys(COUNTS, 0)
    per_source: dict[str, dict[str, Any]] = {}
    with atomic_dir(run.data) as work:
        (work / "images").mkdir()
        if d.sources:
            samples, rejected, per_source = _read_sources(cfg, work, run, counts)
            where = ", ".join(f"{name}: {c['where']}" for name, c in per_source.items())
        else:
            records, where = _records(cfg, work, run)
            samples, rejected = take(records, work, d, guard(cfg, run), counts, d.limit)
        if not samples:
            raise no_sample_error(d, where, rejected)
        for s in samples:
            path = s["image"]
            s["image"] = [str(run.data / path.relative_to(work)) if path.is_relative_to(work) else str(path)]
            if "mask" in s:
                mask = s["mask"]
                s["mask"] = str(run.data / mask.relative_to(work)) if mask.is_relative_to(work) else str(mask)
        write_lists(work, samples, rejected)
    return summary(d, where, len(samples), len(rejected), counts, t0,
                   **({"sources": per_source} if per_source else {}))


def _read_sources(cfg: ExperimentConfig, work: Path, run: RunDir, counts: dict[str, int]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """data.sources, one after another in their order: ids run on across sources, each sample and rejected
    record carries its source's name ("source"; a rejection's file:line moves to "origin") and each caption its
    source's caption_prefix. Returns the samples, the rejections and {name: {samples, rejected, where}}."""
    samples: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    per_source: dict[str, dict[str, Any]] = {}
    for src, sub in cfg.data.per_source():
        assert src is not None
        one = cfg.model_copy(update={"data": sub})
        generated = work / "generated" / src.name  # drawn here, then linked to images/<id> like any file
        records, where = _records(one, work, run, generated)
        taken, dropped = take(records, work, sub, guard(one, run), counts, sub.limit, start=len(samples))
        shutil.rmtree(work / "generated", ignore_errors=True)
        if not taken:
            raise no_sample_error(sub, f"data.sources {src.name!r} ({where})", dropped)
        for s in taken:
            s["source"] = src.name
            if src.caption_prefix:
                s["text"] = src.caption_prefix + s["text"]
        rejected += [{**r, "source": src.name, "origin": r["source"]} for r in dropped]
        samples += taken
        per_source[src.name] = {"samples": len(taken), "rejected": len(dropped), "where": where}
    return samples, rejected, per_source
