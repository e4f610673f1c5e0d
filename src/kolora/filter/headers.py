"""The filter stage's header pass: is an image file there, readable, an image, and complete? Cheap for the
common case (a JPEG/PNG whose end marker is where its format says): the header and the last bytes are read,
nothing is decoded; anything else is fully decoded with PIL's truncation errors on. See kolora.filter.stage."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from kolora.filter.decode import bombs_are_errors

# PIL: imported in the functions that use them (a login node's CLI starts without them)

_TAIL = 64  # bytes read from the end of a file to find the JPEG EOI / PNG IEND marker


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated data even after Data-Juicer set LOAD_TRUNCATED_IMAGES=True globally."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _ends_complete(fmt: str | None, f: io.BufferedReader, size: int) -> bool:
    """True when the file visibly ends where its format says it ends (cheap: reads the last bytes)."""
    if fmt not in ("JPEG", "PNG"):
        return False
    f.seek(max(0, size - _TAIL))
    tail = f.read()
    if fmt == "JPEG":
        return tail.rstrip(b"\x00").endswith(b"\xff\xd9")
    return tail.endswith(b"IEND\xaeB`\x82")


class ImageCheck(NamedTuple):
    reason: str | None  # None: a good file
    size: tuple[int, int] | None
    format: str | None = None  # PIL's name: JPEG, PNG, WEBP, ...


def check_image(path: str | Path) -> ImageCheck:
    """(reason, (width, height), format) for one image file; reason is None for a good file.

    JPEG/PNG files that end with their end marker are judged from the header alone; anything else (other
    formats, trailing bytes after the end marker, a missing end marker) is fully decoded with truncation
    errors on, so a truncated file is always caught and an odd-but-valid one is never rejected."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return ImageCheck("missing file", None)
    except OSError as e:
        return ImageCheck(f"unreadable file ({e.strerror or e})", None)
    if not p.is_file():
        return ImageCheck("not a file", None)
    if st.st_size == 0:
        return ImageCheck("empty file", None)
    try:
        with bombs_are_errors(), open(p, "rb") as f, Image.open(f) as im:
            size, fmt = im.size, im.format
            if _ends_complete(fmt, f, st.st_size):
                return ImageCheck(None, size, fmt)
            f.seek(0)
            try:
                with _strict_truncation():
                    im.load()
            except OSError as e:
                if "truncated" in str(e) or "broken data stream" in str(e):
                    return ImageCheck("truncated image", size, fmt)
                return ImageCheck(f"corrupt image ({e})", size, fmt)
            return ImageCheck(None, size, fmt)
    except UnidentifiedImageError:
        return ImageCheck("not an image", None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return ImageCheck(f"decompression bomb ({e})", None)
    except PermissionError as e:
        return ImageCheck(f"unreadable file ({e.strerror})", None)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return ImageCheck(f"corrupt image ({e.__class__.__name__}: {e})", None)
