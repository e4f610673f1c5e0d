"""Stage keys and completion. A stage's **key** is a hash of its input fields, the fingerprints of its external
files and the keys of the stages it reads from. A stage is complete when its marker (.complete/<stage>.json)
holds the current key and its outputs are on disk. Training's `continues` fields (train.steps) are part of its
output key but not of its work key: raising them continues from the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from kolora.cache.entry import cache_store_of
from kolora.core import hashing
from kolora.core.config import ExperimentConfig, field_value
from kolora.core.rundir import RunDir, atomic_write_json, now
from kolora.formats.lora import resolve_file
from kolora.models import fingerprint
from kolora.pipeline.registry import SINCE, get
from kolora.render.tiles import tile_files


def content(cfg: ExperimentConfig, dotted: str) -> Any:
    """A path field's file(s) by content; the model's fields together as one model fingerprint."""
    if dotted.startswith("model."):
        return fingerprint.model(cfg.model)
    if dotted == "data.path":
        return hashing.dataset(cfg.data)
    if dotted == "data.sources.path":
        return [hashing.dataset(s) for s in cfg.data.sources]
    if dotted == "scorers.dir":
        return fingerprint.scorers(cfg.scorers)
    value = field_value(cfg, dotted)
    if value is None:
        return None
    path = Path(value)
    if dotted == "render.lora":
        path = resolve_file(path)
    return hashing.file_sha256(path) if path.is_file() else {"missing": str(path.name)}


class Keys:
    """The keys of one config's stages in one run directory, each computed once."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self._memo: dict[str, str | None] = {}

    def inputs(self, name: str) -> dict[str, Any]:
        """What the stage's work depends on (its checkpoints too): the key before `continues` fields."""
        s = get(name)
        fields = {f: field_value(self.cfg, f) for f in s.inputs}
        fields = {f: v for f, v in fields.items() if not (f in SINCE and v == SINCE[f])}
        out: dict[str, Any] = {"stage": name, "fields": fields}
        contents = {}
        for f in s.content:
            kind = "model" if f.startswith("model.") else f
            value = contents.get(kind) or content(self.cfg, f)
            if not (f in SINCE and value == SINCE[f]):  # a content field added later, unused: keys as before it
                contents[kind] = value
        out["content"] = contents
        out["after"] = {a: self.output(a) for a in s.after}
        if s.extra_key is not None:
            out.update(s.extra_key(self.cfg, self.run))
        return out

    def work(self, name: str) -> str | None:
        """Key of the stage's work (None: cannot be known yet, e.g. render before its LoRA exists)."""
        if f"work:{name}" not in self._memo:
            inputs = self.inputs(name)
            unknown = any(v is None for v in inputs["after"].values()) or None in inputs.get("tiles", [])
            self._memo[f"work:{name}"] = None if unknown else hashing.digest(inputs)[:16]
        return self._memo[f"work:{name}"]

    def output(self, name: str) -> str | None:
        """Key of the stage's output: its work key plus the `continues` fields (train.steps)."""
        work = self.work(name)
        s = get(name)
        if work is None or not s.continues:
            return work
        return hashing.digest([work, {f: field_value(self.cfg, f) for f in s.continues}])[:16]


def marker_file(run: RunDir, stage: str) -> Path:
    return run.root / ".complete" / f"{stage}.json"


def read_marker(run: RunDir, stage: str) -> dict[str, Any] | None:
    try:
        info = json.loads(marker_file(run, stage).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def is_complete(stage: str, cfg: ExperimentConfig, run: RunDir, keys: Keys | None = None) -> bool:
    """The marker holds the current key *and* the outputs are on disk (a deleted tile or LoRA makes the stage
    run again, and only for what is missing)."""
    info = read_marker(run, stage)
    if info is None:
        return False
    keys = keys or Keys(cfg, run)
    key = keys.output(stage)
    return (key is not None and info.get("key") == key
            and get(stage).done(cfg, run, lambda other: is_complete(other, cfg, run, keys)))


def mark_complete(stage: str, run: RunDir, key: str, **summary: Any) -> None:
    atomic_write_json(marker_file(run, stage), {"key": key, "finished": now(), **summary})


def complete_stages(run: RunDir) -> list[str]:
    return sorted(p.stem for p in (run.root / ".complete").glob("*.json"))


def progress(run: RunDir) -> dict[str, Any]:
    """What the stages have durably written so far (finished stages, newest checkpoint step, tiles, cache
    entries): two equal values mean a job attempt between them achieved nothing."""
    def count(folder: Path) -> int:
        try:
            with os.scandir(folder) as entries:
                return sum(1 for e in entries if not e.name.startswith("."))
        except OSError:
            return 0

    steps = [int(m.group(1)) for p in (run.train / "checkpoints").glob("step=*.ckpt")
             if (m := re.fullmatch(r"step=(\d+)\.ckpt", p.name))]
    store = cache_store_of(run)
    return {"complete": complete_stages(run), "checkpoint_step": max(steps, default=None),
            "tiles": sum(len(tile_files(f)) for f in (run.render, run.render / "base")),
            "cache_entries": count(store / "text") + count(store / "latents")}
