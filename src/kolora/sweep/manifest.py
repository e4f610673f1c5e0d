"""The sweep manifest, `runs/<sweep>/sweep.json`: what makes a folder a sweep (kolora.sweep.names), the
variants it lists and their run folders; written by kolora.sweep.plan.write_manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kolora.core.config import ConfigError

MANIFEST = "sweep.json"


def read_manifest(sweep_dir: Path) -> dict[str, Any]:
    path = Path(sweep_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the sweep manifest ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}); it is written by `kolora sweep`") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        raise ConfigError(f"{path}: not a sweep manifest (no variants list); it is written by `kolora sweep`")
    return data


def find_sweep(name_or_path: str, runs_dir: Path) -> Path | None:
    """The sweep folder NAME (under runs_dir) or PATH names, None when it is not a sweep."""
    for cand in (Path(name_or_path).expanduser(), Path(runs_dir) / name_or_path):
        if (cand / MANIFEST).is_file():
            return cand.resolve()
    return None
