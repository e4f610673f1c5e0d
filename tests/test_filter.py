"""The filter stage: header pass + real Data-Juicer, checked against sizes computed independently here.

Each Data-Juicer run costs ~3-5 s on a 2-core CPU, so the runs are few and the images small (except the
boundary test, whose sizes are the tutorial's 1024-pixel thresholds; plain-colour images decode fast).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import stage_context
from PIL import Image, ImageFile

from kolora.core.config import validate_config
from kolora.core.errors import ConfigError
from kolora.core.rundir import RunDir
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest

REPO = Path(__file__).resolve().parents[1]
DEMO_OPS = [{"image_shape_filter": {"min_width": 64, "min_height": 64, "any_or_all": "any"}},
            {"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0, "any_or_all": "any"}}]


def make_cfg(tmp_path: Path, data: dict[str, Any], ops: list[Any] | None = None, np: int = 1):
    raw: dict[str, Any] = {"name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
                           "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")}, "data": data}
    if ops is not None:
        raw["filter"] = {"ops": ops, "np": np}
    return validate_config(raw)


def expected_kept(sizes: dict[str, tuple[int, int]], min_w: int, min_h: int, min_r: float, max_r: float) -> set[str]:
    """The ops' semantics: width/height minimums inclusive; aspect ratio w/h within [min_r, max_r] inclusive."""
    return {k for k, (w, h) in sizes.items() if w >= min_w and h >= min_h and min_r <= w / h <= max_r}


def noisy_jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rnd.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def report_of(run: RunDir) -> dict[str, Any]:
    return json.loads((run.filter / "report.json").read_text(encoding="utf-8"))


def check_outputs(run: RunDir, kept_ids: set[str]) -> None:
    """result.jsonl, report.json and trainset/train agree with each other and with `kept_ids`."""
    result = [json.loads(x) for x in (run.filter / "result.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["id"] for r in result} == kept_ids
    assert all(set(r) == {"id", "text", "image"} and isinstance(r["image"], list) for r in result)
    report = report_of(run)
    s = report["summary"]
    assert s["kept"] == len(kept_ids) and s["kept"] + s["dropped"] == s["input"] == len(report["samples"])
    assert sum(s["by_reason"].values()) == s["dropped"]
    assert {e["id"] for e in report["samples"] if e["kept"]} == kept_ids
    assert all(e["reason"] for e in report["samples"] if not e["kept"])
    train = run.trainset / "train"
    with open(train / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file_name", "text"] and len(rows) == len(kept_ids) + 1
    by_id = {r["id"]: r for r in result}
    for (name, text), rec in zip(rows[1:], result, strict=True):
        assert text == by_id[rec["id"]]["text"]
        assert (train / name).read_bytes() == Path(rec["image"][0]).read_bytes()
    assert sorted(p.name for p in train.iterdir()) == sorted([r[0] for r in rows[1:]] + ["metadata.csv"])


def test_synthetic_demo_ops_keep_exactly_the_computed_set(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"source": "synthetic", "synthetic": {"count": 32, "seed": 5}}, DEMO_OPS)
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    samples = [json.loads(x) for x in (run.data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    sizes = {}
    for s in samples:
        with Image.open(s["image"][0]) as im:
            sizes[s["id"]] = im.size
    want = expected_kept(sizes, 64, 64, 0.5, 2.0)
    by_shape = {k for k, (w, h) in sizes.items() if w < 64 or h < 64}
    by_aspect = set(sizes) - want - by_shape
    assert want and by_shape and by_aspect  # the synthetic set exercises both ops

    cwd, env, stdout, truncated = os.getcwd(), dict(os.environ), sys.stdout, ImageFile.LOAD_TRUNCATED_IMAGES
    summary = kfilter.run(stage_context("filter", cfg, run))
    # Data-Juicer's process-wide changes are undone
    assert (os.getcwd(), dict(os.environ), sys.stdout) == (cwd, env, stdout)
    assert ImageFile.LOAD_TRUNCATED_IMAGES == truncated

    check_outputs(run, want)
    assert summary["kept"] == len(want) and summary["input"] == len(sizes)
    ops = {e["id"]: e["op"] for e in report_of(run)["samples"] if not e["kept"]}
    assert {k for k, op in ops.items() if op == "image_shape_filter"} == by_shape
    assert {k for k, op in ops.items() if op == "image_aspect_ratio_filter"} == by_aspect
    assert summary["by_op"] == {"image_shape_filter": len(by_shape), "image_aspect_ratio_filter": len(by_aspect)}
    # Data-Juicer's files stay inside the run directory
    assert (run.filter / "dj" / "work").is_dir() and (run.filter / "dj" / "hf").is_dir()

    # a rerun (here with two worker processes, each tracing its own drops) replaces the outputs with the same
    # result and the same attribution
    cfg2 = make_cfg(tmp_path, {"source": "synthetic", "synthetic": {"count": 32, "seed": 5}}, DEMO_OPS, np=2)
    kfilter.run(stage_context("filter", cfg2, run))
    check_outputs(run, want)
    assert {e["id"]: e["op"] for e in report_of(run)["samples"] if not e["kept"]} == ops
    assert len({p.name for p in (run.filter / "dj" / "work").rglob("sample_trace-*")}) > 2  # per worker files


def test_tutorial_ops_at_exact_boundaries(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    sizes = {"square-1024": (1024, 1024), "width-1023": (1023, 1024), "height-1023": (1024, 1023),
             "ratio-2.0": (2048, 1024), "ratio-0.5": (1024, 2048), "ratio-2.002": (2050, 1024),
             "ratio-0.499": (1024, 2052), "big-ok": (1536, 1200)}
    lines = []
    for name, size in sizes.items():
        Image.new("RGB", size, (30, 90, 200)).save(ds / f"{name}.jpg", quality=80)
        lines.append(json.dumps({"text": name, "image": [f"{name}.jpg"]}))
    (ds / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = make_cfg(tmp_path, {"source": "jsonl", "path": str(ds / "metadata.jsonl")})  # default = tutorial ops
    assert cfg.filter.ops[0]["image_shape_filter"]["min_width"] == 1024
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    kfilter.run(stage_context("filter", cfg, run))
    ids = {s["text"]: s["id"] for s in (json.loads(x) for x in (run.data / "metadata.jsonl").read_text().splitlines())}
    want = expected_kept({ids[k]: v for k, v in sizes.items()}, 1024, 1024, 0.5, 2.0)
    assert {k for k, v in ids.items() if v in want} == {"square-1024", "ratio-2.0", "ratio-0.5", "big-ok"}
    check_outputs(run, want)


def test_a_deduplicators_drops_are_attributed_to_it(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    texts = ["a red fox", "a red fox", "A red fox!", "a blue bird", "tiny"]  # 2nd and 3rd duplicate the 1st
    sizes = [(96, 80), (90, 80), (100, 80), (80, 96), (20, 20)]  # the last one fails the shape filter
    for i, size in enumerate(sizes):
        (ds / f"{i}.jpg").write_bytes(noisy_jpeg(size, seed=i))
    lines = [json.dumps({"text": t, "image": [f"{i}.jpg"]}) for i, t in enumerate(texts)]
    (ds / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ops = [*DEMO_OPS, {"document_deduplicator": {"lowercase": True, "ignore_non_character": True}}]
    cfg = make_cfg(tmp_path, {"source": "jsonl", "path": str(ds / "metadata.jsonl")}, ops)
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    kfilter.run(stage_context("filter", cfg, run))
    by_line = {int(Path(e["image"]).stem): e for e in report_of(run)["samples"]}  # ingest keeps the line order
    assert {n for n, e in by_line.items() if e["kept"]} == {0, 3}
    for dup in (1, 2):
        assert by_line[dup]["op"] == "document_deduplicator", by_line[dup]
        assert by_line[dup]["reason"] == "duplicate removed by document_deduplicator"
    assert by_line[4]["reason"] == "filtered by image_shape_filter"
    check_outputs(run, {by_line[n]["id"] for n in (0, 3)})


def test_bad_files_are_reported_and_good_ones_kept(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    good = {}
    for i in range(4):
        (ds / f"good{i}.jpg").write_bytes(noisy_jpeg((96 + i, 80), seed=i))
        good[f"good{i}"] = f"good{i}.jpg"
    Image.new("RGB", (100, 90), (0, 200, 0)).save(ds / "good4.png")
    good["good4"] = "good4.png"
    whole = noisy_jpeg((120, 100), seed=9)
    (ds / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (ds / "random.jpg").write_bytes(random.Random(1).randbytes(3000))
    (ds / "text.jpg").write_text("this is not an image\n" * 20, encoding="utf-8")
    bad = {"truncated": "truncated.jpg", "missing": "missing.jpg", "random": "random.jpg", "text": "text.jpg"}
    lines = [json.dumps({"text": k, "image": [v]}) for k, v in {**good, **bad}.items()]
    lines += [json.dumps({"text": "no image line"}), '{"text": "malformed", "image": ["good0.jpg"]']
    (ds / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    cfg = make_cfg(tmp_path, {"source": "jsonl", "path": str(ds / "metadata.jsonl")}, DEMO_OPS)
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    summary = kfilter.run(stage_context("filter", cfg, run))

    report = report_of(run)
    entries = {e["text"]: e for e in report["samples"] if e["stage"] != "ingest"}
    assert {t for t, e in entries.items() if e["kept"]} == set(good)
    assert {t: entries[t]["reason"] for t in bad} == {"truncated": "truncated image", "missing": "missing file",
                                                      "random": "not an image", "text": "not an image"}
    ingest_rejects = [e for e in report["samples"] if e["stage"] == "ingest"]
    assert sorted(e["reason"].split(" (")[0] for e in ingest_rejects) == ["malformed json", "no image"]
    assert all(e["source"].startswith(str(ds / "metadata.jsonl") + ":") for e in ingest_rejects)
    assert summary["input"] == len(lines) and summary["kept"] == len(good) and summary["dropped"] == 6
    check_outputs(run, {entries[t]["id"] for t in good})


def test_check_image_catches_truncation_even_with_load_truncated_images(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what importing Data-Juicer does
    whole = noisy_jpeg((64, 48))
    (tmp_path / "t.jpg").write_bytes(whole[:-200])
    (tmp_path / "ok.jpg").write_bytes(whole)
    (tmp_path / "junk.jpg").write_bytes(whole + b"trailing bytes after EOI")  # valid; takes the decode path
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 48), noisy_jpeg((64, 48))[:64 * 48 * 3].ljust(64 * 48 * 3, b"x")).save(buf, "PNG")
    (tmp_path / "ok.png").write_bytes(buf.getvalue())
    (tmp_path / "t.png").write_bytes(buf.getvalue()[:-40])
    (tmp_path / "empty.jpg").write_bytes(b"")
    got = {p: kfilter.check_image(tmp_path / p)[0] for p in ("t.jpg", "ok.jpg", "junk.jpg", "ok.png", "t.png",
                                                               "empty.jpg", "absent.png")}
    assert got == {"t.jpg": "truncated image", "ok.jpg": None, "junk.jpg": None, "ok.png": None,
                   "t.png": "truncated image", "empty.jpg": "empty file", "absent.png": "missing file"}
    assert kfilter.check_image(tmp_path / "ok.jpg")[1] == (64, 48)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as it was


def test_unknown_op_or_argument_is_a_clear_error(tmp_path: Path) -> None:
    ops = [DEMO_OPS[0], {"image_shape_filtre": {"min_width": 1}}]
    with pytest.raises(ConfigError, match=r"filter\.ops\[1\]: unknown Data-Juicer op 'image_shape_filtre'; "
                                          r"did you mean: image_shape_filter"):
        kfilter.validate_ops(ops)
    with pytest.raises(ConfigError, match=r"filter\.ops\[0\] \(image_shape_filter\): unknown argument "
                                          r"'min_widht'; did you mean min_width"):
        kfilter.validate_ops([{"image_shape_filter": {"min_widht": 64}}])
    with pytest.raises(ConfigError, match=r"filter\.ops\[0\]: unknown Data-Juicer op 'foo'; valid ops include: "
                                          r".*image_aspect_ratio_filter"):
        kfilter.validate_ops([{"foo": {}}])
    kfilter.validate_ops(DEMO_OPS)
    # the stage itself refuses before running anything
    cfg = make_cfg(tmp_path, {"source": "synthetic", "synthetic": {"count": 2}}, ops)
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    with pytest.raises(ConfigError, match=r"filter\.ops\[1\]"):
        kfilter.run(stage_context("filter", cfg, run))
    assert not (run.filter / "report.json").exists()


def test_nothing_kept_is_a_clear_error_after_the_report(tmp_path: Path) -> None:
    ops = [{"image_shape_filter": {"min_width": 4096, "min_height": 4096}}]
    cfg = make_cfg(tmp_path, {"source": "synthetic", "synthetic": {"count": 6}}, ops)
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    with pytest.raises(kfilter.FilterError, match=r"no sample kept out of 6 \(image_shape_filter dropped 6\); "
                                                  r"relax filter\.ops"):
        kfilter.run(stage_context("filter", cfg, run))
    report = report_of(run)
    assert report["summary"]["kept"] == 0 and len(report["samples"]) == 6
    assert {e["op"] for e in report["samples"]} == {"image_shape_filter"}
    assert not run.trainset.exists()


@pytest.mark.slow
def test_ray_executor_gives_the_same_kept_set(tmp_path: Path) -> None:
    """~15 s: Ray starts a private local instance (RAY_ADDRESS unset) and exports a folder of json shards."""
    pytest.importorskip("ray")
    data = {"source": "synthetic", "synthetic": {"count": 16, "seed": 2}}
    raw_cfg = make_cfg(tmp_path, data, DEMO_OPS)
    cfg = raw_cfg.model_copy(update={"filter": raw_cfg.filter.model_copy(update={"executor": "ray"})})
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    sizes = {}
    for line in (run.data / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        with Image.open(s["image"][0]) as im:
            sizes[s["id"]] = im.size
    kfilter.run(stage_context("filter", cfg, run))
    check_outputs(run, expected_kept(sizes, 64, 64, 0.5, 2.0))
    assert (run.filter / "dj" / "export" / "result.jsonl").is_dir()
    assert all(e["op"] for e in report_of(run)["samples"] if not e["kept"])
