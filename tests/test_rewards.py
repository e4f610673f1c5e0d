"""Reward scorers (scorers.rewards): PickScore, HPSv2 and ImageReward from local weights (a tiny random one in the hub layouts), read
only in English (a prompt's prompt_en gloss; a Chinese prompt without one is not scored, and says why), in
eval/scores.json beside CLIP and aesthetic; missing weights caught before anything runs, and fetching offline fails
fast with the login-node advice."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import DEMO, stage_context

from kolora.cli.main import main
from kolora.core.config import validate_config
from kolora.core.errors import ConfigError
from kolora.core.rundir import RunDir
from kolora.evaluate import stage as evaluate
from kolora.models import scorers

REPO = Path(__file__).resolve().parents[1]


def test_tiny_pickscore_loads_offline_and_scores_as_its_model_card_computes(tmp_path, monkeypatch):
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    assert main(["fetch", "models", "--scorers", "pickscore", "--tiny", "--to", str(tmp_path)]) == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir, proc_dir = tmp_path / scorers.PICKSCORE, tmp_path / scorers.PICKSCORE_PROCESSOR
    assert (model_dir / "model.safetensors").is_file() and (proc_dir / "tokenizer_config.json").is_file()
    assert not list(proc_dir.glob("*.safetensors"))  # the processor's repository is read for its processor only
    loaded = scorers.load_pickscore(model_dir, proc_dir, scorers.PICKSCORE)
    image = Image.new("RGB", (40, 30), "red")
    texts = ["a red square", "a girl singing on a stage"]
    got = scorers.pickscore(loaded, [image, image], texts)

    # independently, as PickScore's model card: logit_scale.exp() * cosine of the normalised embeddings
    model, processor = CLIPModel.from_pretrained(str(model_dir)), CLIPProcessor.from_pretrained(str(proc_dir))
    with torch.no_grad():
        img = model.get_image_features(**processor(images=[image], return_tensors="pt"))
        txt = model.get_text_features(**processor(text=texts, padding=True, return_tensors="pt"))
        img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        want = (model.logit_scale.exp() * (txt @ img.T)[:, 0]).tolist()
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] != pytest.approx(got[1], abs=1e-4)  # the text matters
    assert scorers.english_prompt(type("P", (), {"prompt": "二次元,一个女孩", "prompt_en": None})()) is None


def test_evaluate_scores_pickscore_in_english_and_says_why_a_tile_has_none(demo_run, tmp_path):
    run_root = tmp_path / "run"
    shutil.copytree(demo_run, run_root, ignore=shutil.ignore_patterns("cache", "train"))
    run = RunDir(run_root)
    prompt_set = yaml.safe_load((REPO / "configs/prompts/anime-story.yaml").read_text(encoding="utf-8"))
    prompt_set["prompts"][1]["prompt_en"] = "anime, a girl with short purple hair in the audience of a concert"
    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump(prompt_set, allow_unicode=True), encoding="utf-8")
    raw = run.load_config().model_dump(mode="json")
    raw["render"]["prompts"] = str(tmp_path / "prompts.yaml")
    raw["scorers"].update({"dir": str(tmp_path / "scorers"), "tiny": True,
                           "rewards": ["pickscore", "hps", "imagereward"]})
    cfg = validate_config(raw)
    evaluate.run(stage_context("evaluate", cfg, run))

    scores = json.loads((run_root / "eval" / "scores.json").read_text(encoding="utf-8"))
    tiles = scores["tiles"]
    glossed, chinese = tiles[1], tiles[0]
    assert glossed["pickscore"]["text"] == prompt_set["prompts"][1]["prompt_en"]
    assert all(isinstance(glossed["pickscore"][side], float) for side in ("lora", "base"))
    assert chinese["pickscore"] == {"lora": None, "base": None, "reason": scorers.NO_ENGLISH_PROMPT}
    assert [t["index"] for t in tiles if t["pickscore"]["lora"] is not None] == [1]
    # the score is the glossed text's, of the tile's own image
    from PIL import Image
    s = cfg.scorers
    model = scorers.load_pickscore(scorers.local_folder(s.dir, s.pickscore),
                                   scorers.local_folder(s.dir, s.pickscore_processor), s.pickscore)
    with Image.open(run_root / glossed["base_tile"]) as im:
        assert glossed["pickscore"]["base"] == pytest.approx(
            scorers.pickscore(model, [im.convert("RGB")], [glossed["pickscore"]["text"]])[0], abs=1e-6)
    assert scores["intervals"]["lora"]["pickscore"]["n"] == 1  # over the scored tile only
    assert scores["summary"]["pickscore"]["lora"] == pytest.approx(glossed["pickscore"]["lora"])
    assert scores["intervals"]["lora"]["clip"]["n"] == len(tiles)
    assert scores["models"]["pickscore"]["name"] == scorers.PICKSCORE
    with open(run_root / "eval" / "scores.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["pickscore_lora"] == "" and float(rows[1]["pickscore_lora"]) == glossed["pickscore"]["lora"]

    from kolora.report.stage import build_html
    html = build_html(cfg, run, {}, scores, len(tiles), [], [])
    assert "PickScore LoRA" in html and "no English prompt" in html

    # the ported scorers likewise: the glossed tile scored with its English text, the Chinese one not
    for key, name in (("hps", "HPSv2"), ("imagereward", "ImageReward")):
        assert chinese[key] == {"lora": None, "base": None, "reason": scorers.NO_ENGLISH_PROMPT}
        assert glossed[key]["text"] == glossed["pickscore"]["text"]
        loaded, _folder = scorers.load_reward(s, key)
        with Image.open(run_root / glossed["lora_tile"]) as im:
            assert glossed[key]["lora"] == pytest.approx(
                scorers.reward_score(key, loaded, [im.convert("RGB")], [glossed[key]["text"]])[0], abs=1e-6)
        assert scores["intervals"]["lora_minus_base"][key]["n"] == 1
        assert f"{name} LoRA" in html
    assert scores["models"]["hps"]["name"] == scorers.hps_folder()
    assert scores["models"]["imagereward"]["name"] == scorers.IMAGEREWARD
    assert rows[0]["imagereward_base"] == "" and rows[1]["hps_base"] != ""


def test_pickscore_missing_offline_or_unavailable_is_refused_naming_the_way(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "scorers"
    empty.mkdir()
    rc = main(["validate", str(DEMO), "--set", f"model.path={tmp_path / 'm'}", "--set", f"scorers.dir={empty}",
               "--set", "scorers.tiny=false", "--set", "scorers.rewards=[pickscore]"])
    err = capsys.readouterr().err
    assert rc == 2 and "kolora fetch models --scorers pickscore" in err and scorers.PICKSCORE in err

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as compute jobs have it
    assert main(["fetch", "models", "--scorers", "pickscore", "--to", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "login node" in err and "kolora fetch models --scorers pickscore" in err
    assert not (tmp_path / "m").exists()

    with pytest.raises(SystemExit):
        main(["fetch", "models", "--scorers", "aesthetic-v3", "--to", str(tmp_path / "m")])
    assert "pickscore, hps, imagereward" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="rewards"):
        validate_config({**yaml.safe_load(DEMO.read_text()), "scorers": {"rewards": ["aesthetic-v3"]}})
