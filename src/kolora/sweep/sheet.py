"""The sweep's comparison sheet: `<sweep>/sweep.html` (self-contained: images as data: URIs, no network) and
`<sweep>/sweep.png`: the variants ranked (kolora.sweep.ranking), each with its grid thumbnail, its scores when
eval/scores.json exists, its final loss, and every variant's loss curve in one matplotlib plot."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from kolora.core.rundir import atomic_path, atomic_write_text
from kolora.sweep.manifest import read_manifest
from kolora.sweep.ranking import RunScore, deciding_metric, indistinct_runner_up, loss_curve, rank, score_run

# PIL, matplotlib: imported in the functions that use them (a login node's CLI starts without them)

THUMB_PX = 384


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _thumbnail(grid: Path):
    from PIL import Image

    try:
        with Image.open(grid) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            return im.copy()
    except OSError:
        return None


def _loss_figure(scores: list[RunScore]):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    _loss_curves(ax, scores)
    ax.set_title("loss per step")
    if not ax.lines:
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def _fig_png(fig) -> bytes:
    from matplotlib import pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _score_cells(s: RunScore) -> list[str]:
    cells = []
    for metric in ("aesthetic", "clip"):
        part = s.summary.get(metric) if isinstance(s.summary.get(metric), dict) else {}
        iv = s.intervals.get(metric)
        lora = _fmt(part.get("lora")) + (f" [{iv.low:.4g}, {iv.high:.4g}]" if iv and part.get("lora") is not None
                                         else "")
        cells += [lora, _fmt(part.get("base"))]
    return cells


def verdict_html(ranked: list[RunScore]) -> str:
    """The best variant, or, where its interval overlaps the runner-up's on the score that ordered them, that
    the two are not distinguishable (no winner declared)."""
    esc = html.escape
    if not ranked or not (ranked[0].scored or ranked[0].final_loss is not None):
        return ""
    best = ranked[0]
    tied = indistinct_runner_up(ranked)
    if tied is None:
        return f"<p class=best>Best: <b>{esc(best.name)}</b> ({esc(best.describe())})</p>"
    metric = deciding_metric(best, tied)
    return (f"<p class=best>No clear best: <b>{esc(best.name)}</b> ranks first ({esc(best.describe())}) but is "
            f"<b>not distinguishable from {esc(tied.name)}</b> ({esc(tied.describe())}): their 95 % intervals "
            f"of the {esc(metric or '')} score overlap. More prompts or seeds (render.prompts, render.seeds) "
            "narrow them.</p>")


NOT_DISTINGUISHABLE = "≈ best"  # beside a variant not distinguishable from the best (indistinct_runner_up)


def _score_metrics(scores: list[RunScore]) -> list[str]:
    return [m for m in ("aesthetic", "clip") if any(m in s.intervals for s in scores)]


def _score_figure(scores: list[RunScore]):
    """Each variant's LoRA mean score per scorer with its 95 % interval as an error bar, in ranking order;
    None when no variant has intervals."""
    metrics = _score_metrics(scores)
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.5 * len(metrics) + 0.5, 3.2), dpi=100, squeeze=False)
    tied = indistinct_runner_up(scores)
    for ax, metric in zip(axes[0], metrics, strict=True):
        _score_axes(ax, scores, metric, tied)
    fig.tight_layout()
    return fig


def _score_axes(ax, scores: list[RunScore], metric: str, tied: RunScore | None) -> None:
    """The variants' LoRA means of `metric` (best first) with their 95 % intervals as error bars, each labelled
    by its variant (tests read the drawn bars back by it); `tied`, the runner-up not distinguishable from the
    best, in another colour and named so."""
    for x, s in enumerate(scores):
        iv = s.intervals.get(metric)
        if iv is not None:
            color = "#1f4e79" if x == 0 else "#c55a11" if s is tied else "#6b8fb3"
            ax.errorbar([x], [iv.mean], yerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="o", capsize=5,
                        color=color, label=s.name)
    names = [s.name + (f"\n{NOT_DISTINGUISHABLE}" if s is tied else "") for s in scores]
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_title(f"{metric} (LoRA), 95 % intervals", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def collect(sweep_dir: Path) -> tuple[dict[str, Any], list[RunScore]]:
    """The sweep manifest and its variants' scores, best first."""
    manifest = read_manifest(sweep_dir)
    scores = [score_run(v["name"], Path(sweep_dir) / v.get("run_dir", v["name"])) for v in manifest["variants"]]
    return manifest, rank(scores)


def _html(manifest: dict[str, Any], ranked: list[RunScore], thumbs: dict[str, bytes], loss_png: bytes,
          scores_png: bytes | None = None) -> str:
    overrides = {v["name"]: v["overrides"] for v in manifest["variants"]}
    esc = html.escape
    head = ["#", "variant", "overrides", "aesthetic (LoRA)", "aesthetic (base)", "CLIP (LoRA)", "CLIP (base)",
            "final loss", "step"]
    rows = []
    for i, s in enumerate(ranked, 1):
        cells = [str(i), s.name, ", ".join(f"{k}={v}" for k, v in overrides.get(s.name, {}).items()),
                 *_score_cells(s), _fmt(s.final_loss), _fmt(s.step)]
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    cards = []
    for i, s in enumerate(ranked, 1):
        img = (f'<img src="{_png_uri(thumbs[s.name])}" alt="grid of {esc(s.name)}">' if s.name in thumbs
               else '<div class="missing">no grid yet</div>')
        cards.append(f'<figure class="variant">{img}<figcaption>#{i} {esc(s.name)}<br>'
                     f'<small>{esc(s.describe())}</small></figcaption></figure>')
    best = verdict_html(ranked)
    score_chart = ("<h2>Scores with their 95 % intervals</h2>\n<img id=\"scores\" src=\"" + _png_uri(scores_png) +
                   "\" alt=\"each variant's mean LoRA scores with their intervals\">\n" if scores_png else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kolora sweep {esc(manifest['name'])}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #bbb; padding: 4px 8px; text-align: right; }}
td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
.variants {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure.variant {{ margin: 0; width: {THUMB_PX}px; }}
figure.variant img {{ max-width: 100%; border: 1px solid #ccc; }}
.missing {{ width: {THUMB_PX}px; height: 120px; background: #eee; display: flex; align-items: center;
  justify-content: center; color: #777; }}
</style></head><body>
<h1>Sweep {esc(manifest['name'])}</h1>
<p>{len(ranked)} variants of {esc(str(manifest.get('config', '')))}; varied:
{esc(', '.join(f"{k} ∈ {v}" for k, v in manifest.get('vary', {}).items()))}.
Ranked by the aesthetic score of the LoRA's tiles (ties: CLIP score); variants without scores by final loss.
A LoRA score shows its mean over the tiles (prompts × seeds) and its 95 % interval [low, high].</p>
{best}
<table id="ranking"><thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{score_chart}<h2>Loss curves</h2>
<img id="loss" src="{_png_uri(loss_png)}" alt="training loss per step of every variant">
<h2>Grids</h2>
<div class="variants">{''.join(cards)}</div>
</body></html>
"""


def summary_figure(ranked: list[RunScore], thumbs: dict[str, Any], manifest: dict[str, Any]):
    """sweep.png: the ranked thumbnails with their scores on top, the loss curves below, and, where the
    variants have intervals, each one's LoRA mean scores with their 95 % intervals as error bars; a runner-up
    not distinguishable from the best is marked (as in sweep.html and `kolora status`)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n = max(len(ranked), 1)
    metrics = _score_metrics(ranked)
    tied = indistinct_runner_up(ranked)
    fig = plt.figure(figsize=(max(3.2 * n, 7), 10.4 if metrics else 7.2), dpi=100)
    grid = fig.add_gridspec(3 if metrics else 2, n, height_ratios=[1.3, 1, 1] if metrics else [1.3, 1])
    for i, s in enumerate(ranked):
        ax = fig.add_subplot(grid[0, i])
        ax.axis("off")
        if s.name in thumbs:
            ax.imshow(thumbs[s.name])
        else:
            ax.text(0.5, 0.5, "no grid yet", ha="center", va="center", transform=ax.transAxes)
        mark = f"\n{NOT_DISTINGUISHABLE}: not distinguishable from #1" if s is tied else ""
        ax.set_title(f"#{i + 1} {s.name}\n{s.describe()}{mark}", fontsize=8,
                     color="#c55a11" if s is tied else "black")
    ax = fig.add_subplot(grid[1, :])
    _loss_curves(ax, ranked)
    if metrics:
        panels = grid[2, :].subgridspec(1, len(metrics), wspace=0.3)
        for k, metric in enumerate(metrics):
            _score_axes(fig.add_subplot(panels[0, k]), ranked, metric, tied)
    title = f"kolora sweep {manifest['name']}"
    if tied is not None:
        title += (f"\nno clear best: {ranked[0].name} is not distinguishable from {tied.name} (their 95 % "
                  f"intervals of the {deciding_metric(ranked[0], tied)} score overlap)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _summary_png(ranked: list[RunScore], thumbs: dict[str, Any], manifest: dict[str, Any]) -> bytes:
    """One image: summary_figure."""
    return _fig_png(summary_figure(ranked, thumbs, manifest))


def write(sweep_dir: Path) -> tuple[Path, Path]:
    """Write sweep.html and sweep.png from what the variants' run folders hold now (any time: a variant
    without a grid or metrics yet shows as such)."""
    manifest, ranked = collect(sweep_dir)
    images = {s.name: im for s in ranked if (im := _thumbnail(s.root / "grid.png")) is not None}
    thumbs = {}
    for name, im in images.items():
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        thumbs[name] = buf.getvalue()
    score_fig = _score_figure(ranked)
    page = _html(manifest, ranked, thumbs, _fig_png(_loss_figure(ranked)),
                 _fig_png(score_fig) if score_fig is not None else None)
    html_file, png_file = Path(sweep_dir) / "sweep.html", Path(sweep_dir) / "sweep.png"
    atomic_write_text(html_file, page)
    png = _summary_png(ranked, images, manifest)
    with atomic_path(png_file) as tmp:
        Path(tmp).write_bytes(png)
    return html_file, png_file


def _loss_curves(ax, runs) -> None:
    """Every run's training loss per step on one axis, labelled by variant."""
    for s in runs:
        curve = loss_curve(s.root)
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=s.name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if ax.lines:
        ax.legend(fontsize=8)
