"""Content fingerprints of files and folders, for what a stage reads from outside the run directory (the model,
the dataset, a prompt file, an external LoRA). They replace paths in stage keys, so a copied or moved folder with
the same files is the same input, and a file edited in place is a new one.

Hashing every byte is not affordable at cluster size (Kolors is 16 GB of weights, a dataset 10⁵–10⁶
images), so each kind of file is fingerprinted by what changes when it does:
- text files (configs, tokenizers, metadata, prompt sets) and anything ≤ 2 MiB: every byte;
- weight files: size + the first and the last MiB (the safetensors header and its last tensors);
- images listed in a dataset folder: name + size (reading 300,000 images per check would cost an hour);
- a LoRA: every byte (tens of MB; it is what a render tile depends on most).
Whole-file hashes are remembered per (inode, size, mtime) for the life of the process.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MIB = 1 << 20
TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".model", ".py", ".md", ".tiktoken"}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".arrow", ".gguf", ".onnx"}

_memo: dict[tuple[Any, ...], str] = {}


def digest(obj: Any) -> str:
    """sha256 of a JSON-able value (stable key order)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _stat_key(path: Path, kind: str) -> tuple[Any, ...]:
    st = path.stat()
    return kind, str(path), st.st_ino, st.st_size, st.st_mtime_ns


def file_sha256(path: Path | str) -> str:
    """Every byte of the file."""
    path = Path(path)
    key = _stat_key(path, "sha256")
    if key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 * MIB):
                h.update(chunk)
        _memo[key] = h.hexdigest()
    return _memo[key]


def sampled(path: Path | str) -> str:
    """Size + first and last MiB (every byte when the file is ≤ 2 MiB)."""
    path = Path(path)
    size = path.stat().st_size
    if size <= 2 * MIB:
        return file_sha256(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(MIB))
        f.seek(size - MIB)
        h.update(f.read(MIB))
    return f"{size}:{h.hexdigest()}"


def _walk(root: Path) -> list[Path]:
    """Files under `root`, sorted, without hidden names (hub download caches such as .cache/)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(out)


def tree(root: Path | str, images_by_size: bool = False) -> dict[str, str]:
    """{relative name: fingerprint} of every file under `root` (or of `root` itself when it is a file)."""
    root = Path(root)
    if root.is_file():
        return {root.name: _one(root, images_by_size)}
    return {str(p.relative_to(root)): _one(p, images_by_size) for p in _walk(root)}


def _one(path: Path, images_by_size: bool) -> str:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return file_sha256(path)
    if suffix in WEIGHT_SUFFIXES or not images_by_size:
        return sampled(path)
    return f"size:{path.stat().st_size}"


def dataset(cfg) -> dict[str, Any]:
    """The dataset's listing (names + sizes; metadata files in full), for the sources that live on disk."""
    if cfg.path is None:
        return {}
    root = Path(cfg.path)
    if not root.exists():
        return {"missing": True}  # ingest reports the missing path; the key just differs from any real one
    key = ("dataset", str(root), *_top_signature(root))
    if key not in _memo:
        _memo[key] = digest(tree(root, images_by_size=True))
    return {"listing": _memo[key]}


def _top_signature(root: Path) -> tuple[Any, ...]:
    """Cheap signature of a dataset root (its own and its direct entries' size and mtime): the full listing is
    recomputed when this changes, not at every check of a 300,000-file folder in one process."""
    if root.is_file():
        st = root.stat()
        return st.st_size, st.st_mtime_ns
    with os.scandir(root) as it:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it))
