"""CLIP / Chinese-CLIP / aesthetic scorers on tiny random models saved in the real on-disk layouts: loaded by
Data-Juicer's own loader, run as filter ops offline with their stats in the report, used by the evaluate stage
on the demo (LoRA and base tiles), and a missing model caught before anything runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import DEMO, stage_context

from kolora.cli.main import main
from kolora.core.config import validate_config
from kolora.core.rundir import RunDir
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest
from kolora.models import scorers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scorers")
    assert main(["fetch", "models", "--clip", "--aesthetics", "--tiny", "--to", str(d)]) == 0
    return d


def test_tiny_models_have_the_hub_layouts_and_load_through_data_juicer(scorer_dir, offline):
    from data_juicer.utils.model_utils import prepare_huggingface_model
    from PIL import Image

    for name in (scorers.CLIP_EN, scorers.CLIP_ZH, scorers.AESTHETIC):
        folder = scorer_dir / name
        assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert (scorer_dir / scorers.CLIP_ZH / "vocab.txt").is_file() or (scorer_dir / scorers.CLIP_ZH / "tokenizer.json").is_file()
    assert json.loads((scorer_dir / scorers.AESTHETIC / "config.json").read_text())["architectures"] == [
        "AestheticsPredictorV2Linear"]
    # Data-Juicer's image_text_similarity_filter loader (AutoProcessor + the config's architecture)
    for name, arch in ((scorers.CLIP_EN, "CLIPModel"), (scorers.CLIP_ZH, "ChineseCLIPModel")):
        model, _processor = prepare_huggingface_model(str(scorer_dir / name))
        assert type(model).__name__ == arch

    images = [Image.new("RGB", (40, 30), c) for c in ("red", "navy", "white")]
    zh = scorers.load_clip(scorer_dir / scorers.CLIP_ZH, scorers.CLIP_ZH)
    scores = scorers.clip_score(zh, images, ["二次元,日系动漫"] * 3)
    assert all(-1.0 <= s <= 1.0 for s in scores) and len(set(scores)) == 3
    aes = scorers.aesthetic_score(scorers.load_aesthetic(scorer_dir / scorers.AESTHETIC, scorers.AESTHETIC), images)
    assert len(set(aes)) == 3
    assert scorers.clip_for("二次元,一个紫色短发小女孩", "auto") == scorers.CLIP_ZH
    assert scorers.clip_for("a red circle on a blue background", "auto") == scorers.CLIP_EN
    assert scorers.clip_for("二次元", "en") == scorers.CLIP_EN


def test_clip_and_aesthetics_filter_ops_run_offline_with_stats_in_the_report(tmp_path, scorer_dir, offline):
    ops = [{"image_text_similarity_filter": {"min_score": -1.0, "max_score": 1.0}},
           {"image_aesthetics_filter": {"min_score": 0.0, "max_score": 1.0}}]
    raw = {"name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
           "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")},
           "data": {"source": "synthetic", "synthetic": {"count": 12, "seed": 3, "min_side": 40, "max_side": 80},
                    "caption": "二次元"},
           "filter": {"ops": ops}, "scorers": {"dir": str(scorer_dir)}}
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", validate_config(raw), run))
    kfilter.run(stage_context("filter", validate_config(raw), run))
    report = json.loads((run.filter / "report.json").read_text())
    entries = [e for e in report["samples"] if e["stage"] != "header"]
    assert len(entries) == 12
    sims = [e["stats"]["image_text_similarity"][0] for e in entries]
    aes = [e["stats"]["image_aesthetics_scores"][0] for e in entries]
    assert all(-1 <= s <= 1 for s in sims)
    assert report["summary"]["dj_ops"] == ["image_text_similarity_filter", "image_aesthetics_local_filter"]
    # Chinese captions → Chinese-CLIP, from the local folder
    dj_cfg = (run.filter / "dj" / "config.yaml").read_text()
    assert str(scorer_dir / scorers.CLIP_ZH) in dj_cfg and scorers.CLIP_EN not in dj_cfg

    # a threshold between the scores drops exactly the samples below it, attributed to the op
    cut = sorted(aes)[len(aes) // 2]
    raw["filter"]["ops"][1]["image_aesthetics_filter"]["min_score"] = cut
    kfilter.run(stage_context("filter", validate_config(raw), run))
    report = json.loads((run.filter / "report.json").read_text())
    kept = {e["id"] for e in report["samples"] if e["kept"]}
    assert kept == {e["id"] for e, a in zip(entries, aes, strict=True) if a >= cut}
    dropped = [e for e in report["samples"] if not e["kept"]]
    assert dropped and all(e["op"] == "image_aesthetics_filter" and e["stats"]["image_aesthetics_scores"][0] < cut
                           for e in dropped)
    assert all(e["score"] == e["stats"]["image_aesthetics_scores"][0] and e["threshold"] == {"min_score": cut}
               for e in dropped)  # kolora.filter.dj.thresholds: the score and the bound it fell below
    texts = (run.trainset / "train" / "metadata.csv").read_text(encoding="utf-8")
    assert "<__dj__image>" not in texts and "二次元" in texts


def test_missing_scorer_model_fails_in_preflight_naming_the_fetch_command(tmp_path, capsys):
    empty = tmp_path / "scorers"
    empty.mkdir()
    rc = main(["validate", str(DEMO), "--set", f"model.path={tmp_path / 'm'}", "--set", f"scorers.dir={empty}",
               "--set", "scorers.tiny=false"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "kolora fetch models --clip --aesthetics" in err and scorers.CLIP_ZH in err and scorers.AESTHETIC in err
    # a filter op needing a model is caught the same way, evaluate off
    rc = main(["validate", str(DEMO), "--set", f"model.path={tmp_path / 'm'}", "--set", f"scorers.dir={empty}",
               "--set", "scorers.tiny=false", "--set", "evaluate.enabled=false",
               "--set", "filter.ops=[{image_aesthetics_filter: {min_score: 0.1}}]"])
    err = capsys.readouterr().err
    assert rc == 2 and "kolora fetch models --clip --aesthetics" in err and scorers.AESTHETIC in err


def test_evaluate_on_the_demo_scores_every_lora_and_base_tile(demo_run):
    scores = json.loads((demo_run / "eval" / "scores.json").read_text(encoding="utf-8"))
    prompts = 8
    assert len(scores["tiles"]) == prompts
    assert [t["index"] for t in scores["tiles"]] == list(range(prompts))
    for t in scores["tiles"]:
        assert (demo_run / t["lora_tile"]).is_file() and (demo_run / t["base_tile"]).is_file()
        assert t["base_tile"].startswith("render/base/") and t["lora_tile"] != t["base_tile"]
        for k in ("clip", "aesthetic"):
            assert set(t[k]) == {"lora", "base"} and all(isinstance(v, float) for v in t[k].values())
    for k in ("clip", "aesthetic"):
        mean = sum(t[k]["lora"] for t in scores["tiles"]) / prompts
        assert scores["summary"][k]["lora"] == pytest.approx(mean)
    assert scores["models"]["clip"]["name"] == scorers.CLIP_ZH  # the demo's prompts are Chinese
    assert scores["models"]["aesthetic"]["name"] == scorers.AESTHETIC
    with open(demo_run / "eval" / "scores.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "prompt", "seed", "clip_lora", "clip_base", "aesthetic_lora", "aesthetic_base"]
    assert [float(r["aesthetic_base"]) for r in rows] == [t["aesthetic"]["base"] for t in scores["tiles"]]
    # the base tiles are the base model's: not the LoRA tiles' pixels
    t0 = scores["tiles"][0]
    assert (demo_run / t0["lora_tile"]).read_bytes() != (demo_run / t0["base_tile"]).read_bytes()


def test_base_tiles_are_shared_across_runs_through_the_cache_dir(tiny_diffusers, tmp_path):
    """A second run with another lr and a shared cache.dir links the base tiles the first one rendered."""
    from kolora.render import stage as render
    lab = tmp_path / "lab-cache"
    runs = tmp_path / "runs"
    common = ["--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}", "--set", f"cache.dir={lab}",
              "--set", "train.steps=2", "--set", "data.synthetic.count=12"]
    assert main(["run", str(DEMO), "--name", "a", *common, "--stage", "ingest", "--stage", "filter",
                 "--stage", "cache", "--stage", "train", "--stage", "render"]) == 0
    shared = sorted(p.name for p in (lab / "base-tiles").glob("*.png"))
    assert len(shared) == 8
    calls = []
    real = render._render_tiles
    render._render_tiles = lambda cfg, run, lf, todo, *a: (calls.append((lf, len(todo))), real(cfg, run, lf, todo, *a))
    try:
        assert main(["run", str(DEMO), "--name", "b", *common, "--set", "train.lr=0.002", "--stage", "ingest",
                     "--stage", "filter", "--stage", "cache", "--stage", "train", "--stage", "render"]) == 0
    finally:
        render._render_tiles = real
    assert [lf is None for lf, _n in calls] == [False]  # only the LoRA tiles rendered
    a, b = runs / "a" / "render" / "base", runs / "b" / "render" / "base"
    assert sorted(p.name for p in a.glob("*.png")) == sorted(p.name for p in b.glob("*.png"))


def test_fetch_scorers_offline_fails_fast_with_login_node_advice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as compute jobs have it
    assert main(["fetch", "models", "--clip", "--aesthetics", "--to", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "login node" in err and "kolora fetch models --clip --aesthetics" in err
    assert not (tmp_path / "m").exists()


def test_each_score_is_its_own_tiles_and_the_intervals_are_the_tiles(demo_run):
    """Every number of eval/scores.json recomputed from the tile files it names: a LoRA score from the LoRA tile,
    a base score from the base tile (they differ, so a base score taken from the LoRA tile fails here); the
    intervals are core.stats' over those tiles, the difference paired by prompt and seed."""
    from PIL import Image

    from kolora.core.stats import mean_interval, paired_difference

    scores = json.loads((demo_run / "eval" / "scores.json").read_text(encoding="utf-8"))
    s = RunDir(demo_run).load_config().scorers
    clip = scorers.load_clip(scorers.local_folder(s.dir, scorers.CLIP_ZH), scorers.CLIP_ZH)
    aesthetic = scorers.load_aesthetic(scorers.local_folder(s.dir, s.aesthetic), s.aesthetic)
    tiles = scores["tiles"]
    for t in tiles[:3]:
        for side in ("lora", "base"):
            with Image.open(demo_run / t[f"{side}_tile"]) as im:
                image = im.convert("RGB")
            assert t["clip"][side] == pytest.approx(scorers.clip_score(clip, [image], [t["prompt"]])[0], abs=1e-6)
            assert t["aesthetic"][side] == pytest.approx(scorers.aesthetic_score(aesthetic, [image])[0], abs=1e-6)
    for k in ("clip", "aesthetic"):
        lora, base = [t[k]["lora"] for t in tiles], [t[k]["base"] for t in tiles]
        assert min(abs(a - b) for a, b in zip(lora, base, strict=True)) > 1e-5  # the test can tell them apart
        got = scores["intervals"]
        assert got["lora"][k] == mean_interval(lora).as_dict() and got["base"][k] == mean_interval(base).as_dict()
        assert got["lora_minus_base"][k] == paired_difference(lora, base).as_dict()
        assert got["lora"][k]["n"] == len(tiles) == 8
        assert got["lora"][k]["low"] <= scores["summary"][k]["lora"] == pytest.approx(got["lora"][k]["mean"])
        assert got["lora_minus_base"][k]["mean"] == pytest.approx(sum(lora) / 8 - sum(base) / 8)
