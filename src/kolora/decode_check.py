"""Full-decode verification of the images the header pass accepted, on the filter's CPU job.

The header pass (kolora.filter.check_image) judges complete JPEG/PNG files from their header and end marker,
so a file whose header and end marker are intact but whose pixel data is not decodable passes it; the cache
stage would then die on it on a GPU node. Here every such image is decoded the way the cache stage decodes
it (PIL open, load, convert("RGB")) with truncated data an error (PIL's LOAD_TRUNCATED_IMAGES off) and more
than PIL's MAX_IMAGE_PIXELS a rejection (a decompression bomb is a reason, not a warning), in a process pool
sized to the job's CPUs. The pool checks the stop flag between chunks (kolora.interrupt).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from kolora import interrupt

CHUNK = 16  # images per pool task: small enough to stop quickly, large enough to amortise the pickling
SERIAL_BELOW = 2 * CHUNK  # fewer images than this are decoded in this process (a pool costs ~0.3 s to start)


def job_cpus() -> int:
    """CPUs this job may use: Slurm's SLURM_CPUS_PER_TASK, else the process's CPU affinity."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def decode_reason(path: str, max_pixels: int | None) -> str | None:
    """Why the image at `path` cannot be decoded as the cache stage decodes it; None when it can."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES  # Data-Juicer sets it process-wide; restored below
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    return (f"decompression bomb ({w}x{h} = {w * h} pixels > PIL's MAX_IMAGE_PIXELS "
                            f"{max_pixels})")
                im.load()
                im.convert("RGB")
    except FileNotFoundError:
        return "missing file (removed after the header pass)"
    except UnidentifiedImageError:
        return "not an image (full decode)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"decompression bomb ({e})"
    except MemoryError:
        return "does not decode (out of memory)"
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        msg = str(e).strip() or e.__class__.__name__
        kind = "truncated image" if "truncated" in msg else "corrupt pixel data"
        return f"{kind} (full decode: {e.__class__.__name__}: {msg})"[:300]
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    return None


def _decode_chunk(paths: Sequence[str], max_pixels: int | None) -> list[str | None]:
    return [decode_reason(p, max_pixels) for p in paths]


def _worker_init() -> None:
    # The stop signals are the parent's to act on (it stops handing out chunks); a worker finishes its chunk.
    for s in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)


def _stopped(done: int, total: int) -> interrupt.Interrupted:
    return interrupt.Interrupted(f"filter stopped while verifying decodes ({done} of {total} images) on "
                                 f"{interrupt.requested()}; run it again to redo the stage")


def verify(paths: Sequence[str], workers: int | None = None,
           progress: Callable[[int, int], None] | None = None) -> list[str | None]:
    """The decode reason of every path (None: decodes), in order; raises interrupt.Interrupted on a stop
    request. `workers` defaults to the job's CPUs; small inputs are decoded in this process."""
    from PIL import Image

    max_pixels = Image.MAX_IMAGE_PIXELS  # read here: a spawned worker would not see a changed value
    total = len(paths)
    workers = min(workers or job_cpus(), -(-total // CHUNK) or 1)
    reasons: list[str | None] = [None] * total
    if workers <= 1 or total < SERIAL_BELOW:
        for i, p in enumerate(paths):
            if interrupt.requested() is not None:
                raise _stopped(i, total)
            reasons[i] = decode_reason(p, max_pixels)
        return reasons
    # spawn: the parent may hold threads (Data-Juicer, torch) that a fork would copy mid-lock
    ctx = multiprocessing.get_context("spawn")
    starts = list(range(0, total, CHUNK))
    done = 0
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        pending: dict[Future[list[str | None]], int] = {}
        nxt = 0
        try:
            while nxt < len(starts) or pending:
                while nxt < len(starts) and len(pending) < 2 * workers:  # a bounded window: stop fast
                    s = starts[nxt]
                    pending[pool.submit(_decode_chunk, paths[s:s + CHUNK], max_pixels)] = s
                    nxt += 1
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    s = pending.pop(fut)
                    chunk = fut.result()
                    reasons[s:s + len(chunk)] = chunk
                    done += len(chunk)
                if progress:
                    progress(done, total)
                if interrupt.requested() is not None and (nxt < len(starts) or pending):
                    raise _stopped(done, total)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return reasons


def verify_samples(good: list[dict[str, Any]], report: dict[str, dict[str, Any]],
                   workers: int | None = None) -> list[dict[str, Any]]:
    """The filter's hook: fully decode the image of every sample the header pass kept; a sample that does
    not decode gets its reason in `report` (stage "decode") and leaves the list, which is returned."""
    reasons = verify([g["image"][0] for g in good], workers)
    kept = []
    for g, reason in zip(good, reasons, strict=True):
        if reason is None:
            kept.append(g)
        else:
            report[g["id"]].update(reason=reason, stage="decode")
    return kept
