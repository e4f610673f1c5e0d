"""The report stage: report/report.html (self-contained) and report.png, and the page as a real headless
Chromium renders it."""

from __future__ import annotations

import json
import re
import shutil

from headless_browser import body_attributes, chromium, screenshot

from kolora.core.rundir import RunDir
from kolora.pipeline.runner import run_stage


def _scored_run(demo_run, tmp_path) -> RunDir:
    """A copy of the demo run with validation samples and eval/scores.json as evaluate writes them (the base
    tiles are the LoRA tiles mirrored: any image will do for the page)."""
    from PIL import Image, ImageOps

    from kolora.render.tiles import tiles

    dst = tmp_path / "demo"
    shutil.copytree(demo_run, dst)
    run = RunDir(dst)
    cfg = run.load_config()
    records = []
    (dst / "eval" / "base").mkdir(parents=True)
    for t in tiles(cfg, run):
        base = dst / "eval" / "base" / t.name
        with Image.open(run.render / t.name) as im:
            ImageOps.mirror(im).save(base)
        records.append({"index": t.index, "prompt": t.item.prompt, "seed": t.item.seed,
                        "lora_tile": f"render/{t.name}", "base_tile": f"eval/base/{t.name}",
                        "clip": {"lora": 0.30 + t.index / 100, "base": 0.25},
                        "aesthetic": {"lora": 5.0 + t.index / 10, "base": 4.5}})
    mean = {m: {w: sum(r[m][w] for r in records) / len(records) for w in ("lora", "base")}
            for m in ("clip", "aesthetic")}
    (dst / "eval" / "scores.json").write_text(json.dumps(
        {"models": {"clip": "tiny-clip", "aesthetic": "tiny-aesthetic"}, "tiles": records, "summary": mean}))
    for step in (10, 20):
        folder = run.train / "samples" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        for i, t in enumerate(tiles(cfg, run)[:2]):
            shutil.copyfile(run.render / t.name, folder / f"{i}-0.png")
    return run


def test_report_is_self_contained_with_scores_pairs_loss_and_samples(demo_run, tmp_path):
    run = _scored_run(demo_run, tmp_path)
    summary = run_stage("report", run.load_config(), run, force=True)
    assert summary["scores"] is True and summary["validation_steps"] == [10, 20]
    assert summary["figures"] == ["loss", "scores", "validation"]
    page = (run.root / "report" / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    # grid + score bars + 8 pairs of 2 + loss curve + validation figure, every one inline
    assert len(srcs) == 1 + 1 + 16 + 1 + 1
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(?:href|src)=[\"']?(?:https?:)?//", page), "nothing may come from the network"
    rows = re.findall(r"<tr>", page.split('class="scores"')[1].split("</table>")[0])
    assert len(rows) == 1 + 8 + 1  # header, a row per tile, the means
    assert "二次元" in page or "mean" in page
    from PIL import Image

    with Image.open(run.root / "report" / "report.png") as im:
        assert im.width > 600 and len(im.convert("L").getcolors(1 << 16) or []) > 50


def test_report_without_scores_or_samples_says_so(demo_run, tmp_path):
    dst = tmp_path / "demo"
    shutil.copytree(demo_run, dst)
    shutil.rmtree(dst / "eval", ignore_errors=True)  # the demo evaluates: a run without scores has none
    (dst / "filter" / "report.html").unlink()  # as a run filtered before the filter wrote its page
    run = RunDir(dst)
    summary = run_stage("report", run.load_config(), run, force=True)
    page = (dst / "report" / "report.html").read_text()
    assert "eval/scores.json does not exist" in page and "train.validation.every" in page
    assert page.count('src="data:image/png;base64,') == 2  # the grid and the loss curve
    # the filter's counts and a link to its page, which the report stage wrote again
    assert summary["filter_report"] == str(dst / "filter" / "report.html")
    assert "<h2>Data filter</h2>" in page and "href='../filter/report.html'" in page
    assert "<td>image_shape_filter</td>" in page
    assert "<h2>Dropped samples</h2>" in (dst / "filter" / "report.html").read_text()


def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    from PIL import Image, ImageStat

    browser = chromium()
    run = _scored_run(demo_run, tmp_path)
    run_stage("report", run.load_config(), run, force=True)
    page = run.root / "report" / "report.html"
    body = body_attributes(browser, page, tmp_path / "profile")
    loaded, total = map(int, body["data-images"].split("/"))
    assert total == 20 and loaded == total, f"{loaded} of {total} images rendered"
    # the run table (9 rows), the score table (8 tiles + the means) and the filter's steps (ingest, header pass,
    # full decode and the demo's 2 ops) in the DOM the browser built
    assert int(body["data-tables"]) == 9 + 9 + 5
    shot = screenshot(browser, page, tmp_path / "profile", tmp_path / "report.png", (1200, 1600))
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        gray = im.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 10, "the screenshot is blank"
        # the page's top part holds the run table and the storyboard: not one flat colour
        assert len(gray.crop((0, 0, 1200, 800)).getcolors(1 << 16) or []) > 100
