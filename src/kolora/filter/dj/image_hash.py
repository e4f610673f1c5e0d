"""The image hashes of filter.ops' `image_deduplicator`, computed by Data-Juicer's own ImageDeduplicator
(its `compute_hash`: its image loading, its hash string per sample); kolora's filter merge compares them across
shards (kolora.filter.dedup).

Data-Juicer's op gets its hash functions from imagededup (`imagededup.methods.PHash` ...), which it imports
lazily and pip-installs when it is missing. That package's import pulls in torchvision (its CNN method) and
scikit-learn, and torchvision in the environment switches transformers' image processors (the CLIP scorers')
to its backend. So the op is handed the same four perceptual hashes from the `ImageHash` package (numpy, scipy,
PyWavelets; no torch) through imagededup's `encode_image(image_array=...)` interface, which is all the op calls.
The bits differ from imagededup's (ImageHash resizes after the greyscale conversion and takes the DC term into
the median), so a hash is only compared with hashes made here, which the filter's merge guarantees.

Imports data_juicer at the top: imported by kolora.filter.dj.runner only when an image_deduplicator runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import imagehash
import numpy as np
from data_juicer.ops.base_op import Deduplicator
from data_juicer.ops.deduplicator.document_deduplicator import DocumentDeduplicator
from data_juicer.ops.deduplicator.image_deduplicator import HASH_METHOD, ImageDeduplicator
from data_juicer.utils.constant import HashKeys
from PIL import Image


class ImageHasher:
    """One ImageHash function (64 bits) behind imagededup's `encode_image(image_array=...)`: 16 hex digits."""

    def __init__(self, method: str):
        self.function = HASHERS[method]

    def encode_image(self, image_file: Any = None, image_array: np.ndarray | None = None) -> str:
        if not isinstance(image_array, np.ndarray) or image_array.ndim not in (2, 3):
            raise ValueError("an image hash needs an (h, w) or (h, w, channels) image array")
        return str(self.function(Image.fromarray(image_array.astype("uint8"))))


HASHERS: dict[str, Callable[[Image.Image], Any]] = {"phash": imagehash.phash, "ahash": imagehash.average_hash,
                                                      "dhash": imagehash.dhash, "whash": imagehash.whash}
assert set(HASHERS) == set(HASH_METHOD), "Data-Juicer's image_deduplicator methods changed"


class KoloraImageDeduplicator(ImageDeduplicator):
    """Data-Juicer's image_deduplicator (same arguments, same compute_hash) with ImageHash's functions in place of
    imagededup's: ImageDeduplicator.__init__ minus its `get_hash_method` (the lazy imagededup import)."""

    def __init__(self, method: str = "phash", consider_text: bool = False, *args, **kwargs):
        Deduplicator.__init__(self, *args, **kwargs)
        if method not in HASH_METHOD:
            raise ValueError(f"Keep strategy [{method}] is not supported. Can only be one of {HASH_METHOD}.")
        self.hasher = ImageHasher(method)
        self.consider_text = consider_text
        self.text_dedup_op = DocumentDeduplicator(**kwargs) if consider_text else None


def image_hashes(args: dict[str, Any], samples: list[dict[str, Any]],
                 before_each: Callable[[int], None] | None = None) -> list[str]:
    """The dedup key of each sample ({"id", "text", "image": [path]}) as Data-Juicer's op computes it: its image
    hash (hex, 16 digits per image), with consider_text the text's md5 after a ':'; "" for a sample without an
    image (never a duplicate, as in Data-Juicer). `before_each(n)` runs before the n-th sample."""
    op = KoloraImageDeduplicator(**{"text_key": "text", "image_key": "image", "skip_op_error": False, **args})
    keys = []
    for n, s in enumerate(samples):
        if before_each is not None:
            before_each(n)
        out = op.compute_hash({"id": s["id"], "text": s["text"], "image": list(s["image"])})
        image_hash = str(out[HashKeys.imagehash])
        keys.append(f"{image_hash}:{out[HashKeys.hash]}" if op.consider_text and image_hash else image_hash)
    return keys
