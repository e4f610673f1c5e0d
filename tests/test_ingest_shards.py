"""Sharded ingest (kolora.ingest.shards): a parquet or ModelScope source read in row ranges, each with a marker,
merged into the same data/ as one pass; an interrupted ingest rereads only the ranges without a marker; array
tasks running together read every range once and merge once."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import stage_context
from test_ingest import image_bytes, make_cfg, parquet_table

from kolora.core import interrupt
from kolora.core.rundir import RunDir
from kolora.ingest import shards as ingest_shards
from kolora.ingest import stage as ingest


def dirty_parquet(root: Path) -> Path:
    """Three files, row groups of 3 rows: images as bytes and as {bytes, path}, a row without image, one
    without text, one naming a path outside the dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "pq"
    folder.mkdir(parents=True)
    t1, _ = parquet_table(7, struct=True)
    t2, _ = parquet_table(5, struct=False)
    pq.write_table(t1, folder / "a.parquet", row_group_size=3)
    pq.write_table(t2, folder / "b.parquet", row_group_size=3)
    (root / "secret.png").write_bytes(image_bytes((40, 40), "PNG"))
    pq.write_table(pa.table({"picture": [None, {"bytes": None, "path": "../secret.png"},
                                         {"bytes": image_bytes((64, 48)), "path": "x.jpg"}],
                             "caption": ["no image", "escape", None]}), folder / "c.parquet")
    return folder


def cfg_for(tmp_path: Path, data: dict[str, Any], shards: int):
    cfg = make_cfg(tmp_path, data)
    cfg.filter.shards = shards
    return cfg


def outputs(run: RunDir) -> dict[str, Any]:
    """data/ with the run's own path taken out of image paths, and each image's bytes."""
    def rows(name: str) -> list[dict[str, Any]]:
        text = (run.data / name).read_text(encoding="utf-8").replace(str(run.root), "RUN")
        return [json.loads(line) for line in text.splitlines()]

    samples = rows("metadata.jsonl")
    images = {p.name: p.read_bytes() for p in (run.data / "images").iterdir()}
    return {"samples": samples, "rejected": rows("rejected.jsonl"), "images": images,
            "files": sorted(p.name for p in run.data.iterdir())}


PARQUET = {"source": "parquet", "image_column": "picture", "text_column": "caption"}


@pytest.mark.parametrize("shards", [2, 4, 7])
def test_sharded_parquet_ingest_equals_one_pass(tmp_path: Path, shards: int) -> None:
    data = {**PARQUET, "path": str(dirty_parquet(tmp_path))}
    one = RunDir(tmp_path / "one")
    summary1 = ingest.run(stage_context("ingest", cfg_for(tmp_path, data, 1), one))
    many = RunDir(tmp_path / "many")
    summary = ingest.run(stage_context("ingest", cfg_for(tmp_path, data, shards), many))
    assert summary["shards"] == shards and summary["merged"] is True and summary["ran"] == list(range(shards))
    assert {k: summary[k] for k in summary1 if k != "seconds"} == {k: v for k, v in summary1.items() if k != "seconds"}
    expected, got = outputs(one), outputs(many)
    assert got == expected
    reasons = sorted(r["reason"].split(":")[0] for r in got["rejected"])
    assert len(got["samples"]) == 12 and len(reasons) == 3 and "missing text" in reasons and "no image" in reasons
    assert not (many.data / "shards").exists()


def test_interrupted_sharded_ingest_rereads_only_the_missing_ranges(tmp_path: Path, monkeypatch) -> None:
    data = {**PARQUET, "path": str(dirty_parquet(tmp_path))}
    one = RunDir(tmp_path / "one")
    ingest.run(stage_context("ingest", cfg_for(tmp_path, data, 1), one))
    run, cfg = RunDir(tmp_path / "run"), cfg_for(tmp_path, data, 4)

    read = ingest_shards._read_range
    calls: list[int] = []

    def stop_after_two(cfg, run, source, guard, index, shards, identity):
        calls.append(index)
        if len(calls) == 3:
            interrupt.request("SIGTERM")  # as a preemption would: the range in progress is dropped
        read(cfg, run, source, guard, index, shards, identity)

    monkeypatch.setattr(ingest_shards, "_read_range", stop_after_two)
    try:
        with pytest.raises(interrupt.Interrupted, match="range 2 of 4"):
            ingest.run(stage_context("ingest", cfg, run))
    finally:
        interrupt.clear()
    assert sorted(p.name for p in (run.data / "shards").iterdir() if not p.name.startswith(".")) == [
        "0000-of-0004", "0001-of-0004"] and not (run.data / "metadata.jsonl").exists()
    summary = ingest.run(stage_context("ingest", cfg, run))
    assert summary["ran"] == [2, 3]
    assert outputs(run) == outputs(one)


def test_array_tasks_read_every_range_once_and_merge_once(tmp_path: Path) -> None:
    data = {**PARQUET, "path": str(dirty_parquet(tmp_path))}
    one = RunDir(tmp_path / "one")
    ingest.run(stage_context("ingest", cfg_for(tmp_path, data, 1), one))
    run, cfg = RunDir(tmp_path / "run"), cfg_for(tmp_path, data, 1)  # on Slurm the array's size decides
    results: dict[int, dict[str, Any]] = {}

    def task(i: int) -> None:
        results[i] = ingest.run(stage_context("ingest", cfg, run, shard=i, shards=4))

    threads = [threading.Thread(target=task, args=(i,)) for i in (0, 2)]  # two of four tasks run; 1, 3 pending
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    ran = sorted(i for r in results.values() for i in r["ran"])
    assert ran == [0, 1, 2, 3], results  # the running tasks took the ranges of the tasks not started
    assert sorted(str(r["merged"]) for r in results.values()) == ["True", "by another task"], results
    assert outputs(run) == outputs(one)
    late = ingest.run(stage_context("ingest", cfg, run, shard=3, shards=4))  # a task that starts after the merge
    assert late == {"shard": 3, "shards": 4, "ran": [], "merged": "by another task"}
    assert not (run.data / "shards").exists()


def test_modelscope_download_is_sharded_too(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    pqd = tmp_path / "parquetds"
    (pqd / "data").mkdir(parents=True)
    table, images = parquet_table(5, struct=True)
    pq.write_table(table.rename_columns(["image", "text"]), pqd / "data" / "train-00000-of-00001.parquet")
    one, many = RunDir(tmp_path / "one"), RunDir(tmp_path / "many")
    ingest.run(stage_context("ingest", cfg_for(tmp_path, {"source": "modelscope", "path": str(pqd)}, 1), one))
    assert ingest.run(stage_context("ingest", cfg_for(tmp_path, {"source": "modelscope", "path": str(pqd)}, 3), many))["shards"] == 3
    assert outputs(many) == outputs(one)


def test_which_sources_are_sharded(tmp_path: Path) -> None:
    parquet = cfg_for(tmp_path, {**PARQUET, "path": str(dirty_parquet(tmp_path))}, 4)
    assert ingest_shards.count(parquet) == 4 and ingest_shards.count(parquet, task_count=6) == 6
    parquet.data.limit = 5  # stops after its first samples: one pass
    assert ingest_shards.count(parquet, task_count=6) == 1
    synthetic = cfg_for(tmp_path, {"source": "synthetic"}, 4)  # hard links and generated files: one pass
    assert ingest_shards.count(synthetic, task_count=4) == 1
    sized = cfg_for(tmp_path, {**PARQUET, "path": str(tmp_path / "pq")}, 1)
    sized.filter.shard_size = 5
    assert ingest_shards.count(sized) == 3  # 15 rows
