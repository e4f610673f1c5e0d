"""Source records into samples: each record's image (and loss mask, data.mask: auto) materialised in a folder
(a hard link, else a copy, else the bytes written) under the path rules of kolora.ingest.safe_paths, and the
sample lists written and read back (metadata.jsonl, rejected.jsonl). One ingest pass and each ingest shard
(kolora.ingest.shards) take records this way; the filter stage reads the lists.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kolora.core import interrupt
from kolora.core.config import DataConfig, ExperimentConfig
from kolora.core.rundir import RunDir, atomic_write_text
from kolora.ingest.safe_paths import PathGuard, Unsafe, copy_checked, link_checked, write_bytes
from kolora.ingest.sources import Record, Rejected, alpha_mode, mask_beside, no_alpha, sniff_ext, text_of

COUNTS = ("linked", "copied", "written", "generated", "referenced")  # how each sample's image got into data/


def _ext_for(rec: Record) -> str:
    """Bytes: the format they hold (else the name's suffix); a file: its suffix (else the format it holds)."""
    if rec.data is not None:
        sniffed = sniff_ext(rec.data[:16])
        suffix = Path(rec.name or "").suffix.lower()
        return suffix if sniffed == ".bin" and suffix else sniffed
    if rec.path.suffix:  # type: ignore[union-attr]
        return rec.path.suffix.lower()  # type: ignore[union-attr]
    try:
        with open(rec.path, "rb") as f:  # type: ignore[arg-type]
            return sniff_ext(f.read(16))
    except OSError:
        return ""


def _materialise(rec: Record, dst_stem: Path, counts: dict[str, int], guard: PathGuard | None) -> Path:
    """Put the record's image at dst_stem + ext (hard link, else copy, else write bytes); return its path.
    `guard` (None: generated images) decides which source paths may be taken (kolora.ingest.safe_paths; raises
    Unsafe). A source file that is missing or cannot be linked or copied is referenced where it is."""
    dst = dst_stem.with_suffix(_ext_for(rec))
    if rec.data is not None:
        if guard is not None:
            guard.check_size(len(rec.data))
        write_bytes(dst, rec.data, rec.origin_mode)
        counts["written"] += 1
        return dst
    if guard is None:
        src, st = rec.path.resolve(), None  # type: ignore[union-attr]
    else:
        src, st = guard.check(rec.path)  # type: ignore[arg-type]
    if src == dst.resolve():
        counts["generated"] += 1
        return dst
    if guard is not None and st is None:
        counts["referenced"] += 1  # missing: the filter's header pass reports it
        return src
    if st is not None and link_checked(src, st, dst):
        counts["linked"] += 1
        return dst
    try:
        copy_checked(src, st, dst, guard.max_bytes if guard else None)
        counts["copied"] += 1
        return dst
    except OSError:
        counts["referenced"] += 1  # the filter's header pass reports why it cannot be read
        return src


def guard(cfg: ExperimentConfig, run: RunDir) -> PathGuard | None:
    """The path rules for cfg.data's source (None for generated images): paths stay inside data.path (a
    file's folder), or the ModelScope cache a hub dataset was loaded into."""
    d = cfg.data
    if d.source == "synthetic":
        return None
    if d.path is not None:
        root = d.path if d.path.is_dir() else d.path.parent
    else:
        root = Path(os.environ.get("MODELSCOPE_CACHE") or run.root / ".cache" / "modelscope")
    return PathGuard(Path(os.path.realpath(root)), d.allow_external_paths, d.max_image_bytes)


def _mask_of(rec: Record, d: DataConfig) -> Record | None:
    """The record's loss mask: data.mask auto takes the one its table names (the readers read it only then),
    else <stem>_mask.png beside a local image; alpha (the image's own channel, read by the cache stage) and none
    take no file."""
    if d.mask != "auto":
        return None
    if rec.mask is not None:
        return rec.mask
    if rec.path is not None and mask_beside(rec.path).is_file():
        return Record(rec.source, path=mask_beside(rec.path))
    return None


def take(records: Iterator[Record | Rejected], work: Path, d: DataConfig, guard: PathGuard | None,
         counts: dict[str, int], limit: int | None, start: int = 0
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Materialise the records' images into work/images/<id>.<ext> (ids 000000, ... in record order, from
    `start`: the samples of earlier sources) and their masks into work/masks/<id>.<ext>; returns the samples
    (their "image", and "mask" where there is one: the Path taken) and the rejected records with reasons.
    counts["masks"]: the samples with a mask, when any."""
    samples: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for n, rec in enumerate(records):
        if interrupt.requested() is not None:  # nothing is kept: the rerun starts over (outputs are atomic)
            raise interrupt.Interrupted(f"ingest stopped after {n} records on {interrupt.requested()}; "
                                        "run it again to redo the stage")
        if isinstance(rec, Rejected):
            rejected.append({"source": rec.source, "reason": rec.reason, **{k: v for k, v in rec.extra.items()
                                                                             if v is not None}})
            continue
        text = text_of(rec.text, d)
        if text is None:
            rejected.append({"source": rec.source, "reason": "missing text",
                             "image": str(rec.path) if rec.path else rec.name})
            continue
        sid = f"{start + len(samples):06d}"
        mask_rec, mask = _mask_of(rec, d), None
        if mask_rec is not None:  # first: a rejected mask leaves no image behind under the id the next sample takes
            (work / "masks").mkdir(exist_ok=True)
            try:
                mask = _materialise(mask_rec, work / "masks" / sid, {k: 0 for k in COUNTS}, guard)
            except Unsafe as e:
                rejected.append({"source": rec.source, "reason": f"mask: {e}",
                                 "image": str(rec.path) if rec.path else rec.name, "text": text,
                                 "mask": str(mask_rec.path) if mask_rec.path else mask_rec.name})
                continue
        try:
            path = _materialise(rec, work / "images" / sid, counts, guard)
        except Unsafe as e:
            if mask is not None and mask.is_relative_to(work):
                mask.unlink()
            rejected.append({"source": rec.source, "reason": str(e),
                             "image": str(rec.path) if rec.path else rec.name, "text": text})
            continue
        if d.mask == "alpha" and (mode := alpha_mode(rec.data if rec.data is not None else path)):
            raise no_alpha(rec.path or rec.name or path, mode, rec.source)  # before anything is trained on it
        samples.append({"id": sid, "text": text, "image": path, **({"mask": mask} if mask is not None else {})})
        if mask is not None:
            counts["masks"] = counts.get("masks", 0) + 1
        if limit and len(samples) >= limit:
            break
    return samples, rejected


def write_lists(folder: Path, samples: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> None:
    """rejected.jsonl, then metadata.jsonl: its presence says the lists are complete."""
    atomic_write_text(folder / "rejected.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def summary(d: DataConfig, where: str, samples: int, rejected: int, counts: dict[str, int], t0: float,
            **extra: Any) -> dict[str, Any]:
    return {"source": "sources" if d.sources else d.source, "path": where, "samples": samples, "rejected": rejected,
            **{k: v for k, v in counts.items() if v}, **extra, "seconds": round(time.perf_counter() - t0, 2)}


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Read a metadata.jsonl / rejected.jsonl written by this stage."""
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
