"""`--set key.path=value` items and path fields: how a config's raw mapping is amended before validation.

Relative paths in a config file resolve against that file's folder; those given with --set against the
current directory. Every field an override set is remembered, so a validation problem names the --set item.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kolora.core.errors import ConfigError

# Fields holding file paths: relative values are resolved against the folder of the file that set them.
PATH_FIELDS = [
    ("model", "path"), ("model", "vae_path"), ("model", "tokenizer_path"), ("model", "unet_config"),
    ("model", "vae_config"), ("data", "path"), ("render", "prompts"), ("render", "lora"), ("grid", "font"),
    ("cache", "dir"), ("scorers", "dir"),
]


def resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for section, key in PATH_FIELDS:
        sec = raw.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str | Path):
            p = Path(sec[key]).expanduser()
            sec[key] = str(p if p.is_absolute() else (base / p).resolve())
    _resolve_source_paths(raw.get("data"), base)


def _resolve_source_paths(data: Any, base: Path) -> None:
    """Each data.sources entry's path, like data.path."""
    sources = data.get("sources") if isinstance(data, dict) else None
    for s in sources if isinstance(sources, list) else []:
        if isinstance(s, dict) and isinstance(s.get("path"), str | Path):
            p = Path(s["path"]).expanduser()
            s["path"] = str(p if p.is_absolute() else (base / p).resolve())


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.steps=200` → (["train", "steps"], 200). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key.path=value, e.g. --set train.steps=200")
    key, value = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item}: the key before '=' is empty (e.g. --set train.steps=200)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return keys, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str], base: Path) -> dict[tuple[str, ...], str]:
    """Apply `--set` items to `raw` in place; returns {field path: "--set item"} to blame problems on them."""
    origins: dict[tuple[str, ...], str] = {}
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for n, k in enumerate(keys[:-1], 1):
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: {'.'.join(keys[:n])} is a value, not a section")
            node = nxt
        node[keys[-1]] = value
        if tuple(keys) in PATH_FIELDS and isinstance(value, str):
            p = Path(value).expanduser()
            node[keys[-1]] = str(p if p.is_absolute() else (base / p).resolve())
        if tuple(keys[:2]) == ("data", "sources") or tuple(keys) == ("data",):
            _resolve_source_paths(raw.get("data"), base)
        origins[tuple(keys)] = f"--set {item}"
    return origins


def override_origin(origins: dict[tuple[str, ...], str]) -> Callable[[tuple[Any, ...]], str | None]:
    """loc → the --set/--name that set that field (or a section holding it), else None (the file did)."""
    def origin(loc: tuple[Any, ...]) -> str | None:
        keys = tuple(str(p) for p in loc)
        found = [o for k, o in origins.items() if keys[:len(k)] == k]
        return found[-1] if found else None
    return origin
