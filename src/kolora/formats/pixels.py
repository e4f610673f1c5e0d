"""Is a decoded image a picture? Checked before any PNG is written (render tiles, validation samples).

diffusers' image processor turns nan pixels into 0 when it makes a PIL image, so a float16 overflow in the
UNet or the VAE would be written as a black tile that looks like a result; a decode that saturated comes out
as one flat colour. Both are caught here, on the decoded numbers, before they become a PNG.
"""

from __future__ import annotations

from typing import Any

# numpy: imported in the functions that use them (a login node's CLI starts without them)


def problem(image: Any) -> str | None:
    """What is wrong with `image` ([H, W, C] floats in [0, 1], diffusers' output_type="np"), or None."""
    import numpy as np

    image = np.asarray(image)
    bad = int((~np.isfinite(image)).sum())
    if bad:
        return f"decoded to {bad:,} non-finite values (nan or inf) of {image.size:,}"
    as_png = (image * 255).round().astype(np.uint8)  # what diffusers' numpy_to_pil writes
    if (as_png == as_png[:1, :1]).all():
        return f"decoded to one flat colour (every pixel {tuple(int(v) for v in as_png[0, 0])})"
    return None
