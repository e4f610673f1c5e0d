"""The filter stage's trainset writer: the kept images as run/trainset/train/<n>.<ext> (hard links where the
file system allows, copies otherwise) and metadata.csv (file_name,text), the tutorial's training format;
written as a whole folder that replaces the previous one atomically. Samples with a loss mask get theirs as
<n>_mask.<ext> and a third column, mask (empty for the others); without any mask the files are as before.
With data.sources a last column, source, names each image's source."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from kolora.core.rundir import atomic_dir, atomic_write_text
from kolora.ingest.safe_paths import copy_no_wider

_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        copy_no_wider(src, dst)  # a copy is no more readable than its source


def write_trainset(kept: list[dict[str, Any]], formats: dict[str, str | None], trainset: Path) -> None:
    with atomic_dir(trainset) as work:
        train = work / "train"
        train.mkdir()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        masked = any(rec.get("mask") for rec in kept)
        sourced = any("source" in rec for rec in kept)  # data.sources: the sampler's repeats go by it
        writer.writerow(["file_name", "text", *(["mask"] if masked else []), *(["source"] if sourced else [])])
        for n, rec in enumerate(kept):
            src = Path(rec["image"][0])
            name = f"{n}{_EXT.get(formats.get(rec['id']) or '', src.suffix.lower() or '.img')}"
            _link_or_copy(src, train / name)
            mask = ""
            if rec.get("mask"):
                mask_src = Path(rec["mask"])
                mask = f"{n}_mask{mask_src.suffix.lower() or '.img'}"
                _link_or_copy(mask_src, train / mask)
            writer.writerow([name, rec["text"], *([mask] if masked else []), *([rec["source"]] if sourced else [])])
        atomic_write_text(train / "metadata.csv", buf.getvalue())
