"""Every image the filter keeps decodes: a dirty dataset through ingest + filter, checked against a full decode
computed here independently; the verification pool and the filter stop on the stop flag."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import stage_context
from PIL import Image, ImageFile

from kolora.core import interrupt
from kolora.core.config import validate_config
from kolora.core.rundir import RunDir
from kolora.filter import decode as decode_check
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest

REPO = Path(__file__).resolve().parents[1]
KEEP_ALL = [{"image_shape_filter": {"min_width": 1, "min_height": 1, "any_or_all": "any"}}]


def make_cfg(tmp_path: Path, data: dict[str, Any]):
    return validate_config({"name": "t", "model": {"path": str(tmp_path / "model"), "tiny": True},
                            "render": {"prompts": str(REPO / "configs/prompts/anime-story.yaml")},
                            "data": data, "filter": {"ops": KEEP_ALL}})


def encoded(fmt: str, seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rnd = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rnd.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def corrupt_huffman_table(jpg: bytes) -> bytes:
    """Header (as PIL reads it) and end marker intact; the decoder rejects the Huffman table."""
    dht = jpg.index(b"\xff\xc4")
    return jpg[:dht + 5] + b"\xff" * 16 + jpg[dht + 21:]


def bad_marker_in_scan(jpg: bytes) -> bytes:
    mid = (jpg.index(b"\xff\xda") + len(jpg)) // 2
    return jpg[:mid] + b"\xff\xc0" + jpg[mid + 2:]


def zeroed_scan(jpg: bytes) -> bytes:
    """Garbage pixels, but libjpeg decodes it (warnings only): decodable, so kept."""
    sos = jpg.index(b"\xff\xda") + 14
    return jpg[:sos] + b"\x00" * (len(jpg) - sos - 2) + jpg[-2:]


def corrupt_idat(png: bytes) -> bytes:
    i = png.index(b"IDAT") + 24
    return png[:i] + bytes(x ^ 0x5A for x in png[i:i + 36]) + png[i + 36:]


def dirty_dataset(root: Path) -> dict[str, str]:
    """A folder dataset: 40 good images and every kind of bad file; returns {file name: kind}."""
    root.mkdir(parents=True)
    files: dict[str, tuple[str, bytes]] = {}
    for i in range(40):
        fmt = "PNG" if i % 4 == 0 else "JPEG"
        files[f"good{i}.{fmt.lower()}"] = ("good", encoded(fmt, i))
    jpg, png = encoded("JPEG", 100), encoded("PNG", 101)
    files.update({
        "truncated.jpg": ("truncated", jpg[:len(jpg) // 2]),
        "truncated.png": ("truncated", png[:len(png) // 2]),
        "text.jpg": ("not an image", b"this is not an image\n" * 10),
        "zero.png": ("zero bytes", b""),
        "huffman.jpg": ("corrupt data", corrupt_huffman_table(jpg)),
        "marker.jpg": ("corrupt data", bad_marker_in_scan(encoded("JPEG", 102))),
        "idat.png": ("corrupt data", corrupt_idat(png)),
        "zeroed.jpg": ("decodable garbage", zeroed_scan(encoded("JPEG", 103))),
    })
    for name, (_, data) in files.items():
        (root / name).write_bytes(data)
    # just over MAX_IMAGE_PIXELS (only a warning from PIL) and over twice that (an error from PIL)
    Image.new("1", (9500, 9500)).save(root / "bomb.png")
    Image.new("1", (14000, 14000)).save(root / "bigbomb.png")
    kinds = {name: kind for name, (kind, _) in files.items()} | {"bomb.png": "bomb", "bigbomb.png": "bomb"}
    with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for name in kinds:
            w.writerow([name, f"caption of {name}"])
    return kinds


def decodes_independently(path: Path) -> bool:
    """Open, load and convert as the cache stage does, truncation an error and bombs refused."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with Image.open(path) as im:
                im.load()
                im.convert("RGB")
        return True
    except Exception:  # noqa: BLE001 - anything the decoder raises means "does not decode"
        return False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


@pytest.fixture(autouse=True)
def _no_stop_request():
    interrupt.clear()
    yield
    interrupt.clear()


def test_kept_set_equals_an_independent_full_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")  # worker processes, whatever this machine's affinity
    ds = tmp_path / "ds"
    kinds = dirty_dataset(ds)
    cfg = make_cfg(tmp_path, {"source": "folder", "path": str(ds)})
    run = RunDir(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ingest.run(stage_context("ingest", cfg, run))
        summary = kfilter.run(stage_context("filter", cfg, run))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]

    expected = {name for name in kinds if decodes_independently(ds / name)}
    assert expected == {n for n, k in kinds.items() if k in ("good", "decodable garbage")}  # the data is as meant
    report = json.loads((run.filter / "report.json").read_text(encoding="utf-8"))
    by_text = {e["text"].removeprefix("caption of "): e for e in report["samples"]}
    assert set(by_text) == set(kinds)
    assert {name for name, e in by_text.items() if e["kept"]} == expected
    assert all(e["reason"] for e in report["samples"] if not e["kept"])
    # the files whose header and end marker are intact were caught by the full decode, not the header pass
    for name in ("huffman.jpg", "marker.jpg", "idat.png"):
        assert by_text[name]["stage"] == "decode", (name, by_text[name])
    for name in ("bomb.png", "bigbomb.png"):  # from the header alone, as a reason (not PIL's warning)
        assert by_text[name]["reason"].startswith("decompression bomb (Image size"), by_text[name]
    assert "corrupt pixel data" in by_text["idat.png"]["reason"]
    assert summary["seconds"]["decode"] >= 0 and summary["kept"] == len(expected)
    # what reaches the cache stage decodes
    train = run.trainset / "train"
    names = [r[0] for r in list(csv.reader(open(train / "metadata.csv", encoding="utf-8")))[1:]]
    assert len(names) == len(expected) and all(decodes_independently(train / n) for n in names)


def test_workers_and_serial_agree_and_bombs_are_reasons(tmp_path: Path) -> None:
    paths = []
    for i in range(decode_check.SERIAL_BELOW + 5):
        p = tmp_path / f"{i}.jpg"
        data = encoded("JPEG", i)
        p.write_bytes(corrupt_huffman_table(data) if i % 7 == 3 else data)
        paths.append(str(p))
    Image.new("1", (300, 300)).save(tmp_path / "bomb.png")
    paths.append(str(tmp_path / "bomb.png"))
    serial = decode_check.verify(paths, workers=1)
    pooled = decode_check.verify(paths, workers=2)
    assert pooled == serial
    assert [r is None for r in serial] == [decodes_independently(Path(p)) for p in paths]
    assert all(r.startswith("corrupt pixel data") for r in serial[:-1] if r)
    assert serial[-1] is None
    old = Image.MAX_IMAGE_PIXELS
    try:
        for limit in (80_000, 30_000):  # over the limit (PIL warns), over twice the limit (PIL raises)
            Image.MAX_IMAGE_PIXELS = limit  # the limit in force in the parent is the workers' limit too
            pooled = decode_check.verify(paths, workers=2)
            assert pooled == decode_check.verify(paths, workers=1)
            assert pooled[:-1] == serial[:-1] and pooled[-1].startswith("decompression bomb ("), pooled[-1]
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_job_cpus_follow_slurm_then_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert decode_check.job_cpus() == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert decode_check.job_cpus() == len(os.sched_getaffinity(0))


def test_verification_stops_on_the_stop_flag(tmp_path: Path) -> None:
    paths = []
    for i in range(8 * decode_check.CHUNK):
        (tmp_path / f"{i}.png").write_bytes(encoded("PNG", i, (16, 16)))
        paths.append(str(tmp_path / f"{i}.png"))
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        interrupt.request("SIGUSR2")  # the signal arrives while chunks are decoding

    with pytest.raises(interrupt.Interrupted, match=rf"of {len(paths)} images\) on SIGUSR2"):
        decode_check.verify(paths, workers=2, progress=progress)
    assert seen and seen[-1] < len(paths)
    interrupt.clear()
    interrupt.request("SIGTERM")
    with pytest.raises(interrupt.Interrupted, match=r"\(0 of"):
        decode_check.verify(paths[:3], workers=1)


def _my_workers() -> list[int]:
    """PIDs of this process's decode workers (children running kolora.filter.decode)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"kolora.filter.decode" in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_worker_that_dies_costs_one_image_not_the_stage(tmp_path: Path) -> None:
    """A decoder crash (here: SIGKILL, as from a segfault or the OOM killer) rejects the image the worker was
    on, with the reason; every other image is still verified."""
    paths = []
    for i in range(12 * decode_check.CHUNK):
        (tmp_path / f"{i}.png").write_bytes(encoded("PNG", i, (96, 96)))
        paths.append(str(tmp_path / f"{i}.png"))
    killed: list[int] = []

    def progress(done: int, total: int) -> None:
        if not killed and done >= 4:
            pids = _my_workers()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

    reasons = decode_check.verify(paths, workers=2, progress=progress)
    assert killed
    crashed = [r for r in reasons if r is not None]
    assert crashed == ["crashed the decoder (killed by SIGKILL)"]
    assert not _my_workers()
