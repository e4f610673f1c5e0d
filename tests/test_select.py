"""The select stage (evaluate.select): validation samples scored over training, the run's LoRA chosen among the
validation steps, lora/last/ and lora/selection.json; `last` (the default) as before."""

from __future__ import annotations

import csv
import hashlib
import html
import json
import re
from pathlib import Path

import pytest
from conftest import DEMO, untrained_copy
from headless_browser import body_attributes, chromium, dom, screenshot

from kolora.cache.validation import prompt_texts
from kolora.core.config import load_config
from kolora.core.rundir import RunDir
from kolora.core.stage import StageContext
from kolora.evaluate import selection
from kolora.pipeline.keys import Keys
from kolora.pipeline.registry import NAMES
from kolora.pipeline.runner import run_stage
from kolora.train.validation import sample_names, step_dir, step_lora

LORA = "pytorch_lora_weights.safetensors"
STEPS = (0, 10, 20, 30)  # the demo's 30 steps, validation every 10, and the base model as step 0


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_tensors(a: Path, b: Path) -> bool:
    import torch

    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---- the choice, on samples made to differ, scored by the real (tiny) scorer models --------------------------
def _noise(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _pool_scores(cfg, metric: str, images: list) -> list[list[float]]:
    """Each pool image's score under `metric` for each validation prompt, straight from the scorer models."""
    from kolora.models import scorers

    s = cfg.scorers
    scorers.ensure_tiny(s)
    if metric == "aesthetic":
        model = scorers.load_aesthetic(scorers.local_folder(s.dir, s.aesthetic), s.aesthetic)
        return [scorers.aesthetic_score(model, images)] * len(prompt_texts(cfg))
    out = []
    for text in prompt_texts(cfg):
        name = scorers.clip_for(text, s.language, s.clip, s.chinese_clip)
        model = scorers.load_clip(scorers.local_folder(s.dir, name), name)
        out.append(scorers.clip_score(model, images, [text] * len(images)))
    return out


def _fake_run(tmp_path: Path, cfg, picture) -> RunDir:
    """A trained run's validation folders: picture(step, prompt index) at every step, a LoRA file per step after 0
    (bytes naming its step) and a final LoRA."""
    run = RunDir(tmp_path / "run")
    for step in STEPS:
        folder = step_dir(run.train, step)
        folder.mkdir(parents=True)
        for i, _seed, name in sample_names(cfg):
            picture(step, i).save(folder / name)
        if step:
            step_lora(run.train, step).write_bytes(f"LoRA of step {step}".encode())
    run.lora.mkdir(parents=True)
    (run.lora / LORA).write_bytes(b"LoRA of the final step")
    return run


@pytest.mark.parametrize(("metric", "best"), [("clip", 20), ("aesthetic", 10)])
def test_the_step_whose_samples_score_best_is_selected(tmp_path, metric, best):
    cfg = load_config(DEMO, ["train.validation.every=10", f"evaluate.select={metric}"])
    pool = [_noise(seed) for seed in range(10)]
    scores = _pool_scores(cfg, metric, pool)
    ranked = [sorted(range(len(pool)), key=lambda k, s=s: s[k]) for s in scores]  # per prompt, worst first
    # `best` gets each prompt's top image, the other steps images from the bottom of the pool
    pick = {best: -1, **{s: n for n, s in enumerate(x for x in STEPS if x != best)}}
    run = _fake_run(tmp_path, cfg, lambda step, i: pool[ranked[i][pick[step]]])

    summary = selection.run(StageContext(cfg, run))

    chosen = json.loads((run.lora / "selection.json").read_text())
    assert summary["step"] == chosen["step"] == best and chosen["metric"] == metric
    assert chosen["value"] == pytest.approx(sum(max(s) for s in scores) / len(scores))
    assert chosen["interval"]["low"] <= chosen["value"] <= chosen["interval"]["high"]
    assert chosen["runner_up"]["step"] != best and chosen["runner_up"]["value"] < chosen["value"]
    assert (run.lora / LORA).read_bytes() == f"LoRA of step {best}".encode()
    assert (run.lora / "last" / LORA).read_bytes() == b"LoRA of the final step"
    with open(run.train / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "prompt", "seed", "scorer", "value"]
    assert {int(r["step"]) for r in rows} == set(STEPS) and {r["scorer"] for r in rows} == {"clip", "aesthetic"}
    assert len(rows) == len(STEPS) * len(sample_names(cfg)) * 2


@pytest.mark.parametrize("metric", ["hps", "imagereward"])
def test_a_reward_scorer_selects_the_step_whose_samples_it_prefers(tmp_path, metric):
    from kolora.models import scorers

    cfg = load_config(DEMO, ["train.validation.every=10", f"evaluate.select={metric}",
                             "train.validation.prompts=['a red square', 'a girl singing on a stage']"])
    pool = [_noise(seed) for seed in range(8)]
    reward, _folder = scorers.load_reward(cfg.scorers, metric)
    scores = [scorers.reward_score(metric, reward, pool, [text] * len(pool)) for text in prompt_texts(cfg)]
    ranked = [sorted(range(len(pool)), key=lambda k, s=s: s[k]) for s in scores]
    best = 20
    pick = {best: -1, **{s: n for n, s in enumerate(x for x in STEPS if x != best)}}
    run = _fake_run(tmp_path, cfg, lambda step, i: pool[ranked[i][pick[step]]])

    selection.run(StageContext(cfg, run))

    chosen = json.loads((run.lora / "selection.json").read_text())
    assert chosen["step"] == best and chosen["metric"] == metric and chosen["higher_is_better"]
    assert chosen["value"] == pytest.approx(sum(max(s) for s in scores) / len(scores), abs=1e-6)
    with open(run.train / "scores.csv", newline="") as f:
        assert {r["scorer"] for r in csv.DictReader(f)} == {"clip", "aesthetic", metric}


def test_a_reward_scorer_without_english_validation_prompts_is_caught_before_training():
    from kolora.core.prompts import load_prompts
    from kolora.models import scorers

    cfg = load_config(DEMO, ["train.validation.every=10", "evaluate.select=pickscore"])  # the demo's are Chinese
    problems = scorers.missing_for_config(cfg, load_prompts(cfg.render.prompts, cfg.render.negative_prompt))
    assert any("evaluate.select: pickscore reads English only" in p and "prompt_en" in p for p in problems)


def test_identical_samples_are_not_distinguishable(tmp_path):
    cfg = load_config(DEMO, ["train.validation.every=10", "evaluate.select=clip"])
    run = _fake_run(tmp_path, cfg, lambda step, i: _noise(i))
    selection.run(StageContext(cfg, run))
    chosen = json.loads((run.lora / "selection.json").read_text())
    # nothing tells the steps apart: the later step (nearest the default, the final one), and the verdict says so
    assert (chosen["step"], chosen["runner_up"]["step"], chosen["distinguishable"]) == (30, 20, False)
    assert "not distinguishable from step 20" in chosen["verdict"]
    assert (run.lora / LORA).read_bytes() == b"LoRA of step 30"


def test_mean_rank_averages_each_scorers_rank_per_sample():
    rows = [{"step": step, "prompt": "p", "seed": seed, "scorer": scorer, "value": value}
            for seed in (0, 1)
            for scorer, values in (("clip", {10: 0.1, 20: 0.3, 30: 0.2}), ("aesthetic", {10: 0.5, 20: 0.4, 30: 0.6}))
            for step, value in values.items()]
    chosen = selection.choose(rows, "mean_rank", [10, 20, 30])
    # ranks (clip, aesthetic): 10 → (3, 2), 20 → (1, 3), 30 → (2, 1): 30 has the lowest mean rank, 1.5
    assert (chosen["step"], chosen["value"], chosen["higher_is_better"]) == (30, 1.5, False)
    assert chosen["steps"]["10"]["mean"] == 2.5 and chosen["steps"]["20"]["mean"] == 2.0


# ---- through training --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selected(demo_run, tmp_path_factory):
    """The demo trained with validation every 10 steps and evaluate.select: clip, then selected."""
    run, cfg = untrained_copy(demo_run, tmp_path_factory.mktemp("select") / "demo")
    cfg.train.validation.every, cfg.train.validation.steps, cfg.evaluate.select = 10, 2, "clip"
    run_stage("cache", cfg, run)
    run_stage("train", cfg, run)
    run_stage("select", cfg, run)
    return run, cfg


def test_training_keeps_each_validation_steps_lora_and_select_installs_the_best(selected, demo_run):
    run, cfg = selected
    with open(run.train / "scores.csv", newline="") as f:
        assert {int(r["step"]) for r in csv.DictReader(f)} == set(STEPS)  # the base model's samples as step 0
    chosen = json.loads((run.lora / "selection.json").read_text())
    assert chosen["metric"] == "clip" and chosen["step"] in (10, 20, 30) and "verdict" in chosen
    assert _same_tensors(run.lora / LORA, step_lora(run.train, chosen["step"]))
    assert _sha(run.lora / LORA) == _sha(step_lora(run.train, chosen["step"])) == chosen["lora_sha256"]
    # lora/last/ is the final step's: the LoRA the demo trains without validation, tensor for tensor
    assert _same_tensors(run.lora / "last" / LORA, demo_run / "lora" / LORA)
    assert _same_tensors(step_lora(run.train, 30), demo_run / "lora" / LORA)
    assert not step_lora(run.train, 0).exists()


def test_the_report_draws_the_scores_over_the_steps_with_the_selected_one(selected):
    from kolora.report.stage import selection_section

    run, _ = selected
    chosen = json.loads((run.lora / "selection.json").read_text())
    page = selection_section(run)
    assert "Validation scores over training" in page and 'src="data:image/png;base64,' in page
    assert f"{chosen['step']} ← selected" in page and "0 (base model)" in page
    assert chosen["verdict"] in page.replace("&#x27;", "'")


# Each image's natural width and its box on the page (CSS pixels from the page's top left), for the DOM dump.
_BOXES = """<script>window.addEventListener('load', function () {
  Array.prototype.forEach.call(document.images, function (i) {
    var r = i.getBoundingClientRect();
    i.setAttribute('data-box', [i.naturalWidth, r.left + scrollX, r.top + scrollY, r.width, r.height]
      .map(Math.round).join(' '));
  });
  document.body.setAttribute('data-height', String(document.documentElement.scrollHeight));
});</script></head>"""


@pytest.fixture(scope="module")
def reported(selected):
    """The selected run through the rest of the pipeline (render, grid, evaluate, report): `kolora run` of the demo
    with train.validation.every=10 and evaluate.select=clip (validation sampled in 2 steps)."""
    run, cfg = selected
    assert cfg.evaluate.enabled
    for stage in NAMES[NAMES.index("select") + 1:]:
        run_stage(stage, cfg, run)
    return run, cfg


# Before the test below, which changes the selection of this module's run.
def test_the_demo_with_a_selection_reports_its_scores_over_the_steps_in_a_browser(reported, tmp_path):
    """Issue #27's acceptance: scores.csv at every validation step, selection.json, the run's LoRA the selected
    step's, and the report's curves, step table and error bars rendered by headless Chromium."""
    from PIL import Image, ImageStat

    from kolora.report.stage import read_scores, score_intervals

    run, cfg = reported
    steps = list(range(0, cfg.train.steps + 1, cfg.train.validation.every))
    with open(run.train / "scores.csv", newline="") as f:
        assert sorted({int(r["step"]) for r in csv.DictReader(f)}) == steps == list(STEPS)
    chosen = json.loads((run.lora / "selection.json").read_text())
    assert chosen["metric"] == "clip" and chosen["step"] in steps[1:]
    assert _same_tensors(run.lora / LORA, step_lora(run.train, chosen["step"]))
    assert score_intervals(read_scores(run)), "eval/scores.json has no intervals: the chart has no error bars"

    browser = chromium()
    report = run.root / "report" / "report.html"
    loaded, total = map(int, body_attributes(browser, report, tmp_path / "profile")["data-images"].split("/"))
    assert total > 0 and loaded == total, f"{loaded} of {total} images rendered"
    probe = tmp_path / "probe.html"  # the report with _BOXES (self-contained: it reads nothing beside it)
    probe.write_text(report.read_text(encoding="utf-8").replace("</head>", _BOXES, 1), encoding="utf-8")
    width = 1200
    page = dom(browser, probe.as_uri(), tmp_path / "profile", (width, 1000))
    boxes = {html.unescape(alt): tuple(map(int, box.split()))
             for alt, box in re.findall(r'<img[^>]*alt="([^"]*)"[^>]*data-box="([^"]*)"', page)}
    curves, bars = boxes.get("scores over steps"), boxes.get("mean scores")
    assert curves and bars, f"figures missing from the page: {sorted(boxes)}"
    assert curves[0] > 0 and bars[0] > 0, "a figure did not load"
    table = page.split('<table class="step-scores">', 1)[1].split("</table>", 1)[0]
    firsts = [html.unescape(c) for c in re.findall(r"<tr><td[^>]*>(.*?)</td>", table)]
    assert [int(c.split()[0]) for c in firsts] == steps, firsts
    assert firsts[steps.index(chosen["step"])].endswith("← selected")

    height = int(re.search(r'data-height="(\d+)"', page).group(1))
    shot = screenshot(browser, probe, tmp_path / "profile", tmp_path / "report.png", (width, height))
    with Image.open(shot) as im:
        gray = im.convert("L")
        for name, (_, left, top, w, h) in {"scores over steps": curves, "error bars": bars}.items():
            assert w > 100 and h > 100, f"{name}: {w}x{h} on the page"
            crop = gray.crop((left, top, left + w, top + h))
            # a drawn chart: axes, text and curves on white, not one flat colour
            assert ImageStat.Stat(crop).stddev[0] > 10 and len(crop.getcolors(1 << 16) or []) > 20, \
                f"the screenshot is blank where the {name} figure is"


def test_changing_select_reruns_only_the_selection_and_what_reads_the_lora(selected, tmp_path):
    run, cfg = selected
    first = json.loads((run.lora / "selection.json").read_text())
    other = cfg.model_copy(deep=True)
    other.evaluate.select = "aesthetic"
    before, after = Keys(cfg, run), Keys(other, run)
    assert [s for s in NAMES if before.output(s) != after.output(s)] == ["select", "report"]
    assert run_stage("train", other, run)["skipped"] is True
    assert run_stage("select", other, run)["metric"] == "aesthetic"
    chosen = json.loads((run.lora / "selection.json").read_text())
    assert _sha(run.lora / LORA) == _sha(step_lora(run.train, chosen["step"]))
    # back to last: the final step's LoRA is the run's again, byte for byte, and nothing is scored
    final = _sha(run.lora / "last" / LORA)
    default = other.model_copy(deep=True)
    default.evaluate.select = "last"
    assert run_stage("select", default, run)["metric"] == "last"
    assert _sha(run.lora / LORA) == final and not (run.lora / "last").exists()
    assert not (run.train / "scores.csv").exists()  # the scored selection's outputs went with it
    assert json.loads((run.lora / "selection.json").read_text()) == {"metric": "last", "step": 30,
                                                                     "lora": f"lora/{LORA}"}
    # and back to the fixture's selection: the same step's LoRA again (the shared run is left as it came)
    assert run_stage("select", cfg, run)["metric"] == cfg.evaluate.select
    assert json.loads((run.lora / "selection.json").read_text())["step"] == first["step"]
    assert _sha(run.lora / LORA) == _sha(step_lora(run.train, first["step"]))


def test_by_default_nothing_is_scored_and_the_lora_is_the_final_steps(demo_run):
    assert json.loads((demo_run / "lora" / "selection.json").read_text())["metric"] == "last"
    assert not (demo_run / "lora" / "last").exists() and not (demo_run / "train" / "scores.csv").exists()


def test_a_selection_without_validation_names_the_fields():
    with pytest.raises(Exception, match=r"evaluate\.select: clip.*train\.validation\.every"):
        load_config(DEMO, ["evaluate.select=clip"])
