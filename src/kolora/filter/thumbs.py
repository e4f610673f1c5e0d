"""Thumbnails of samples for the filter report (kolora.filter.report_page), made on the filter's CPU job:

    filter/thumbs/<sample id>-<source key>.jpg   JPEG, at most SIDE pixels on the long side, EXIF orientation
                                                applied (the sides the filter's ops judged)

The source key is a digest of the image's path, size and modification time: a thumbnail is made once and
remade only when its image changed. Only images that passed the full decode (kolora.filter.decode: in worker
processes) are decoded here; one the header pass or the decode rejected is not opened again (a decoder crash
would take the job with it) and has no thumbnail. Thumbnails no page shows are removed (`prune`)."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from pathlib import Path

from kolora.core.rundir import TEMP_MARK, atomic_write_bytes
from kolora.filter.decode import bombs_are_errors

# PIL: imported in the functions that use them (a login node's CLI starts without them)

SIDE = 128
QUALITY = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def path_for(folder: Path, sample_id: str, image: Path) -> Path | None:
    """Where the thumbnail of `image` (sample `sample_id`) is kept; None when the image cannot be stat'ed."""
    try:
        st = image.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{image}\0{st.st_size}\0{st.st_mtime_ns}\0{SIDE}\0{QUALITY}".encode()).hexdigest()[:12]
    return folder / f"{_UNSAFE.sub('_', sample_id)}-{key}.jpg"


def jpeg_thumbnail(image: Path) -> bytes | None:
    """The thumbnail's JPEG bytes; None when the image does not open or decode (or is bigger than PIL allows)."""
    from PIL import Image, ImageOps

    try:
        with bombs_are_errors(), Image.open(image) as im:
            im.draft("RGB", (SIDE, SIDE))  # JPEG: decode at 1/2..1/8 scale, enough for a thumbnail
            im = ImageOps.exif_transpose(im)
            im.thumbnail((SIDE, SIDE))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (200, 200, 200))  # transparency on grey, as a viewer shows it
                flat.paste(rgba, mask=rgba.getchannel("A"))
                im = flat
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=QUALITY)
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - a sample without a thumbnail is shown without one (PIL raises many kinds)
        return None


def ensure(folder: Path, sample_id: str, image: str | Path | None) -> Path | None:
    """The thumbnail of a sample's image, made when missing; None when there is none to make."""
    if not image:
        return None
    path = path_for(folder, sample_id, Path(image))
    if path is None:
        return None
    if path.is_file():
        return path
    data = jpeg_thumbnail(Path(image))
    if data is None:
        return None
    atomic_write_bytes(path, data)
    return path


def prune(folder: Path, keep: Iterable[Path]) -> int:
    """Remove the thumbnails (and killed writers' temp files) not in `keep`; returns how many."""
    wanted = {p.name for p in keep}
    gone = 0
    for p in folder.glob("*.jpg*") if folder.is_dir() else ():
        if p.name not in wanted and (p.suffix == ".jpg" or TEMP_MARK in p.name):
            p.unlink(missing_ok=True)
            gone += 1
    return gone
