"""The model card (kolora.report.card): lora/README.md after the pipeline, its front matter as the hubs parse it,
the numbers it shows equal to the run's files, its images present, the selected step when lora/selection.json
says one; `kolora export` writes one beside the exported file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import DEMO, run_cli, stage_context

from kolora.core.config import CardConfig, load_config
from kolora.core.errors import ConfigError
from kolora.core.rundir import RunDir
from kolora.core.stats import Interval
from kolora.pipeline.keys import Keys, is_complete
from kolora.report import card
from kolora.report import stage as report_stage


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _linked_images(folder: Path, text: str) -> list[str]:
    links = re.findall(r"\]\((images/[^)]+)\)", text) + [w["output"]["url"] for w in _front_matter(text)["widget"]]
    assert links and all((folder / link).is_file() for link in links), links
    return links


def test_card_after_the_pipeline_shows_the_runs_numbers_and_the_configs_fields(demo_run, tmp_path):
    dst = tmp_path / "demo"
    shutil.copytree(demo_run, dst)
    run = RunDir(dst)
    text = (run.lora / "README.md").read_text()  # the pipeline wrote it
    meta = _front_matter(text)
    assert meta["base_model"] == "Kwai-Kolors/Kolors-diffusers" and meta["library_name"] == "diffusers"
    assert meta["license"] == "other" and "instance_prompt" not in meta
    assert "This is the final step (30)" in text
    _linked_images(run.lora, text)

    # the dataset's counts: filter/report.json's, per op
    summary = json.loads((dst / "filter" / "report.json").read_text())["summary"]
    assert f"**{summary['kept']} of {summary['input']} images kept**" in text
    left = summary["input"]
    for op in summary["ops"]:
        dropped = summary["by_op"].get(op, 0)
        assert f"| `{op}` | {left} | {dropped} | {left - dropped} |" in text
        left -= dropped

    # the scores: eval/scores.json's means with their intervals, the LoRA's, the base model's, their difference
    scores = json.loads((dst / "eval" / "scores.json").read_text())
    for metric, label in (("clip", "CLIP score"), ("aesthetic", "aesthetic score")):
        mean, iv = scores["summary"][metric], scores["intervals"]
        cells = [str(Interval(m, iv[side][metric]["low"], iv[side][metric]["high"], 0))
                 for side, m in (("lora", mean["lora"]), ("base", mean["base"]),
                                 ("lora_minus_base", iv["lora_minus_base"][metric]["mean"]))]
        assert re.search(rf"\| {label}[^|]*\| {re.escape(' | '.join(cells))} \|", text), (metric, cells)

    # the card's own fields, a trigger with a backtick and a bar
    cfg = run.load_config()
    cfg = cfg.model_copy(update={"card": CardConfig(license="apache-2.0", trigger="kolo`ra | 二次元", tags=["anime"])})
    text = card.write(cfg, run, run.lora, scores).read_text()
    meta = _front_matter(text)
    assert meta["license"] == "apache-2.0" and meta["instance_prompt"] == "kolo`ra | 二次元"
    assert meta["tags"] == ["text-to-image", "lora", "kolors", "diffusers", "anime"]
    assert "Trigger words: ``kolo`ra | 二次元``" in text

    # a selection names its step (lora/selection.json as kolora.evaluate.selection writes it); writing again gives
    # the same bytes
    (run.lora / "selection.json").write_text(json.dumps({
        "metric": "clip", "higher_is_better": True, "step": 20, "value": 0.3125,
        "interval": {"mean": 0.3125, "low": 0.3, "high": 0.325, "n": 8},
        "runner_up": {"step": 30, "value": 0.31, "interval": {"mean": 0.31, "low": 0.29, "high": 0.33, "n": 8}},
        "distinguishable": False, "final_step": 30, "base": {"mean": 0.25, "low": 0.24, "high": 0.26, "n": 8}}))
    report_stage.run(stage_context("report", cfg, run))
    first = (run.lora / "README.md").read_bytes()
    images = {p.name: p.read_bytes() for p in (run.lora / "images").iterdir()}
    text = first.decode()
    assert ("This is step **20** of 30, selected for the highest mean `clip` on the validation samples: "
            "0.3125 [0.3000, 0.3250] over 8 prompt and seed pairs") in text
    assert "runner-up, step 30, scored 0.3100 [0.2900, 0.3300]; the selection cannot tell" in text
    assert "The base model scored 0.2500 [0.2400, 0.2600]" in text and "final step" not in text
    report_stage.run(stage_context("report", cfg, run))
    assert (run.lora / "README.md").read_bytes() == first
    assert {p.name: p.read_bytes() for p in (run.lora / "images").iterdir()} == images


def test_card_fields_key_the_report_only_and_are_out_of_the_digest_at_their_defaults(demo_run):
    run = RunDir(demo_run)
    cfg = run.load_config()
    explicit = cfg.model_copy(update={"card": CardConfig(license="other", tags=[])})
    assert "card" not in cfg.model_dump(mode="json") and explicit.digest() == cfg.digest()
    changed = cfg.model_copy(update={"card": CardConfig(license="mit")})
    assert changed.digest() != cfg.digest()
    before, after = Keys(cfg, run), Keys(changed, run)
    assert before.work("report") != after.work("report")
    assert all(before.work(s) == after.work(s) for s in ("train", "render", "grid", "evaluate"))
    assert is_complete("report", cfg, run)
    with pytest.raises(ConfigError, match=r"card\.license"):
        load_config(DEMO, ["card.license=Apache License 2.0"])


def test_report_is_incomplete_without_its_card(demo_run, tmp_path):
    dst = tmp_path / "demo"
    shutil.copytree(demo_run, dst)
    run = RunDir(dst)
    (run.lora / "README.md").unlink()
    assert not is_complete("report", run.load_config(), run)


def test_export_kohya_writes_the_card_about_the_exported_file(demo_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["export", str(demo_run), "--format", "kohya", "--to", f"{out}/"]) == 0
    text = (out / "README.md").read_text()
    assert "`demo.safetensors` is the kohya format" in text and "LoraLoaderModelOnly" in text
    assert "weight_name=\"demo.safetensors\"" in text and "pytorch_lora_weights" not in text
    assert "FOLDER" in text  # no path of this machine in a card
    assert _front_matter(text)["base_model"] == "Kwai-Kolors/Kolors-diffusers"
    links = _linked_images(out, text)
    assert all((out / link).read_bytes() == (demo_run / "lora" / link).read_bytes() for link in links)
    assert "model card:" in capsys.readouterr().err
    # a folder with a README of its own keeps it; the card gets another name
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "README.md").write_text("my notes\n")
    assert run_cli(["export", str(demo_run), "--format", "kohya", "--to", str(shared / "x.safetensors")]) == 0
    assert (shared / "README.md").read_text() == "my notes\n"
    assert "`x.safetensors` is the kohya format" in (shared / "kolora-card.md").read_text()


def test_dataset_section_lists_each_source_with_its_counts_per_op(tmp_path):
    cfg = load_config(DEMO, [f"model.path={tmp_path}", "data.sources=[{name: plain, synthetic: {count: 3}}, "
                             "{name: triple, repeats: 3, caption_prefix: 'sks, ', synthetic: {count: 2, seed: 1}}]"])
    rows = [{"source": "plain", "kept": True}, {"source": "plain", "kept": False, "op": "image_shape_filter"},
            {"source": "plain", "kept": False, "op": "image_aspect_ratio_filter"},
            {"source": "triple", "kept": True}, {"source": "triple", "kept": False, "op": "image_shape_filter"}]
    report = {"summary": {"input": 5, "kept": 2, "ops": ["image_shape_filter", "image_aspect_ratio_filter"]},
              "samples": rows}
    text = "\n".join(card.dataset_section(cfg, report))
    assert "- `plain`: synthetic shapes (kolora's demo data, 3 images)" in text
    assert "- `triple`: synthetic shapes (kolora's demo data, 2 images), 3 repeats per epoch, captions prefixed " \
           "`sks,`" in text
    assert "| `image_shape_filter` | 5 | 2 | 3 |" in text and "| `image_aspect_ratio_filter` | 3 | 1 | 2 |" in text
    assert "| source | images | kept | dropped by `image_shape_filter` | dropped by `image_aspect_ratio_filter` |" in text
    assert "| `plain` | 3 | 1 | 1 | 1 |" in text and "| `triple` | 2 | 1 | 1 | 0 |" in text
