"""report: report/report.html, a self-contained page a person opens (every image a data: URI, no script or
style from the network): the grid, LoRA-vs-base pairs and the score table when eval/scores.json exists, the
loss curve and the validation samples over steps (matplotlib, kolora.report.plots); and report/report.png, a
one-page summary figure.

It ends with the filter's counts per step (kolora.filter.report_page) and a link to filter/report.html, which
it writes when a run filtered before that page existed has none.

Then the model card beside the LoRA (kolora.report.card): lora/README.md and lora/images/.

The page checks itself (kolora.core.webpage): a small inline script sets `data-images` on <body> to
"<loaded>/<total>" once every image has decoded (tests read it back from a headless browser)."""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path
from typing import Any

from kolora.core.config import ExperimentConfig
from kolora.core.errors import RunFailure
from kolora.core.rundir import RunDir, atomic_write_bytes, atomic_write_text
from kolora.core.stage import StageContext
from kolora.core.stats import Interval, mean_interval
from kolora.core.webpage import data_uri, page, table
from kolora.filter import report_page as filter_page
from kolora.render.tiles import tiles
from kolora.report import card
from kolora.train import metrics as train_metrics
from kolora.train.validation import SCORES_FILE, SELECTION_FILE

# kolora.report.plots (matplotlib): imported in the functions that use them (a login node's CLI starts without them)

SCORES = Path("eval") / "scores.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SAMPLE = re.compile(r"^(\d+)-(-?\d+)\.png$")

STYLE = """
img.plot { max-width: 100%; border: 1px solid #eee; }
img.grid { width: min(100%, 512px); image-rendering: pixelated; border: 1px solid #eee; }
.pairs { display: flex; flex-wrap: wrap; gap: 12px; }
.pair { font-size: 12px; text-align: center; width: 330px; overflow-wrap: anywhere; }
.pair img { width: 160px; height: 160px; object-fit: contain; image-rendering: pixelated; border: 1px solid #ccc; }
"""


def read_scores(run: RunDir) -> dict[str, Any] | None:
    path = run.root / SCORES
    if not path.is_file():
        return None
    try:
        scores = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunFailure(f"report: {path} is not readable JSON ({e}); rerun the evaluate stage") from None
    if not isinstance(scores, dict) or not isinstance(scores.get("tiles", []), list):
        raise RunFailure(f"report: {path} has no 'tiles' list (see eval/scores.json in README); rerun evaluate")
    return scores


def validation_samples(train_dir: Path) -> dict[int, list[tuple[str, Path]]]:
    """{step: [(label "<prompt index>-<seed>", png)]} from train/samples/step-XXXXXX/<i>-<seed>.png."""
    out: dict[int, list[tuple[str, Path]]] = {}
    for folder in sorted((train_dir / "samples").glob("step-*")):
        m = _STEP_DIR.match(folder.name)
        if m and folder.is_dir():
            files = sorted((p for p in folder.iterdir() if _SAMPLE.match(p.name)),
                           key=lambda p: tuple(int(x) for x in _SAMPLE.match(p.name).groups()))
            if files:
                out[int(m.group(1))] = [(p.stem, p) for p in files]
    return out


def _img(src: bytes | Path, alt: str, cls: str = "") -> str:
    png = src.read_bytes() if isinstance(src, Path) else src
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="{data_uri(png)}">'


def _score(tile: dict[str, Any], metric: str, which: str) -> float | None:
    value = (tile.get(metric) or {}).get(which)
    return float(value) if isinstance(value, int | float) else None


def _reward_cell(tile: dict[str, Any], metric: str, which: str) -> float | str | None:
    """A reward scorer's score, or why the tile has none (e.g. no English prompt)."""
    value = _score(tile, metric, which)
    return value if value is not None else (tile.get(metric) or {}).get("reason")


def _run_table(cfg: ExperimentConfig, loss: list[dict[str, float]], n_tiles: int, steps_sampled: list[int]) -> str:
    t = cfg.train
    rows = [["run", cfg.name], ["training steps", loss[-1]["step"] if loss else t.steps],
            ["final loss", loss[-1]["loss"] if loss else None], ["lr", t.lr], ["rank / alpha", f"{t.rank} / {t.alpha:g}"],
            ["resolution", t.resolution], ["precision", t.precision], ["tiles", n_tiles],
            ["validation samples at steps", ", ".join(map(str, steps_sampled)) or "none (train.validation.every: 0)"]]
    return table(["", "value"], rows, "run")


def _filter_section(filter_report: dict[str, Any] | None) -> str:
    if filter_report is None:
        return "<h2>Data filter</h2><p class='note'>No filter/report.json (the filter stage writes it).</p>"
    return ("<h2>Data filter</h2>" + filter_page.counts_html(filter_report) +
            f"<p><a href='../filter/{filter_page.PAGE}'>filter/{filter_page.PAGE}</a>: the dropped samples' "
            "thumbnails, grouped by what dropped them.</p>")


def source_rows(cfg: ExperimentConfig, run: RunDir) -> list[dict[str, Any]]:
    """data.sources: per source the images ingested, kept by the filter, its repeats and the samples an epoch
    draws of it (kept × repeats); empty without sources."""
    if not cfg.data.sources:
        return []
    try:
        summary = json.loads((run.filter / "report.json").read_text()).get("summary", {})
    except (OSError, ValueError):
        summary = {}
    counts = summary.get("sources") or {}
    rows = []
    for s in cfg.data.sources:
        c = counts.get(s.name) or {}
        kept = c.get("kept")
        rows.append({"source": s.name, "images": (kept or 0) + (c.get("dropped") or 0) if c else None, "kept": kept,
                     "repeats": s.repeats, "samples_per_epoch": kept * s.repeats if kept is not None else None})
    return rows


def _sources_table(rows: list[dict[str, Any]]) -> str:
    total = sum(r["samples_per_epoch"] or 0 for r in rows)
    body = [[r["source"], r["images"], r["kept"], r["repeats"], r["samples_per_epoch"],
             f"{100 * r['samples_per_epoch'] / total:.1f}%" if total and r["samples_per_epoch"] is not None else None]
            for r in rows]
    return "<h2>Data sources</h2>" + table(
        ["source", "images", "kept", "repeats", "samples per epoch", "share of an epoch"], body, "sources")


def selection_section(run: RunDir) -> str:
    """The validation samples' scores over the steps (train/scores.csv) with the step evaluate.select chose
    (lora/selection.json): a curve per scorer with its 95 % intervals, a table, the verdict. Empty without scores."""
    from kolora.report import plots

    if not (run.root / SCORES_FILE).is_file():
        return ""
    values: dict[str, dict[int, list[float]]] = {}
    with open(run.root / SCORES_FILE, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            values.setdefault(r["scorer"], {}).setdefault(int(r["step"]), []).append(float(r["value"]))
    if not values:
        return ""
    intervals = {scorer: {step: mean_interval(v) for step, v in by_step.items()} for scorer, by_step in values.items()}
    try:
        selection = json.loads((run.root / SELECTION_FILE).read_text())
    except (OSError, ValueError):
        selection = {}
    chosen, metric = selection.get("step"), selection.get("metric")
    means = {scorer: {step: (i.mean, i.low, i.high) for step, i in by_step.items()}
             for scorer, by_step in intervals.items()}
    figure = plots.png_bytes(plots.scores_over_steps(means, chosen, metric))
    scorers = sorted(intervals)
    rows = [[f"{step}" + (" (base model)" if step == 0 else "") + (" ← selected" if step == chosen else ""),
             *(str(intervals[sc][step]) if step in intervals[sc] else None for sc in scorers)]
            for step in sorted({step for by_step in intervals.values() for step in by_step})]
    verdict = (f"<p>The run's LoRA is step {chosen}'s (evaluate.select: {html.escape(str(metric))}): "
               f"{html.escape(selection['verdict'])}. lora/last/ holds the final step's.</p>"
               if selection.get("verdict") else "")
    return ("<h2>Validation scores over training</h2>" + verdict + _img(figure, "scores over steps", "plot")
            + table(["step", *(f"{sc}: mean [95 % interval]" for sc in scorers)], rows, "step-scores"))


METRICS = {"clip": "CLIP", "aesthetic": "aesthetic", "pickscore": "PickScore", "hps": "HPSv2",
           "imagereward": "ImageReward"}
REWARD_METRICS = ("pickscore", "hps", "imagereward")  # scorers.rewards: in eval/scores.json only when configured


def score_intervals(scores: dict[str, Any]) -> dict[str, dict[str, Interval]] | None:
    """eval/scores.json's intervals as {"lora" | "base" | "lora_minus_base": {scorer: Interval}}; None when it
    has none (written before the evaluate stage computed them)."""
    raw = scores.get("intervals")
    if not isinstance(raw, dict):
        return None
    try:
        return {side: {m: Interval(float(v["mean"]), float(v["low"]), float(v["high"]), int(v["n"]))
                       for m, v in raw[side].items() if m in METRICS} for side in ("lora", "base", "lora_minus_base")}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def verdict(difference: Interval) -> str:
    """What the paired LoRA − base difference says: a direction only when its interval excludes 0."""
    if not difference.excludes_zero():
        return "no measurable difference"
    return "LoRA higher" if difference.mean > 0 else "LoRA lower"


def interval_table(intervals: dict[str, dict[str, Interval]] | None) -> str:
    """Per scorer: each side's mean [95 % interval] and the paired LoRA − base difference with its verdict."""
    if intervals is None:
        return ("<p class='note'>No intervals in eval/scores.json (written by an older kolora): rerun the evaluate "
                "stage (--stage evaluate --force) for each mean's 95 % interval.</p>")
    rows = [[METRICS[m], str(intervals["lora"][m]), str(intervals["base"][m]), str(d), verdict(d), d.n]
            for m, d in intervals["lora_minus_base"].items() if m in intervals["lora"] and m in intervals["base"]]
    return (table(["scorer", "LoRA mean [95 % interval]", "base mean [95 % interval]", "LoRA − base (paired)",
                   "verdict", "tiles"], rows, "intervals") +
            "<p class='note'>95 % intervals: a seeded bootstrap over the tiles (prompts × seeds); the difference "
            "pairs each LoRA tile with the base tile of the same prompt and seed. Where its interval includes 0, "
            "the LoRA and the base model are not told apart by these tiles.</p>")


def build_html(cfg: ExperimentConfig, run: RunDir, figures: dict[str, bytes], scores: dict[str, Any] | None,
               n_tiles: int, loss: list[dict[str, float]], steps_sampled: list[int],
               filter_report: dict[str, Any] | None = None, selection: str = "") -> str:
    sources = source_rows(cfg, run)
    parts = [f"<h1>kolora report: {html.escape(cfg.name)}</h1>",
             _run_table(cfg, loss, n_tiles, steps_sampled), *([_sources_table(sources)] if sources else []),
             "<h2>Storyboard</h2>", _img(run.grid_file, "the grid", "grid")]
    if scores is not None:
        tiles = scores.get("tiles", [])
        parts.append("<h2>Scores (LoRA vs base model)</h2>")
        parts.append(interval_table(score_intervals(scores)))
        rewards = [m for m in REWARD_METRICS if any(m in t for t in tiles)]
        rows = [[t.get("index"), t.get("prompt"), t.get("seed"), _score(t, "clip", "lora"), _score(t, "clip", "base"),
                 _score(t, "aesthetic", "lora"), _score(t, "aesthetic", "base"),
                 *(_reward_cell(t, m, w) for m in rewards for w in ("lora", "base"))] for t in tiles]
        summary = scores.get("summary") or {}
        rows.append(["mean", "", "", *((summary.get(m) or {}).get(w) for m in ("clip", "aesthetic", *rewards)
                                       for w in ("lora", "base"))])
        parts.append(table(["#", "prompt", "seed", "CLIP LoRA", "CLIP base", "aesthetic LoRA", "aesthetic base",
                            *(f"{METRICS[m]} {w}" for m in rewards for w in ("LoRA", "base"))], rows, "scores"))
        if "scores" in figures:
            parts.append(_img(figures["scores"], "mean scores", "plot"))
        pairs = [t for t in tiles if t.get("base_tile") and t.get("lora_tile")
                 and (run.root / t["base_tile"]).is_file() and (run.root / t["lora_tile"]).is_file()]
        if pairs:
            parts.append("<h2>Base model vs LoRA (same prompt and seed)</h2><div class='pairs'>")
            for t in pairs:
                caption = html.escape(f"#{t.get('index')} seed {t.get('seed')}: {t.get('prompt', '')}"[:80])
                parts.append(f"<div class='pair'>{_img(run.root / t['base_tile'], 'base')}"
                             f"{_img(run.root / t['lora_tile'], 'LoRA')}<br>base | LoRA<br>{caption}</div>")
            parts.append("</div>")
    else:
        parts.append("<p class='note'>No scores: eval/scores.json does not exist (the evaluate stage writes it).</p>")
    parts.append("<h2>Training loss</h2>")
    parts.append(_img(figures["loss"], "loss curve", "plot") if "loss" in figures else
                 "<p class='note'>No train/metrics.csv.</p>")
    parts.append(selection)
    parts.append("<h2>Validation samples over steps</h2>")
    parts.append(_img(figures["validation"], "validation samples", "plot") if "validation" in figures else
                 "<p class='note'>None: set train.validation.every to sample during training.</p>")
    parts.append(_filter_section(filter_report))
    return page(f"kolora report: {cfg.name}", "\n".join(parts), STYLE)


def score_figure(plots, scores: dict[str, Any]):
    """LoRA vs base per scorer with their intervals as error bars; the plain mean bars without intervals."""
    intervals = score_intervals(scores)
    return plots.interval_chart(intervals) if intervals else plots.score_bars(scores["summary"])


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, run = ctx.cfg, ctx.run
    from kolora.report import plots

    if not run.grid_file.is_file():
        raise RunFailure(f"report: {run.grid_file} is missing: run the grid stage first")
    loss = train_metrics.rows(run.root, upto=cfg.train.steps)  # not a later step kept from a longer run
    scores = read_scores(run)
    samples = validation_samples(run.train)
    figures: dict[str, bytes] = {}
    if loss:
        figures["loss"] = plots.png_bytes(plots.loss_curve(loss))
    if samples:
        figures["validation"] = plots.png_bytes(plots.validation_over_steps(samples))
    if scores and scores.get("summary"):
        figures["scores"] = plots.png_bytes(score_figure(plots, scores))
    filter_report = filter_page.read_report(run)
    filter_html = filter_page.write_if_missing(run, filter_report, cfg.name) if filter_report is not None else None
    html_page = build_html(cfg, run, figures, scores, len(tiles(cfg, run)), loss, sorted(samples), filter_report,
                           selection=selection_section(run))
    out = run.root / "report"
    summary_png = plots.png_bytes(plots.summary_figure(
        f"kolora: {cfg.name}", run.grid_file, loss, scores, samples[max(samples)] if samples else [],
        score_intervals(scores) if scores else None), dpi=90)
    atomic_write_bytes(out / "report.png", summary_png)
    atomic_write_text(out / "report.html", html_page)
    sources = source_rows(cfg, run)
    card_file = card.write(cfg, run, run.lora, scores) if card.applies(cfg, run) else None
    return {"report": str(out / "report.html"), "figures": sorted(figures), "scores": scores is not None,
            "validation_steps": sorted(samples), "filter_report": str(filter_html) if filter_html else None,
            **({"sources": sources} if sources else {}), "card": str(card_file) if card_file else None}
