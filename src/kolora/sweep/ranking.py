"""Which run is best: the ranking contract shared by `kolora status SWEEP`, sweep.html and the report.

Runs with scores (eval/scores.json, written by the evaluate stage) rank first, by summary.aesthetic.lora
(higher is better), ties by summary.clip.lora; runs without scores follow, by their final training loss
(lower is better); runs with neither come last. No heavy imports: status runs on a login node.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    @property
    def scored(self) -> bool:
        return self.aesthetic is not None or self.clip is not None

    def describe(self) -> str:
        parts = []
        if self.aesthetic is not None:
            parts.append(f"aesthetic {self.aesthetic:.4g}")
        if self.clip is not None:
            parts.append(f"clip {self.clip:.4g}")
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
    return score


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
