"""The local dataset sources `data:` can name, read in one place and used three ways:

- `records(data)` yields every source record (the ingest stage materialises them);
- `probe(data)` raises DatasetError for whatever ingest would refuse (no metadata.csv, wrong columns, a file
  that is not UTF-8 or not parquet, no usable record) reading only text files and parquet footers, never an
  image, so `validate` and `submit` run it before anything is queued;
- `check_folder(path)` (`kolora check dataset DIR`) reports every problem: the probe's, each record that
  cannot become a sample, each image that is missing or not an image.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolora.core.config import DataConfig
from kolora.core.errors import InputError, decode_utf8
from kolora.core.files import FileChecker, Report
from kolora.ingest.safe_paths import PathGuard, Unsafe

# pyarrow: imported in the functions that use them (a login node's CLI starts without them)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXPECTED = {
    "synthetic": "data.synthetic.count >= 1",
    "jsonl": 'lines like {"text": "...", "image": ["path"]}',
    "folder": "images plus metadata.csv with columns file_name,text",
    "parquet": "rows with an image (bytes or {bytes, path}) and a text column",
    "modelscope": "rows with an image and a text column",
}
MAX_LISTED = 20  # problems of one kind listed by check_folder before "... and N more"
MASK_COLUMN = "mask"  # a sample's loss mask in a dataset's table: a path (relative like the image's) or bytes
MASK_SUFFIX = "_mask.png"  # ... or a file <image stem>_mask.png beside the image (data.mask: auto)


class DatasetError(InputError):
    """The dataset cannot be read or holds no sample; the message names the path and what was expected."""


class NoAlpha(DatasetError):
    """data.mask: alpha on an image without transparency (ingest refuses it, and the cache stage)."""


def no_alpha(image: str | Path, mode: str, source: str | None = None) -> NoAlpha:
    where = f" ({source})" if source and source != str(image) else ""
    return NoAlpha(f"{image}{where}: data.mask is 'alpha' but this image has no alpha channel (mode {mode}); "
                   "give every image one, or set data.mask: auto (mask files) or none")


def alpha_mode(image: str | Path | bytes) -> str | None:
    """None when the image (a file, or its bytes) carries transparency: an alpha channel, or a palette or colour
    key with transparency, what data.mask: alpha reads (kolora.cache.masks); else its mode ("RGB", "L", ...),
    from its header. None too when it cannot be opened: the filter's header pass reports why."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return None if im.has_transparency_data else im.mode
    except Exception:  # noqa: BLE001 - PIL raises many types for a file that is not an image
        return None


@dataclass
class Record:
    """One source record: a caption and an image given as a local path or as encoded bytes."""

    source: str
    text: Any = None
    path: Path | None = None
    data: bytes | None = None
    name: str | None = None  # the original file name, for the extension of written bytes
    origin_mode: int | None = None  # st_mode of the file holding `data` (parquet): written no more readable
    mask: Record | None = None  # the loss mask its table names, given as an image is (ingest decides: data.mask)


def mask_beside(image: Path) -> Path:
    """Where data.mask: auto looks for an image's mask file when the table names none."""
    return image.with_name(image.stem + MASK_SUFFIX)


@dataclass
class Rejected:
    source: str
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)


def fills_text(d: DataConfig) -> str | None:
    """What the table readers take for a missing text (their `caption` argument): data.caption, or "" when the
    filter job captions samples without one (data.captions: generate | replace); None = a text is required."""
    return "" if d.caption is None and d.captions != "keep" else d.caption


def text_of(rec_text: Any, d: DataConfig) -> str | None:
    """A record's text as ingest keeps it: sample_text, or "" for the captioner (data.captions) when it has none."""
    text = sample_text(rec_text, d.caption)
    return "" if text is None and d.captions != "keep" else text


def sample_text(value: Any, caption: str | None) -> str | None:
    """The caption a record gets: data.caption, else its own text (None when it has none)."""
    if caption is not None:
        return caption
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip() or None


_MAGIC = [(b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif")]


def sniff_ext(head: bytes) -> str:
    """The image format the first 16 bytes announce ('.png', ...), or '.bin'."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    for magic, ext in _MAGIC:
        if head.startswith(magic):
            return ext
    return ".bin"


# jsonl ------------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, text_key: str, image_key: str, masks: bool = False) -> Iterator[Record | Rejected]:
    """`masks`: read each line's mask (data.mask: auto)."""
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise DatasetError(f"data.path: {path} does not exist (expected a jsonl file with "
                           f'{{"{text_key}": ..., "{image_key}": [path]}} lines, or a folder holding metadata.jsonl)')
    base = path.parent
    for n, line in enumerate(decode_utf8(path.read_bytes(), path).splitlines(), 1):
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
        mask = obj.get(MASK_COLUMN) if masks else None
        if isinstance(mask, list):
            mask = mask[0] if mask else None
        if mask is not None and not isinstance(mask, str):
            yield Rejected(src, f"{MASK_COLUMN!r} is neither a path nor a list of paths", {"text": obj.get(text_key)})
            continue
        p = Path(image).expanduser()
        yield Record(src, obj.get(text_key), path=p if p.is_absolute() else base / p,
                     mask=_path_record(src, mask, base))


def _path_record(src: str, value: str | None, base: Path) -> Record | None:
    """A mask named by a path in a table (relative to `base`, as the image's), or None for an empty cell."""
    value = (value or "").strip()
    if not value:
        return None
    p = Path(value).expanduser()
    return Record(src, path=p if p.is_absolute() else base / p)


# folder: images + metadata.csv ------------------------------------------------------------------------------
def _find_metadata_csv(path: Path) -> Path | None:
    if path.is_file():
        if path.suffix.lower() != ".csv":
            with open(path, "rb") as f:
                kind = "an image" if sniff_ext(f.read(16)) != ".bin" else "not a .csv file"
            raise DatasetError(f"data.path: {path} is a file ({kind}); data.source 'folder' needs the folder "
                               "holding the images and metadata.csv (columns file_name,text), or that metadata.csv")
        return path
    for cand in (path / "metadata.csv", path / "train" / "metadata.csv"):
        if cand.is_file():
            return cand
    return None


def _read_folder(path: Path, text_key: str, caption: str | None, masks: bool = False
                 ) -> Iterator[Record | Rejected]:
    """`masks` (data.mask: auto): read metadata.csv's mask column; a folder listed without metadata.csv does not
    take the <stem>_mask.png files of its images as images of their own (they are those images' masks)."""
    if not path.exists():
        raise DatasetError(f"data.path: {path} does not exist (expected a folder with images and metadata.csv "
                           "(columns file_name,text), or such a folder's train/ subfolder)")
    meta = _find_metadata_csv(path)
    if meta is None:
        if caption is None:
            raise DatasetError(f"data.path: no metadata.csv in {path} or {path / 'train'} (expected columns "
                               "file_name,text; or set data.caption to caption every image in the folder alike, or "
                               "data.captions: generate to caption them with a model)")
        folder = path / "train" if (path / "train").is_dir() else path
        images = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        beside = {mask_beside(p) for p in images} if masks else set()
        for p in images:
            if p not in beside:
                yield Record(str(p), None, path=p)
        return
    reader = csv.DictReader(io.StringIO(decode_utf8(meta.read_bytes(), meta), newline=""))
    cols = reader.fieldnames or []
    if "file_name" not in cols or (text_key not in cols and caption is None):
        raise DatasetError(f"{meta}: expected the columns file_name,{text_key} (the tutorial's metadata.csv), "
                           f"found {','.join(cols) or 'no header'}")
    for row in reader:
        src = f"{meta}:{reader.line_num}"
        name = (row.get("file_name") or "").strip()
        if not name:
            yield Rejected(src, "no image", {"text": row.get(text_key)})
            continue
        p = Path(name).expanduser()
        yield Record(src, row.get(text_key), path=p if p.is_absolute() else meta.parent / p,
                     mask=_path_record(src, row.get(MASK_COLUMN) if masks else None, meta.parent))


# parquet ----------------------------------------------------------------------------------------------------
def image_value(value: Any, base: Path) -> tuple[Path | None, bytes | None, str | None]:
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


def rows_to_records(rows: Iterable[dict[str, Any]], src_prefix: str, base: Path, image_key: str,
                    text_key: str, start: int = 0) -> Iterator[Record | Rejected]:
    """Records of table rows; `start`: the number of the first row (rows of a shard)."""
    for i, row in enumerate(rows, start):
        src = f"{src_prefix}:row {i}"
        p, data, name = image_value(row.get(image_key), base)
        if p is None and data is None:
            yield Rejected(src, "no image", {"text": row.get(text_key)})
            continue
        mp, mdata, mname = image_value(row.get(MASK_COLUMN) if image_key != MASK_COLUMN else None, base)
        mask = Record(src, path=mp, data=mdata, name=mname) if mp is not None or mdata is not None else None
        yield Record(src, row.get(text_key), path=p, data=data, name=name, mask=mask)


def check_columns(have: list[str], image_key: str, text_key: str, caption: str | None, where: str) -> None:
    missing = [c for c in (image_key, text_key) if c not in have and not (c == text_key and caption is not None)]
    if missing:
        raise DatasetError(f"{where}: no column {', '.join(map(repr, missing))} (data.image_column / "
                           f"data.text_column); the columns are {have}"
                           + ("; without captions, data.captions: generate captions the images with a model"
                              if missing == [text_key] else ""))


def _parquet_files(path: Path, image_key: str, text_key: str, caption: str | None) -> list[tuple[Path, Any]]:
    """Every parquet file of data.path, opened (footer and schema only) and its columns checked."""
    import pyarrow.parquet as pq

    if not path.exists():
        raise DatasetError(f"data.path: {path} does not exist (expected a parquet file or a folder of them, "
                           f"with an image column {image_key!r} and a text column {text_key!r})")
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise DatasetError(f"data.path: no *.parquet file in {path}")
    opened = []
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DatasetError(f"{file}: not a readable parquet file ({e})") from None
        check_columns(pf.schema_arrow.names, image_key, text_key, caption, str(file))
        opened.append((file, pf))
    return opened


def parquet_rows(path: Path, image_key: str, text_key: str, caption: str | None) -> int:
    """Rows of data.path's parquet files, from their footers."""
    return sum(pf.metadata.num_rows for _, pf in _parquet_files(path, image_key, text_key, caption))


def _row_groups(pf: Any, start: int, end: int) -> tuple[list[int], int]:
    """The row groups of a parquet file holding its rows [start, end), and the number of their first row."""
    groups, first, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < end and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    return groups, first or 0


def _read_parquet(path: Path, image_key: str, text_key: str, caption: str | None,
                  rows: tuple[int, int] | None = None, masks: bool = False) -> Iterator[Record | Rejected]:
    """Every row's record; with `rows` = [a, b), only rows a..b-1 counted over the files in order, reading
    only the row groups that hold them (an ingest shard). `masks`: read the mask column too, if any."""
    offset = 0
    for file, pf in _parquet_files(path, image_key, text_key, caption):
        cols = [image_key] + ([text_key] if text_key in pf.schema_arrow.names else [])
        if masks and MASK_COLUMN in pf.schema_arrow.names and MASK_COLUMN not in cols:
            cols.append(MASK_COLUMN)
        count = pf.metadata.num_rows
        start, end = (0, count) if rows is None else (max(rows[0] - offset, 0), min(rows[1] - offset, count))
        offset += count
        if start >= end:
            continue
        groups, first = _row_groups(pf, start, end)

        def table_rows(pf=pf, cols=cols, groups=groups, first=first, start=start, end=end):
            number = first
            for batch in pf.iter_batches(batch_size=64, columns=cols, row_groups=groups):
                for row in batch.to_pylist():
                    if start <= number < end:
                        yield row
                    number += 1

        mode = file.stat().st_mode
        for rec in rows_to_records(table_rows(), str(file), file.parent, image_key, text_key, start):
            if isinstance(rec, Record):
                rec.origin_mode = mode
                if rec.mask is not None:
                    rec.mask.origin_mode = mode
            yield rec


# the three uses ---------------------------------------------------------------------------------------------
def records(d: DataConfig, rows: tuple[int, int] | None = None) -> Iterator[Record | Rejected]:
    """Every record of a local folder, jsonl or parquet source (synthetic and modelscope live in ingest);
    `rows`: only those rows of a parquet source (an ingest shard)."""
    assert d.path is not None  # the config schema guarantees it for these sources
    masks = d.mask == "auto"
    if d.source == "jsonl":
        return _read_jsonl(d.path, d.text_column, d.image_column, masks)
    if d.source == "folder":
        return _read_folder(d.path, d.text_column, fills_text(d), masks)
    if d.source == "parquet":
        return _read_parquet(d.path, d.image_column, d.text_column, fills_text(d), rows, masks)
    raise DatasetError(f"data.source: {d.source!r} is not a local file source")


def no_sample_error(d: DataConfig, where: str, rejected: list[dict[str, Any]]) -> DatasetError:
    shown = "; ".join(f"{r['source']}: {r['reason']}" for r in rejected[:5])
    return DatasetError(f"data: no usable sample in {where} (data.source {d.source!r}: expected "
                        f"{EXPECTED[d.source]})" + (f"; {len(rejected)} record(s) rejected, e.g. {shown}"
                                                    if rejected else "")
                        + ("; for images without captions, data.captions: generate captions them with a model"
                           if any(r["reason"] == "missing text" for r in rejected) else ""))


def probe(d: DataConfig) -> None:
    """Raise DatasetError for what ingest would refuse; reads text files and parquet footers, no image."""
    if d.source == "synthetic" or d.path is None:
        return
    if d.source == "modelscope":
        if not d.path.exists():
            raise DatasetError(f"data.path: {d.path} does not exist (a folder made by `modelscope download "
                               f"--dataset ...`); fix the path or download the dataset first")
        return
    if not d.path.exists():
        raise DatasetError(f"data.path: {d.path} does not exist (data.source {d.source!r}: expected "
                           f"{EXPECTED[d.source]}); fix the path or download the dataset first")
    if d.source == "parquet":
        if parquet_rows(d.path, d.image_column, d.text_column, fills_text(d)) == 0:
            raise DatasetError(f"data.path: the parquet data in {d.path} has no rows")
        return
    rejected: list[dict[str, Any]] = []
    for rec in records(d):
        if isinstance(rec, Rejected):
            rejected.append({"source": rec.source, "reason": rec.reason})
        elif text_of(rec.text, d) is not None:
            return
        else:
            rejected.append({"source": rec.source, "reason": "missing text"})
    raise no_sample_error(d, str(d.path), rejected)


def detect_source(path: Path) -> dict[str, str]:
    """The `data:` lines for a dataset folder: a tutorial folder, a metadata.jsonl, else a ModelScope download."""
    if (path / "metadata.csv").is_file() or (path / "train" / "metadata.csv").is_file():
        return {"source": "folder", "path": str(path)}
    if (path / "metadata.jsonl").is_file():
        return {"source": "jsonl", "path": str(path / "metadata.jsonl")}
    return {"source": "modelscope", "path": str(path)}


def check_folder(path: Path) -> Report:
    """`kolora check dataset DIR`: every file intact (images by their first bytes, parquet/JSON/safetensors by
    their headers), the probe, and each record that cannot become a sample or names a missing image."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist or is not a folder")
    report = Report(root=path, kind="dataset")
    checker = FileChecker(report)
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts)]
    if not files:
        report.problems.append(f"no files in {path}")
    for p in files:
        if checker.file(p) and p.suffix.lower() in IMAGE_SUFFIXES:
            _check_image_head(p, checker.rel(p), report.problems)
    lines = detect_source(path)
    report.config["data"] = lines
    if lines["source"] in ("folder", "jsonl"):
        d = DataConfig(source=lines["source"], path=Path(lines["path"]))
        try:
            probe(d)
            _check_records(d, path, checker, report.problems)
        except DatasetError as e:
            report.problems.append(str(e))
    return report


def _check_image_head(p: Path, label: str, problems: list[str]) -> bool:
    with open(p, "rb") as f:
        head = f.read(16)
    if sniff_ext(head) == ".bin":
        problems.append(f"{label}: not an image (its first bytes are {head[:8]!r}, not PNG/JPEG/GIF/BMP/TIFF/WebP)")
        return False
    return True


def _check_records(d: DataConfig, root: Path, checker: FileChecker, problems: list[str]) -> None:

    guard = PathGuard(root, allow_external=False, max_bytes=d.max_image_bytes)  # ingest's rules, by default
    found: list[str] = []
    for rec in records(d):
        if isinstance(rec, Rejected):
            found.append(f"{checker.rel(Path(rec.source))}: {rec.reason}")
        elif text_of(rec.text, d) is None:
            found.append(f"{checker.rel(Path(rec.source))}: no text")
        elif rec.path is not None:
            try:
                _, st = guard.check(rec.path)
            except Unsafe as e:  # the images inside the folder were checked above
                found.append(f"{checker.rel(Path(rec.source))}: image {rec.path}: {e}")
                continue
            if st is None:
                found.append(f"{checker.rel(Path(rec.source))}: image {rec.path} does not exist")
            if rec.mask is not None and rec.mask.path is not None:  # the mask its table names
                try:
                    _, st = guard.check(rec.mask.path)
                except Unsafe as e:
                    found.append(f"{checker.rel(Path(rec.source))}: mask {rec.mask.path}: {e}")
                    continue
                if st is None:
                    found.append(f"{checker.rel(Path(rec.source))}: mask {rec.mask.path} does not exist")
    problems += found[:MAX_LISTED]
    if len(found) > MAX_LISTED:
        problems.append(f"... and {len(found) - MAX_LISTED} more records with problems")
