"""data.captions: generate on the dev Slurm cluster: `kolora submit` refuses before queueing while the captioner is
missing (naming the fetch command); once `kolora fetch models --captioner --tiny` put it in scorers.dir, the
filter job (an array of 2 shard tasks, offline) captions the samples without a caption, and its outputs equal an
unsharded in-process filter of the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import stage_context
from slurmkit import DEMO, LOCAL, kolora, submit, wait_ended
from test_captions import GIVEN, dataset
from test_filter_shards import outputs

from kolora.core.config import load_config
from kolora.core.rundir import RunDir
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest
from kolora.models import captioner

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cancel_leftovers")]


def test_filter_job_captions_offline_after_submit_refused_without_the_captioner(env: dict[str, str],
                                                                                 tmp_path: Path) -> None:
    meta = dataset(tmp_path / "ds")
    scorers = tmp_path / "scorers"
    scorers.mkdir()
    runs = tmp_path / "runs"
    sets = ["data.source=jsonl", f"data.path={meta}", "data.captions=generate", "data.caption_prefix=sks",
            "filter.shards=2", f"scorers.dir={scorers}", "scorers.tiny=false", "evaluate.enabled=false"]
    args = [x for s in sets for x in ("--set", s)]

    refused = kolora(env, "submit", DEMO, "--cluster", LOCAL, "--runs-dir", runs, "--name", "cap", *args)
    assert refused.returncode == 2, refused.stderr
    assert f"kolora fetch models --captioner {captioner.CAPTIONER_EN} --to {scorers}" in refused.stderr
    assert not (runs / "cap" / "manifest.json").exists()  # nothing queued

    fetched = kolora(env, "fetch", "models", "--captioner", captioner.CAPTIONER_EN, "--tiny", "--to", scorers)
    assert fetched.returncode == 0, fetched.stderr
    sub, _ = submit(env, runs, "cap", *args)
    run = RunDir(runs / "cap")
    filt = sub["jobs"]["filter"]["job_id"]
    assert sub["jobs"]["filter"]["array"] and len(sub["jobs"]["filter"]["task_ids"]) == 2
    rows = wait_ended(env, [filt], 2, run.root)
    kolora(env, "cancel", "cap", "--runs-dir", runs, timeout=60)  # training is not what is tested here
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows

    report = json.loads((run.filter / "report.json").read_text(encoding="utf-8"))
    assert report["summary"]["shards"] == 2
    assert report["summary"]["captions"] == {"mode": "generate", "model": captioner.CAPTIONER_EN, "prefix": "sks",
                                             "generated": 6 - len(GIVEN), "given": len(GIVEN)}
    generated = [e for e in report["samples"] if e.get("caption_source") == "generated"]
    assert all(e["generated_caption"].strip() and e["text"].startswith("sks") for e in generated)

    # the same config unsharded, in this process: the same captions, report and trainset
    cfg = load_config(DEMO, [s for s in sets if s != "filter.shards=2"])
    ref = RunDir(tmp_path / "ref")
    ingest.run(stage_context("ingest", cfg, ref))
    kfilter.run(stage_context("filter", cfg, ref))
    assert outputs(run) == outputs(ref)
