"""Full-decode verification of the images the header pass accepted, on the filter's CPU job.

The header pass (kolora.filter.stage.check_image) judges complete JPEG/PNG files from their header and end marker,
so a file whose header and end marker are intact but whose pixel data is not decodable passes it; the cache
stage would then die on it on a GPU node. Here every such image is decoded the way the cache stage decodes
it (PIL open, load, convert("RGB")) with truncated data an error (PIL's LOAD_TRUNCATED_IMAGES off) and more
than PIL's MAX_IMAGE_PIXELS a rejection (a decompression bomb is a reason, not a warning), in worker
processes sized to the job's CPUs; the parent checks the stop flag between images
(kolora.core.interrupt) and ends the workers on a stop request. A worker that dies (a decoder crash, the OOM
killer) costs the image it was decoding, rejected with that reason; the rest go to new workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kolora.core import interrupt

# PIL: imported in the functions that use them (a login node's CLI starts without them)

CHUNK = 16  # at least this many images per worker process (one costs ~0.2 s to start)
SERIAL_BELOW = 2 * CHUNK  # fewer images than this are decoded in this process


def job_cpus() -> int:
    """CPUs this job may use: Slurm's SLURM_CPUS_PER_TASK, else the process's CPU affinity."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def bombs_are_errors() -> Iterator[None]:
    """PIL's DecompressionBombWarning (more than MAX_IMAGE_PIXELS, less than twice that) raised as an error."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def decode_reason(path: str, max_pixels: int | None) -> str | None:
    """Why the image at `path` cannot be decoded as the cache stage decodes it; None when it can."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES  # Data-Juicer sets it process-wide; restored below
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with bombs_are_errors():
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


def _worker_main() -> None:
    """`python -m kolora.filter.decode MAX_PIXELS`: decode the paths of a JSON list on stdin, print one JSON
    line [index, reason] per image as it is done (after a [-1, "ready"] line)."""
    # The stop signals, and a terminal's Ctrl-C, are the parent's to act on (it ends the workers); a worker
    # just decodes.
    interrupt.shield_worker()
    from PIL import Image

    max_pixels = Image.MAX_IMAGE_PIXELS = None if sys.argv[1] == "none" else int(sys.argv[1])
    print(json.dumps([-1, "ready"]), flush=True)  # imports done: a death from here on is an image's
    for i, path in enumerate(json.load(sys.stdin)):
        print(json.dumps([i, decode_reason(path, max_pixels)]), flush=True)


def _stopped(done: int, total: int) -> interrupt.Interrupted:
    return interrupt.Interrupted(f"filter stopped while verifying decodes ({done} of {total} images) on "
                                 f"{interrupt.requested()}; run it again to redo the stage")


def _start_worker(paths: Sequence[str], max_pixels: int | None) -> subprocess.Popen[str]:
    # A fresh interpreter, not a fork (the parent may hold threads: Data-Juicer, torch) nor multiprocessing's
    # spawn (which re-runs the parent's __main__ script).
    import kolora

    env = dict(os.environ)
    src = str(Path(kolora.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen([sys.executable, "-m", "kolora.filter.decode", str(max_pixels or "none")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(list(paths)))  # read whole before the worker prints: no pipe deadlock
    proc.stdin.close()
    return proc


def _exit_reason(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def _in_workers(paths: Sequence[str], workers: int, max_pixels: int | None, progress, done0: int,
                total: int) -> dict[int, str | None]:
    """Decode `paths` over `workers` processes (worker w takes paths[w::workers]: slow images spread evenly).
    Returns {index: reason} for every image a worker reported and, for a worker that died (a decoder crash,
    the OOM killer), the image it was decoding; the images after it are left for another round."""
    procs = {w: _start_worker(paths[w::workers], max_pixels) for w in range(workers)}
    got: dict[int, str | None] = {}
    ready: set[int] = set()
    partial = {w: b"" for w in procs}
    try:
        with selectors.DefaultSelector() as sel:
            for w, proc in procs.items():
                sel.register(proc.stdout.fileno(), selectors.EVENT_READ, w)  # type: ignore[union-attr]
            open_ = len(procs)
            while open_:
                for key, _ in sel.select(timeout=1.0):
                    w = key.data
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fd)
                        open_ -= 1
                        continue
                    *lines, partial[w] = (partial[w] + data).split(b"\n")
                    for line in lines:
                        i, reason = json.loads(line)
                        if i < 0:
                            ready.add(w)
                        else:
                            got[w + i * workers] = reason
                if progress:
                    progress(done0 + len(got), total)
                if interrupt.requested() is not None and len(got) < len(paths):
                    raise _stopped(done0 + len(got), total)
        for w, proc in procs.items():
            rc = proc.wait()
            first = next((j for j in range(w, len(paths), workers) if j not in got), None)
            if first is None:
                continue
            if w not in ready:
                raise RuntimeError(f"decode verification: a worker process (python -m kolora.filter.decode) did "
                                   f"not start ({_exit_reason(rc)}); its error is in the job's stderr")
            got[first] = f"crashed the decoder ({_exit_reason(rc)})"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
    return got


def verify(paths: Sequence[str], workers: int | None = None,
           progress: Callable[[int, int], None] | None = None) -> list[str | None]:
    """The decode reason of every path (None: decodes), in order; raises interrupt.Interrupted on a stop
    request. `workers` (processes) defaults to the job's CPUs; small inputs are decoded in this process."""
    from PIL import Image

    max_pixels = Image.MAX_IMAGE_PIXELS  # the limit in force here is the workers' limit too
    total = len(paths)
    workers = workers or job_cpus()
    reasons: list[str | None] = [None] * total
    if min(workers, -(-total // CHUNK)) <= 1 or total < SERIAL_BELOW:
        for i, p in enumerate(paths):
            if interrupt.requested() is not None:
                raise _stopped(i, total)
            reasons[i] = decode_reason(p, max_pixels)
        return reasons
    todo = list(range(total))
    while todo:  # each round settles at least one image per worker that died, so this ends
        got = _in_workers([paths[j] for j in todo], max(1, min(workers, -(-len(todo) // CHUNK))), max_pixels,
                          progress, total - len(todo), total)
        for k, reason in got.items():
            reasons[todo[k]] = reason
        todo = [j for k, j in enumerate(todo) if k not in got]
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


if __name__ == "__main__":
    _worker_main()
