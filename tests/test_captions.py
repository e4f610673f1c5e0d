"""data.captions: generate | replace, data.caption_prefix: captions from a (tiny, random) BLIP captioner in the
filter stage, deterministic across shards, marked in the report; the preflight names the fetch command when the
captioner is missing. The dev-cluster version: test_captions_slurm.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import DEMO, stage_context
from test_filter import DEMO_OPS, noisy_jpeg
from test_filter_shards import outputs

from kolora.cli.main import main
from kolora.core.config import DataConfig, load_config, validate_config
from kolora.core.errors import ConfigError
from kolora.core.rundir import RunDir
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest
from kolora.ingest.sources import DatasetError, probe
from kolora.models import captioner
from kolora.models.scorers import TINY_MARKER
from kolora.pipeline.keys import Keys

GIVEN = {0: "a red fox", 2: "二次元少女", 3: "a blue car"}  # rows 1, 4, 5 have no caption (empty, missing key)


@pytest.fixture(scope="module")
def captioners(tmp_path_factory) -> Path:
    """`kolora fetch models --captioner --tiny --to DIR`: both default captioners, tiny."""
    to = tmp_path_factory.mktemp("scorers")
    assert main(["fetch", "models", "--captioner", "--tiny", "--to", str(to)]) == 0
    return to


def dataset(root: Path) -> Path:
    root.mkdir()
    lines = []
    for i in range(6):
        (root / f"{i}.jpg").write_bytes(noisy_jpeg((96 + 8 * i, 80), seed=i))
        row: dict[str, Any] = {"image": [f"{i}.jpg"]}
        if i in GIVEN:
            row["text"] = GIVEN[i]
        elif i == 4:
            row["text"] = "  "
        lines.append(json.dumps(row, ensure_ascii=False))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "metadata.jsonl"


def config(tmp_path: Path, scorers_dir: Path, **data: Any):
    return validate_config({
        "name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
        "render": {"prompts": str(DEMO.parent / "prompts/anime-story.yaml")},
        "data": {"source": "jsonl", "path": str(tmp_path / "ds" / "metadata.jsonl"), **data},
        "filter": {"ops": DEMO_OPS}, "scorers": {"dir": str(scorers_dir)}})


def filtered(cfg, run: RunDir) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """(metadata.csv rows, report.json) after ingest and filter."""
    ingest.run(stage_context("ingest", cfg, run))
    kfilter.run(stage_context("filter", cfg, run))
    rows = list(csv.DictReader(io.StringIO((run.trainset / "train" / "metadata.csv").read_text(encoding="utf-8"))))
    return rows, json.loads((run.filter / "report.json").read_text(encoding="utf-8"))


def test_generate_captions_only_the_samples_without_one_and_the_prefix_goes_before_all(tmp_path, captioners):
    dataset(tmp_path / "ds")
    rows, report = filtered(config(tmp_path, captioners, captions="generate", caption_prefix="sks"),
                            RunDir(tmp_path / "run"))
    assert len(rows) == 6  # nothing rejected for a missing caption
    by_source = {e["id"]: e for e in report["samples"]}
    for n, row in enumerate(rows):
        e = by_source[f"{n:06d}"]
        if n in GIVEN:
            assert e["caption_source"] == "given" and "generated_caption" not in e
            assert row["text"] == f"sks{'，' if n == 2 else ', '}{GIVEN[n]}" == e["text"]
        else:
            assert e["caption_source"] == "generated" and e["generated_caption"].strip()
            assert row["text"] == f"sks, {e['generated_caption']}" or row["text"] == f"sks，{e['generated_caption']}"
    generated = {by_source[f"{n:06d}"]["generated_caption"] for n in (1, 4, 5)}
    assert len(generated) > 1  # the captions depend on the image
    summary = report["summary"]["captions"]
    assert summary == {"mode": "generate", "model": captioner.CAPTIONER_EN, "prefix": "sks", "generated": 3,
                       "given": 3}

    # keep (the default): the samples without a caption are rejected at ingest, as before
    rows, report = filtered(config(tmp_path, captioners), RunDir(tmp_path / "keep"))
    assert [r["text"] for r in rows] == list(GIVEN.values())
    assert sorted(e["reason"] for e in report["samples"] if not e["kept"]) == ["missing text"] * 3
    assert "captions" not in report["summary"] and all("caption_source" not in e for e in report["samples"])


def test_replace_captions_every_sample_and_shards_caption_like_one_pass(tmp_path, captioners):
    dataset(tmp_path / "ds")
    one = config(tmp_path, captioners, captions="replace", caption_language="zh")
    two = one.model_copy(update={"filter": one.filter.model_copy(update={"shards": 2})})
    rows, report = filtered(one, RunDir(tmp_path / "one"))
    filtered(two, RunDir(tmp_path / "two"))
    assert outputs(RunDir(tmp_path / "one")) == outputs(RunDir(tmp_path / "two"))
    assert [e["caption_source"] for e in report["samples"]] == ["generated"] * 6
    assert all(r["text"] and r["text"] not in GIVEN.values() for r in rows)
    assert report["summary"]["captions"]["model"] == captioner.CAPTIONER_ZH


def test_fetch_tiny_writes_loadable_captioners(captioners, tmp_path):
    for name in (captioner.CAPTIONER_EN, captioner.CAPTIONER_ZH):
        folder = captioner.local_folder(captioners, name)
        assert (folder / TINY_MARKER).is_file() and (folder / "model.safetensors").is_file()
    model = captioner.load(captioners / captioner.CAPTIONER_ZH, captioner.CAPTIONER_ZH)
    (tmp_path / "probe.jpg").write_bytes(noisy_jpeg((64, 64)))
    assert captioner.caption(model, str(tmp_path / "probe.jpg")).strip()
    # a BERT tokenizer decodes Chinese with a space between characters
    assert captioner.tidy(" 一 个 女 孩 ， 在 舞 台 上 ") == "一个女孩，在舞台上" and captioner.tidy("a  girl ") == "a girl"


def test_validate_refuses_without_the_captioner_naming_the_fetch_command(tmp_path, capsys):
    empty = tmp_path / "scorers"
    empty.mkdir()
    common = ["validate", str(DEMO), "--set", f"model.path={tmp_path / 'm'}", "--set", f"scorers.dir={empty}",
              "--set", "scorers.tiny=false", "--set", "evaluate.enabled=false"]
    assert main(common) == 0, capsys.readouterr().err  # nothing captioned: no captioner needed
    capsys.readouterr()
    assert main([*common, "--set", "data.captions=generate", "--set", "data.caption_language=zh"]) == 2
    err = capsys.readouterr().err
    assert f"kolora fetch models --captioner {captioner.CAPTIONER_ZH} --to {empty}" in err
    # submit refuses before it looks at the cluster, let alone queues anything
    runs = tmp_path / "runs"
    assert main(["submit", *common[1:], "--set", "data.captions=replace", "--cluster",
                 str(DEMO.parents[1] / "slurm" / "clusters" / "local.yaml"), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert f"kolora fetch models --captioner {captioner.CAPTIONER_EN} --to {empty}" in err and not runs.exists()


def test_caption_fields_leave_digests_and_keys_as_before_and_key_the_stages_they_change(tmp_path, captioners):
    base = load_config(DEMO)
    assert "captions" not in base.data.model_dump() and "caption_prefix" not in base.data.model_dump()
    run = RunDir(tmp_path / "none")
    keys = Keys(base, run)
    prefixed = Keys(load_config(DEMO, ["data.caption_prefix=sks"]), run)
    assert prefixed.work("ingest") == keys.work("ingest") and prefixed.work("filter") != keys.work("filter")
    generating = Keys(load_config(DEMO, ["data.captions=generate", f"scorers.dir={captioners}"]), run)
    assert generating.work("ingest") != keys.work("ingest")
    assert generating.inputs("filter")["captioner"]["files"] != "missing"

    with pytest.raises(ConfigError, match="data.caption_prefix"):
        load_config(DEMO, ["data.caption=二次元", "data.captions=replace"])


def test_a_dataset_without_captions_names_data_captions_generate(tmp_path):
    root = tmp_path / "bare"
    root.mkdir()
    (root / "0.jpg").write_bytes(noisy_jpeg((64, 64)))
    (root / "metadata.jsonl").write_text('{"image": ["0.jpg"]}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="data.captions: generate"):
        probe(DataConfig(source="jsonl", path=root / "metadata.jsonl"))
    probe(DataConfig(source="jsonl", path=root / "metadata.jsonl", captions="generate"))
    with pytest.raises(DatasetError, match="data.captions: generate"):  # a folder without metadata.csv
        probe(DataConfig(source="folder", path=root))
    probe(DataConfig(source="folder", path=root, captions="generate"))
