"""The filter stage's trainset writer: the kept images as run/trainset/train/<n>.<ext> (hard links where the
file system allows, copies otherwise) and metadata.csv (file_name,text), the tutorial's training format;
written as a whole folder that replaces the previous one atomically."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from kolora.core.rundir import atomic_dir, atomic_write_text
from kolora.ingest.safe_paths import copy_no_wider

_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def write_trainset(kept: list[dict[str, Any]], formats: dict[str, str | None], trainset: Path) -> None:
    with atomic_dir(trainset) as work:
        train = work / "train"
        train.mkdir()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["file_name", "text"])
        for n, rec in enumerate(kept):
            src = Path(rec["image"][0])
            name = f"{n}{_EXT.get(formats.get(rec['id']) or '', src.suffix.lower() or '.img')}"
            try:
                os.link(src, train / name)
            except OSError:
                copy_no_wider(src, train / name)  # a copy is no more readable than its source
            writer.writerow([name, rec["text"]])
        atomic_write_text(train / "metadata.csv", buf.getvalue())
