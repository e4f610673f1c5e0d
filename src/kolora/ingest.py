"""Stage `ingest`: any supported dataset -> run/data/ in the tutorial's Data-Juicer input format.

Outputs (replaced as a whole on every run, so a rerun never mixes old and new files):
    data/images/<id>.<ext>   the images (hard links to local files where possible, else copies / written bytes)
    data/metadata.jsonl      {"id": "000000", "text": "<caption>", "image": ["/abs/path"]} per sample
    data/rejected.jsonl      {"source": "<file>:<line>", "reason": "..."} per source record that cannot be a sample

Whether an image file is readable is *not* decided here: a sample whose file is missing keeps the path it
names, and the filter stage's header pass reports it ("missing file"), so every record ends up in the report.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolora.config import ExperimentConfig
from kolora.rundir import RunDir, atomic_dir, atomic_write_text

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MODELSCOPE_OFFLINE", "KOLORA_OFFLINE")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DatasetError(ValueError):
    """The dataset cannot be read or holds no sample; the message names the path and what was expected."""


@dataclass
class Record:
    """One source record: a caption and an image given as a local path or as encoded bytes."""

    source: str
    text: Any = None
    path: Path | None = None
    data: bytes | None = None
    name: str | None = None  # the original file name, for the extension of written bytes


@dataclass
class Rejected:
    source: str
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)


# sources ---------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, text_key: str, image_key: str) -> Iterator[Record | Rejected]:
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise DatasetError(f"data.path: {path} does not exist (expected a jsonl file with "
                           f'{{"{text_key}": ..., "{image_key}": [path]}} lines, or a folder holding metadata.jsonl)')
    base = path.parent
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            src = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Rejected(src, f"malformed json ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield Rejected(src, f"not a json object ({type(obj).__name__})")
                continue
            image = obj.get(image_key)
            if isinstance(image, list):
                image = image[0] if image else None
            if image is not None and not isinstance(image, str):
                yield Rejected(src, f"{image_key!r} is neither a path nor a list of paths", {"text": obj.get(text_key)})
                continue
            if not image:
                yield Rejected(src, "no image", {"text": obj.get(text_key)})
                continue
            p = Path(image).expanduser()
            yield Record(src, obj.get(text_key), path=p if p.is_absolute() else base / p)


def _find_metadata_csv(path: Path) -> Path | None:
    if path.is_file():
        return path
    for cand in (path / "metadata.csv", path / "train" / "metadata.csv"):
        if cand.is_file():
            return cand
    return None


def _read_folder(path: Path, text_key: str, caption: str | None) -> Iterator[Record | Rejected]:
    if not path.exists():
        raise DatasetError(f"data.path: {path} does not exist (expected a folder with images and metadata.csv "
                           "(columns file_name,text), or such a folder's train/ subfolder)")
    meta = _find_metadata_csv(path)
    if meta is None:
        if caption is None:
            raise DatasetError(f"data.path: no metadata.csv in {path} or {path / 'train'} (expected columns "
                               "file_name,text; or set data.caption to caption every image in the folder alike)")
        folder = path / "train" if (path / "train").is_dir() else path
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                yield Record(str(p), None, path=p)
        return
    with open(meta, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "file_name" not in cols or (text_key not in cols and caption is None):
            raise DatasetError(f"{meta}: expected the columns file_name,{text_key} (the tutorial's metadata.csv), "
                               f"found {cols}")
        for row in reader:
            src = f"{meta}:{reader.line_num}"
            name = (row.get("file_name") or "").strip()
            if not name:
                yield Rejected(src, "no image", {"text": row.get(text_key)})
                continue
            p = Path(name).expanduser()
            yield Record(src, row.get(text_key), path=p if p.is_absolute() else meta.parent / p)


def _image_value(value: Any, base: Path) -> tuple[Path | None, bytes | None, str | None]:
    """An image cell as HF/ModelScope store it: bytes, {"bytes", "path"}, or a path string."""
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
        if data:
            return None, bytes(data), name
        value = name
    if isinstance(value, bytes | bytearray | memoryview):
        return (None, bytes(value), None) if len(value) else (None, None, None)
    if isinstance(value, str) and value:
        p = Path(value).expanduser()
        return (p if p.is_absolute() else base / p), None, None
    if hasattr(value, "save") and hasattr(value, "size"):  # an already decoded PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return None, buf.getvalue(), None
    return None, None, None


def _rows_to_records(rows: Iterable[dict[str, Any]], src_prefix: str, base: Path, image_key: str,
                     text_key: str) -> Iterator[Record | Rejected]:
    for i, row in enumerate(rows):
        src = f"{src_prefix}:row {i}"
        p, data, name = _image_value(row.get(image_key), base)
        if p is None and data is None:
            yield Rejected(src, "no image", {"text": row.get(text_key)})
            continue
        yield Record(src, row.get(text_key), path=p, data=data, name=name)


def _check_columns(have: list[str], image_key: str, text_key: str, caption: str | None, where: str) -> None:
    missing = [c for c in (image_key, text_key) if c not in have and not (c == text_key and caption is not None)]
    if missing:
        raise DatasetError(f"{where}: no column {', '.join(map(repr, missing))} (data.image_column / "
                           f"data.text_column); the columns are {have}")


def _read_parquet(path: Path, image_key: str, text_key: str, caption: str | None) -> Iterator[Record | Rejected]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise DatasetError(f"data.path: {path} does not exist (expected a parquet file or a folder of them, "
                           f"with an image column {image_key!r} and a text column {text_key!r})")
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise DatasetError(f"data.path: no *.parquet file in {path}")
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DatasetError(f"{file}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        _check_columns(names, image_key, text_key, caption, str(file))
        cols = [image_key] + ([text_key] if text_key in names else [])

        def rows(pf=pf, cols=cols) -> Iterator[dict[str, Any]]:
            for batch in pf.iter_batches(batch_size=64, columns=cols):
                yield from batch.to_pylist()

        yield from _rows_to_records(rows(), str(file), file.parent, image_key, text_key)


def _offline_reason() -> str | None:
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
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


def _read_modelscope(cfg: ExperimentConfig, cache_dir: Path) -> Iterator[Record | Rejected]:
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
    _check_columns(list(hf.column_names), d.image_column, d.text_column, d.caption, f"dataset {target}")
    cols = [d.image_column] + ([d.text_column] if d.text_column in hf.column_names else [])
    hf = hf.select_columns(cols)
    try:  # keep the encoded bytes / original paths instead of decoding every image to PIL
        hf = hf.cast_column(d.image_column, HFImage(decode=False))
    except Exception:  # noqa: BLE001 - not an image-like column; read it as it is
        pass
    base = Path(target) if d.path is not None else cache_dir
    yield from _rows_to_records(hf, str(target), base, d.image_column, d.text_column)


# materialising ----------------------------------------------------------------------------------------------
_MAGIC = [(b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif")]


def _sniff_ext(head: bytes) -> str:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    for magic, ext in _MAGIC:
        if head.startswith(magic):
            return ext
    return ".bin"


def _ext_for(rec: Record) -> str:
    """Bytes: the format they hold (else the name's suffix); a file: its suffix (else the format it holds)."""
    if rec.data is not None:
        sniffed = _sniff_ext(rec.data[:16])
        suffix = Path(rec.name or "").suffix.lower()
        return suffix if sniffed == ".bin" and suffix else sniffed
    if rec.path.suffix:  # type: ignore[union-attr]
        return rec.path.suffix.lower()  # type: ignore[union-attr]
    try:
        with open(rec.path, "rb") as f:  # type: ignore[arg-type]
            return _sniff_ext(f.read(16))
    except OSError:
        return ""


def _materialise(rec: Record, dst_stem: Path, counts: dict[str, int]) -> Path:
    """Put the record's image at dst_stem + ext (hard link, else copy, else write bytes); return its path.
    A source file that cannot be linked or copied (missing, unreadable) is referenced where it is."""
    dst = dst_stem.with_suffix(_ext_for(rec))
    if rec.data is not None:
        dst.write_bytes(rec.data)
        counts["written"] += 1
        return dst
    src = rec.path.resolve()  # type: ignore[union-attr]
    if src == dst.resolve():
        counts["generated"] += 1
        return dst
    try:
        os.link(src, dst)
        counts["linked"] += 1
        return dst
    except OSError:
        pass
    try:
        shutil.copyfile(src, dst)
        counts["copied"] += 1
        return dst
    except OSError:
        counts["referenced"] += 1  # the filter's header pass reports why it cannot be read
        return src


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip() or None


def _records(cfg: ExperimentConfig, work: Path, run: RunDir) -> tuple[Iterator[Record | Rejected], str]:
    d = cfg.data
    if d.source == "synthetic":
        s = d.synthetic
        count = min(s.count, d.limit) if d.limit else s.count
        from kolora.synthetic import make_synthetic

        items = make_synthetic(work / "images", count, s.seed, s.min_side, s.max_side)
        return (Record(f"synthetic:{i}", cap, path=p) for i, (p, cap) in enumerate(items)), "synthetic"
    assert d.path is not None or d.source == "modelscope"  # the config schema guarantees it
    if d.source == "jsonl":
        return _read_jsonl(d.path, d.text_column, d.image_column), str(d.path)
    if d.source == "folder":
        return _read_folder(d.path, d.text_column, d.caption), str(d.path)
    if d.source == "parquet":
        return _read_parquet(d.path, d.image_column, d.text_column, d.caption), str(d.path)
    if d.source == "modelscope":
        return _read_modelscope(cfg, run.root / ".cache" / "modelscope"), str(d.path or d.dataset_id)
    raise DatasetError(f"data.source: unknown source {d.source!r}")


def run(cfg: ExperimentConfig, run: RunDir) -> dict[str, Any]:
    """Read cfg.data's source into run.data (images/, metadata.jsonl, rejected.jsonl); return a summary."""
    t0 = time.perf_counter()
    d = cfg.data
    counts = {"linked": 0, "copied": 0, "written": 0, "generated": 0, "referenced": 0}
    with atomic_dir(run.data) as work:
        (work / "images").mkdir()
        records, where = _records(cfg, work, run)
        samples: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for rec in records:
            if isinstance(rec, Rejected):
                rejected.append({"source": rec.source, "reason": rec.reason, **{k: v for k, v in rec.extra.items()
                                                                                 if v is not None}})
                continue
            text = d.caption if d.caption is not None else _text(rec.text)
            if text is None:
                rejected.append({"source": rec.source, "reason": "missing text",
                                 "image": str(rec.path) if rec.path else rec.name})
                continue
            sid = f"{len(samples):06d}"
            path = _materialise(rec, work / "images" / sid, counts)
            samples.append({"id": sid, "text": text, "image": [str(run.data / path.relative_to(work))
                                                               if path.is_relative_to(work) else str(path)]})
            if d.limit and len(samples) >= d.limit:
                break
        if not samples:
            shown = "; ".join(f"{r['source']}: {r['reason']}" for r in rejected[:5])
            raise DatasetError(
                f"data: no usable sample in {where} (data.source {d.source!r}: expected "
                f"{_EXPECTED[d.source]})" + (f"; {len(rejected)} record(s) rejected, e.g. {shown}" if rejected else ""))
        atomic_write_text(work / "metadata.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        atomic_write_text(work / "rejected.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
    summary = {"source": d.source, "path": where, "samples": len(samples), "rejected": len(rejected),
               **{k: v for k, v in counts.items() if v}, "seconds": round(time.perf_counter() - t0, 2)}
    run.mark_complete("ingest", cfg, **summary)
    return summary


_EXPECTED = {
    "synthetic": "data.synthetic.count >= 1",
    "jsonl": 'lines like {"text": "...", "image": ["path"]}',
    "folder": "images plus metadata.csv with columns file_name,text",
    "parquet": "rows with an image (bytes or {bytes, path}) and a text column",
    "modelscope": "rows with an image and a text column",
}


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Read a metadata.jsonl / rejected.jsonl written by this stage."""
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
