"""Fingerprints of the model and the scorer models: every component file by content (kolora.core.hashing), so
that stage keys name what was loaded, not where it lay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kolora.core.hashing import digest, tree
from kolora.models import kolors
from kolora.models.scorers import ensure_tiny


def model(cfg) -> str:
    """The model's identity: its layout and every component file (configs in full, weights sampled)."""
    kolors.ensure_model(cfg)  # a tiny demo model is built on first use, deterministically
    files = kolors.resolve(cfg)
    parts: dict[str, Any] = {"layout": files.layout, "variant": files.variant}
    for name in ("tokenizer", "text_encoder", "unet", "vae", "scheduler", "unet_config", "vae_config"):
        path = getattr(files, name)
        if path is not None and Path(path).exists():
            parts[name] = tree(path)
    return digest(parts)


def scorers(scfg) -> dict[str, str] | None:
    """The configured scorer models (scorers.*) by content; the tiny ones are built first (scorers.tiny)."""
    if scfg.dir is None:
        return None
    ensure_tiny(scfg)
    out = {}
    for name in (scfg.clip, scfg.chinese_clip, scfg.aesthetic):
        folder = Path(scfg.dir) / name
        out[name] = digest(tree(folder)) if folder.is_dir() else "missing"
    return out
