"""The cache stage's shards (one per rank of the train job) and its journal: what each rank has cached so
far, appended as it goes, so that a stop (time limit, preemption) loses at most the batch in flight and the
next attempt — on any number of ranks — continues with the samples that are missing. Rank r's shard is
samples r, r + world, ... (kolora.core.shards.interleaved); the stage itself is kolora.cache.stage.

Layout: <run>/cache/journal/<identity>/part-<rank>.jsonl, one JSON object per line, written with one
O_APPEND write + fsync per batch (never a rewrite: at 300,000 samples the index is written once, at the end):
  {"row": i, "entry": {...}}               sample i (its metadata.csv row) is cached: its index entry
  {"row": i, "skipped": "reason"}          sample i could not be cached (its image does not decode)
  {"encoded": "text"|"latent", "keys": [...], "attempt": A}  entries encoded by attempt A (the summary)
  {"repaired": path, "of": "...", "problem": "...", "aside": path}  a bad entry found in the store, moved aside
The identity hashes the stage's work key and the entry store: a journal made for other inputs, or for
another cache.dir, is never read. A torn last line (killed mid-write) is ignored. Rank 0 merges the parts
into cache/index.json once every rank's shard is done, then removes the journal.

Ranks meet through files in a per-attempt barrier folder (the job folder, shared by all ranks): each rank
> 0 writes its marker rank-<r>.json (done / interrupted / failed) when its shard ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from kolora.core import interrupt
from kolora.core import shards as core_shards
from kolora.core.errors import RunFailure


def journal_folder(run_cache: Path, work_key: str | None, store: Path) -> Path:
    identity = hashlib.sha256(f"{work_key}\0{Path(store).resolve()}".encode()).hexdigest()[:16]
    return Path(run_cache) / "journal" / identity


class Journal:
    """One rank's appender plus a reader of every rank's lines."""

    def __init__(self, path: Path, rank: int):
        self.path = Path(path)
        self.part = self.path / f"part-{rank}.jsonl"

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        fd = os.open(self.part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for part in sorted(self.path.glob("part-*.jsonl")):
            for line in part.read_bytes().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        out.append(record)
        return out

    def state(self, attempt: str | None = None
              ) -> tuple[dict[int, dict[str, Any]], dict[int, str], dict[str, set[str]]]:
        """(row → its line, row → skip reason, kind → keys `attempt` encoded): a row cached by any line is
        cached, even if an earlier attempt skipped it."""
        cached: dict[int, dict[str, Any]] = {}
        skipped: dict[int, str] = {}
        encoded: dict[str, set[str]] = {"text": set(), "latent": set()}
        for r in self.records():
            if "entry" in r:
                cached[r["row"]] = r
            elif "skipped" in r:
                skipped[r["row"]] = r["skipped"]
            elif r.get("encoded") in encoded and r.get("attempt") == attempt:
                encoded[r["encoded"]].update(r["keys"])
        return cached, {i: why for i, why in skipped.items() if i not in cached}, encoded

    def repaired(self) -> list[dict[str, Any]]:
        """The bad entries any attempt of this cache run moved aside (each is encoded again)."""
        return [{k: r[k] for k in ("repaired", "of", "problem", "aside")} for r in self.records() if "repaired" in r]

    def remove(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)  # every identity's journal: the index is written


# ---- ranks meeting in a barrier folder -----------------------------------------------------------------
def report_shard(barrier: Path | str, rank: int, status: str, detail: str = "") -> None:
    core_shards.write_marker(Path(barrier) / f"rank-{rank}.json", {"status": status, "detail": detail})


def wait_for_shards(barrier: Path | str, world: int, poll_s: float = 1.0) -> None:
    """Rank 0: until every other rank's shard is done. Stops on the stop signal (the other ranks got it too);
    fails when a rank failed."""
    pending = set(range(1, world))
    while pending:
        for rank in sorted(pending):
            info = core_shards.read_marker(Path(barrier) / f"rank-{rank}.json")
            if info is None:
                continue
            if info["status"] == "failed":
                raise RunFailure(f"cache: rank {rank} failed on its shard ({info['detail']}); see its log")
            if info["status"] == "interrupted":
                raise interrupt.Interrupted(f"cache: rank {rank} stopped on a signal; the journal keeps its work")
            pending.discard(rank)
        if pending:
            if interrupt.requested():
                raise interrupt.Interrupted(f"cache: stopped ({interrupt.requested()}) while waiting for ranks "
                                            f"{sorted(pending)}; the journal keeps what every rank cached")
            time.sleep(poll_s)
