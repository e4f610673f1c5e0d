"""kolora.filter.dj.ops: the header-only shape ops keep exactly the samples Data-Juicer's built-ins keep, with the same stats.

One synthetic set (~260 samples) exercises inclusive bounds, any/all, EXIF and XMP orientations (the built-ins
apply them: datasets' Image.decode_example runs ImageOps.exif_transpose), PNG metadata after the pixel data,
WEBP/MPO/GIF/TIFF, multi-image samples, a repeated path and samples without images. Both op sets run through real
Data-Juicer (kolora.filter.stage.run_data_juicer) and are also checked against sizes computed here with PIL.
"""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import stage_context
from PIL import Image, ImageFile, ImageOps, PngImagePlugin

from kolora.core.config import validate_config
from kolora.core.errors import ConfigError
from kolora.filter import stage as kfilter

REPO = Path(__file__).resolve().parents[1]
MIN_W, MIN_H, MAX_W, MAX_H = 64, 80, 180, 200  # unequal, so a 90° EXIF rotation changes the verdict
MIN_R, MAX_R = 0.6, 2.0


def ops(any_or_all: str) -> list[dict[str, dict[str, Any]]]:
    return [{"image_shape_filter": {"min_width": MIN_W, "max_width": MAX_W, "min_height": MIN_H,
                                    "max_height": MAX_H, "any_or_all": any_or_all}},
            {"image_aspect_ratio_filter": {"min_ratio": MIN_R, "max_ratio": MAX_R, "any_or_all": any_or_all}}]


def exif_bytes(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def png_chunk(cid: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data) & 0xFFFFFFFF)


def png_with_exif_after_pixels(img: Image.Image, orientation: int) -> bytes:
    """A PNG whose eXIf chunk follows the IDAT chunks (Pillow writes it before them; Pillow reads it only when
    it decodes)."""
    buf = io.BytesIO()
    img.save(buf, "PNG")
    raw = buf.getvalue()
    iend = raw.rindex(b"IEND") - 4
    return raw[:iend] + png_chunk(b"eXIf", exif_bytes(orientation).removeprefix(b"Exif\x00\x00")) + raw[iend:]


def oriented_size(path: Path) -> tuple[int, int]:
    """What a viewer shows: PIL's own EXIF transpose, independent of both op implementations."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).size


def make_images(root: Path, n_random: int = 200, seed: int = 0) -> list[Path]:
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(name: str, size: tuple[int, int], **kw: Any) -> None:
        p = root / name
        Image.new("RGB", size, (rnd.randrange(256), 90, 200)).save(p, **kw)
        paths.append(p)

    # exact boundaries of every bound, one pixel either side
    for w, h in [(MIN_W, MIN_H), (MIN_W - 1, MIN_H), (MIN_W, MIN_H - 1), (MAX_W, MAX_H - 10), (MAX_W + 1, 100),
                 (120, MAX_H), (110, MAX_H + 1), (160, 80), (161, 80), (90, 150), (84, 140), (83, 140)]:
        save(f"edge-{w}x{h}.jpg", (w, h), quality=80)  # 160x80 = ratio 2.0, 84x140 = 0.6, 83x140 < 0.6
    # EXIF orientation 1-8 (and out-of-range values) where a swap flips the verdict: 144x80 (1.8) passes
    # both ops, 80x144 (0.56) fails the ratio; 100x70 fails min_height, 70x100 passes
    for o in range(0, 10):
        save(f"exif{o}-144x80.jpg", (144, 80), quality=80, exif=exif_bytes(o))
        save(f"exif{o}-100x70.jpg", (100, 70), quality=80, exif=exif_bytes(o))
    save("xmp6-144x80.jpg", (144, 80), xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    save("exif6-144x80.png", (144, 80), exif=exif_bytes(6))
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>')
    save("xmp8-100x70.png", (100, 70), pnginfo=info)
    (root / "exif6-after-idat-144x80.png").write_bytes(png_with_exif_after_pixels(Image.new("RGB", (144, 80)), 6))
    paths.append(root / "exif6-after-idat-144x80.png")
    save("exif6-144x80.webp", (144, 80), exif=exif_bytes(6))
    save("exif6-100x70.mpo", (100, 70), format="MPO", save_all=True,
         append_images=[Image.new("RGB", (100, 70))], exif=exif_bytes(6))
    save("exif6-144x80.tif", (144, 80), exif=exif_bytes(6))  # not a header format: load_image fallback
    save("plain-120x90.gif", (120, 90))
    save("plain-120x90.png", (120, 90))
    # random sizes around the bounds, some rotated
    sides = [40, 63, 64, 70, 79, 80, 81, 100, 128, 150, 160, 179, 180, 181, 199, 200, 201, 240]
    for i in range(n_random):
        w, h = rnd.choice(sides), rnd.choice(sides)
        kw: dict[str, Any] = {"quality": 70}
        if rnd.random() < 0.3:
            kw["exif"] = exif_bytes(rnd.randint(1, 8))
        save(f"r{i:03d}-{w}x{h}.jpg", (w, h), **kw)
    return paths


def make_samples(paths: list[Path], seed: int = 1) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    samples = [{"id": f"s{i}", "text": p.name, "image": [str(p)]} for i, p in enumerate(paths)]
    for j in range(40):  # multi-image samples, mixed verdicts
        chosen = rnd.sample(paths, rnd.randint(2, 3))
        samples.append({"id": f"m{j}", "text": "multi", "image": [str(p) for p in chosen]})
    samples.append({"id": "dup", "text": "same file twice", "image": [str(paths[0]), str(paths[0])]})
    samples += [{"id": f"none{k}", "text": "no image", "image": []} for k in range(3)]
    return samples


def expected_kept(samples: list[dict[str, Any]], sizes: dict[str, tuple[int, int]], any_or_all: str) -> set[str]:
    agg = any if any_or_all == "any" else all
    kept = set()
    for s in samples:
        whs = [sizes[p] for p in s["image"]]
        if not whs:
            kept.add(s["id"])  # no image: both built-ins keep the sample
            continue
        shape_ok = agg(MIN_W <= w <= MAX_W and MIN_H <= h <= MAX_H for w, h in whs)
        ratio_ok = agg(MIN_R <= w / h <= MAX_R for w, h in whs)
        if shape_ok and ratio_ok:
            kept.add(s["id"])
    return kept


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[list[dict[str, Any]], dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    root = tmp_path_factory.mktemp("dj-ops-images")
    paths = make_images(root)
    samples = make_samples(paths)
    oriented = {str(p): oriented_size(p) for p in paths}
    raw = {}
    for p in paths:
        with Image.open(p) as im:
            raw[str(p)] = im.size
    return samples, oriented, raw


def make_cfg(tmp_path: Path, any_or_all: str, fast_ops: bool, executor: str = "default"):
    return validate_config({
        "name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
        "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")},
        "filter": {"ops": ops(any_or_all), "fast_ops": fast_ops, "executor": executor}})


def run_both(tmp_path: Path, samples: list[dict[str, Any]], any_or_all: str, executor: str = "default"):
    out = {}
    for fast in (False, True):
        cfg = make_cfg(tmp_path, any_or_all, fast, executor)
        kept, dropped = kfilter.run_data_juicer(cfg, samples, tmp_path / f"dj-{fast}")
        out[fast] = ({str(r["id"]): r.get("__dj__stats__") for r in kept}, dropped)
        traces = sorted({kfilter.traced_op(p) for p in (tmp_path / f"dj-{fast}" / "work").rglob("sample_trace-*")})
        ran = [next(iter(op)) for op in kfilter.dj_process(cfg.filter)]
        assert ran[0] == ("image_shape_header_filter" if fast else "image_shape_filter")
        assert traces == sorted(ran), traces  # what ran is what was asked for
    return out


@pytest.mark.parametrize("any_or_all", ["any", "all"])
def test_header_ops_keep_the_same_samples_and_stats_as_the_builtins(tmp_path: Path, dataset, any_or_all: str) -> None:
    samples, oriented, raw = dataset
    want = expected_kept(samples, oriented, any_or_all)
    # the set discriminates: ignoring EXIF orientation would keep a different set
    assert want != expected_kept(samples, raw, any_or_all)
    assert 0 < len(want) < len(samples)

    out = run_both(tmp_path, samples, any_or_all)
    (kept_b, dropped_b), (kept_h, dropped_h) = out[False], out[True]
    assert set(kept_b) == want
    assert set(kept_h) == want
    assert kept_h == kept_b  # stats too: image_width, image_height, aspect_ratios per image
    assert dropped_h == dropped_b  # same op (named as configured) and same stats for every dropped sample
    assert set(dropped_b) == {s["id"] for s in samples} - want
    sample = kept_h[next(s["id"] for s in samples if s["id"].startswith("s") and s["id"] in want)]
    assert set(sample) == {"image_width", "image_height", "aspect_ratios"}


def test_image_size_matches_load_image_without_decoding(tmp_path: Path, dataset, monkeypatch) -> None:
    from data_juicer.utils.mm_utils import load_image

    from kolora.filter.dj import ops as dj_ops
    samples, oriented, _ = dataset
    paths = sorted({p for s in samples for p in s["image"]})
    truth = {p: load_image(p).size for p in paths}
    assert truth == {p: oriented[p] for p in paths}
    raw_truth = {p: load_image(Path(p).read_bytes()).size for p in paths}  # bytes: no EXIF transpose

    fallbacks: list[Any] = []
    monkeypatch.setattr(dj_ops, "load_image", lambda x: fallbacks.append(x) or load_image(x))
    decodes: list[tuple[str, str]] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: decodes.append((self.format, getattr(self, "filename", ""))) or real_load(self))
    assert {p: dj_ops.image_size(p) for p in paths} == truth
    assert {p: dj_ops.image_size(Path(p).read_bytes()) for p in paths} == raw_truth
    # only the files the header cannot answer for were decoded (TIFF, GIF, PNG with eXIf after IDAT) ...
    slow = sorted(Path(x).name for x in fallbacks if isinstance(x, str))
    assert slow == ["exif6-144x80.tif", "exif6-after-idat-144x80.png", "plain-120x90.gif"]
    # ... and nothing else was decoded (MPO/JPEG/PNG/WEBP answered from their headers)
    assert {Path(f).name for _, f in decodes if f} == set(slow)
    assert {fmt for fmt, f in decodes if not f} == {"TIFF", "GIF"}  # bytes: only the non-header formats


def test_ops_called_directly_with_bytes_context_and_no_images(dataset) -> None:
    """Paths Data-Juicer's loader also takes: the sample's image_bytes (no EXIF transpose there), a context
    already holding loaded images, missing/empty image lists."""
    import numpy as np
    from data_juicer.ops.filter.image_aspect_ratio_filter import ImageAspectRatioFilter
    from data_juicer.ops.filter.image_shape_filter import ImageShapeFilter
    from data_juicer.utils.constant import Fields

    from kolora.filter.dj import ops as dj_ops
    samples, _, _ = dataset
    rotated = [s for s in samples if "exif6" in s["text"] or "exif8" in s["text"]][:4]
    kw = {"image_key": "image", "min_width": MIN_W, "min_height": MIN_H}
    pairs = [(ImageShapeFilter(**kw), dj_ops.ImageShapeHeaderFilter(**kw)),
             (ImageAspectRatioFilter(image_key="image", min_ratio=MIN_R), dj_ops.ImageAspectRatioHeaderFilter(
                 image_key="image", min_ratio=MIN_R))]

    def batch(with_bytes: bool) -> dict[str, Any]:
        b: dict[str, Any] = {"text": [s["text"] for s in rotated] + ["none"],
                             "image": [list(s["image"]) for s in rotated] + [[]],
                             Fields.stats: [{} for _ in range(len(rotated) + 1)]}
        if with_bytes:
            b["image_bytes"] = [[Path(p).read_bytes() for p in s["image"]] for s in rotated] + [[]]
        return b

    for builtin, header in pairs:
        for with_bytes in (False, True):
            got = [header.compute_stats_batched(batch(with_bytes)), builtin.compute_stats_batched(batch(with_bytes))]
            stats = [[{k: list(np.asarray(v)) for k, v in st.items()} for st in g[Fields.stats]] for g in got]
            assert stats[0] == stats[1]
            assert all(st and all(len(v) for v in st.values()) for st in stats[0][:-1])  # real numbers compared
            assert list(header.process_batched(got[0])) == list(builtin.process_batched(got[1]))
            sides = {tuple(st.values())[0][0] for st in stats[0][:-1]}
            if not with_bytes and builtin._name == "image_shape_filter":
                assert sides == {80, 70}  # rotated: width is the stored height
            elif builtin._name == "image_shape_filter":
                assert sides == {144, 100}  # image_bytes: no EXIF transpose, in both
        # a context filled by an earlier fused op is used as the built-in uses it
        ctx_batch = batch(False)
        ctx_batch[Fields.context] = [{p: Image.new("RGB", (7, 3)) for p in imgs} for imgs in ctx_batch["image"]]
        res = header.compute_stats_batched(ctx_batch, context=True)
        first = res[Fields.stats][0]
        assert first.get("image_width", first.get("aspect_ratios"))[0] in (7, 7 / 3)
    # a sample without the image key at all
    shape = dj_ops.ImageShapeHeaderFilter(image_key="image")
    out = shape.compute_stats_single({"text": "x", Fields.stats: {}})
    assert out[Fields.stats]["image_width"].dtype == np.int64 and shape.process_single(out)


def test_stage_swaps_by_default_and_validate_ops_accepts_both_names(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "any", fast_ops=True)
    assert [next(iter(o)) for o in kfilter.dj_process(cfg.filter)] == ["image_shape_header_filter",
                                                                       "image_aspect_ratio_header_filter"]
    assert kfilter.dj_process(cfg.filter)[0]["image_shape_header_filter"] == ops("any")[0]["image_shape_filter"]
    assert "fast_ops" not in cfg.model_dump()["filter"]  # default left out of digests: older runs stay complete
    slow = make_cfg(tmp_path, "any", fast_ops=False)
    assert kfilter.dj_process(slow.filter) == ops("any") and slow.model_dump()["filter"]["fast_ops"] is False
    assert slow.digest() != cfg.digest()
    kfilter.validate_ops(ops("all"))
    kfilter.validate_ops([{"image_shape_header_filter": {"min_width": 1, "any_or_all": "all"}},
                          {"image_aspect_ratio_header_filter": {"min_ratio": 0.5, "max_ratio": 2.0}}])
    with pytest.raises(ConfigError, match=r"image_shape_header_filter\): unknown argument 'min_widht'; "
                                          r"did you mean min_width"):
        kfilter.validate_ops([{"image_shape_header_filter": {"min_widht": 1}}])
    with pytest.raises(ConfigError, match=r"did you mean: image_shape_header_filter"):
        kfilter.validate_ops([{"image_shape_header_filtr": {}}])


def test_filter_stage_reports_the_configured_op_names(tmp_path: Path) -> None:
    from kolora.core.rundir import RunDir
    from kolora.ingest import stage as ingest

    cfg = validate_config({
        "name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
        "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")},
        "data": {"source": "synthetic", "synthetic": {"count": 16, "seed": 3}},
        "filter": {"ops": [{"image_shape_filter": {"min_width": 64, "min_height": 64}},
                           {"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0}}]}})
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    summary = kfilter.run(stage_context("filter", cfg, run))
    assert summary["dj_ops"] == ["image_shape_header_filter", "image_aspect_ratio_header_filter"]
    assert summary["ops"] == ["image_shape_filter", "image_aspect_ratio_filter"]
    assert set(summary["by_op"]) == {"image_shape_filter", "image_aspect_ratio_filter"}  # as configured
    traces = {kfilter.traced_op(p) for p in (run.filter / "dj" / "work").rglob("sample_trace-*.jsonl")}
    assert traces == {"image_shape_header_filter", "image_aspect_ratio_header_filter"}


def test_plain_data_juicer_loads_the_ops_from_custom_operator_paths(tmp_path: Path) -> None:
    """Outside kolora: `custom_operator_paths: [.../kolora/filter/dj/ops.py]`, also when kolora.filter.dj.ops is imported."""
    import kolora.filter.dj.ops

    code = (
        "import kolora.filter.dj.ops\n"
        "from data_juicer.config.config import load_custom_operators\n"
        "from data_juicer.ops import OPERATORS\n"
        f"load_custom_operators([{kolora.filter.dj.ops.__file__!r}])\n"
        "print(OPERATORS.modules['image_shape_header_filter'].__module__,"
        " OPERATORS.modules['image_aspect_ratio_header_filter']._name)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    # Data-Juicer loads the file under its stem: that module's classes replace kolora.filter.dj.ops' own
    assert res.stdout.split()[-2:] == ["ops", "image_aspect_ratio_header_filter"]


@pytest.mark.slow
def test_ray_executor_keeps_the_same_samples(tmp_path: Path, dataset) -> None:
    """~40 s: both op sets under Data-Juicer's Ray executor (a private local Ray)."""
    pytest.importorskip("ray")
    samples, oriented, _ = dataset
    out = run_both(tmp_path, samples, "any", executor="ray")
    want = expected_kept(samples, oriented, "any")
    assert set(out[False][0]) == set(out[True][0]) == want
    assert {k: json.dumps(v, sort_keys=True) for k, v in out[True][0].items()} == \
           {k: json.dumps(v, sort_keys=True) for k, v in out[False][0].items()}
    assert out[True][1] == out[False][1]
