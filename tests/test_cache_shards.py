"""The cache stage over ranks: each rank caches its shard and journals it as it goes, a stop between batches
loses nothing already journaled and the next attempt continues from there, and an image that no longer
decodes (changed on disk after the filter) is skipped with its reason in cache/report.json — training then
uses the entries that exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kolora.cache import shards as cache_shards
from kolora.core import interrupt
from kolora.core.interrupt import Interrupted
from kolora.core.rundir import RunDir
from kolora.pipeline.runner import run_stage


def _copy(demo_run: Path, tmp_path: Path) -> RunDir:
    shutil.copytree(demo_run, tmp_path / "demo")
    return RunDir(tmp_path / "demo")


def _fresh_cache(run: RunDir, tmp_path: Path, **cache: object):
    """The run's config with a new, empty entry store (cache.dir is operational: --force encodes into it)."""
    cfg = run.load_config()
    cfg.cache.dir = tmp_path / "fresh-store"
    for k, v in cache.items():
        setattr(cfg.cache, k, v)
    return cfg


def _index(run: RunDir) -> dict:
    return json.loads((run.cache / "index.json").read_text())


def _journal_lines(run: RunDir) -> list[dict]:
    return [json.loads(line) for p in sorted((run.cache / "journal").rglob("part-*.jsonl"))
            for line in p.read_text().splitlines()]


def test_two_ranks_cache_their_shards_and_rank_0_writes_the_same_index(demo_run, tmp_path):
    run = _copy(demo_run, tmp_path)
    cfg = _fresh_cache(run, tmp_path)
    reference = _index(RunDir(demo_run))["entries"]
    (run.cache / "index.json").unlink()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    follower = run_stage("cache", cfg, run, follower=True, rank=1, world=2, extra={"barrier": str(barrier)})
    assert json.loads((barrier / "rank-1.json").read_text())["status"] == "done"
    rows = {line["row"] for line in _journal_lines(run) if "entry" in line}
    assert rows == set(range(1, len(reference), 2))  # rank 1 cached exactly the odd samples
    assert not (run.cache / "index.json").exists()  # only rank 0 writes the index
    summary = run_stage("cache", cfg, run, force=True, rank=0, world=2, extra={"barrier": str(barrier)})
    assert _index(run)["entries"] == reference  # same entries, same order as one process
    assert summary["samples"] == len(reference) and summary["ranks"] == 2
    # each rank encoded its own half of the images; rank 0's summary counts both
    assert follower["encoded_images"] + (summary["encoded_images"] - follower["encoded_images"]) == \
        len({e["latent_key"] for e in reference})
    assert 0 < follower["encoded_images"] < summary["encoded_images"]
    assert not (run.cache / "journal").exists()  # merged into the index


def test_a_stopped_cache_continues_from_its_journal(demo_run, tmp_path):
    run = _copy(demo_run, tmp_path)
    cfg = _fresh_cache(run, tmp_path, batch_size=4)
    reference = _index(RunDir(demo_run))["entries"]
    (run.cache / "index.json").unlink()
    seen: list[tuple[int, int]] = []

    def stop_after_two_image_batches(done: int, total: int) -> None:
        seen.append((done, total))
        if done > total - len(reference) + 4:  # texts done, two batches of 4 images on disk
            interrupt.request("SIGUSR2")

    try:
        with pytest.raises(Interrupted, match=r"cache rank 0: stopped \(SIGUSR2\) after \d+ of \d+"):
            run_stage("cache", cfg, run, force=True, progress=stop_after_two_image_batches)
    finally:
        interrupt.clear()
    assert not (run.cache / "index.json").exists()
    journaled = {line["row"] for line in _journal_lines(run) if "entry" in line}
    assert len(journaled) == 8  # exactly the two finished batches: nothing after the stop
    assert json.loads((run.root / "manifest.json").read_text())["stages"]["cache"]["status"] == "interrupted"
    summary = run_stage("cache", cfg, run)
    assert summary["resumed_samples"] == 8
    assert summary["encoded_texts"] == 0 and summary["encoded_images"] == len(reference) - 8  # none twice
    assert _index(run)["entries"] == reference


@pytest.mark.parametrize("bucketed", [False, True], ids=["square", "buckets"])
def test_an_image_corrupted_after_the_filter_is_skipped_with_its_reason(demo_run, tmp_path, bucketed):
    run = _copy(demo_run, tmp_path)
    cfg = _fresh_cache(run, tmp_path)
    cfg.train.buckets = bucketed  # buckets read each image's header first: a garbage file fails there
    images = run.trainset / "train"
    entries = _index(run)["entries"]
    truncated, garbage, deleted = (entries[i]["file_name"] for i in (1, 4, 7))
    data = (images / truncated).read_bytes()
    (images / truncated).write_bytes(data[: len(data) // 2])
    (images / garbage).write_bytes(b"not an image any more")
    (images / deleted).unlink()
    summary = run_stage("cache", cfg, run, force=True)
    report = json.loads((run.cache / "report.json").read_text())
    reasons = {row["image"]: row["reason"] for row in report["skipped"]}
    assert set(reasons) == {truncated, garbage, deleted}
    assert reasons[truncated].startswith("does not decode: OSError") and "truncated" in reasons[truncated]
    assert reasons[garbage].startswith(("cannot be read" if bucketed else "does not decode") +
                                       ": UnidentifiedImageError")
    assert reasons[deleted].startswith("cannot be read: FileNotFoundError")
    assert (report["samples"], report["cached"]) == (len(entries), len(entries) - 3)
    assert summary["skipped"] == 3 and summary["samples"] == len(entries) - 3
    kept = [e["file_name"] for e in _index(run)["entries"]]
    assert kept == [e["file_name"] for e in entries if e["file_name"] not in reasons]
    # training reads the index: it trains on the entries that exist
    cfg.train.steps = 2
    shutil.rmtree(run.train)
    shutil.rmtree(run.lora)
    run_stage("train", cfg, run)
    assert (run.lora / "pytorch_lora_weights.safetensors").is_file()


def test_rank_0_stops_when_a_rank_stopped_or_fails_when_one_failed(tmp_path):
    (tmp_path / "rank-1.json").write_text(json.dumps({"status": "interrupted", "detail": ""}))
    with pytest.raises(Interrupted, match="rank 1 stopped"):
        cache_shards.wait_for_shards(tmp_path, 2, poll_s=0.01)
    (tmp_path / "rank-1.json").write_text(json.dumps({"status": "failed", "detail": "OSError: disk full"}))
    with pytest.raises(cache_shards.RunFailure, match="rank 1 failed on its shard.*disk full"):
        cache_shards.wait_for_shards(tmp_path, 2, poll_s=0.01)
    interrupt.request("SIGTERM")
    try:
        (tmp_path / "rank-1.json").write_text(json.dumps({"status": "done", "detail": ""}))
        with pytest.raises(Interrupted, match=r"waiting for ranks \[2\]"):
            cache_shards.wait_for_shards(tmp_path, 3, poll_s=0.01)  # rank 2 never reports; a signal came
    finally:
        interrupt.clear()


def test_ddp_ranks_wait_for_rank_0s_cache_decision_and_stop_with_it(tmp_path, monkeypatch):
    """jobs.StageJob: rank 0 writes run/skip/fail/stop per stage; the other ranks follow it (a stop before a
    stage is a stop, not a failure; a failure is a failure)."""
    from kolora.launch.jobs import Decision, StageJob

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    job = StageJob(str(tmp_path / "run"), "config.yaml", str(tmp_path / "job"), "stamp", "train", ("cache", "train"),
                   tasks_per_node=2)
    job._decide("cache", Decision("run"))
    assert job._wait_go(1, "cache").action == "run" and (job._go_file("cache") / "decision").is_file()
    job._decide("train", Decision("stop"))
    job._decide("train", Decision("fail"), overwrite=False)  # the first decision stays
    with pytest.raises(Interrupted, match="rank 0 stopped on a signal before train"):
        job._wait_go(1, "train")
    job._decide("train", Decision("fail"))
    with pytest.raises(RuntimeError, match="rank 0 failed before train"):
        job._wait_go(1, "train")
