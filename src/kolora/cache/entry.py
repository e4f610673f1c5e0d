"""One cache entry on disk: a safetensors file whose metadata holds a SHA-256 of its tensors (each tensor's
name, dtype, shape and bytes, in name order), written atomically and verified whenever it is read.

A read fails with BadCacheEntry when the file does not parse (truncated, a damaged header), its tensors no
longer match the checksum written with them (bytes changed on disk, in a copy, on a network file system), or
it holds nan/inf. Entries written before checksums existed are checked for finiteness only, so an older store
stays valid. The cache stage moves a bad entry aside to <store>/quarantine/ (never deletes it) and encodes it
again; every other reader fails naming it and that fix.

Cost, measured on one CPU core: a verified read of a 256 KiB latent (1024²) takes 0.7 ms (load_file alone
0.1 ms), of a short caption's text entry 0.4 ms, of the largest (256 tokens, 2 MiB) 2.5 ms: SHA-256 at about
1 GB/s plus a float64 sum for finiteness; reading from a network file system costs more. Training pays about
1 ms per sample, in its DataLoader (workers overlap it with the GPU step); the cache stage pays it once per entry
found in the store (10⁵ samples: a few CPU minutes, where it read every entry before too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolora.core.errors import RunFailure
from kolora.core.numerics import nonfinite_count
from kolora.core.rundir import atomic_path, atomic_write_json

if TYPE_CHECKING:
    from kolora.core.config import ExperimentConfig
    from kolora.core.rundir import RunDir

# safetensors, torch: imported in the functions that use them (a login node's CLI starts without them)

CHECKSUM = "kolora.sha256"
# In <run>/cache: a reader (training, validation) found a bad entry, so the cache stage is not complete until it
# has run again and repaired it (it verifies every entry the run uses; the file names the one that was found).
DAMAGED = "damaged.json"
REPAIR = ("the cache stage repairs it (`kolora run CONFIG --stage cache`, or `kolora resume RUN` on a cluster): it "
          "moves the entry aside to {aside} and encodes it again; then rerun what failed (training resumes from "
          "its last checkpoint)")


class BadCacheEntry(RunFailure):
    """A cache entry that cannot be trusted: `path`, `reason` (unreadable | checksum | nonfinite), `problem`."""

    path: Path
    reason: str
    problem: str


def _bad(path: Path, of: str, reason: str, problem: str) -> BadCacheEntry:
    # One message argument, so a DataLoader worker's exception is raised again as a BadCacheEntry.
    e = BadCacheEntry(f"cache entry {path} ({of}) {problem}; " + REPAIR.format(aside=quarantine_dir(path)))
    e.path, e.reason, e.problem = path, reason, problem
    return e


def checksum(tensors: Mapping[str, Any]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write(path: Path, tensors: Mapping[str, Any]) -> None:
    """The entry with its checksum, through an atomic rename (racing writers of one key write the same bytes)."""
    from safetensors.torch import save_file

    with atomic_path(Path(path)) as tmp:
        save_file(dict(tensors), str(tmp), metadata={CHECKSUM: checksum(tensors)})


def read(path: Path | str, of: str) -> dict[str, Any]:
    """The entry's tensors, verified; BadCacheEntry naming the file, `of` (the image or caption it belongs to),
    what is wrong and the fix otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            written = (f.metadata() or {}).get(CHECKSUM)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise _bad(path, of, "missing", "is missing from the store") from None
    except (SafetensorError, OSError) as e:
        raise _bad(path, of, "unreadable", f"cannot be read ({e})") from None
    nonfinite = {name: n for name, t in tensors.items() if (n := nonfinite_count(t))}
    mismatch = written is not None and written != checksum(tensors)
    if nonfinite:
        where = ", ".join(f"{n} in {name}" for name, n in nonfinite.items())
        raise _bad(path, of, "nonfinite", f"holds non-finite values (nan/inf: {where})"
                   + (" and no longer matches the checksum written with it" if mismatch else ""))
    if mismatch:
        raise _bad(path, of, "checksum", "no longer matches the checksum written with it (its bytes changed "
                   "after it was written)")
    return tensors


def mark_damaged(run_cache: Path, e: BadCacheEntry) -> None:
    atomic_write_json(Path(run_cache) / DAMAGED, {"entry": str(e.path), "problem": e.problem})


def quarantine_dir(path: Path) -> Path:
    """<store>/quarantine/<text|latents>/ for an entry <store>/<text|latents>/<key>.safetensors."""
    return path.parent.parent / "quarantine" / path.parent.name


def quarantine(path: Path, reason: str) -> Path | None:
    """Move a bad entry aside to <store>/quarantine/<kind>/<name>.<reason> (a rename: the bytes are kept for a
    look, and the key is free for a new entry). None when it is gone already (another run moved it)."""
    folder = quarantine_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{path.name}.{reason}"
    if dest.exists():  # the same key went bad before: keep both
        dest = dest.with_name(f"{dest.name}.{time.time_ns()}")
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    return dest


def cache_store(cfg: ExperimentConfig, run: RunDir) -> Path:
    """Where the cache's content-addressed entries live: cache.dir (shared across runs) or <run>/cache."""
    return Path(cfg.cache.dir) if cfg.cache.dir else run.cache


def cache_store_of(run: RunDir) -> Path:
    """The entry store named by the run's cache index (or the run's own cache folder)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return Path(json.loads((run.cache / "index.json").read_text())["store"] or run.cache)
    return run.cache
