"""train/metrics.csv as its readers see it (status, the sweep ranking and sheet, the report, train's summary).

Training writes one row per optimizer step (kolora.train.loop.MetricsCSV). A run re-run with a lower train.steps keeps
an earlier checkpoint as its LoRA, and the rows of the later steps stay in the file (raising train.steps again
continues from their checkpoints); they are not the run's, so readers take the rows up to the kept step only.
No heavy imports: status runs on a login node.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import yaml

FILE = Path("train") / "metrics.csv"


def kept_step(run_root: Path) -> int | None:
    """The step the run trains to: train.steps of its frozen config.yaml (None when it cannot be read)."""
    try:
        steps = yaml.safe_load((Path(run_root) / "config.yaml").read_text(encoding="utf-8"))["train"]["steps"]
    except (OSError, yaml.YAMLError, UnicodeDecodeError, TypeError, KeyError):
        return None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def all_rows(run_root: Path) -> list[dict[str, float]]:
    """{"step", "loss", "lr"} of every row with a step and a loss, as written (a diverged loss is nan)."""
    try:
        with open(Path(run_root) / FILE, newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    out = []
    for row in raw:
        step, loss, lr = (_number(row.get(k)) for k in ("step", "loss", "lr"))
        if step is not None and math.isfinite(step) and loss is not None:
            out.append({"step": int(step), "loss": loss, "lr": math.nan if lr is None else lr})
    return out


def rows(run_root: Path, upto: int | None = None) -> list[dict[str, float]]:
    """The rows up to step `upto` (default: the kept step; all rows when that cannot be read)."""
    limit = upto if upto is not None else kept_step(run_root)
    return [r for r in all_rows(run_root) if limit is None or r["step"] <= limit]
