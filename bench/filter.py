"""Filter bench: the tutorial's two Data-Juicer ops, built-ins vs kolora's header-only ops, on synthetic images.

    .venv/bin/python bench/filter.py [--count 2000] [--repeats 3] [--np 1]

The images (default 2,000, cached under .cache/bench-filter/) have the sizes of real anime/illustration sets:
SDXL-style buckets, pixiv-like portrait pages, 16:9 wallpapers, lower-resolution scans, a few extreme ratios and
exact-boundary sizes; 3 % carry an EXIF orientation of 6 or 8. Content is smooth colour fields with strokes
(JPEG q90), so decoding costs about what illustrations cost. Both op sets run through kolora.filter.stage's
Data-Juicer call (the filter stage's own), alternately in the same process; the kept sets and the per-sample
stats must be identical, and equal to the set computed here from PIL's EXIF-transposed sizes.

It also times what the filter stage does around Data-Juicer: the header pass (kolora.filter.stage.check_image) and
the full-decode verification of every image (kolora.filter.decode, on one core and over the job's CPUs), and
compares the whole stage (header pass + verification + header ops) with Data-Juicer's built-ins alone, which
decode every image too.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from _common import REPO, base_parser, environment, median, report, table

NAME = "filter"
MIN_SIDE, MIN_RATIO, MAX_RATIO = 1024, 0.5, 2.0
# (width, height): weight.  Mean ≈ 1.9 MP (the notes' measurement set), about 60 % pass the tutorial's filter.
SIZES: dict[tuple[int, int], float] = {
    (1024, 1024): 6, (832, 1216): 6, (1216, 832): 4, (896, 1152): 4, (1152, 896): 3, (768, 1344): 3,
    (1344, 768): 3, (1024, 1536): 5, (1536, 1024): 4, (1536, 2304): 2, (2048, 2048): 2,
    (1200, 1697): 6, (1448, 2048): 4, (1447, 2047): 3, (2048, 1448): 2, (1754, 2480): 3, (2480, 3508): 1,
    (1920, 1080): 5, (1080, 1920): 4, (2560, 1440): 2, (1280, 720): 3, (720, 1280): 2, (1600, 1200): 3,
    (1200, 1600): 3, (512, 512): 1, (512, 768): 1, (768, 512): 1, (600, 800): 1, (800, 600): 1, (640, 960): 1,
    (2048, 1024): 1, (1024, 2048): 1, (2400, 1000): 1, (800, 2000): 1, (1023, 1500): 1, (1500, 1023): 1,
}
DATASET_VERSION = 2
TARGET = 20  # issue 7: header ops >= 20x the built-ins' images/s


def _exif(orientation: int) -> bytes:
    from PIL import Image

    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def _make_image(job: tuple[str, int, int, int, int]) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    path, w, h, seed, orientation = job
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(40):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 8)))
        else:
            draw.ellipse((x0, y0, x1, y1), outline=colour, width=int(rng.integers(2, 6)))
    kw = {"exif": _exif(orientation)} if orientation else {}
    tmp = f"{path}.tmp"
    im.save(tmp, format="JPEG", quality=90, **kw)
    Path(tmp).rename(path)


def make_dataset(root: Path, count: int, seed: int) -> list[dict[str, Any]]:
    """count JPEGs under root (reused when already there); returns tutorial-format samples."""
    rnd = random.Random(seed)
    sizes, weights = list(SIZES), list(SIZES.values())
    jobs = []
    for i in range(count):
        w, h = rnd.choices(sizes, weights)[0]
        if rnd.random() < 0.3:  # jitter off the buckets, keeping boundary sizes exact elsewhere
            w, h = max(64, round(w * rnd.uniform(0.92, 1.08))), max(64, round(h * rnd.uniform(0.92, 1.08)))
        orientation = rnd.choice((6, 8)) if rnd.random() < 0.03 else 0
        jobs.append((str(root / f"{i:05d}.jpg"), w, h, seed * 1_000_003 + i, orientation))
    root.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not Path(j[0]).is_file()]
    if todo:
        print(f"generating {len(todo)} images in {root} ...", flush=True)
        t0 = time.perf_counter()
        with Pool(2) as pool:
            pool.map(_make_image, todo, chunksize=16)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return [{"id": f"{i:05d}", "text": "二次元", "image": [j[0]]} for i, j in enumerate(jobs)]


def oriented_sizes(samples: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """What a viewer shows (PIL's EXIF transpose of the header size), computed without either op set."""
    from PIL import Image

    out = {}
    for s in samples:
        with Image.open(s["image"][0]) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w
        out[s["id"]] = (w, h)
    return out


def make_cfg(tmp: Path, fast: bool, np_: int):
    from kolora.core.config import validate_config

    return validate_config({
        "name": "bench-filter", "model": {"path": str(tmp / "model"), "tiny": True},
        "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")},
        "filter": {"fast_ops": fast, "np": np_, "ops": [
            {"image_shape_filter": {"min_width": MIN_SIDE, "min_height": MIN_SIDE, "any_or_all": "any"}},
            {"image_aspect_ratio_filter": {"min_ratio": MIN_RATIO, "max_ratio": MAX_RATIO, "any_or_all": "any"}}]}})


def run_dj(tmp: Path, samples: list[dict[str, Any]], fast: bool, np_: int) -> tuple[float, dict[str, Any]]:
    from kolora.filter.stage import run_data_juicer

    dj_dir = tmp / ("header" if fast else "builtin")
    t0 = time.perf_counter()
    kept, _dropped = run_data_juicer(make_cfg(tmp, fast, np_), samples, dj_dir)
    seconds = time.perf_counter() - t0
    ops_s = op_seconds(dj_dir)
    shutil.rmtree(dj_dir, ignore_errors=True)
    return seconds, ops_s, {str(r["id"]): json.dumps(r.get("__dj__stats__"), sort_keys=True) for r in kept}


def op_seconds(dj_dir: Path) -> float:
    """Seconds the filter ops took inside Data-Juicer, from its own log lines
    `[i/n] OP [name] Done in 12.345s. Left N samples.` (excludes config, dataset load and export)."""
    text = "\n".join(p.read_text(errors="replace") for p in dj_dir.rglob("*.log") if p.is_file())
    found = [float(x) for x in re.findall(r"OP \[[^\]]+\] Done in ([0-9.]+)s", text)]
    if not found:
        raise RuntimeError(f"no per-op timing lines in Data-Juicer's logs under {dj_dir}")
    return sum(found)


def loader_rates(paths: list[str], repeats: int) -> tuple[float, float]:
    """Images/s of Data-Juicer's load_image (what the built-ins call per image) and of kolora's header read,
    timed alternately on the same files (one process, one core)."""
    from data_juicer.utils.mm_utils import load_image

    from kolora.filter.dj.ops import image_size

    full, head = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            load_image(p)
        full.append(len(paths) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(10):
            for p in paths:
                image_size(p)
        head.append(10 * len(paths) / (time.perf_counter() - t0))
    return median(full), median(head)


def stage_parts(paths: list[str], workers: int) -> tuple[float, float, int]:
    """Seconds of the filter stage's header pass and of its decode verification over `workers` processes,
    and how many images the verification rejected (none in this clean set)."""
    from kolora.filter.decode import verify
    from kolora.filter.stage import check_image

    t0 = time.perf_counter()
    for p in paths:
        check_image(p)
    header_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reasons = verify(paths, workers)
    return header_s, time.perf_counter() - t0, sum(r is not None for r in reasons)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--repeats", type=int, default=3, help="Data-Juicer runs per op set (default 3)")
    p.add_argument("--np", type=int, default=1, dest="np_", help="Data-Juicer worker processes (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, help="image folder (default .cache/bench-filter/v<N>-<seed>)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs (smoke tests)")
    args = p.parse_args(argv)

    from kolora.models.kolors import quiet_libraries

    quiet_libraries()
    env = environment()
    root = args.data_dir or REPO / ".cache" / "bench-filter" / f"v{DATASET_VERSION}-{args.seed}"
    samples = make_dataset(root, args.count, args.seed)
    sizes = oriented_sizes(samples)
    want = {k for k, (w, h) in sizes.items() if w >= MIN_SIDE and h >= MIN_SIDE and MIN_RATIO <= w / h <= MAX_RATIO}
    mean_mp = sum(w * h for w, h in sizes.values()) / len(sizes) / 1e6
    rotated = sum(1 for s in samples if _orientation(s["image"][0]))

    from kolora.filter.decode import job_cpus, verify

    cpus = job_cpus()
    paths = [s["image"][0] for s in samples]
    header_times: list[float] = []
    verify_times: list[float] = []
    rejected = 0
    times: dict[bool, list[float]] = {False: [], True: []}
    op_times: dict[bool, list[float]] = {False: [], True: []}
    kept: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="kolora-bench-filter-") as tmp_name:
        tmp = Path(tmp_name)
        for fast in () if args.no_warmup else (False, True):  # warm-up: imports, first-run costs (not timed)
            run_dj(tmp, samples[:20], fast, args.np_)
        for r in range(args.repeats):
            for fast in ((False, True) if r % 2 == 0 else (True, False)):
                seconds, ops_s, got = run_dj(tmp, samples, fast, args.np_)
                times[fast].append(seconds)
                op_times[fast].append(ops_s)
                kept[fast].append(got)
                print(f"  repeat {r + 1}: {'kolora header ops' if fast else 'Data-Juicer built-ins'}: "
                      f"{seconds:.2f} s, {len(got)} kept", flush=True)
            header_s, verify_s, n_bad = stage_parts(paths, cpus)
            header_times.append(header_s)
            verify_times.append(verify_s)
            rejected += n_bad
            print(f"  repeat {r + 1}: header pass {header_s:.2f} s, decode verification {verify_s:.2f} s "
                  f"({cpus} processes)", flush=True)
    loader_paths = [s["image"][0] for s in samples[: min(len(samples), 200)]]
    load_rate, header_rate = loader_rates(loader_paths, repeats=3)
    t0 = time.perf_counter()
    verify(loader_paths, workers=1)
    verify_core_rate = len(loader_paths) / (time.perf_counter() - t0)

    runs = kept[False] + kept[True]
    same_kept = all(set(k) == set(runs[0]) for k in runs)
    same_stats = all(k == runs[0] for k in runs)
    correct = set(runs[0]) == want
    b, h = median(times[False]), median(times[True])
    hp, vs = median(header_times), median(verify_times)
    stage = hp + vs + h  # the filter stage as it runs: header pass, verification, header ops
    bo, ho = median(op_times[False]), median(op_times[True])
    rows = [
        ["Data-Juicer built-ins (image_shape_filter, image_aspect_ratio_filter)", b, args.count / b, bo,
         args.count / bo, len(kept[False][0])],
        ["kolora header ops (image_shape_header_filter, image_aspect_ratio_header_filter)", h, args.count / h, ho,
         args.count / ho, len(kept[True][0])],
    ]
    body = (f"{args.count} JPEGs, mean {mean_mp:.2f} MP, {rotated} EXIF-rotated; ops min side {MIN_SIDE}, ratio "
            f"{MIN_RATIO}-{MAX_RATIO} (any); Data-Juicer np={args.np_}; median of {args.repeats} runs each, "
            f"alternating; a run is kolora.filter.stage.run_data_juicer end to end (config, load, ops, export).\n\n"
            + table(["ops", "Data-Juicer run s", "run images/s", "ops s", "ops images/s", "kept"], rows)
            + f"\n\nspeedup of the ops (Data-Juicer's own per-op timing): **{bo / ho:.1f}x**; "
              f"of the whole Data-Juicer run: **{b / h:.1f}x** (target >= {TARGET:g}x: "
              f"{'met' if min(bo / ho, b / h) >= TARGET else 'NOT met'}); kept sets identical: {same_kept}; "
              f"stats identical: {same_stats}; equal to the sizes computed here: {correct}\n\n"
            + table([f"per-image read, one core (first {len(loader_paths)} images)", "images/s"],
                    [["Data-Juicer load_image (full decode + RGB)", load_rate],
                     ["kolora.filter.dj.ops.image_size (header)", header_rate],
                     ["ratio", header_rate / load_rate]])
            + "\n\n"
            + table(["the filter stage, all images", "s", "images/s", "images/s per process"],
                    [["header pass (kolora.filter.stage.check_image, one process)", hp, args.count / hp, args.count / hp],
                     [f"decode verification (kolora.filter.decode, {cpus} processes)", vs, args.count / vs,
                      args.count / vs / cpus],
                     ["kolora stage: header pass + verification + header ops", stage, args.count / stage, "-"],
                     ["Data-Juicer built-ins alone (no verification)", b, args.count / b, "-"]])
            + f"\n\nverification on one core (first {len(loader_paths)} images): {verify_core_rate:.1f} images/s; "
              f"whole stage with verification vs Data-Juicer's built-ins: **{stage / b:.2f}x** the time; "
              f"images the verification rejected: {rejected}")
    result = {"count": args.count, "np": args.np_, "builtin_s": b, "kolora_s": h, "builtin_img_s": args.count / b,
              "kolora_img_s": args.count / h, "speedup": b / h,
              "builtin_ops_img_s": args.count / bo, "kolora_ops_img_s": args.count / ho, "ops_speedup": bo / ho, "same_kept": same_kept, "same_stats": same_stats,
              "kept": len(runs[0]), "expected_kept": len(want), "load_image_img_s": load_rate,
              "header_img_s": header_rate, "read_speedup": header_rate / load_rate,
              "cpus": cpus, "verify_core_img_s": verify_core_rate, "verify_img_s": args.count / vs,
              "verify_img_s_per_proc": args.count / vs / cpus, "header_pass_s": hp, "stage_s": stage,
              "stage_vs_builtin": stage / b, "verify_rejected": rejected}
    notes = ["The header ops' run time is mostly Data-Juicer's fixed cost (config, dataset load, export); "
             "the per-image read rows show the op-level difference."]
    report(NAME, "Data-Juicer shape filters, built-ins vs header-only ops", env, body, result,
           record=not args.no_record, notes=notes)
    return 0 if same_kept and same_stats and correct and rejected == 0 else 1


def _orientation(path: str) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return int(im.getexif().get(0x0112) or 0)


if __name__ == "__main__":
    sys.exit(main())
