"""filter/report.html (kolora.filter.report_page): counts per step, and the dropped samples' thumbnails grouped
by what dropped them, near-duplicates beside the kept image they duplicate; made once by the filter's merge,
escaped, self-contained, and as a headless Chromium shows it."""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import stage_context
from headless_browser import body_attributes, chromium, screenshot
from PIL import Image
from test_filter import DEMO_OPS, report_of
from test_filter_dedup import DEDUP, config, jpeg_bytes, original

from kolora.core.rundir import RunDir
from kolora.filter import report_page, thumbs
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest

SCRIPT_CAPTION = "<script>alert('caption')</script> & <b>tiny</b>"


def dataset(root: Path) -> Path:
    """5 originals and a copy of 3 of them, one image too small, two too narrow or too wide, a missing file and
    a record without a caption: every check and op drops something."""
    root.mkdir()
    images: dict[str, Image.Image | bytes] = {f"orig-{g}": jpeg_bytes(original(g), 90) for g in range(5)}
    images |= {"tiny": original(10).resize((48, 38)), "tall": original(11).resize((64, 200)),
               "wide": original(12).resize((240, 80)), "exact-0": images["orig-0"],
               "crop-2": original(2).crop((3, 3, 157, 125)), "resized-1": original(1).resize((120, 96))}
    lines = []
    for name in ["orig-0", "tiny", "orig-1", "exact-0", "tall", "orig-2", "crop-2", "orig-3", "wide", "resized-1",
                 "orig-4"]:
        data = images[name]
        if isinstance(data, bytes):
            (root / f"{name}.jpg").write_bytes(data)
        else:
            data.save(root / f"{name}.png")
        file = f"{name}.jpg" if isinstance(data, bytes) else f"{name}.png"
        lines.append({"text": SCRIPT_CAPTION if name == "tiny" else name, "image": [file]})
    lines.insert(5, {"text": "gone", "image": ["gone.jpg"]})
    lines.insert(8, {"image": ["orig-3.jpg"]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return root / "metadata.jsonl"


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    tmp = tmp_path_factory.mktemp("fsheet")
    cfg = config(tmp, dataset(tmp / "ds"), [*DEMO_OPS, DEDUP])
    run = RunDir(tmp / "run")
    ingest.run(stage_context("ingest", cfg, run))
    kfilter.run(stage_context("filter", cfg, run))
    return run


def figures(page: str) -> list[str]:
    return re.findall(r"<figure.*?</figure>", page, re.S)


def pixels(src: bytes | Path) -> np.ndarray:
    """An image as 8x8 RGB, to tell which image a thumbnail shows."""
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        return np.asarray(im.convert("RGB").resize((8, 8), Image.BOX), dtype=np.float64)


def shows(thumb_uri: str, row: dict[str, Any]) -> bool:
    import base64

    data = base64.b64decode(thumb_uri.removeprefix("data:image/jpeg;base64,"))
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and max(im.size) <= thumbs.SIDE
    return float(np.abs(pixels(data) - pixels(Path(row["image"]))).mean()) < 12


def test_counts_and_a_thumbnail_per_dropped_sample_duplicates_beside_their_originals(filtered: RunDir) -> None:
    report = report_of(filtered)
    rows = report["samples"]
    by_id = {r["id"]: r for r in rows if r["id"]}
    assert next(r for r in rows if r["text"] == SCRIPT_CAPTION)["op"] == "image_shape_filter"
    page = (filtered.filter / report_page.PAGE).read_text(encoding="utf-8")

    # counts per step, in the order they run: 13 records in, 5 kept
    steps = re.search(r"<table class=\"steps\">.*?<tbody>(.*?)</tbody>", page, re.S).group(1)
    got = [re.findall(r"<td[^>]*>([^<]*)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", steps)]
    assert got == [["rejected at ingest", "13", "1", "12"], ["header pass", "12", "1", "11"],
                   ["full decode", "11", "0", "11"], ["image_shape_filter", "11", "1", "10"],
                   ["image_aspect_ratio_filter", "10", "2", "8"], ["image_deduplicator", "8", "3", "5"]]
    assert report["summary"]["kept"] == 5 and "report_page" in report["summary"]["seconds"]

    # a figure per dropped sample; a thumbnail of its own image for each the ops dropped
    figs = figures(page)
    assert len(figs) == sum(not r["kept"] for r in rows) == 8
    dropped_by_ops = [r for r in rows if r["stage"] == "data-juicer"]
    assert len(dropped_by_ops) == 6
    for r in dropped_by_ops:
        fig = next(f for f in figs if f"dropped {r['id']}<" in f or f"<b>{r['id']}</b>" in f)
        assert shows(re.findall(r'src="([^"]+)"', fig)[-1], r), r
        assert html.escape(r["reason"]) in fig or "duplicate of" in fig
    # each duplicate beside the kept image it duplicates (that image's thumbnail first), with their distance
    pairs = [f for f in figs if "class='pair'" in f]
    assert len(pairs) == 3
    for fig in pairs:
        kept_id, dropped_id = re.search(r"kept (\d+)<.*dropped (\d+)<", fig, re.S).groups()
        copy = by_id[dropped_id]
        assert copy["duplicate_of"] == kept_id and by_id[kept_id]["kept"]
        first, second = re.findall(r'src="([^"]+)"', fig)
        assert shows(first, by_id[kept_id]) and shows(second, copy)
        assert f"Hamming distance {copy['distance']} bits" in fig
    assert any(by_id[re.search(r"dropped (\d+)<", f).group(1)]["distance"] > 0 for f in pairs)  # near, not equal
    # images the header pass (or ingest) rejected are not opened: placeholders
    assert sum("not opened" in f or "no image" in f for f in figs) == 2
    assert "missing file" in page and "missing text" in page

    # a thumbnail file per image shown, nothing else; the page needs none of them (self-contained)
    shown = {r["id"] for r in dropped_by_ops} | {r["duplicate_of"] for r in dropped_by_ops if r.get("duplicate_of")}
    assert len(list((filtered.filter / report_page.THUMBS).iterdir())) == len(shown) == 9
    assert page.count('src="data:image/jpeg;base64,') == 6 + 3
    assert not re.search(r"(?:href|src)=[\"'](?!data:|#)", page), "nothing may come from elsewhere"

    # dataset strings are escaped: the caption's <script> is text, the page's own check the only script
    assert "<script>alert" not in page and html.escape(SCRIPT_CAPTION) in page
    assert page.count("<script>") == 1


def test_made_once_capped_per_group_and_remade_when_the_image_changes(filtered: RunDir, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path / "run")
    shutil.copytree(filtered.root, run.root)
    report = report_of(run)
    folder = run.filter / report_page.THUMBS
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    page = (run.filter / report_page.PAGE).read_text(encoding="utf-8")
    report_page.write(run, report, "t")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # not remade
    assert (run.filter / report_page.PAGE).read_text(encoding="utf-8") == page

    # at most PER_GROUP per group, the first in dataset order; thumbnails no longer shown are removed
    monkeypatch.setattr(report_page, "PER_GROUP", 1)
    report_page.write(run, report, "t")
    capped = (run.filter / report_page.PAGE).read_text(encoding="utf-8")
    assert len(figures(capped)) == 5  # one per group: ingest, header pass, and the three ops
    assert "and 1 more" in capped and "and 2 more" in capped  # aspect ratio (2), deduplicator (3)
    assert len(list(folder.iterdir())) == 1 + 1 + 2  # shape, aspect ratio, and the first pair

    # a changed image gets a new thumbnail (the copy's images, not the shared run's)
    report = json.loads(json.dumps(report).replace(json.dumps(str(filtered.root))[1:-1], json.dumps(str(run.root))[1:-1]))
    tiny = next(r for r in report["samples"] if r["op"] == "image_shape_filter")
    assert tiny["image"].startswith(str(run.root / "data"))
    report_page.write(run, report, "t")
    old = thumbs.path_for(folder, tiny["id"], Path(tiny["image"]))
    assert old.is_file()
    Image.new("RGB", (48, 38), (255, 0, 0)).save(Path(tiny["image"]).with_suffix(".new.png"))
    os.replace(Path(tiny["image"]).with_suffix(".new.png"), tiny["image"])
    report_page.write(run, report, "t")
    new = thumbs.path_for(folder, tiny["id"], Path(tiny["image"]))
    assert new != old and new.is_file() and not old.is_file()
    red = pixels(new)
    assert (red[..., 0] > 200).all() and (red[..., 1:] < 40).all()


def test_the_contact_sheet_renders_in_headless_chromium(filtered: RunDir, tmp_path: Path) -> None:
    from PIL import ImageStat

    browser = chromium()
    page = filtered.filter / report_page.PAGE
    body = body_attributes(browser, page, tmp_path / "profile")
    assert body["data-images"] == "9/9", "every thumbnail decodes in the browser"
    assert body["data-tables"] == "6"
    size = (1200, 1800)

    def saturated(path: Path) -> tuple[int, int, tuple[int, int, int, int] | None]:
        """Strongly coloured pixels (the thumbnails: the page itself is grey with a little coloured text), how
        many colours, and where the coloured pixels are."""
        with Image.open(path) as im:
            assert im.size == size and ImageStat.Stat(im.convert("L")).stddev[0] > 10, "the screenshot is blank"
            hsv = np.asarray(im.convert("RGB").convert("HSV"))
            mask = (hsv[..., 1] > 90) & (hsv[..., 2] > 60)
            colours = len(im.convert("RGB").getcolors(1 << 20) or [])
            return int(mask.sum()), colours, Image.fromarray(mask).getbbox()

    shot = screenshot(browser, page, tmp_path / "profile", tmp_path / "sheet.png", size)
    coloured, colours, box = saturated(shot)
    assert coloured > 30_000 and colours > 5000, (coloured, colours)
    assert box[1] > 250, f"nothing coloured in the title and the counts, but at {box}"
    # the same page without its thumbnails: the colour was theirs (what is left: links and reasons)
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", page.read_text(encoding="utf-8")), encoding="utf-8")
    without = saturated(screenshot(browser, bare, tmp_path / "profile", tmp_path / "bare.png", size))
    assert without[0] * 5 < coloured and without[1] * 5 < colours, (without, coloured, colours)


def test_counts_per_source_and_any_scores_in_the_captions(tmp_path: Path) -> None:
    """Rows as other ops and sources write them (no filter run): a `source` per sample, a score and threshold on
    the rows an op dropped, a generated caption; dataset strings escaped wherever they land."""
    image = tmp_path / "a.png"
    original(3).save(image)

    def row(i: int, source: str, **more: Any) -> dict[str, Any]:
        return {"id": f"{i:06d}", "image": str(image), "text": f"t{i}", "size": [160, 128], "format": "PNG",
                "kept": True, "reason": None, "op": None, "stage": None, "source": source, **more}

    odd = "<i>lab</i> & co"
    rows = [row(0, "laion"), row(1, odd, caption_source="generated"),
            row(2, "laion", kept=False, op="image_nsfw_filter", stage="data-juicer", reason="filtered by nsfw",
                score=0.91, threshold=0.5, stats={"image_nsfw_score": [0.91]}),
            row(3, odd, kept=False, op="image_nsfw_filter", stage="data-juicer", reason="filtered by nsfw",
                score=0.77, threshold=0.5, detail={"model": "<m>", "nested": {"x": 1}}),
            row(4, odd, kept=False, stage="decode", reason="does not decode"),
            {"id": None, "source": "meta.jsonl:7", "image": None, "text": None, "kept": False,
             "reason": "missing text", "op": None, "stage": "ingest"}]
    report = {"summary": {"ops": ["image_shape_filter", "image_nsfw_filter"]}, "samples": rows}
    page, used = report_page.build(report, tmp_path / "thumbs", "t")
    assert len(used) == 2  # the two the op dropped; the one the decode rejected is not opened

    def body(cls: str) -> list[list[str]]:
        part = re.search(rf'<table class="{cls}">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
        return [re.findall(r"<td[^>]*>([^<]*)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", part)]

    assert body("steps") == [["rejected at ingest", "6", "1", "5"], ["header pass", "5", "0", "5"],
                             ["full decode", "5", "1", "4"], ["image_shape_filter", "4", "0", "4"],
                             ["image_nsfw_filter", "4", "2", "2"]]
    esc_odd = html.escape(odd)
    assert body("sources") == [["laion", "2", "1", "0", "1"], [esc_odd, "3", "1", "1", "1"]]
    assert "1 record(s) rejected at ingest are not counted per source" in page
    figs = figures(page)
    nsfw = [f for f in figs if "filtered by nsfw" in f]
    assert len(nsfw) == 2 and all("threshold=0.5" in f for f in nsfw)
    assert "score=0.91" in nsfw[0] and "image_nsfw_score=0.91" in nsfw[0] and "score=0.77" in nsfw[1]
    assert "detail.model=&lt;m&gt;" in nsfw[1] and "nested" not in nsfw[1]
    assert f"source {esc_odd}" in nsfw[1] and odd not in page
    assert "caption_source" not in page  # a kept sample is not on the sheet
    # no source on the rows: no per-source table
    for r in rows:
        r.pop("source")
    assert '<table class="sources">' not in report_page.build(report, tmp_path / "thumbs", "t")[0]
