"""data.sources: several datasets in one run, each with its name, repeats and caption prefix. Ingest tags every
sample with its source, the filter and training count them per source, and the sampler draws each image of a
source `repeats` times per epoch, still a pure function of (seed, step): an interrupted run resumes exactly."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import DEMO, demo_overrides, untrained_copy
from safetensors.torch import load_file
from test_train import stop_at

from kolora.core import interrupt
from kolora.core.config import load_config
from kolora.core.errors import ConfigError
from kolora.core.rundir import RunDir
from kolora.filter.stage import validate_all_ops
from kolora.pipeline.keys import Keys
from kolora.pipeline.runner import run_stage
from kolora.report.stage import source_rows
from kolora.train import samples as train_samples
from kolora.train.samples import BucketSampler, StepSampler

# Two tiny synthetic datasets: 8 images each, 4 of which pass the demo's filter (kolora.ingest.synthetic)
TWO = ("data.sources=[{name: plain, synthetic: {count: 8, seed: 0}}, "
       "{name: triple, repeats: 3, caption_prefix: 'sks, ', synthetic: {count: 8, seed: 1}}]")


def _config(tiny_diffusers, *extra: str):
    return load_config(DEMO, demo_overrides(tiny_diffusers, *extra))


# ---- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sources", "says"), [
    ("[{name: a}, {name: a}]", "two sources are named 'a'"),
    ("[{name: a, repeats: 0}]", "data.sources[0].repeats"),
    ("[{name: a, source: folder}]", "path is required"),
])
def test_bad_sources_name_the_field(tiny_diffusers, sources, says):
    with pytest.raises(ConfigError, match=r"data\.sources") as e:
        _config(tiny_diffusers, f"data.sources={sources}")
    assert says in str(e.value)


def test_data_source_and_sources_together_are_refused_naming_both(tiny_diffusers, tmp_path):
    with pytest.raises(ConfigError) as e:
        _config(tiny_diffusers, "data.source=folder", f"data.path={tmp_path}", "data.sources=[{name: a}]")
    assert "data.source, data.path and data.sources are both set" in str(e.value)


def test_sources_are_named_after_their_dataset_and_numbered_when_alike(tiny_diffusers, tmp_path):
    cfg = _config(tiny_diffusers, f"data.sources=[{{}}, {{synthetic: {{seed: 1}}}}, {{source: folder, path: "
                                  f"{tmp_path / 'faces'}}}, {{name: synthetic-2}}]")
    assert [s.name for s in cfg.data.sources] == ["synthetic", "synthetic-3", "faces", "synthetic-2"]
    assert cfg.data.sources[2].path == tmp_path / "faces"


def test_no_sources_leave_digests_and_keys_as_before(tiny_diffusers, demo_run):
    cfg = _config(tiny_diffusers)
    assert "sources" not in cfg.model_dump(mode="json")["data"]
    keys = [Keys(cfg, RunDir(demo_run)).inputs(s) for s in ("ingest", "train")]
    assert not [f for k in keys for f in [*k["fields"], *k["content"]] if "sources" in f]
    # repeats key training only: ingest (and so the cache) keeps its key when they change
    one, three = (_config(tiny_diffusers, TWO.replace("repeats: 3", f"repeats: {r}")) for r in (1, 3))
    run = RunDir(demo_run)
    assert Keys(one, run).work("ingest") == Keys(three, run).work("ingest")
    assert Keys(one, run).work("train") != Keys(three, run).work("train")


# ---- the sampler -------------------------------------------------------------------------------------------
def test_the_sampler_without_repeats_draws_what_it_drew_before_sources():
    """Pinned from the sampler before data.sources existed: every existing config trains on the same order."""
    assert list(StepSampler(5, 12, 3)) == list(StepSampler(5, 12, 3, repeats=[1] * 5)) == \
        [4, 2, 1, 3, 0, 1, 3, 0, 4, 2, 4, 1]
    assert list(StepSampler(5, 12, 3, start=7)) == [0, 4, 2, 4, 1]
    sizes = [(8, 8), (8, 4), (8, 8), (8, 8), (4, 8)]
    assert list(BucketSampler(sizes, 2, 5, 3)) == list(BucketSampler(sizes, 2, 5, 3, repeats=[1] * 5)) == \
        [1, 1, 2, 3, 4, 4, 3, 0, 1, 1]


def test_each_epoch_draws_every_sample_repeats_times_and_resumes_exactly():
    repeats = [1, 3, 1, 2]
    epoch = sum(repeats)
    whole = list(StepSampler(4, 3 * epoch, 9, repeats=repeats))
    for e in range(3):
        assert Counter(whole[e * epoch:(e + 1) * epoch]) == dict(enumerate(repeats))
    assert whole[:epoch] != whole[epoch:2 * epoch]  # reshuffled each epoch
    assert list(StepSampler(4, 3 * epoch, 9, start=11, repeats=repeats)) == whole[11:]
    buckets = BucketSampler([(8, 8)] * 4, 1, epoch, 9, repeats=repeats)
    assert Counter(buckets) == dict(enumerate(repeats))


# ---- through the stages ------------------------------------------------------------------------------------
def test_two_sources_with_repeats_1_and_3_train_and_resume_bit_identical(demo_run, tiny_diffusers, tmp_path,
                                                                          monkeypatch):
    """Ingest tags the samples; the filter, training and report count them per source; over one epoch the
    training reads each image of `triple` 3 times and each of `plain` once; stopped at step 3 and resumed, the
    LoRA equals the uninterrupted one bit for bit."""
    import shutil

    cfg = _config(tiny_diffusers, TWO, "train.steps=8", "train.checkpoint_every=100")  # 4 + 4·3 = 16 = 8 steps of 2
    ref, _ = untrained_copy(demo_run, tmp_path / "ref")
    for stage in ("ingest", "filter", "cache"):
        summary = run_stage(stage, cfg, ref)
    meta = [json.loads(line) for line in (ref.data / "metadata.jsonl").read_text().splitlines()]
    assert [m["source"] for m in meta] == ["plain"] * 8 + ["triple"] * 8
    assert len({m["id"] for m in meta}) == 16
    assert all(m["text"].startswith("sks, 二次元") == (m["source"] == "triple") for m in meta)
    manifest = json.loads((ref.root / "manifest.json").read_text())["stages"]
    assert manifest["ingest"]["summary"]["sources"]["triple"]["samples"] == 8
    assert manifest["filter"]["summary"]["sources"] == {"plain": {"kept": 4, "dropped": 4},
                                                        "triple": {"kept": 4, "dropped": 4}}
    rows = json.loads((ref.filter / "report.json").read_text())["samples"]
    assert Counter(r["source"] for r in rows) == {"plain": 8, "triple": 8}
    entries = json.loads((ref.cache / "index.json").read_text())["entries"]
    shutil.copytree(ref.root, tmp_path / "stopped")

    read: list[int] = []
    getitem = train_samples.CachedSamples.__getitem__
    monkeypatch.setattr(train_samples.CachedSamples, "__getitem__", lambda self, i: read.append(i) or getitem(self, i))
    summary = run_stage("train", cfg, ref)
    assert Counter(entries[i]["source"] for i in read) == {"plain": 4, "triple": 12}
    assert set(Counter(read).values()) == {1, 3} and all(
        n == (3 if entries[i]["source"] == "triple" else 1) for i, n in Counter(read).items())
    assert summary["sources"] == {"plain": {"images": 4, "repeats": 1, "samples_per_epoch": 4},
                                  "triple": {"images": 4, "repeats": 3, "samples_per_epoch": 12}}
    assert [(r["source"], r["kept"], r["samples_per_epoch"]) for r in source_rows(cfg, ref)] == [
        ("plain", 4, 4), ("triple", 4, 12)]

    stopped = RunDir(tmp_path / "stopped")
    stop_at(monkeypatch, {3})
    with pytest.raises(interrupt.Interrupted):
        run_stage("train", cfg, stopped)
    interrupt.clear()
    assert run_stage("train", cfg, stopped)["resumed_from_step"] == 3
    got, want = (load_file(str(r.lora / "pytorch_lora_weights.safetensors")) for r in (stopped, ref))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_a_source_with_its_own_filter_ops_is_filtered_by_them(demo_run, tiny_diffusers, tmp_path):
    """`triple` keeps every image with filter_ops: [] while `plain` goes through filter.ops (4 of 8 kept)."""
    cfg = _config(tiny_diffusers, TWO.replace("caption_prefix: 'sks, '", "filter_ops: []"))
    run, _ = untrained_copy(demo_run, tmp_path / "run")
    run_stage("ingest", cfg, run)
    assert run_stage("filter", cfg, run)["sources"] == {"plain": {"kept": 4, "dropped": 4},
                                                         "triple": {"kept": 8, "dropped": 0}}
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.filter_ops.*compares the samples of every source"):
        _config(tiny_diffusers, "data.sources=[{filter_ops: [image_deduplicator]}]")
    bad = _config(tiny_diffusers, "data.sources=[{name: a, filter_ops: [no_such_filter]}]")
    with pytest.raises(ConfigError, match=r"data\.sources 'a' filter_ops\[0\]: unknown Data-Juicer op"):
        validate_all_ops(bad)


def test_preflight_names_the_model_a_sources_filter_ops_need(tiny_diffusers, tmp_path):
    """A scorer op only in a source's filter_ops: its model is checked before anything runs, like filter.ops'."""
    from kolora.models.scorers import missing_for_config

    ops = "filter_ops: [{image_aesthetics_filter: {min_score: 0.1}}]"
    cfg = _config(tiny_diffusers, f"data.sources=[{{name: a, {ops}}}]", f"scorers.dir={tmp_path / 'none'}",
                  "scorers.tiny=false", "evaluate.enabled=false")
    problems = missing_for_config(cfg, [])
    assert any(cfg.scorers.aesthetic in p and "kolora fetch models" in p for p in problems), problems
    plain = _config(tiny_diffusers, "data.sources=[{name: a}]", f"scorers.dir={tmp_path / 'none'}",
                    "scorers.tiny=false", "evaluate.enabled=false", "filter.ops=[]")
    assert missing_for_config(plain, []) == []
