"""The image hashes of filter.ops' `image_deduplicator`, computed by Data-Juicer's own ImageDeduplicator
(its `compute_hash`: its image loading, its hash string per sample); kolora's filter merge compares them across
shards (kolora.filter.dedup).

Data-Juicer's op gets its hash functions from imagededup (`imagededup.methods.PHash` ...), which it imports
lazily and pip-installs when it is missing. That package's import pulls in torchvision (its CNN method) and
scikit-learn, and torchvision in the environment switches transformers' image processors (the CLIP scorers')
to its backend. The four hash functions Data-Juicer uses are a few lines each, so they are reproduced here from
imagededup 0.3.3 (Apache-2.0: imagededup/methods/hashing.py, utils/image_utils.py) and handed to Data-Juicer's
op in place of imagededup's objects; tests/test_filter_dedup.py compares them with imagededup's own where it
is installed. `whash` needs PyWavelets, as in imagededup.

Imports data_juicer at the top: imported by kolora.filter.dj.runner only when an image_deduplicator runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from data_juicer.ops.base_op import Deduplicator
from data_juicer.ops.deduplicator.document_deduplicator import DocumentDeduplicator
from data_juicer.ops.deduplicator.image_deduplicator import HASH_METHOD, ImageDeduplicator
from data_juicer.utils.constant import HashKeys
from PIL import Image
from scipy.fftpack import dct


class _Hashing:
    """imagededup.methods.hashing.Hashing.encode_image(image_array=...): LANCZOS resize to `target_size`, then
    grayscale, then the method's bit matrix as hex (np.packbits)."""

    target_size: tuple[int, int] = (8, 8)

    def encode_image(self, image_file: Any = None, image_array: np.ndarray | None = None) -> str:
        if not isinstance(image_array, np.ndarray) or image_array.ndim not in (2, 3) or (
                image_array.ndim == 3 and image_array.shape[2] != 3):
            raise ValueError("an image hash needs an (h, w) or (h, w, 3) image array")
        image = Image.fromarray(image_array.astype("uint8")).resize(self.target_size, Image.LANCZOS).convert("L")
        bits = self._hash_algo(np.array(image).astype("uint8"))
        return np.packbits(bits).tobytes().hex()

    def _hash_algo(self, image_array: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class PHash(_Hashing):
    """Perceptual hash: the top-left 8x8 DCT coefficients of the 32x32 image against their median (DC left out
    of the median)."""

    target_size = (32, 32)

    def _hash_algo(self, image_array: np.ndarray) -> np.ndarray:
        coef = dct(dct(image_array, axis=0), axis=1)[:8, :8]
        return coef >= np.median(np.ndarray.flatten(coef)[1:])


class AHash(_Hashing):
    """Average hash: the 8x8 image against its mean."""

    target_size = (8, 8)

    def _hash_algo(self, image_array: np.ndarray) -> np.ndarray:
        return image_array >= np.mean(image_array)


class DHash(_Hashing):
    """Difference hash: each pixel of the 9x8 (w x h) image against its left neighbour."""

    target_size = (9, 8)

    def _hash_algo(self, image_array: np.ndarray) -> np.ndarray:
        return image_array[:, 1:] > image_array[:, :-1]


class WHash(_Hashing):
    """Wavelet hash: the LL coefficients of a level-5 Haar decomposition of the 256x256 image against their
    median."""

    target_size = (256, 256)

    def _hash_algo(self, image_array: np.ndarray) -> np.ndarray:
        import pywt  # PyWavelets: only this method needs it (kolora.filter.dj.runner checks it is there)

        ll = pywt.wavedec2(data=image_array / 255, wavelet="haar", level=5)[0]
        return ll >= np.median(np.ndarray.flatten(ll))


HASHERS: dict[str, type[_Hashing]] = {"phash": PHash, "ahash": AHash, "dhash": DHash, "whash": WHash}
assert set(HASHERS) == set(HASH_METHOD), "Data-Juicer's image_deduplicator methods changed"


class KoloraImageDeduplicator(ImageDeduplicator):
    """Data-Juicer's image_deduplicator (same arguments, same compute_hash) with the hash functions above in
    place of imagededup's: ImageDeduplicator.__init__ minus its `get_hash_method` (the lazy imagededup import)."""

    def __init__(self, method: str = "phash", consider_text: bool = False, *args, **kwargs):
        Deduplicator.__init__(self, *args, **kwargs)
        if method not in HASH_METHOD:
            raise ValueError(f"Keep strategy [{method}] is not supported. Can only be one of {HASH_METHOD}.")
        self.hasher = HASHERS[method]()
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
