"""Which run is best: the ranking contract shared by `kolora status SWEEP`, sweep.html and the report.

Runs with scores (eval/scores.json, written by the evaluate stage) rank first, by summary.aesthetic.lora
(higher is better), ties by summary.clip.lora; runs without scores follow, by their final training loss
(lower is better); runs with neither come last. No heavy imports: status runs on a login node.

Scores are means over a handful of tiles: each carries its 95 % interval (eval/scores.json's intervals, see
kolora.core.stats). The order stays the contract's, but where the best's interval on the score that ordered it
overlaps the runner-up's, the two are not distinguishable (`indistinct_runner_up`) and no winner is declared.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolora.core.stats import Interval, distinguishable
from kolora.train import metrics as train_metrics


@dataclass
class RunScore:
    name: str
    root: Path
    aesthetic: float | None = None  # summary.aesthetic.lora
    clip: float | None = None  # summary.clip.lora
    final_loss: float | None = None
    step: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # eval/scores.json's summary, as written
    # the LoRA's mean score with its 95 % interval per scorer (eval/scores.json's intervals.lora; none before
    # the evaluate stage wrote intervals)
    intervals: dict[str, Interval] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return self.aesthetic is not None or self.clip is not None

    def describe(self) -> str:
        parts = []
        for metric, value in (("aesthetic", self.aesthetic), ("clip", self.clip)):
            if value is not None:
                iv = self.intervals.get(metric)
                parts.append(f"{metric} {value:.4g}" + (f" [{iv.low:.4g}, {iv.high:.4g}]" if iv else ""))
        if self.final_loss is not None:
            parts.append(f"final loss {self.final_loss:.4g} (step {self.step})")
        return ", ".join(parts) or "no scores or loss yet"


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def loss_curve(run_root: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of train/metrics.csv up to the run's kept step; rows without a finite loss are skipped."""
    return [(r["step"], r["loss"]) for r in train_metrics.rows(run_root) if math.isfinite(r["loss"])]


def read_scores(run_root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(run_root) / "eval" / "scores.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def score_run(name: str, run_root: Path) -> RunScore:
    score = RunScore(name=name, root=Path(run_root))
    curve = loss_curve(run_root)
    if curve:
        score.step, score.final_loss = curve[-1]
    summary = (read_scores(run_root) or {}).get("summary")
    if isinstance(summary, dict):
        score.summary = summary
        score.aesthetic = _finite((summary.get("aesthetic") or {}).get("lora"))
        score.clip = _finite((summary.get("clip") or {}).get("lora"))
        score.intervals = lora_intervals(read_scores(run_root) or {})
    return score


def lora_intervals(scores: dict[str, Any]) -> dict[str, Interval]:
    """{scorer: Interval} of the LoRA's tiles from eval/scores.json (those that are complete and finite)."""
    raw = (scores.get("intervals") or {}).get("lora") if isinstance(scores.get("intervals"), dict) else None
    out = {}
    for metric, v in (raw or {}).items():
        if metric not in ("aesthetic", "clip") or not isinstance(v, dict):
            continue
        mean, low, high, n = (_finite(v.get(k)) for k in ("mean", "low", "high", "n"))
        if None not in (mean, low, high, n):
            out[metric] = Interval(mean, low, high, int(n))
    return out


def deciding_metric(best: RunScore, runner_up: RunScore) -> str | None:
    """The score that put `best` before `runner_up` (aesthetic; CLIP where the aesthetic scores tie or are
    missing); None where a loss, not a score, ordered them."""
    if not (best.scored and runner_up.scored):
        return None
    if best.aesthetic is not None and runner_up.aesthetic is not None and best.aesthetic != runner_up.aesthetic:
        return "aesthetic"
    return "clip" if best.clip is not None and runner_up.clip is not None else None


def indistinct_runner_up(ranked: list[RunScore]) -> RunScore | None:
    """The runner-up when the best of `ranked` (best first, as rank() returns) is not distinguishable from it:
    their 95 % intervals on the score that ordered them overlap. None when the best stands apart, or when
    there is no runner-up or no intervals to tell."""
    if len(ranked) < 2:
        return None
    best, second = ranked[0], ranked[1]
    metric = deciding_metric(best, second)
    if metric is None or metric not in best.intervals or metric not in second.intervals:
        return None
    return None if distinguishable(best.intervals[metric], second.intervals[metric]) else second


def rank(scores: list[RunScore]) -> list[RunScore]:
    """Best first, per the contract above (stable: equal runs keep their order)."""
    def key(s: RunScore) -> tuple:
        if s.scored:
            return (0, -(s.aesthetic if s.aesthetic is not None else -math.inf),
                    -(s.clip if s.clip is not None else -math.inf))
        if s.final_loss is not None:
            return (1, s.final_loss, 0.0)
        return (2, 0.0, 0.0)

    return sorted(scores, key=key)
