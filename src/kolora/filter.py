"""Stage `filter`: run/data/ -> a header check of every image, then Data-Juicer -> run/filter/ + run/trainset/.

1. Header pass (PIL, no full decode for complete JPEG/PNG files): missing, unreadable, non-image and truncated
   files are recorded with their reason. Only good samples reach Data-Juicer, which otherwise drops whole
   batches on one bad file and keeps truncated JPEGs (notes/data-juicer.md).
   Then every image that passed is fully decoded, as the cache stage decodes it, over the job's CPUs
   (kolora.decode_check): pixel data that does not decode and decompression bombs get their reason too.
2. Data-Juicer through its Python API with cfg.filter.ops as `process`, `skip_op_error: false` and a tracer
   that logs every dropped sample (`kolora.data_juicer`; Data-Juicer's own RayTracer with the Ray executor), so each
   dropped sample is attributed to the op that dropped it. Its work dir, caches
   and logs live in run/filter/dj/; the process-wide state it changes (cwd, env, stdout/stderr, loguru,
   multiprocess start method, PIL's LOAD_TRUNCATED_IMAGES, the HF datasets cache dir) is restored afterwards.
   With filter.fast_ops (the default) image_shape_filter / image_aspect_ratio_filter run as kolora's header-only
   ops (kolora.dj_ops: same arguments and stats, same kept samples, no full decode); the report names the ops
   as configured, `summary.dj_ops` what ran.
   A stop request (kolora.interrupt) ends the stage between images or around Data-Juicer; the rerun redoes it.
3. Outputs:
     filter/result.jsonl           kept samples, tutorial format {"id", "text", "image": [path]}
     filter/report.json            {"summary", "samples": [every sample and every ingest rejection, with reason]}
     trainset/train/<n>.<ext>      the kept images (hard links where possible)
     trainset/train/metadata.csv   file_name,text -- the tutorial's training format
"""


from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from kolora.config import ExperimentConfig
from kolora.data_juicer import (  # noqa: F401 - traced_op: part of this module's interface
    FilterError,
    dj_process,
    run_data_juicer,
    traced_op,
    validate_ops,
)
from kolora.decode_check import bombs_are_errors, verify_samples
from kolora.interrupt import Interrupted, requested
from kolora.rundir import RunDir, atomic_dir, atomic_write_json, atomic_write_text
from kolora.safe_paths import copy_no_wider

DJ_SPECIAL_TOKENS = ("<__dj__image>", "<|__dj__eoc|>")
_TAIL = 64  # bytes read from the end of a file to find the JPEG EOI / PNG IEND marker


# header pass ------------------------------------------------------------------------------------------------
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


# the stage --------------------------------------------------------------------------------------------------
def _stop_point(where: str) -> None:
    """Stop cleanly on a stop request (the job is requeued); the rerun redoes the stage, whose outputs are
    written only at its end."""
    if requested() is not None:
        raise Interrupted(f"filter stopped {where} on {requested()}; run it again to redo the stage")


def _strip_tokens(text: str) -> str:
    for tok in DJ_SPECIAL_TOKENS:
        text = text.replace(tok, "")
    return text.strip()


def _first_image(rec: dict[str, Any]) -> str | None:
    img = rec.get("image")
    if isinstance(img, list):
        return img[0] if img else None
    return img


_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def _write_trainset(kept: list[dict[str, Any]], formats: dict[str, str | None], trainset: Path) -> None:
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


def _by_op_message(by_op: Counter, header: Counter) -> str:
    parts = [f"{op} dropped {n}" for op, n in by_op.items()] + [f"{n} {r}" for r, n in header.items()]
    return ", ".join(parts) or "nothing was dropped by an op"


def run(cfg: ExperimentConfig, run: RunDir) -> dict[str, Any]:
    """Filter run.data into run.filter (result.jsonl, report.json) and run.trainset; return a summary."""
    from kolora.ingest import read_samples

    t0 = time.perf_counter()
    validate_ops(cfg.filter.ops)
    t_validate = time.perf_counter() - t0
    meta = run.data / "metadata.jsonl"
    if not meta.is_file():
        raise FilterError(f"{meta} does not exist: run the ingest stage first")
    samples = read_samples(meta)
    rejected = read_samples(run.data / "rejected.jsonl")
    run.filter.mkdir(parents=True, exist_ok=True)

    # 1. header pass
    report: dict[str, dict[str, Any]] = {}
    good: list[dict[str, Any]] = []
    for n, s in enumerate(samples):
        _stop_point(f"in the header pass ({n} of {len(samples)} images)")
        image = _first_image(s)
        reason, size, fmt = check_image(image) if image else ImageCheck("no image", None)
        report[s["id"]] = {"id": s["id"], "image": image, "text": s.get("text"), "size": list(size) if size else None,
                           "format": fmt, "kept": False, "reason": reason, "op": None,
                           "stage": "header" if reason else None}
        if reason is None:
            good.append({"id": s["id"], "text": s["text"], "image": [image]})
    t_header = time.perf_counter() - t0 - t_validate

    # 1b. full decode of what the header pass accepted, over the job's CPUs (kolora.decode_check)
    t_decode = time.perf_counter()
    good = verify_samples(good, report)
    t_decode = time.perf_counter() - t_decode
    _stop_point("before Data-Juicer")

    # 2. Data-Juicer
    kept: list[dict[str, Any]] = []
    t1 = time.perf_counter()
    if good:
        dj_kept, dropped = run_data_juicer(cfg, good, run.filter / "dj")
        order = {g["id"]: i for i, g in enumerate(good)}
        good_ids = set(order)
        seen: set[str] = set()
        # input order (the Ray executor exports shards in no particular order)
        for rec in sorted(dj_kept, key=lambda r: order.get(str(r.get("id")), -1)):
            sid = str(rec.get("id"))
            if sid not in good_ids or sid in seen:
                raise RuntimeError(f"Data-Juicer returned a sample that was not in its input (or twice): {rec!r}")
            seen.add(sid)
            image = _first_image(rec)
            out = {"id": sid, "text": _strip_tokens(str(rec.get("text", ""))), "image": [image]}
            kept.append(out)
            report[sid].update(kept=True, reason=None, stage=None, image=image, text=out["text"],
                               stats=rec.get("__dj__stats__") or None)
        kept_ids = {k["id"] for k in kept}
        for sid in good_ids - kept_ids:
            op, stats, reason = dropped.get(sid, (None, {}, "dropped by Data-Juicer (no op traced it)"))
            report[sid].update(stage="data-juicer", op=op, stats=stats or None, reason=reason)
    else:
        shutil.rmtree(run.filter / "dj", ignore_errors=True)  # no stale Data-Juicer output from an earlier run
    t_dj = time.perf_counter() - t1
    _stop_point("after Data-Juicer, before writing its outputs")

    entries = list(report.values()) + [
        {"id": None, "source": r.get("source"), "image": r.get("image"), "text": r.get("text"), "kept": False,
         "reason": r.get("reason"), "op": None, "stage": "ingest"} for r in rejected]
    n_kept = sum(e["kept"] for e in entries)
    if len(report) != len(samples) or n_kept != len(kept) or len(entries) != len(samples) + len(rejected):
        raise RuntimeError(f"filter: counts do not add up ({len(samples)} samples + {len(rejected)} rejected in, "
                           f"{len(entries)} report entries, {n_kept} kept vs {len(kept)} exported)")
    by_reason = Counter(e["reason"] for e in entries if not e["kept"])
    by_op = Counter(e["op"] for e in entries if e["op"])
    header = Counter(e["reason"] for e in entries if e["stage"] in ("header", "ingest"))
    summary = {
        "input": len(samples) + len(rejected), "samples": len(samples), "rejected_at_ingest": len(rejected),
        "kept": len(kept), "dropped": len(entries) - len(kept), "by_reason": dict(by_reason), "by_op": dict(by_op),
        "ops": [next(iter(op)) for op in cfg.filter.ops], "dj_ops": [next(iter(op)) for op in dj_process(cfg.filter)],
        "executor": cfg.filter.executor, "np": cfg.filter.np,
        "seconds": {"validate_ops": round(t_validate, 2), "header": round(t_header, 2),
                    "decode": round(t_decode, 2), "data_juicer": round(t_dj, 2)},
    }
    atomic_write_json(run.filter / "report.json", {"summary": summary, "samples": entries})
    atomic_write_text(run.filter / "result.jsonl", "".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
    if not kept:
        shutil.rmtree(run.trainset, ignore_errors=True)
        raise FilterError(
            f"filter: no sample kept out of {summary['input']} ({_by_op_message(by_op, header)}); relax filter.ops "
            f"(e.g. lower min_width/min_height, widen min_ratio/max_ratio) or check the data. "
            f"Every sample and its reason: {run.filter / 'report.json'}")
    _write_trainset(kept, {sid: e["format"] for sid, e in report.items()}, run.trainset)
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return summary
