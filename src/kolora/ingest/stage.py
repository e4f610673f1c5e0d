"""Stage `ingest`: any supported dataset -> run/data/ in the tutorial's Data-Juicer input format.

Outputs (replaced as a whole on every run, so a rerun never mixes old and new files):
    data/images/<id>.<ext>   the images (hard links to local files where possible, else copies / written bytes)
    data/metadata.jsonl      {"id": "000000", "text": "<caption>", "image": ["/abs/path"]} per sample
    data/rejected.jsonl      {"source": "<file>:<line>", "reason": "..."} per source record that cannot be a sample

Whether an image file is readable is *not* decided here: a sample whose file is missing keeps the path it
names, and the filter stage's header pass reports it ("missing file"), so every record ends up in the report.
Which paths may be taken at all is (kolora.ingest.safe_paths): inside the dataset root unless
data.allow_external_paths, regular files only, at most data.max_image_bytes; others go to rejected.jsonl.
A stop request (kolora.core.interrupt) ends the stage between records; the rerun redoes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kolora.core import interrupt
from kolora.core.config import DataConfig, ExperimentConfig
from kolora.core.offline import offline_variable
from kolora.core.rundir import RunDir, atomic_dir, atomic_write_text
from kolora.ingest.safe_paths import PathGuard, Unsafe, copy_checked, link_checked, write_bytes
from kolora.ingest.sources import (
    DatasetError,
    Record,
    Rejected,
    check_columns,
    no_sample_error,
    parquet_rows,
    records,
    rows_to_records,
    sample_text,
    sniff_ext,
)

COUNTS = ("linked", "copied", "written", "generated", "referenced")  # how each sample's image got into data/


def _offline_reason() -> str | None:
    if var := offline_variable():
        return f"{var} is set"
    try:
        from modelscope.hub.utils.utils import get_domain

        host = get_domain()
    except Exception:  # noqa: BLE001 - any failure here just means "use the default host"
        host = "www.modelscope.cn"
    host = host.split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=3):
            return None
    except OSError as e:
        return f"{host} cannot be reached ({e.__class__.__name__}: {e})"


def _load_modelscope(cfg: ExperimentConfig, cache_dir: Path) -> tuple[Any, str, Path]:
    """The hub dataset (or its local download) as a Hugging Face dataset of image and text columns, with
    the image cells left encoded; its name for the report and the folder relative image paths start from."""
    d = cfg.data
    ds_id = d.dataset_id or "<dataset id>"
    hint = f"run `modelscope download --dataset {ds_id} --local-dir DIR` on a login node and set data.path: DIR"
    if d.path is not None:
        if not d.path.exists():
            raise DatasetError(f"data.path: {d.path} does not exist; to fetch the dataset {hint}")
        target = str(d.path)
    else:
        why = _offline_reason()
        if why:
            raise DatasetError(f"data.dataset_id: the ModelScope dataset {ds_id} cannot be loaded from the hub here "
                               f"({why}); {hint}")
        target = d.dataset_id
    from datasets import Image as HFImage
    from modelscope.msdatasets import MsDataset

    try:
        ds = MsDataset.load(target, subset_name=d.subset, split=d.split,
                            cache_dir=os.environ.get("MODELSCOPE_CACHE") or str(cache_dir))
    except Exception as e:  # noqa: BLE001 - MsDataset raises anything from ValueError to HTTP errors
        raise DatasetError(f"data: MsDataset.load({target!r}, subset_name={d.subset!r}, split={d.split!r}) failed: "
                           f"{e.__class__.__name__}: {e}" + ("" if d.path else f"; {hint}")) from None
    hf = ds.to_hf_dataset() if hasattr(ds, "to_hf_dataset") else ds
    check_columns(list(hf.column_names), d.image_column, d.text_column, d.caption, f"dataset {target}")
    cols = [d.image_column] + ([d.text_column] if d.text_column in hf.column_names else [])
    hf = hf.select_columns(cols)
    try:  # keep the encoded bytes / original paths instead of decoding every image to PIL
        hf = hf.cast_column(d.image_column, HFImage(decode=False))
    except Exception:  # noqa: BLE001 - not an image-like column; read it as it is
        pass
    return hf, str(target), Path(target) if d.path is not None else cache_dir


class TableSource:
    """A parquet or ModelScope source read by row ranges (ingest shards); the hub dataset loads once."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir) -> None:
        self.cfg, self.cache_dir = cfg, run.root / ".cache" / "modelscope"
        self._hf: tuple[Any, str, Path] | None = None

    def _hub(self) -> tuple[Any, str, Path]:
        if self._hf is None:
            self._hf = _load_modelscope(self.cfg, self.cache_dir)
        return self._hf

    @property
    def where(self) -> str:
        return str(self.cfg.data.path or self.cfg.data.dataset_id)

    def rows(self) -> int:
        d = self.cfg.data
        if d.source == "parquet":
            return parquet_rows(d.path, d.image_column, d.text_column, d.caption)  # type: ignore[arg-type]
        return len(self._hub()[0])

    def records(self, rows: tuple[int, int] | None = None) -> Iterator[Record | Rejected]:
        d = self.cfg.data
        if d.source == "parquet":
            return records(d, rows)
        hf, target, base = self._hub()
        start, end = rows or (0, len(hf))
        part = hf if rows is None else hf.select(range(start, end))
        return rows_to_records(part, target, base, d.image_column, d.text_column, start)


# materialising ----------------------------------------------------------------------------------------------
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


def _records(cfg: ExperimentConfig, work: Path, run: RunDir) -> tuple[Iterator[Record | Rejected], str]:
    d = cfg.data
    if d.source == "synthetic":
        s = d.synthetic
        count = min(s.count, d.limit) if d.limit else s.count
        from kolora.ingest.synthetic import make_synthetic

        items = make_synthetic(work / "images", count, s.seed, s.min_side, s.max_side)
        return (Record(f"synthetic:{i}", cap, path=p) for i, (p, cap) in enumerate(items)), "synthetic"
    if d.source == "modelscope":
        source = TableSource(cfg, run)
        return source.records(), source.where
    return records(d), str(d.path)


def take(records: Iterator[Record | Rejected], work: Path, d: DataConfig, guard: PathGuard | None,
         counts: dict[str, int], limit: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Materialise the records' images into work/images/<id>.<ext> (ids 000000, ... in record order); returns
    the samples (their "image": the Path taken) and the rejected records with reasons."""
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
        text = sample_text(rec.text, d.caption)
        if text is None:
            rejected.append({"source": rec.source, "reason": "missing text",
                             "image": str(rec.path) if rec.path else rec.name})
            continue
        sid = f"{len(samples):06d}"
        try:
            path = _materialise(rec, work / "images" / sid, counts, guard)
        except Unsafe as e:
            rejected.append({"source": rec.source, "reason": str(e),
                             "image": str(rec.path) if rec.path else rec.name, "text": text})
            continue
        samples.append({"id": sid, "text": text, "image": path})
        if limit and len(samples) >= limit:
            break
    return samples, rejected


def write_lists(folder: Path, samples: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> None:
    """rejected.jsonl, then metadata.jsonl: its presence says the lists are complete."""
    atomic_write_text(folder / "rejected.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def run(cfg: ExperimentConfig, run: RunDir, task_index: int | None = None,
        task_count: int | None = None) -> dict[str, Any]:
    """Read cfg.data's source into run.data (images/, metadata.jsonl, rejected.jsonl); return a summary.
    A parquet or ModelScope source is read in shards when the filter is sharded (kolora.ingest.shards)."""
    from kolora.ingest import shards as ingest_shards
    shards = ingest_shards.count(cfg, task_count)
    if shards > 1:
        return ingest_shards.run(cfg, run, shards, task_index)
    t0 = time.perf_counter()
    d = cfg.data
    counts = dict.fromkeys(COUNTS, 0)
    with atomic_dir(run.data) as work:
        (work / "images").mkdir()
        records, where = _records(cfg, work, run)
        samples, rejected = take(records, work, d, guard(cfg, run), counts, d.limit)
        if not samples:
            raise no_sample_error(d, where, rejected)
        for s in samples:
            path = s["image"]
            s["image"] = [str(run.data / path.relative_to(work)) if path.is_relative_to(work) else str(path)]
        write_lists(work, samples, rejected)
    return summary(d, where, len(samples), len(rejected), counts, t0)


def summary(d: DataConfig, where: str, samples: int, rejected: int, counts: dict[str, int], t0: float,
            **extra: Any) -> dict[str, Any]:
    return {"source": d.source, "path": where, "samples": samples, "rejected": rejected,
            **{k: v for k, v in counts.items() if v}, **extra, "seconds": round(time.perf_counter() - t0, 2)}


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Read a metadata.jsonl / rejected.jsonl written by this stage."""
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
