"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend state): the loss
curve, validation samples over steps, LoRA-vs-base scores, and the one-page summary (report.png)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

# PIL: imported in the functions that use them (a login node's CLI starts without them)


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _loss_axes(ax, rows: list[dict[str, float]]) -> None:
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    ax.plot(steps, losses, color="#9bb7d4", linewidth=1, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:  # a running mean: single-batch losses are noisy
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="#1f4e79", linewidth=2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def loss_curve(rows: list[dict[str, float]]) -> Figure:
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    _loss_axes(ax, rows)
    lrs = {r["lr"] for r in rows}
    if len(lrs) > 1:  # a schedule: lr on its own axis
        twin = ax.twinx()
        twin.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="#c55a11", linewidth=1)
        twin.set_ylabel("lr", color="#c55a11")
    return fig


def _image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").copy()


def validation_over_steps(samples: dict[int, list[tuple[str, Path]]]) -> Figure:
    """Rows: the steps sampled; columns: the samples (prompt index-seed)."""
    steps = sorted(samples)
    labels = sorted({label for row in samples.values() for label, _ in row})
    cell = 1.6
    fig = Figure(figsize=(cell * len(labels) + 0.8, cell * len(steps) + 0.4))
    axes = fig.subplots(len(steps), len(labels), squeeze=False)
    for r, step in enumerate(steps):
        found = dict(samples[step])
        for c, label in enumerate(labels):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if label in found:
                ax.imshow(_image(found[label]))
            if r == 0:
                prompt, seed = label.split("-", 1)
                ax.set_title(f"prompt {prompt}, seed {seed}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"step {step}", fontsize=8)
    return fig


def score_bars(summary: dict[str, dict[str, float]]) -> Figure:
    fig = Figure(figsize=(4, 3))
    _score_axes(fig.add_subplot(), summary)
    return fig


def _score_axes(ax, summary: dict[str, dict[str, float]]) -> None:
    metrics = [m for m in ("clip", "aesthetic") if m in summary]
    width = 0.38
    for k, (which, color) in enumerate((("base", "#a6a6a6"), ("lora", "#1f4e79"))):
        values = [summary[m].get(which) for m in metrics]
        xs = [i + (k - 0.5) * width for i in range(len(metrics))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=which, color=color)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_title("mean scores")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def interval_chart(intervals: dict[str, dict[str, Any]]) -> Figure:
    """A panel per scorer: the base model's and the LoRA's mean with its 95 % interval as an error bar, the
    paired difference in the title. `intervals`: {"lora" | "base" | "lora_minus_base": {scorer: Interval}}."""
    metrics = [m for m in ("clip", "aesthetic") if m in intervals["lora"] and m in intervals["base"]]
    fig = Figure(figsize=(2.6 * max(len(metrics), 1) + 0.6, 3))
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        _interval_axes(ax, [intervals["base"][m], intervals["lora"][m]], m)
        d = intervals["lora_minus_base"].get(m)
        ax.set_title(f"{m}\nLoRA − base {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
                     + ("" if d.excludes_zero() else "\nno measurable difference") if d else m, fontsize=8)
    fig.tight_layout()
    return fig


def _interval_axes(ax, pair: list[Any], metric: str = "") -> None:
    """Base and LoRA: a point at the mean, an error bar from low to high (labelled "<metric> base" and
    "<metric> lora": tests read the drawn bars back by these)."""
    for x, (iv, side, color) in enumerate(zip(pair, ("base", "lora"), ("#a6a6a6", "#1f4e79"), strict=True)):
        ax.errorbar([x], [iv.mean], yerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="o", color=color,
                    capsize=6, markersize=6, label=f"{metric} {side}".strip())
    ax.set_xticks([0, 1], ["base", "LoRA"])
    ax.set_xlim(-0.6, 1.6)
    ax.grid(axis="y", alpha=0.3)


def _difference_axes(ax, difference: Any, metric: str) -> None:
    """The paired LoRA − base difference with its interval, against a line at 0: a bar crossing it is no
    measurable difference."""
    ax.axhline(0, color="#7f7f7f", linestyle="--", linewidth=1)
    ax.errorbar([0], [difference.mean], yerr=[[difference.mean - difference.low], [difference.high - difference.mean]],
                fmt="o", color="#1f4e79" if difference.excludes_zero() else "#7f7f7f", capsize=6, markersize=6,
                label=f"{metric} lora_minus_base")
    ax.set_xticks([0], ["LoRA − base"])
    ax.set_xlim(-0.8, 0.8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    if not difference.excludes_zero():
        ax.set_title("no measurable\ndifference", fontsize=7)


def _summary_interval_panel(fig, spec, intervals: dict[str, dict[str, Any]]) -> bool:
    """report.png's scores with their 95 % intervals: a row per scorer, base and LoRA beside their paired
    difference. False (nothing drawn) when no scorer has both sides' intervals."""
    metrics = [m for m in ("clip", "aesthetic") if m in intervals["lora"] and m in intervals["base"]]
    if not metrics:
        return False
    rows = spec.subgridspec(len(metrics), 2, width_ratios=[2, 1], wspace=0.6, hspace=0.6)
    for r, m in enumerate(metrics):
        difference = intervals["lora_minus_base"].get(m)
        ax = fig.add_subplot(rows[r, 0] if difference else rows[r, :])
        _interval_axes(ax, [intervals["base"][m], intervals["lora"][m]], m)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{m}: mean, 95 % interval", fontsize=8)
        if difference:
            _difference_axes(fig.add_subplot(rows[r, 1]), difference, m)
    return True


def summary_figure(title: str, grid: Path | None, loss: list[dict[str, float]],
                   scores: dict[str, Any] | None, last_samples: list[tuple[str, Path]],
                   intervals: dict[str, dict[str, Any]] | None = None) -> Figure:
    """report.png: the grid, the loss curve, and the scores (or the last validation samples) on one page.
    `intervals` (eval/scores.json's, as kolora.report.stage.score_intervals reads them): the scores drawn with
    their 95 % intervals as error bars; without them, the plain mean bars."""
    fig = Figure(figsize=(12, 5.5))
    fig.suptitle(title, fontsize=13)
    spec = fig.add_gridspec(2, 3, width_ratios=[1.1, 1.3, 1])
    ax = fig.add_subplot(spec[:, 0])
    ax.set_axis_off()
    ax.set_title("grid")
    if grid is not None and grid.is_file():
        ax.imshow(_image(grid))
    if loss:
        _loss_axes(fig.add_subplot(spec[:, 1]), loss)
    if scores and scores.get("summary"):
        if not (intervals and _summary_interval_panel(fig, spec[:, 2], intervals)):
            _score_axes(fig.add_subplot(spec[:, 2]), scores["summary"])
    elif last_samples:
        sub = spec[:, 2].subgridspec(2, 2)
        for k, (label, path) in enumerate(last_samples[:4]):
            a = fig.add_subplot(sub[k // 2, k % 2])
            a.imshow(_image(path))
            a.set_axis_off()
            a.set_title(f"last samples: {label}" if k == 0 else label, fontsize=8)
    return fig


def scores_over_steps(means: dict[str, dict[int, tuple[float, float, float]]], selected: int | None,
                      metric: str | None) -> Figure:
    """One panel per scorer: the mean score of the validation samples at each step (step 0: the base model) with
    its 95 % interval, the selected step marked."""
    scorers = sorted(means)
    fig = Figure(figsize=(4.2 * len(scorers), 3.2))
    axes = fig.subplots(1, len(scorers), squeeze=False)[0]
    for ax, scorer in zip(axes, scorers, strict=True):
        steps = sorted(means[scorer])
        mean, low, high = ([means[scorer][s][k] for s in steps] for k in range(3))
        ax.fill_between(steps, low, high, color="#9bb7d4", alpha=0.5, linewidth=0, label="95 % interval")
        ax.plot(steps, mean, color="#1f4e79", marker="o", linewidth=2, label="mean")
        if selected is not None:
            ax.axvline(selected, color="#c55a11", linestyle="--", linewidth=1.5,
                       label=f"selected: step {selected}" + (f" ({metric})" if metric else ""))
        ax.set_xlabel("step")
        ax.set_title(f"{scorer} over training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return fig
