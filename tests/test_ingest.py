"""The ingest stage: every source into data/ in the tutorial's Data-Juicer input format (no Data-Juicer here)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import stage_context
from PIL import Image

from kolora.core.config import validate_config
from kolora.core.rundir import RunDir
from kolora.ingest import stage as ingest
from kolora.ingest.sources import DatasetError

REPO = Path(__file__).resolve().parents[1]


def make_cfg(tmp_path: Path, data: dict[str, Any] | None = None, ops: list[Any] | None = None):
    raw: dict[str, Any] = {"name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
                           "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")}}
    if data is not None:
        raw["data"] = data
    if ops is not None:
        raw["filter"] = {"ops": ops}
    return validate_config(raw)


def image_bytes(size: tuple[int, int], fmt: str = "JPEG", colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_layout(run: RunDir, n: int) -> list[dict[str, Any]]:
    """metadata.jsonl has n samples in the Data-Juicer input format; return them."""
    samples = read_jsonl(run.data / "metadata.jsonl")
    assert len(samples) == n
    assert len({s["id"] for s in samples}) == n
    for s in samples:
        assert set(s) == {"id", "text", "image"}
        assert isinstance(s["image"], list) and len(s["image"]) == 1  # a string breaks Data-Juicer
        assert Path(s["image"][0]).is_absolute()
        assert isinstance(s["text"], str) and s["text"]
    return samples


def test_synthetic(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"source": "synthetic", "synthetic": {"count": 24, "seed": 3}})
    run = RunDir(tmp_path / "run")
    summary = ingest.run(stage_context("ingest", cfg, run))
    assert summary["samples"] == 24 and summary["rejected"] == 0
    samples = check_layout(run, 24)
    sizes = set()
    for s in samples:
        p = Path(s["image"][0])
        assert p.parent == run.data / "images" and p.stem == s["id"]
        with Image.open(p) as im:
            sizes.add(im.size)
            assert im.format in ("JPEG", "PNG")
        assert s["text"].startswith("二次元, a ")
    assert len(sizes) > 12  # varied sizes and aspect ratios
    assert read_jsonl(run.data / "rejected.jsonl") == []

    # rerun: same content, nothing left over; limit and caption apply
    first = (run.data / "metadata.jsonl").read_text(encoding="utf-8")
    ingest.run(stage_context("ingest", cfg, run))
    assert (run.data / "metadata.jsonl").read_text(encoding="utf-8") == first
    cfg2 = make_cfg(tmp_path, {"source": "synthetic", "synthetic": {"count": 24, "seed": 3}, "limit": 5,
                               "caption": "二次元"})
    ingest.run(stage_context("ingest", cfg2, run))
    samples = check_layout(run, 5)
    assert {s["text"] for s in samples} == {"二次元"}
    assert len(list((run.data / "images").iterdir())) == 5
    assert not [p for p in run.root.iterdir() if p.name.startswith(".data")]


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    from kolora.ingest.synthetic import make_synthetic

    a = make_synthetic(tmp_path / "a", 8, seed=1)
    b = make_synthetic(tmp_path / "b", 8, seed=1)
    assert [c for _, c in a] == [c for _, c in b]
    assert all(pa.read_bytes() == pb.read_bytes() for (pa, _), (pb, _) in zip(a, b, strict=True))


def test_folder(tmp_path: Path) -> None:
    train = tmp_path / "ds" / "train"
    train.mkdir(parents=True)
    for i in range(3):
        (train / f"{i}.jpg").write_bytes(image_bytes((80 + i, 70)))
    rows = ["file_name,text", "0.jpg,二次元 zero", '1.jpg,"one, with a comma"', ",no file name",
            "2.jpg,", "gone.jpg,missing file kept", "2.jpg,two"]
    (train / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")  # with BOM
    cfg = make_cfg(tmp_path, {"source": "folder", "path": str(tmp_path / "ds")})
    run = RunDir(tmp_path / "run")
    summary = ingest.run(stage_context("ingest", cfg, run))
    samples = check_layout(run, 4)
    assert [s["text"] for s in samples] == ["二次元 zero", "one, with a comma", "missing file kept", "two"]
    # hard links into data/images (same filesystem)
    assert os.stat(samples[0]["image"][0]).st_ino == os.stat(train / "0.jpg").st_ino
    assert summary["linked"] == 3
    # a missing file is not an ingest error: it keeps its path so the filter reports it
    assert samples[2]["image"] == [str(train / "gone.jpg")]
    rejected = read_jsonl(run.data / "rejected.jsonl")
    assert [(r["source"], r["reason"]) for r in rejected] == [
        (f"{train / 'metadata.csv'}:4", "no image"), (f"{train / 'metadata.csv'}:5", "missing text")]


def test_jsonl(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    (ds / "img").mkdir(parents=True)
    (ds / "img" / "a.png").write_bytes(image_bytes((90, 90), "PNG"))
    (ds / "img" / "b.jpg").write_bytes(image_bytes((70, 100)))
    abs_c = tmp_path / "c.jpg"
    abs_c.write_bytes(image_bytes((64, 64)))
    lines = [json.dumps({"text": "二次元", "image": ["img/a.png"]}, ensure_ascii=False),
             json.dumps({"text": "string image", "image": "img/b.jpg"}),
             "",
             json.dumps({"text": "absolute", "image": [str(abs_c)]}),
             "{not json",
             json.dumps({"text": "no image"}),
             json.dumps({"image": ["img/a.png"]})]
    (ds / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # c.jpg lies outside the dataset's folder: listed on purpose, so opted in (tests/test_safe_paths.py: refused)
    cfg = make_cfg(tmp_path, {"source": "jsonl", "path": str(ds / "metadata.jsonl"), "allow_external_paths": True})
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    samples = check_layout(run, 3)
    assert [s["text"] for s in samples] == ["二次元", "string image", "absolute"]
    assert [Path(s["image"][0]).suffix for s in samples] == [".png", ".jpg", ".jpg"]
    assert Path(samples[0]["image"][0]).read_bytes() == (ds / "img" / "a.png").read_bytes()
    reasons = {r["source"].rsplit(":", 1)[1]: r["reason"] for r in read_jsonl(run.data / "rejected.jsonl")}
    assert reasons["5"].startswith("malformed json") and reasons["6"] == "no image" and reasons["7"] == "missing text"
    # the folder holding metadata.jsonl works too, and data.caption fills in a missing text
    cfg = make_cfg(tmp_path, {"source": "jsonl", "path": str(ds), "caption": "二次元", "allow_external_paths": True})
    ingest.run(stage_context("ingest", cfg, run))
    assert len(check_layout(run, 4)) == 4


def parquet_table(n: int, struct: bool):
    import pyarrow as pa

    images = [image_bytes((60 + i, 50), "PNG" if i % 2 else "JPEG") for i in range(n)]
    col = [{"bytes": b, "path": f"{i}.img"} for i, b in enumerate(images)] if struct else images
    return pa.table({"picture": col, "caption": [f"cap {i}" for i in range(n)]}), images


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    t1, img1 = parquet_table(3, struct=True)
    t2, img2 = parquet_table(2, struct=False)
    pq.write_table(t1, folder / "a.parquet")
    pq.write_table(t2, folder / "b.parquet")
    pq.write_table(pa.table({"picture": pa.array([None], pa.binary()), "caption": ["no image"]}),
                   folder / "c.parquet")
    cfg = make_cfg(tmp_path, {"source": "parquet", "path": str(folder), "image_column": "picture",
                              "text_column": "caption"})
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    samples = check_layout(run, 5)
    assert [Path(s["image"][0]).read_bytes() for s in samples] == img1 + img2
    assert [Path(s["image"][0]).suffix for s in samples] == [".jpg", ".png", ".jpg", ".jpg", ".png"]
    rejected = read_jsonl(run.data / "rejected.jsonl")
    assert len(rejected) == 1 and rejected[0]["reason"] == "no image" and "c.parquet" in rejected[0]["source"]
    # one file, and a clear error for a wrong column name
    cfg = make_cfg(tmp_path, {"source": "parquet", "path": str(folder / "b.parquet"), "image_column": "picture",
                              "text_column": "caption"})
    ingest.run(stage_context("ingest", cfg, run))
    check_layout(run, 2)
    cfg = make_cfg(tmp_path, {"source": "parquet", "path": str(folder / "b.parquet")})
    with pytest.raises(DatasetError, match=r"no column 'image'.*\['picture', 'caption'\]"):
        ingest.run(stage_context("ingest", cfg, run))


def test_modelscope_local_imagefolder_and_parquet(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    # an imagefolder: train/*.jpg + metadata.csv (the tutorial's own training format)
    imf = tmp_path / "imagefolder"
    (imf / "train").mkdir(parents=True)
    rows = ["file_name,text"]
    for i in range(3):
        (imf / "train" / f"{i}.jpg").write_bytes(image_bytes((70 + i, 80)))
        rows.append(f"{i}.jpg,二次元 {i}")
    (imf / "train" / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = make_cfg(tmp_path, {"source": "modelscope", "path": str(imf), "dataset_id": "AI-ModelScope/lowres_anime"})
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    samples = check_layout(run, 3)
    assert sorted(s["text"] for s in samples) == ["二次元 0", "二次元 1", "二次元 2"]
    for s in samples:
        i = s["text"].split()[-1]
        assert Path(s["image"][0]).read_bytes() == (imf / "train" / f"{i}.jpg").read_bytes()

    # parquet with embedded bytes, as `modelscope download --dataset` leaves it
    pqd = tmp_path / "parquetds"
    (pqd / "data").mkdir(parents=True)
    table, images = parquet_table(4, struct=True)
    pq.write_table(table.rename_columns(["image", "text"]), pqd / "data" / "train-00000-of-00001.parquet")
    cfg = make_cfg(tmp_path, {"source": "modelscope", "path": str(pqd)})
    ingest.run(stage_context("ingest", cfg, run))
    samples = check_layout(run, 4)
    assert [Path(s["image"][0]).read_bytes() for s in samples] == images
    assert not (Path.home() / ".cache" / "modelscope" / "hub" / "datasets" / "parquetds").exists()


def test_modelscope_hub_id_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg(tmp_path, {"source": "modelscope", "dataset_id": "AI-ModelScope/lowres_anime"})
    with pytest.raises(DatasetError, match=r"modelscope download --dataset AI-ModelScope/lowres_anime "
                                                  r"--local-dir DIR.*data.path"):
        ingest.run(stage_context("ingest", cfg, RunDir(tmp_path / "run")))
    cfg = make_cfg(tmp_path, {"source": "modelscope", "path": str(tmp_path / "nowhere"),
                              "dataset_id": "AI-ModelScope/lowres_anime"})
    with pytest.raises(DatasetError, match="nowhere does not exist.*modelscope download"):
        ingest.run(stage_context("ingest", cfg, RunDir(tmp_path / "run")))


@pytest.mark.parametrize("content", ["", "{broken\n" + json.dumps({"text": "x"}) + "\n"])
def test_empty_dataset_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    cfg = make_cfg(tmp_path, {"source": "jsonl", "path": str(path)})
    run = RunDir(tmp_path / "run")
    with pytest.raises(DatasetError, match=f"no usable sample in {path}") as e:
        ingest.run(stage_context("ingest", cfg, run))
    assert isinstance(e.value, ValueError)
    assert not run.data.exists()  # nothing half-written


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    for source in ("folder", "jsonl", "parquet"):
        cfg = make_cfg(tmp_path, {"source": source, "path": str(tmp_path / "absent")})
        with pytest.raises(DatasetError, match="absent"):
            ingest.run(stage_context("ingest", cfg, RunDir(tmp_path / "run")))
