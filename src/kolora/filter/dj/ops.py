"""Header-only Data-Juicer operators for the tutorial's two shape filters.

Data-Juicer's `image_shape_filter` and `image_aspect_ratio_filter` get width and height by fully decoding every
image (`mm_utils.load_image`: `datasets.Image().decode_example` + `.convert("RGB")`, ~120 images/s per core for
1-2 MP JPEGs). The two operators here are subclasses of those built-ins that read the same numbers from the
file header instead; everything else -- arguments, stats keys, bounds, any/all, no-image samples -- is the
built-in code. They register in Data-Juicer's own registry, so they run inside Data-Juicer (default and Ray
executors, tracer, stats export) and a config swaps them by name:

    image_shape_filter         -> image_shape_header_filter
    image_aspect_ratio_filter  -> image_aspect_ratio_header_filter

What `load_image` returns, and so what is reproduced here (datasets 4.8 / Pillow 13 / Data-Juicer 1.6.1):
- a path: `decode_example` opens the file, loads it and, when EXIF (or XMP) carries an Orientation tag, applies
  `ImageOps.exif_transpose`: orientations 5-8 swap width and height, 2-4 keep them.
- bytes (the sample's `image_bytes` field, when present): `PIL.Image.open(BytesIO(...))` only -- no EXIF
  transpose, so the raw header size.
- PNG can keep eXIf/text chunks after the pixel data; Pillow only reads them when it decodes. A PNG with any
  metadata chunk after its first IDAT, a format other than JPEG/MPO/PNG/WEBP, or a non-local path falls back
  to `load_image` itself, so the answer is always the built-in's.
Difference by design: a file whose header is fine but whose pixel data is corrupt is not read to the end here
(the built-in raises on it). kolora's filter stage checks every file before Data-Juicer runs (filter.check_image).

Importing this module registers the ops (kolora's filter stage does). It imports nothing from kolora, so a plain
Data-Juicer config can load it too: `custom_operator_paths: [<path to this file>]`.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
import PIL.Image
from data_juicer.ops.base_op import OPERATORS
from data_juicer.ops.filter.image_aspect_ratio_filter import ImageAspectRatioFilter
from data_juicer.ops.filter.image_shape_filter import ImageShapeFilter
from data_juicer.utils.constant import Fields, StatsKeys
from data_juicer.utils.mm_utils import load_image, load_mm_bytes_from_sample
from datasets.utils.file_utils import is_local_path

# built-in name -> header-only equivalent (kolora's filter stage swaps them unless filter.fast_ops is false)
HEADER_OPS = {
    "image_shape_filter": "image_shape_header_filter",
    "image_aspect_ratio_filter": "image_aspect_ratio_header_filter",
}

_HEADER_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})
# ImageOps.exif_transpose: 5 TRANSPOSE, 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90 swap the sides
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA_CHUNKS = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})


def _png_metadata_before_pixels(f: Any) -> bool:
    """True when no chunk Pillow would read into `info` only while decoding (eXIf / text chunks after the
    first IDAT) exists, i.e. the header already holds everything `getexif()` can see. Skips chunk bodies by
    seeking; any oddity answers False (the caller then decodes, as the built-in does)."""
    f.seek(0)
    if f.read(8) != _PNG_SIGNATURE:
        return False
    seen_idat = False
    while True:
        head = f.read(8)
        if len(head) < 8:
            return False  # no IEND: let the decoder judge it
        length, cid = struct.unpack(">I4s", head)
        if cid == b"IEND":
            return True
        if cid == b"IDAT":
            seen_idat = True
        elif seen_idat and cid in _PNG_METADATA_CHUNKS:
            return False
        f.seek(length + 4, io.SEEK_CUR)  # body + CRC


def _oriented(im: PIL.Image.Image, exif: PIL.Image.Exif) -> tuple[int, int]:
    w, h = im.size
    orientation = exif.get(PIL.Image.ExifTags.Base.Orientation)
    if orientation is not None and orientation in _SWAPPING_ORIENTATIONS:
        return h, w
    return w, h


def image_size(path_or_bytes: str | bytes) -> tuple[int, int]:
    """(width, height) of `data_juicer.utils.mm_utils.load_image(path_or_bytes)`, from the header when the
    format allows it, else from `load_image` itself."""
    if isinstance(path_or_bytes, bytes):  # load_image: PIL.Image.open(BytesIO(b)).convert("RGB"), no EXIF
        with PIL.Image.open(io.BytesIO(path_or_bytes)) as im:
            if im.format in _HEADER_FORMATS:
                return im.size
        return load_image(path_or_bytes).size
    if not is_local_path(path_or_bytes):  # datasets downloads remote files; leave that to it
        return load_image(path_or_bytes).size
    with open(path_or_bytes, "rb") as f, PIL.Image.open(f) as im:
        if im.format == "PNG":
            if not _png_metadata_before_pixels(f):
                return load_image(path_or_bytes).size
            # PngImageFile.getexif() decodes the image when info has no "exif"; the base method reads the
            # same info (eXIf, "Raw profile type exif", XMP) without decoding, and info is complete here.
            return _oriented(im, PIL.Image.Image.getexif(im))
        if im.format in _HEADER_FORMATS:  # EXIF / XMP are parsed at open for these
            return _oriented(im, im.getexif())
    return load_image(path_or_bytes).size


def image_sizes(sample: dict[str, Any], context: bool, keys: list[str], bytes_key: str | None,
                sample_idx: int | None = None) -> dict[str, tuple[int, int]]:
    """{image key: (width, height)} with the lookup order of `mm_utils.load_data_with_context`: an image a
    fused op already loaded into the context, else the sample's bytes, else the file. Unlike it, nothing is
    stored into the context (there is no decoded image to share)."""
    ctx: Any = {}
    if context:
        ctx = sample[Fields.context]
        if sample_idx is not None and isinstance(ctx, list) and sample_idx < len(ctx):
            ctx = ctx[sample_idx]
    sizes: dict[str, tuple[int, int]] = {}
    for idx, key in enumerate(keys):
        if context and key in ctx:
            sizes[key] = (ctx[key].width, ctx[key].height)
        elif key not in sizes:
            data = load_mm_bytes_from_sample(sample, idx, bytes_key, sample_idx)
            sizes[key] = image_size(data if data is not None else key)
    return sizes


class _InProcessWhenSerial:
    """Run the op's dataset passes in the calling process when Data-Juicer gives it one process.

    Data-Juicer passes `num_proc=1` to `datasets.map`/`filter`, and datasets then starts a pool of one worker
    for each pass (fork, dill-pickle the op, write and read back an Arrow shard): ~0.15 s per pass, four passes
    per filter -- more than reading 2,000 headers (~0.12 s). `num_proc=None` is datasets' in-process path.
    Only `run` (the default executor's entry) sees it; everything else that asks `runtime_np` (op fusion, the
    adaptive batch-size probe) still gets Data-Juicer's integer, and np > 1 keeps its worker pool."""

    _serial_in_process = False

    def runtime_np(self):
        return None if self._serial_in_process else super().runtime_np()

    def run(self, dataset, *args, **kwargs):
        if super().runtime_np() != 1:
            return super().run(dataset, *args, **kwargs)
        self._serial_in_process = True
        try:
            return super().run(dataset, *args, **kwargs)
        finally:
            self._serial_in_process = False


class ImageShapeHeaderFilter(_InProcessWhenSerial, ImageShapeFilter):
    """`image_shape_filter` (same arguments, stats `image_width`/`image_height`, same kept samples) reading
    width and height from the image header instead of decoding the image."""

    def compute_stats_single(self, sample, context=False):
        stats = sample[Fields.stats]
        if StatsKeys.image_width in stats and StatsKeys.image_height in stats:
            return sample
        if self.image_key not in sample or not sample[self.image_key]:
            stats[StatsKeys.image_width] = np.array([], dtype=np.int64)
            stats[StatsKeys.image_height] = np.array([], dtype=np.int64)
            return sample
        keys = sample[self.image_key]
        sizes = image_sizes(sample, context, keys, self.image_bytes_key)
        stats[StatsKeys.image_width] = [sizes[k][0] for k in keys]
        stats[StatsKeys.image_height] = [sizes[k][1] for k in keys]
        return sample


class ImageAspectRatioHeaderFilter(_InProcessWhenSerial, ImageAspectRatioFilter):
    """`image_aspect_ratio_filter` (same arguments, stats `aspect_ratios` = W / H, same kept samples) reading
    width and height from the image header instead of decoding the image."""

    def compute_stats_batched(self, samples, context=False):
        image_list = samples[self.image_key]
        for i, stat in enumerate(samples[Fields.stats]):
            if StatsKeys.aspect_ratios in stat:
                continue
            keys = image_list[i]
            if not keys:
                stat[StatsKeys.aspect_ratios] = np.array([], dtype=np.float64)
                continue
            sizes = image_sizes(samples, context, keys, self.image_bytes_key, sample_idx=i)
            stat[StatsKeys.aspect_ratios] = [sizes[k][0] / sizes[k][1] for k in keys]
        return samples


def _register(name: str, cls: type) -> None:
    """Register once; loading this file a second time under another module name (custom_operator_paths
    beside `import kolora.filter.dj.ops`) replaces our own earlier class, never somebody else's op."""
    existing = OPERATORS.modules.get(name)
    ours = (existing is not None and existing.__qualname__ == cls.__qualname__
            and existing.__module__.rpartition(".")[2] == __name__.rpartition(".")[2])
    if existing is not None and not ours:
        raise KeyError(f"Data-Juicer already has an op named {name!r} ({existing.__module__}.{existing.__qualname__})")
    OPERATORS.register_module(name, cls, force=ours)


_register(HEADER_OPS["image_shape_filter"], ImageShapeHeaderFilter)
_register(HEADER_OPS["image_aspect_ratio_filter"], ImageAspectRatioHeaderFilter)
