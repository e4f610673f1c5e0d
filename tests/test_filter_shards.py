"""filter.shards: the samples filtered as contiguous slices (one after another in process, or as Slurm array
tasks that each filter one shard and merge when theirs is the last) give the outputs of one unsharded pass;
a rerun redoes only the shards without a completion marker. The dev-cluster version is in
test_filter_shards_slurm.py."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import stage_context
from PIL import Image
from test_filter import DEMO_OPS, check_outputs, make_cfg, noisy_jpeg

from kolora.core import shards as core_shards
from kolora.core.config import validate_config
from kolora.core.errors import ConfigError
from kolora.core.rundir import RunDir
from kolora.filter import shards as filter_shards
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest

REPO = Path(__file__).resolve().parents[1]


def dirty_dataset(root: Path) -> Path:
    """22 rows: images the ops keep or drop (shape, aspect) and files the header pass rejects, interleaved so
    that every shard of 4 gets some of each; plus a line ingest rejects."""
    root.mkdir()
    rnd = random.Random(3)
    rows = []
    for i in range(18):
        w, h = rnd.choice([(96, 80), (40, 90), (200, 60), (70, 70), (128, 100)])
        (root / f"img{i}.jpg").write_bytes(noisy_jpeg((w, h), seed=i))
        rows.append({"text": f"image {i}", "image": [f"img{i}.jpg"]})
    whole = noisy_jpeg((120, 100), seed=99)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "text.jpg").write_text("not an image\n" * 10, encoding="utf-8")
    Image.new("RGB", (90, 90), (10, 20, 30)).save(root / "plain.png")
    for pos, (text, name) in zip((2, 7, 12, 20), [("truncated", "truncated.jpg"), ("text", "text.jpg"),
                                                  ("missing", "missing.jpg"), ("png", "plain.png")], strict=True):
        rows.insert(pos, {"text": text, "image": [name]})
    lines = [json.dumps(r) for r in rows] + ['{"text": "malformed"']
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "metadata.jsonl"


def outputs(run: RunDir) -> dict[str, Any]:
    """The stage's outputs with the run's own path taken out, the timings and the shard count left out."""
    def local(text: str) -> str:
        return text.replace(str(run.root), "<run>")

    report = json.loads(local((run.filter / "report.json").read_text(encoding="utf-8")))
    summary = {k: v for k, v in report["summary"].items() if k not in ("seconds", "shards")}
    train = run.trainset / "train"
    files = {p.name: p.read_bytes() for p in sorted(train.iterdir())}
    return {"summary": summary, "samples": report["samples"], "files": files,
            "result": local((run.filter / "result.jsonl").read_text(encoding="utf-8"))}


def markers(run: RunDir, shards: int) -> dict[int, int]:
    return {i: (filter_shards.folder(run, i, shards) / "done.json").stat().st_mtime_ns for i in range(shards)
            if (filter_shards.folder(run, i, shards) / "done.json").is_file()}


def test_sharded_filter_equals_unsharded_and_reruns_only_missing_shards(tmp_path: Path) -> None:
    meta = dirty_dataset(tmp_path / "ds")
    data = {"source": "jsonl", "path": str(meta)}
    one = make_cfg(tmp_path, data, DEMO_OPS)
    four = one.model_copy(update={"filter": one.filter.model_copy(update={"shards": 4})})
    plain, sharded = RunDir(tmp_path / "plain"), RunDir(tmp_path / "sharded")
    for cfg, run in ((one, plain), (four, sharded)):
        ingest.run(stage_context("ingest", cfg, run))
    kfilter.run(stage_context("filter", one, plain))
    want = outputs(plain)
    kept = {e["id"] for e in want["samples"] if e["kept"]}
    stages_seen = {e["stage"] for e in want["samples"]}
    assert kept and {"header", "data-juicer", "ingest"} <= stages_seen  # every kind of row is compared

    # as Slurm array tasks, in the order they happen to finish: only the last one merges
    for i in (2, 0, 3):
        summary = kfilter.run(stage_context("filter", four, sharded, shard=i, shards=4))
        assert summary["merged"] is False and summary["ran"] == [i] and i not in summary["waiting_for"]
        assert not (sharded.filter / "report.json").exists()
    summary = kfilter.run(stage_context("filter", four, sharded, shard=1, shards=4))
    assert summary["shards"] == 4 and summary["ran"] == [1] and summary["merged"] is True and summary["kept"] == len(kept)
    assert outputs(sharded) == want
    check_outputs(sharded, {e["id"] for e in outputs(sharded)["samples"] if e["kept"]})
    for i in range(4):  # each shard ran Data-Juicer on its own slice
        rows = json.loads((filter_shards.folder(sharded, i, 4) / "report.json").read_text())["entries"]
        assert len(rows) in (5, 6) and (filter_shards.folder(sharded, i, 4) / "dj" / "config.yaml").is_file()
    # a task that finds the merge done (it finished together with the merging one) does not merge again
    again = kfilter.run(stage_context("filter", four, sharded, shard=0, shards=4))
    assert again["merged"] == "by another task" and again["ran"] == []

    # one shard's work lost (its task killed before the marker): the rerun redoes that shard only
    before = markers(sharded, 4)
    (filter_shards.folder(sharded, 2, 4) / "done.json").unlink()
    summary = kfilter.run(stage_context("filter", four, sharded))
    after = markers(sharded, 4)
    assert summary["ran"] == [2]
    assert {i: after[i] == before[i] for i in range(4)} == {0: True, 1: True, 2: False, 3: True}
    assert outputs(sharded) == want

    # filter.shard_size: 22 samples at 6 per shard are the same 4 shards, all done: only the merge runs
    by_size = four.model_copy(update={"filter": one.filter.model_copy(update={"shard_size": 6})})
    summary = kfilter.run(stage_context("filter", by_size, sharded))
    assert summary["ran"] == [] and summary["shards"] == 4 and outputs(sharded) == want

    # a mismatched array (planned for another shard count) is refused, naming the fix
    with pytest.raises(kfilter.FilterError, match="filter.shards is 4.*kolora resume"):
        kfilter.run(stage_context("filter", four, sharded, shard=0, shards=3))


def test_shard_bounds_cover_every_sample_once() -> None:
    for count in (0, 1, 7, 48, 20_001):
        for shards in (1, 2, 4, 7):
            spans = [core_shards.bounds(count, shards, i) for i in range(shards)]
            assert spans[0][0] == 0 and spans[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


def test_shards_config_and_plan() -> None:
    base = {"name": "t", "model": {"path": "tiny-model", "tiny": True},
            "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")}}
    cfg = validate_config(base)
    assert "shards" not in cfg.model_dump()["filter"]  # at its default: runs made before it stay bound
    dedup = [{"document_deduplicator": {}}]  # image_deduplicator runs across shards (test_filter_dedup.py)
    validate_config({**base, "filter": {"ops": dedup}})
    with pytest.raises(ConfigError, match=r"set filter.shards: 1 \(no shard_size\) or remove the deduplicator"):
        validate_config({**base, "filter": {"ops": dedup, "shards": 4}})

    from kolora.launch.cluster import load_profile
    from kolora.launch.plan import describe, plan_jobs

    profile = load_profile(REPO / "slurm" / "clusters" / "local.yaml")
    sharded = validate_config({**base, "filter": {"shards": 4}})
    plans = {p.job: p for p in plan_jobs(sharded, profile)}
    assert plans["filter"].array_tasks == 4 and describe(plans["filter"])["array"] == "0-3%4"
    assert plans["filter"].stages == ("ingest", "filter")
    assert {p.job: p.array_tasks for p in plan_jobs(cfg, profile)}["filter"] == 0
    # shard_size: the array's size from the dataset's size, known before ingest (48 synthetic samples)
    by_size = validate_config({**base, "filter": {"shard_size": 20}, "data": {"synthetic": {"count": 48}}})
    assert {p.job: p.array_tasks for p in plan_jobs(by_size, profile)}["filter"] == 3
    limited = validate_config({**base, "filter": {"shard_size": 20}, "data": {"limit": 20}})
    assert {p.job: p.array_tasks for p in plan_jobs(limited, profile)}["filter"] == 0
    hub = validate_config({**base, "filter": {"shard_size": 20},
                           "data": {"source": "modelscope", "dataset_id": "AI-ModelScope/lowres_anime"}})
    with pytest.raises(ConfigError, match="set filter.shards: N instead"):
        plan_jobs(hub, profile)
    both = validate_config({**base, "filter": {"shards": 2, "shard_size": 30}, "data": {"synthetic": {"count": 48}}})
    assert {p.job: p.array_tasks for p in plan_jobs(both, profile)}["filter"] == 2  # shard_size decides
