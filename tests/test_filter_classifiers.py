"""Data-Juicer's image_nsfw_filter and image_watermark_filter on tiny random ViT classifiers saved in the hub
models' layouts (`kolora fetch models --filters nsfw,watermark --tiny`): run offline from scorers.dir, each
dropped sample's report row carrying its score and the threshold it crossed, and a missing model refused by
validate/submit naming the fetch command. The filter job on Slurm: tests/test_filter_shards_slurm.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEMO, stage_context

from kolora.cli.main import main
from kolora.core.config import validate_config
from kolora.core.rundir import RunDir
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest
from kolora.ingest.samples import read_samples
from kolora.models import scorers

REPO = Path(__file__).resolve().parents[1]
LOCAL = str(REPO / "slurm" / "clusters" / "local.yaml")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("classifiers")
    assert main(["fetch", "models", "--filters", "nsfw,watermark", "--tiny", "--to", str(d)]) == 0
    return d


def classifier_scores(folder: Path, images: list[str]) -> list[float]:
    """Softmax index 1 of the classifier for each image, as Data-Juicer's nsfw/watermark ops score it."""
    import torch
    from data_juicer.utils.model_utils import prepare_huggingface_model
    from PIL import Image

    model, processor = prepare_huggingface_model(str(folder))
    out = []
    for path in images:
        with Image.open(path) as im, torch.no_grad():
            logits = model(**processor(images=[im.convert("RGB")], return_tensors="pt")).logits
        out.append(float(torch.softmax(logits, dim=-1)[0, 1]))
    return out


def cut_between(scores: list[float]) -> float:
    """A threshold in the widest gap of the scores' middle half: some lie above it, some below, none near it."""
    s = sorted(scores)
    i = max(range(max(1, len(s) // 4), max(2, 3 * len(s) // 4 + 1)), key=lambda k: s[k] - s[k - 1])
    assert s[i] - s[i - 1] > 1e-4, s
    return round((s[i] + s[i - 1]) / 2, 6)


def thresholds_for(folder: Path, samples: list[dict]) -> tuple[float, float, dict, dict]:
    """(nsfw max_score, watermark prob_threshold, nsfw score by id, watermark prob by id) such that the nsfw op
    drops some samples and the watermark op some of those the nsfw op keeps."""
    images = [s["image"][0] for s in samples]
    nsfw = dict(zip([s["id"] for s in samples], classifier_scores(folder / scorers.NSFW, images), strict=True))
    mark = dict(zip([s["id"] for s in samples], classifier_scores(folder / scorers.WATERMARK, images), strict=True))
    cut_n = cut_between(list(nsfw.values()))
    cut_w = cut_between([mark[i] for i, v in nsfw.items() if v <= cut_n])
    return cut_n, cut_w, nsfw, mark


def classifier_ops(cut_n: float, cut_w: float) -> list[dict]:
    return [{"image_nsfw_filter": {"max_score": cut_n, "any_or_all": "any"}},
            {"image_watermark_filter": {"prob_threshold": cut_w}}]


def check_report(report: dict, cut_n: float, cut_w: float, nsfw: dict, mark: dict) -> None:
    """Exactly the samples beyond a threshold are dropped, each by its op with its score and that threshold."""
    rows = {e["id"]: e for e in report["samples"]}
    want_kept = {i for i in nsfw if nsfw[i] <= cut_n and mark[i] <= cut_w}
    assert 0 < len(want_kept) < len(nsfw)
    assert {i for i, e in rows.items() if e["kept"]} == want_kept
    by_nsfw = {i for i in nsfw if nsfw[i] > cut_n}
    by_mark = set(nsfw) - want_kept - by_nsfw
    assert by_nsfw and by_mark
    for i in by_nsfw:
        e = rows[i]
        assert (e["op"], e["threshold"]) == ("image_nsfw_filter", {"max_score": cut_n}), e
        assert e["score"] == pytest.approx(nsfw[i], abs=1e-4) and e["score"] > cut_n
    for i in by_mark:
        e = rows[i]
        assert (e["op"], e["threshold"]) == ("image_watermark_filter", {"prob_threshold": cut_w}), e
        assert e["score"] == pytest.approx(mark[i], abs=1e-4) and e["score"] > cut_w
        assert e["stats"]["image_nsfw_score"] == [pytest.approx(nsfw[i], abs=1e-4)]
    assert all("score" not in e and "threshold" not in e for e in rows.values() if e["kept"])
    assert report["summary"]["by_op"] == {"image_nsfw_filter": len(by_nsfw), "image_watermark_filter": len(by_mark)}


def test_fetch_writes_tiny_classifiers_data_juicer_loads_and_refuses_unknown_names(classifier_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    from data_juicer.utils.model_utils import prepare_huggingface_model

    for key, c in scorers.CLASSIFIERS.items():
        folder = classifier_dir / c.hub_id
        assert {"config.json", "model.safetensors", "preprocessor_config.json", scorers.TINY_MARKER} <= {
            p.name for p in folder.iterdir()}
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["ViTForImageClassification"]
        assert config["id2label"]["1"] == key  # the class Data-Juicer scores (softmax index 1)
        model, _processor = prepare_huggingface_model(str(folder))
        assert type(model).__name__ == "ViTForImageClassification"
    with pytest.raises(SystemExit) as e:
        main(["fetch", "models", "--filters", "nsfw,aesthetic", "--tiny", "--to", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'aesthetic'" in err and "nsfw, watermark" in err
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as compute jobs have it: the real fetch says where to run it
    assert main(["fetch", "models", "--filters", "watermark", "--to", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "login node" in err and "kolora fetch models --filters watermark --to" in err


def test_nsfw_and_watermark_ops_run_offline_and_report_score_and_threshold(tmp_path, classifier_dir, offline):
    raw = {"name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
           "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")},
           "data": {"source": "synthetic", "synthetic": {"count": 12, "seed": 3, "min_side": 40, "max_side": 80}},
           "filter": {"ops": []}, "scorers": {"dir": str(classifier_dir)}}
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", validate_config(raw), run))
    cut_n, cut_w, nsfw, mark = thresholds_for(classifier_dir, read_samples(run.data / "metadata.jsonl"))
    raw["filter"]["ops"] = classifier_ops(cut_n, cut_w)
    kfilter.run(stage_context("filter", validate_config(raw), run))
    check_report(json.loads((run.filter / "report.json").read_text()), cut_n, cut_w, nsfw, mark)
    dj_cfg = (run.filter / "dj" / "config.yaml").read_text()
    assert str(classifier_dir / scorers.NSFW) in dj_cfg and str(classifier_dir / scorers.WATERMARK) in dj_cfg


@pytest.mark.parametrize("command", ["validate", "submit"])
def test_missing_classifier_is_refused_before_queueing_with_the_fetch_command(tmp_path, capsys, command):
    empty = tmp_path / "scorers"
    empty.mkdir()
    runs = tmp_path / "runs"
    where = ["--cluster", LOCAL, "--runs-dir", str(runs)] if command == "submit" else []
    rc = main([command, str(DEMO), *where, "--set", f"model.path={tmp_path / 'm'}", "--set", f"scorers.dir={empty}",
               "--set", "scorers.tiny=false", "--set", "evaluate.enabled=false",
               "--set", "filter.ops=[{image_nsfw_filter: {max_score: 0.4}}, {image_watermark_filter: {}}]"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"kolora fetch models --filters nsfw --to {empty}" in err and str(empty / scorers.NSFW) in err
    assert f"kolora fetch models --filters watermark --to {empty}" in err
    assert not runs.exists()
