"""Image paths from dataset metadata: only regular files inside the dataset root (unless opted in), under a
size cap, reach the run directory, never more readable than their source; ingest and filter stop on the stop
flag and a rerun completes."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import stage_context
from PIL import Image

from kolora.core import interrupt
from kolora.core.config import validate_config
from kolora.core.rundir import RunDir
from kolora.filter import stage as kfilter
from kolora.ingest import safe_paths
from kolora.ingest import samples as ingest_samples
from kolora.ingest import stage as ingest
from kolora.pipeline.runner import run_stage

REPO = Path(__file__).resolve().parents[1]
KEEP_ALL = [{"image_shape_filter": {"min_width": 1, "min_height": 1, "any_or_all": "any"}}]
CAP = 20_000


def make_cfg(tmp_path: Path, data: dict[str, Any]):
    return validate_config({"name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
                            "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")},
                            "data": data, "filter": {"ops": KEEP_ALL}})


def png(seed: int, size: tuple[int, int] = (24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed % 256, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def big_png() -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (100, 100), os.urandom(30_000)).save(buf, format="PNG")
    assert len(buf.getvalue()) > CAP
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch):
    interrupt.clear()
    old = os.umask(0o022)
    yield
    os.umask(old)
    interrupt.clear()


def hostile_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, str], list[Path]]:
    """A folder dataset whose metadata.csv names escapes and special files; returns (folder, {file_name:
    expected reason prefix or "" for kept}, the files outside the root)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    ds = tmp_path / "lab" / "ds"
    (ds / "img").mkdir(parents=True)
    secrets = [tmp_path / "secret", home / ".ssh" / "id_ed25519", tmp_path / "abs.png"]
    for n, p in enumerate(secrets):
        p.write_bytes(png(200 + n))
        p.chmod(0o600)
    (ds / "img" / "good.png").write_bytes(png(1))
    (ds / "img" / "private.png").write_bytes(png(2))
    (ds / "img" / "private.png").chmod(0o600)
    (ds / "img" / "inner-link.png").symlink_to("good.png")
    (ds / "img" / "escape-link.png").symlink_to(tmp_path / "secret")
    (ds / "img" / "big.png").write_bytes(big_png())
    os.mkfifo(ds / "img" / "fifo.png")
    (ds / "img" / "dir.png").mkdir()
    rows = {
        "img/good.png": "", "img/private.png": "", "img/inner-link.png": "", "img/missing.png": "",
        "../../secret": "outside the dataset root", "~/.ssh/id_ed25519": "outside the dataset root",
        str(tmp_path / "abs.png"): "outside the dataset root", "img/escape-link.png": "outside the dataset root",
        "img/../../../secret": "outside the dataset root",
        "/dev/zero": "outside the dataset root", "img/fifo.png": "not a regular file",
        "img/dir.png": "not a regular file", "img/big.png": "file too large",
    }
    with open(ds / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for name in rows:
            w.writerow([name, f"caption {name}"])
    return ds, rows, secrets


def rejected_by_text(run: RunDir) -> dict[str, str]:
    rows = [json.loads(x) for x in (run.data / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["text"].removeprefix("caption "): r["reason"] for r in rows}


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_escapes_and_special_files_are_rejected_and_nothing_outside_is_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds, rows, secrets = hostile_dataset(tmp_path, monkeypatch)
    cfg = make_cfg(tmp_path, {"source": "folder", "path": str(ds), "max_image_bytes": CAP})
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    rejected = rejected_by_text(run)
    assert set(rejected) == {name for name, why in rows.items() if why}
    for name, why in rows.items():
        if why:
            assert rejected[name].startswith(why), (name, rejected[name])
    assert "a fifo" in rejected["img/fifo.png"] and "a folder" in rejected["img/dir.png"]
    samples = [json.loads(x) for x in (run.data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["text"].removeprefix("caption ") for s in samples] == [n for n, why in rows.items() if not why]

    # the filter (stopped once in its header pass, then rerun) reports every rejection with its reason
    calls = {"n": 0}
    real_check = kfilter.check_image

    def check_then_stop(path):
        calls["n"] += 1
        interrupt.request("SIGUSR2")  # the job's time is up while the header pass runs
        return real_check(path)

    monkeypatch.setattr(kfilter, "check_image", check_then_stop)
    with pytest.raises(interrupt.Interrupted, match="filter stopped in the header pass"):
        kfilter.run(stage_context("filter", cfg, run))
    assert calls["n"] >= 1 and not (run.filter / "report.json").exists() and not run.trainset.exists()
    interrupt.clear()
    monkeypatch.setattr(kfilter, "check_image", real_check)
    kfilter.run(stage_context("filter", cfg, run))
    report = json.loads((run.filter / "report.json").read_text(encoding="utf-8"))
    by_text = {e["text"].removeprefix("caption "): e for e in report["samples"]}
    assert set(by_text) == set(rows) and all(e["reason"] for e in report["samples"] if not e["kept"])
    assert {n for n, e in by_text.items() if e["stage"] == "ingest"} == {n for n, why in rows.items() if why}
    assert by_text["img/missing.png"]["reason"] == "missing file"
    assert {n for n, e in by_text.items() if e["kept"]} == {"img/good.png", "img/private.png", "img/inner-link.png"}

    # nothing outside the dataset root is in the run directory: no inode, no bytes
    outside = {(p.stat().st_dev, p.stat().st_ino): p.read_bytes() for p in secrets}
    for p in files_under(run.root):
        st = p.stat()
        assert (st.st_dev, st.st_ino) not in outside, p
        assert p.read_bytes() not in outside.values(), p


def test_copies_are_no_more_readable_than_their_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds, _, _ = hostile_dataset(tmp_path, monkeypatch)
    cfg = make_cfg(tmp_path, {"source": "folder", "path": str(ds), "max_image_bytes": CAP})
    linked = RunDir(tmp_path / "linked")
    ingest.run(stage_context("ingest", cfg, linked))  # same file system: hard links, the source's inode and mode
    images = {Path(s["image"][0]).name: Path(s["image"][0]) for s in map(
        json.loads, (linked.data / "metadata.jsonl").read_text(encoding="utf-8").splitlines())}
    assert images["000001.png"].stat().st_ino == (ds / "img" / "private.png").stat().st_ino
    assert stat.S_IMODE(images["000001.png"].stat().st_mode) == 0o600

    def no_link(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)  # another file system: copies
    copied = RunDir(tmp_path / "copied")
    summary = ingest.run(stage_context("ingest", cfg, copied))
    assert summary["copied"] == 3
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (copied.data / "images").iterdir()}
    assert modes == {"000000.png": 0o644, "000001.png": 0o600, "000002.png": 0o644}
    assert (copied.data / "images" / "000001.png").read_bytes() == (ds / "img" / "private.png").read_bytes()
    # the filter's trainset copies (when it cannot link) keep it so too
    safe_paths.copy_no_wider(copied.data / "images" / "000001.png", tmp_path / "train-copy.png")
    assert stat.S_IMODE((tmp_path / "train-copy.png").stat().st_mode) == 0o600


def test_opt_in_admits_external_regular_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds, rows, _ = hostile_dataset(tmp_path, monkeypatch)
    cfg = make_cfg(tmp_path, {"source": "folder", "path": str(ds), "max_image_bytes": CAP,
                              "allow_external_paths": True})
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    rejected = rejected_by_text(run)
    assert rejected["/dev/zero"].startswith("not a regular file (/dev/zero is a character device)")
    assert set(rejected) == {"/dev/zero", "img/fifo.png", "img/dir.png", "img/big.png"}


def test_parquet_bytes_are_capped_and_written_no_wider(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp_path / "ds" / "train.parquet"
    file.parent.mkdir()
    pq.write_table(pa.table({"image": [png(1), big_png()], "text": ["small", "big"]}), file)
    file.chmod(0o640)
    cfg = make_cfg(tmp_path, {"source": "parquet", "path": str(file), "max_image_bytes": CAP})
    run = RunDir(tmp_path / "run")
    ingest.run(stage_context("ingest", cfg, run))
    rejected = [json.loads(x) for x in (run.data / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["reason"].split(" (")[0] for r in rejected] == ["file too large"]
    (image,) = (run.data / "images").iterdir()
    assert stat.S_IMODE(image.stat().st_mode) == 0o640 & 0o644


def test_ingest_stops_on_the_stop_flag_and_a_rerun_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds, rows, _ = hostile_dataset(tmp_path, monkeypatch)
    cfg = make_cfg(tmp_path, {"source": "folder", "path": str(ds), "max_image_bytes": CAP})
    run = RunDir(tmp_path / "run")
    real = ingest_samples._materialise

    def materialise_then_stop(*a, **k):
        interrupt.request("SIGTERM")
        return real(*a, **k)

    monkeypatch.setattr(ingest_samples, "_materialise", materialise_then_stop)
    with pytest.raises(interrupt.Interrupted, match=r"ingest stopped after 1 records on SIGTERM"):
        run_stage("ingest", cfg, run)  # as `kolora run` and the Slurm job call it
    assert not run.data.exists() and not list(run.root.glob(".data.*"))  # nothing half-written is left
    assert json.loads((run.root / "manifest.json").read_text())["stages"]["ingest"]["status"] == "interrupted"
    interrupt.clear()
    monkeypatch.setattr(ingest_samples, "_materialise", real)
    summary = run_stage("ingest", cfg, run)
    assert summary["samples"] == sum(not why for why in rows.values())
    assert json.loads((run.root / "manifest.json").read_text())["stages"]["ingest"]["status"] == "complete"
    assert run_stage("ingest", cfg, run) == {"skipped": True}


def test_guard_unit_rules(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(b"x" * 10)
    guard = safe_paths.PathGuard(root, allow_external=False, max_bytes=5)
    with pytest.raises(safe_paths.Unsafe, match="file too large"):
        guard.check(root / "a.png")
    assert guard.check(root / "missing.png") == (root / "missing.png", None)
    with pytest.raises(safe_paths.Unsafe, match="outside the dataset root"):
        guard.check(root / ".." / "root-sibling.png")


def test_check_dataset_names_the_rows_ingest_would_reject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kolora.ingest.sources import check_folder

    ds, rows, _ = hostile_dataset(tmp_path, monkeypatch)
    (ds / "img" / "big.png").unlink()  # under the default cap it would be fine; not this test's point
    problems = "\n".join(check_folder(ds).problems)
    for name, why in rows.items():
        if why and name != "img/big.png":
            line = next((p for p in problems.splitlines() if f"image {Path(name).expanduser()}" in p
                         or f"image {ds / name}" in p), "")
            assert why in line, (name, problems)
    assert "img/missing.png does not exist" in problems
    assert "good.png" not in problems and "private.png" not in problems
