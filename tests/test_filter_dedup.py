"""filter.ops' image_deduplicator across shards (kolora.filter.dedup): each shard hashes the samples it kept with
Data-Juicer's op, the merge keeps the first occurrence of each group in dataset order and names, for every
dropped copy, the sample it duplicates; one shard keeps the same set. Copies are made here: byte-exact,
resized, JPEG re-encoded and cropped by a few pixels."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import stage_context
from PIL import Image
from test_filter import DEMO_OPS, check_outputs, report_of

from kolora.core import shards as core_shards
from kolora.core.config import validate_config
from kolora.core.errors import ConfigError
from kolora.core.rundir import RunDir
from kolora.filter import dedup
from kolora.filter import shards as filter_shards
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest

REPO = Path(__file__).resolve().parents[1]
# phash: the crops below differ from their original in up to ~8 of 64 bits, distinct images in 20 or more
DEDUP = {"image_deduplicator": {"method": "phash", "max_distance": 10}}


def original(seed: int) -> Image.Image:
    """A distinct image: smooth colour noise (an 8x8 grid upscaled), textured enough for a stable phash."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((160, 128), Image.BICUBIC)


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def dataset(root: Path) -> tuple[Path, list[tuple[str, int]]]:
    """12 originals and copies of 9 of them, shuffled: [(label, group)] in dataset (line) order. A copy may come
    before its original; the tiny copy of group 4 comes first and fails the shape filter (filters run first)."""
    root.mkdir()
    files: dict[str, tuple[bytes | Image.Image, int]] = {}
    for g in range(12):
        files[f"orig-{g}"] = (jpeg_bytes(original(g), 90), g)
    for g in (0, 1, 2):
        files[f"exact-{g}"] = (files[f"orig-{g}"][0], g)
    for g in (3, 4, 5):
        files[f"resized-{g}"] = (original(g).resize((120, 96), Image.LANCZOS), g)
    for g in (6, 7):
        files[f"jpeg-{g}"] = (jpeg_bytes(Image.open(io.BytesIO(files[f"orig-{g}"][0])), 40), g)
    for g in (8, 9, 0):
        files[f"crop-{g}"] = (original(g).crop((3, 3, 157, 125)), g)
    files["crop2-8"] = (original(8).crop((4, 2, 158, 125)), 8)
    order = sorted(n for n in files if n != "tiny-4")
    random.Random(7).shuffle(order)
    files["tiny-4"] = (original(4).resize((48, 38), Image.LANCZOS), 4)
    order.insert(0, "tiny-4")
    lines = []
    for name in order:
        data, _ = files[name]
        if isinstance(data, bytes):
            (root / f"{name}.jpg").write_bytes(data)
            lines.append(json.dumps({"text": name, "image": [f"{name}.jpg"]}))
        else:
            data.save(root / f"{name}.png")
            lines.append(json.dumps({"text": name, "image": [f"{name}.png"]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "metadata.jsonl", [(name, files[name][1]) for name in order]


def config(tmp_path: Path, meta: Path, ops: list[Any], shards: int = 1):
    return validate_config({"name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
                            "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")},
                            "data": {"source": "jsonl", "path": str(meta)},
                            "filter": {"ops": ops, "shards": shards}})


def first_occurrences(rows: list[tuple[str, int]]) -> dict[str, str]:
    """{label: label of the first occurrence of its group} for every sample past the shape filter."""
    first: dict[int, str] = {}
    for name, g in rows:
        if not name.startswith("tiny"):
            first.setdefault(g, name)
    return {name: first[g] for name, g in rows if not name.startswith("tiny")}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, int]], RunDir]:
    tmp = tmp_path_factory.mktemp("dedup")
    meta, rows = dataset(tmp / "ds")
    run = RunDir(tmp / "ingested")
    ingest.run(stage_context("ingest", config(tmp, meta, [*DEMO_OPS, DEDUP]), run))
    return meta, rows, run


def copy_run(ingested_run: RunDir, dest: Path) -> RunDir:
    shutil.copytree(ingested_run.root, dest)
    return RunDir(dest)


def by_label(run: RunDir) -> dict[str, dict[str, Any]]:
    return {e["text"]: e for e in report_of(run)["samples"]}


def test_three_shards_keep_the_first_occurrences_and_name_what_each_copy_duplicates(
        tmp_path: Path, ingested: tuple[Path, list[tuple[str, int]], RunDir]) -> None:
    meta, rows, ingested_run = ingested
    names = [name for name, _ in rows]
    of = first_occurrences(rows)
    want = {name for name, first in of.items() if name == first}
    assert len(want) == 12
    # the layout exercises what it should: copies in other shards than their kept sample, copies first
    shard_of = {name: i for i in range(3) for name in core_shards.part(names, 3, i)}
    assert any(shard_of[n] != shard_of[first] for n, first in of.items() if n != first)
    assert any(not n.startswith("orig") for n in want)

    cfg = config(tmp_path, meta, [*DEMO_OPS, DEDUP], shards=3)  # accepted with shards
    run = copy_run(ingested_run, tmp_path / "sharded")
    for i in (2, 0):
        assert kfilter.run(stage_context("filter", cfg, run, shard=i, shards=3))["merged"] is False
    summary = kfilter.run(stage_context("filter", cfg, run, shard=1, shards=3))
    assert summary["merged"] is True and summary["shards"] == 3
    for i in range(3):  # each shard hashed only the samples it kept
        part = json.loads((filter_shards.folder(run, i, 3) / "report.json").read_text())
        assert {sid for sid, _ in part["image_hashes"]} == {k["id"] for k in part["kept"]}

    entries = by_label(run)
    ids = {label: e["id"] for label, e in entries.items()}
    assert {label for label, e in entries.items() if e["kept"]} == want
    check_outputs(run, {ids[n] for n in want})
    for name, first in of.items():
        if name != first:
            e = entries[name]
            assert (e["op"], e["reason"], e["duplicate_of"]) == (dedup.OP, dedup.REASON, ids[first]), e
            assert 0 <= e["distance"] <= 10 and e["image_hash"]
    assert entries["tiny-4"]["op"] == "image_shape_filter"  # dropped before any hashing
    assert summary["by_op"][dedup.OP] == len(of) - 12
    assert max(e["distance"] for e in entries.values() if e.get("duplicate_of")) > 0  # near, not only equal

    # one shard: the same code, the same kept set and the same report rows
    one = copy_run(ingested_run, tmp_path / "one")
    kfilter.run(stage_context("filter", config(tmp_path, meta, [*DEMO_OPS, DEDUP]), one))
    assert report_of(one)["samples"] == report_of(run)["samples"]
    assert (one.trainset / "train" / "metadata.csv").read_bytes() == (run.trainset / "train" / "metadata.csv").read_bytes()


def test_equal_hashes_only_by_default_and_nothing_changes_without_the_op(
        tmp_path: Path, ingested: tuple[Path, list[tuple[str, int]], RunDir]) -> None:
    meta, rows, ingested_run = ingested
    # max_distance 0 (Data-Juicer's rule): the byte-exact copies go, the crops (a few bits off) stay
    run = copy_run(ingested_run, tmp_path / "exact")
    kfilter.run(stage_context("filter", config(tmp_path, meta, [*DEMO_OPS, {"image_deduplicator": {}}], 2), run))
    entries = by_label(run)
    for g in (0, 1, 2):
        pair = sorted((f"orig-{g}", f"exact-{g}"), key=[n for n, _ in rows].index)
        assert entries[pair[0]]["kept"] and entries[pair[1]]["duplicate_of"] == entries[pair[0]]["id"]
        assert entries[pair[1]]["distance"] == 0
    # equal hashes only: each removed sample has its kept sample's hash, no two kept samples share one, and near
    # copies a few bits off stay (some crops do)
    order = [n for n, _ in rows if n in entries]
    for n in order:
        e = entries[n]
        if not e["kept"] and e.get("duplicate_of"):
            kept = next(k for k in order if entries[k]["id"] == e["duplicate_of"])
            assert e["distance"] == 0 and e["image_hash"] == entries[kept]["image_hash"]
            assert order.index(kept) < order.index(n)
    kept_hashes = [entries[n]["image_hash"] for n in order if entries[n]["kept"]]
    assert len(kept_hashes) == len(set(kept_hashes))
    assert any(entries[n]["kept"] for n in order if n.startswith("crop"))
    assert all(e["image_hash"] for e in entries.values() if e["kept"])

    # without the op: every sample the shape ops keep is kept, and nothing of the deduplicator is written
    plain = copy_run(ingested_run, tmp_path / "plain")
    kfilter.run(stage_context("filter", config(tmp_path, meta, DEMO_OPS, 2), plain))
    entries = by_label(plain)
    assert {n for n, e in entries.items() if e["kept"]} == {n for n, _ in rows} - {"tiny-4"}
    assert not any({"image_hash", "duplicate_of"} & set(e) for e in entries.values())
    part = json.loads((filter_shards.folder(plain, 0, 2) / "report.json").read_text())
    assert "image_hashes" not in part and "image_hash" not in part["seconds"]


def test_duplicates_rule() -> None:
    def h(bits: int) -> str:
        return f"{bits:016x}"

    a, near_a, b = h(0), h(0b111), h(0xFFFF_0000_0000_0000)
    chained = h(0b111111)  # 3 bits from near_a (dropped), 6 from a (kept): compared with kept samples only
    rows = [("1", near_a), ("2", a), ("3", b), ("4", h(0b111)), ("5", chained), ("6", ""), ("7", "")]
    assert dedup.duplicates(rows) == {"4": ("1", 0)}
    assert dedup.duplicates(rows, 3) == {"2": ("1", 3), "4": ("1", 0), "5": ("1", 3)}
    assert dedup.duplicates(rows, 2) == {"4": ("1", 0)}
    rows = [("1", a), ("2", near_a), ("3", chained)]
    assert dedup.duplicates(rows, 3) == {"2": ("1", 3)}  # 3 is near 2, which was dropped, not near 1
    # consider_text: the text hash after ':' must be equal
    rows = [("1", f"{a}:x"), ("2", f"{near_a}:y"), ("3", f"{near_a}:x"), ("4", f"{a}:y")]
    assert dedup.duplicates(rows, 3) == {"3": ("1", 3), "4": ("2", 3)}
    assert dedup.duplicates(rows) == {}
    many = [(str(i), h(random.Random(i).getrandbits(64))) for i in range(300)]
    assert dedup.duplicates(many, 1) == {}  # grows past its first allocation


def test_config_checks(tmp_path: Path) -> None:
    meta = tmp_path / "m.jsonl"
    with pytest.raises(ConfigError, match=r"filter.ops\[0\] \(image_deduplicator\): must be the last op"):
        kfilter.validate_ops([DEDUP, *DEMO_OPS])
    with pytest.raises(ConfigError, match=r"filter.ops\[2\] \(image_deduplicator\): max_distance must be .* got 65"):
        kfilter.validate_ops([*DEMO_OPS, {"image_deduplicator": {"max_distance": 65}}])
    with pytest.raises(ConfigError, match=r"image_deduplicator\): unknown argument 'max_distanse'.*max_distance"):
        kfilter.validate_ops([{"image_deduplicator": {"max_distanse": 4}}])
    kfilter.validate_ops([*DEMO_OPS, {"image_deduplicator": {"method": "dhash", "max_distance": 4,
                                                             "consider_text": True}}])
    # other deduplicators still see one shard's samples only
    with pytest.raises(ConfigError, match="remove the deduplicator"):
        config(tmp_path, meta, [{"document_deduplicator": {}}], shards=2)
    assert config(tmp_path, meta, [DEDUP], shards=2).filter.shards == 2


def test_the_op_hashes_with_imagehash_behind_data_juicers_compute_hash(tmp_path: Path) -> None:
    """Data-Juicer's compute_hash, given ImageHash's functions, keys each image by that function's 64-bit hash."""
    import imagehash

    from kolora.filter.dj.image_hash import HASHERS, image_hashes

    path = tmp_path / "a.png"
    original(0).save(path)
    for method, function in HASHERS.items():
        key = image_hashes({"method": method}, [{"id": "a", "text": "t", "image": [str(path)]}])[0]
        assert key == str(function(Image.open(path).convert("RGB"))) and len(key) == 16, method
    assert HASHERS["phash"] is imagehash.phash
