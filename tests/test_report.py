"""The report stage: report/report.html (self-contained) and report.png, and the page as a real headless
Chromium renders it."""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest
from drawn_figures import error_bars, flat
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
                        "clip": {"lora": 0.30 + t.index / 100, "base": 0.25 + t.index / 1000},
                        # aesthetic: the LoRA and the base model alternate ahead: no measurable difference
                        "aesthetic": {"lora": 5.0 + t.index / 10, "base": 5.35 + (0.4 if t.index % 2 else -0.4)}})
    mean = {m: {w: sum(r[m][w] for r in records) / len(records) for w in ("lora", "base")}
            for m in ("clip", "aesthetic")}
    (dst / "eval" / "scores.json").write_text(json.dumps(
        {"models": {"clip": "tiny-clip", "aesthetic": "tiny-aesthetic"}, "tiles": records, "summary": mean,
         "intervals": _intervals(records)}))
    for step in (10, 20):
        folder = run.train / "samples" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        for i, t in enumerate(tiles(cfg, run)[:2]):
            shutil.copyfile(run.render / t.name, folder / f"{i}-0.png")
    return run


def _intervals(records):
    """As the evaluate stage writes them (tests/test_scorers.py checks that one)."""
    from kolora.core.stats import mean_interval, paired_difference

    side = {w: {m: mean_interval([r[m][w] for r in records]).as_dict() for m in ("clip", "aesthetic")}
            for w in ("lora", "base")}
    return {**side, "lora_minus_base": {m: paired_difference([r[m]["lora"] for r in records],
                                                             [r[m]["base"] for r in records]).as_dict()
                                        for m in ("clip", "aesthetic")}}


def table_cells(page: str, cls: str) -> list[list[str]]:
    """The body rows of the page's table of class `cls`, as the text of their cells."""
    body = page.split(f'<table class="{cls}">', 1)[1].split("</table>", 1)[0].split("<tbody>", 1)[1]
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_report_is_self_contained_with_scores_pairs_loss_and_samples(demo_run, tmp_path, monkeypatch):
    from kolora.report import plots

    run = _scored_run(demo_run, tmp_path)
    drawn = []  # report.png's figure, as the stage drew it
    summary_figure = plots.summary_figure
    monkeypatch.setattr(plots, "summary_figure", lambda *a, **k: drawn.append(summary_figure(*a, **k)) or drawn[-1])
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
    # every number of the score table is eval/scores.json's, in its own column (LoRA and base differ throughout)
    scores = json.loads((run.root / "eval" / "scores.json").read_text())
    cells = table_cells(page, "scores")
    assert len(cells) == 8 + 1
    for row, t in zip(cells, scores["tiles"], strict=False):
        assert row[:3] == [str(t["index"]), t["prompt"], str(t["seed"])]
        assert [float(c) for c in row[3:]] == pytest.approx(
            [t["clip"]["lora"], t["clip"]["base"], t["aesthetic"]["lora"], t["aesthetic"]["base"]], rel=1e-3)
    s = scores["summary"]
    assert cells[-1][0] == "mean" and [float(c) for c in cells[-1][3:]] == pytest.approx(
        [s["clip"]["lora"], s["clip"]["base"], s["aesthetic"]["lora"], s["aesthetic"]["base"]], rel=1e-3)
    assert len({t["seed"] for t in scores["tiles"]}) > 1  # prompts × seeds: a seed column that can be wrong
    # each mean with its interval, and the paired difference: CLIP clearly higher, aesthetic not told apart
    iv = scores["intervals"]
    rows = {r[0]: r for r in table_cells(page, "intervals")}
    for metric, name, verdict in (("clip", "CLIP", "LoRA higher"), ("aesthetic", "aesthetic",
                                                                      "no measurable difference")):
        def shown(d):
            return f"{d['mean']:.4f} [{d['low']:.4f}, {d['high']:.4f}]"

        assert rows[name][1:] == [shown(iv["lora"][metric]), shown(iv["base"][metric]),
                                  shown(iv["lora_minus_base"][metric]), verdict, "8"]
    assert iv["lora_minus_base"]["aesthetic"]["low"] < 0 < iv["lora_minus_base"]["aesthetic"]["high"]
    assert iv["lora_minus_base"]["clip"]["low"] > 0
    from PIL import Image

    with Image.open(run.root / "report" / "report.png") as im:
        assert im.width > 600 and len(im.convert("L").getcolors(1 << 16) or []) > 50
    # report.png: each mean of eval/scores.json with its interval as an error bar, the paired difference too
    assert flat({label: bar for (_, label), bar in error_bars(drawn[0]).items()}) == pytest.approx(flat(
        {f"{m} {side}": (iv[side][m]["mean"], iv[side][m]["low"], iv[side][m]["high"])
         for m in ("clip", "aesthetic") for side in ("lora", "base", "lora_minus_base")}))


def _scores_file(tmp_path, with_intervals: bool) -> dict:
    """eval/scores.json for 8 known tiles (with or without intervals, as kolora before them wrote it), read
    back as the report stage reads it."""
    from kolora.report.stage import read_scores

    records = [{"index": i, "prompt": "p", "seed": i, "clip": {"lora": 0.30 + i / 100, "base": 0.25 + i / 1000},
                "aesthetic": {"lora": 5.0 + i / 10, "base": 5.35 + (0.4 if i % 2 else -0.4)}} for i in range(8)]
    mean = {m: {w: sum(r[m][w] for r in records) / len(records) for w in ("lora", "base")}
            for m in ("clip", "aesthetic")}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "scores.json").write_text(json.dumps(
        {"tiles": records, "summary": mean, **({"intervals": _intervals(records)} if with_intervals else {})}))
    return read_scores(RunDir(tmp_path))


def test_report_png_draws_each_mean_with_its_interval_and_the_paired_difference(tmp_path):
    from kolora.report import plots
    from kolora.report.stage import score_intervals

    scores = _scores_file(tmp_path, with_intervals=True)
    fig = plots.summary_figure("t", None, [], scores, [], score_intervals(scores))
    bars = error_bars(fig)
    iv = scores["intervals"]
    assert flat({label: bar for (_, label), bar in bars.items()}) == pytest.approx(flat(
        {f"{m} {side}": (iv[side][m]["mean"], iv[side][m]["low"], iv[side][m]["high"])
         for m in ("clip", "aesthetic") for side in ("lora", "base", "lora_minus_base")}))
    # the LoRA's CLIP is clearly higher; its aesthetic score is not told apart from the base model's
    assert bars[("", "clip lora_minus_base")][1] > 0
    assert bars[("no measurable\ndifference", "aesthetic lora_minus_base")][1] < 0
    assert plots.png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_png_without_intervals_shows_the_plain_means(tmp_path):
    from kolora.report import plots
    from kolora.report.stage import score_intervals

    scores = _scores_file(tmp_path, with_intervals=False)  # an eval/scores.json older than the intervals
    assert score_intervals(scores) is None
    fig = plots.summary_figure("t", None, [], scores, [], score_intervals(scores))
    assert error_bars(fig) == {}
    heights = sorted(round(p.get_height(), 6) for ax in fig.axes for p in ax.patches)
    assert heights == sorted(round(scores["summary"][m][w], 6) for m in ("clip", "aesthetic") for w in ("lora", "base"))
    assert plots.png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"


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
    # the run table (9 rows), the intervals (2 scorers), the score table (8 tiles + the means) and the filter's
    # steps (ingest, header pass, full decode and the demo's 2 ops) in the DOM the browser built
    assert int(body["data-tables"]) == 9 + 2 + 9 + 5
    shot = screenshot(browser, page, tmp_path / "profile", tmp_path / "report.png", (1200, 1600))
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        gray = im.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 10, "the screenshot is blank"
        # the page's top part holds the run table and the storyboard: not one flat colour
        assert len(gray.crop((0, 0, 1200, 800)).getcolors(1 << 16) or []) > 100
