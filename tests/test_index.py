"""`kolora index RUNS_DIR`: RUNS_DIR/index.html lists every run and sweep of the folder with its state (from the run
folder: complete, running, failed), the settings that differ between the runs, the selected checkpoint, scores
with intervals, a grid thumbnail and a link to its report; a damaged neighbour is a row, not a failure; the
page renders and sorts in headless Chromium; `kolora run` refreshes it."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from headless_browser import body_attributes, chromium, dom, screenshot

from kolora.cli.main import main
from kolora.core.stats import mean_interval
from kolora.pipeline.registry import NAMES
from kolora.sweep.index import INDEX, refresh, refresh_for_run

EVIL = 'x<b>"&\'y'  # a run name that is markup


def _copy(demo_run: Path, dst: Path, lr: float | None = None) -> Path:
    """The demo run at dst made of hard links (cheap); the files edited below are replaced, never written into."""
    shutil.copytree(demo_run, dst, copy_function=os.link, ignore=shutil.ignore_patterns(".lock", ".*.lock"))
    if lr is not None:
        _edit_yaml(dst / "config.yaml", lambda c: c["train"].update(lr=lr))
    _edit_json(dst / "manifest.json", lambda m: m.update(name=dst.name))
    return dst


def _replace(path: Path, text: str) -> None:
    path.unlink()  # a hard link to the demo run's file: a new file, not the shared one
    path.write_text(text)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    _replace(path, json.dumps(data))


def _edit_yaml(path: Path, edit) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    _replace(path, yaml.safe_dump(data))


def _stage(status: str, stage: str = "train", **fields):
    def edit(m):
        m["stages"][stage] = {**m["stages"][stage], "status": status, "started": "2099-01-01T00:00:00+00:00",
                              **fields}
        for later in NAMES[NAMES.index(stage) + 1:]:
            m["stages"].pop(later, None)
    return edit


@pytest.fixture(scope="module")
def lab(demo_run, tmp_path_factory) -> Path:
    """A runs dir: the demo run, a copy with another lr and a selected checkpoint, a failed run, a running one
    (its `kolora run` alive: this process holds the lock), a run named with markup, a damaged run, and a sweep of
    two variants (its sheet a stand-in)."""
    runs = tmp_path_factory.mktemp("lab") / "runs"
    runs.mkdir()
    _copy(demo_run, runs / "demo")
    hot = _copy(demo_run, runs / "hot-lr", lr=0.0042)
    _replace(hot / "lora" / "selection.json", json.dumps(
        {"step": 4, "metric": "aesthetic", "value": {"mean": 5.25, "low": 5.0, "high": 5.5, "n": 8},
         "runner_up": None}))
    _edit_json(hot / "eval" / "scores.json", lambda s: s["summary"]["aesthetic"].update(
        lora={"mean": 9.5, "low": 9.25, "high": 9.75, "n": 8}))
    failed = _copy(demo_run, runs / "oom", lr=0.0042)
    _edit_json(failed / "manifest.json", _stage("failed", error="CUDA out of memory\ntraceback"))
    busy = _copy(demo_run, runs / "busy")
    _edit_json(busy / "manifest.json", _stage("running"))
    (busy / ".lock").write_text(json.dumps({
        "kind": "run", "host": socket.gethostname(), "pid": os.getpid(), "user": "someone",
        "started": "2099-01-01T00:00:00+00:00", "heartbeat": time.time(), "token": "by-hand"}))
    _copy(demo_run, runs / EVIL)
    damaged = _copy(demo_run, runs / "damaged")
    _replace(damaged / "manifest.json", "{ not json")
    sweep = runs / "sw"
    sweep.mkdir()
    for name, lr in (("lr-1", 0.001), ("lr-2", 0.002)):
        _copy(demo_run, sweep / name, lr=lr)
    (sweep / "sweep.json").write_text(json.dumps({"name": "sw", "vary": {"train.lr": [0.001, 0.002]},
                                                  "created": "2026-01-02T00:00:00+00:00", "variants": [
        {"name": n, "overrides": {"train.lr": lr}, "run_dir": n} for n, lr in (("lr-1", 0.001), ("lr-2", 0.002))]}))
    (sweep / "sweep.html").write_text("<!doctype html><title>sheet</title>")
    (runs / "notes.txt").write_text("not a run")
    (runs / "scratch").mkdir()  # a folder of something else: not listed
    return runs


def _rows(page: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r'<tr class="[^"]+" data-name="([^"]+)">.*?</tr>', page)}


def test_index_lists_every_run_and_sweep(lab, demo_run, capsys):
    assert (demo_run.parent / INDEX).is_file()  # `kolora run` (the fixture's) refreshed its runs dir's page
    assert 'data-name="demo"' in (demo_run.parent / INDEX).read_text()

    assert main(["index", str(lab)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(lab / INDEX) and "8 runs, 1 sweeps; unreadable: damaged" in out.err
    page = (lab / INDEX).read_text()
    rows = _rows(page)
    evil = EVIL.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") \
        .replace("'", "&#x27;")
    assert set(rows) == {"demo", "hot-lr", "oom", "busy", evil, "damaged", "sw", "sw/lr-1", "sw/lr-2"}
    assert "<b>" not in page  # the markup name is text

    def state(name):
        return re.search(r'<td class="([\w-]+)" data-sort="[^"]*">', rows[name]).group(1)

    assert {n: state(n) for n in rows} == {
        "demo": "complete", "hot-lr": "complete", "oom": "failed", "busy": "running", evil: "complete",
        "damaged": "unreadable", "sw": "complete", "sw/lr-1": "complete", "sw/lr-2": "complete"}
    assert "stage train failed: CUDA out of memory" in rows["oom"]

    # the settings that differ: train.lr only (name, steps and every other field are the same)
    head = re.findall(r'<th data-key="([^"]+)"', page)
    assert head == ["grid", "name", "kind", "created", "state", "steps", "train.lr", "checkpoint", "aesthetic",
                    "clip", "report"]
    lr = head.index("train.lr")

    def cells(name):
        return re.findall(r"<td[^>]*>(.*?)</td>", rows[name])

    assert cells("hot-lr")[lr] == "0.0042" and cells("sw/lr-2")[lr] == "0.002"
    # the selected checkpoint where lora/selection.json says, else the last; scores with intervals: as
    # scores.json gives them, else bootstrapped over its tiles
    assert cells("hot-lr")[head.index("checkpoint")].startswith("step 4 (aesthetic 5.2500 [5.0000, 5.5000])")
    assert cells("demo")[head.index("checkpoint")] == "last"
    assert cells("hot-lr")[head.index("aesthetic")] == "9.5<br><small>[9.25, 9.75] n=8</small>"
    tiles = json.loads((demo_run / "eval" / "scores.json").read_text())["tiles"]
    clip = mean_interval([t["clip"]["lora"] for t in tiles])
    assert clip.n > 1 and cells("demo")[head.index("clip")] == \
        f"{clip.mean:.4g}<br><small>[{clip.low:.4g}, {clip.high:.4g}] n={clip.n}</small>"
    steps = yaml.safe_load((demo_run / "config.yaml").read_text())["train"]["steps"]
    assert cells("demo")[head.index("steps")] == f"{steps} / {steps}"
    # the sweep: its best variant's scores and thumbnail, a link to its sheet
    assert "best: lr-" in cells("sw")[head.index("checkpoint")] and "varies train.lr" in cells("sw")[head.index("kind")]

    # thumbnails inline (JPEG), links relative to the report of each run that has one, nothing from a network
    # 7 readable runs + the sweep's (its best variant's grid)
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', page)) == 8
    links = re.findall(r'href="([^"]+)"', page)
    assert len(links) == 8 and all((lab / urllib.parse.unquote(h)).is_file() for h in links), links
    assert "sw/sweep.html" in links and not re.search(r'(src|href)="(?!data:)[a-z]+://', page)


def test_refresh_never_fails_its_caller(tmp_path, lab, capsys):
    # `kolora index` of a run's folder, or of none, names the fix instead
    assert main(["index", str(lab / "demo")]) == 2
    assert "is the folder of run demo" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert refresh(tmp_path / "missing") is None
    (tmp_path / "file").write_text("x")
    assert refresh(tmp_path / "file") is None
    # a variant refreshes the runs dir its sweep is in
    assert refresh_for_run(lab / "sw" / "lr-1") == lab / INDEX and not (lab / "sw" / INDEX).exists()


def test_index_renders_and_sorts_in_headless_chromium(lab, tmp_path):
    from PIL import Image, ImageStat

    browser = chromium()
    assert main(["index", str(lab)]) == 0
    page = lab / INDEX
    body = body_attributes(browser, page, tmp_path / "profile")
    assert body["data-images"] == "8/8" and body["data-tables"] == "9"  # every thumbnail decoded, every row
    shot = screenshot(browser, page, tmp_path / "profile", tmp_path / "index.png", (1400, 1000))
    with Image.open(shot) as im:
        assert ImageStat.Stat(im.convert("L")).stddev[0] > 10, "the screenshot is blank"
    # the page's sort, run by the browser: #sort=-KEY sorts descending on load (numbers as numbers)
    # (stable: equal values keep the page's order), rows without the value last
    for key, first, last in (("-train.lr", ["hot-lr", "oom", "sw/lr-2"], ["damaged", "sw"]),
                             ("name", ["busy", "damaged", "demo"], [EVIL])):
        built = dom(browser, page.as_uri() + f"#sort={key}", tmp_path / "profile")
        assert f'data-sorted="{key}"' in built
        order = [html.unescape(n) for n in re.findall(r'<tr class="[^"]+" data-name="([^"]+)">', built)]
        assert order[:len(first)] == first and order[-len(last):] == last, order


def test_the_job_that_finishes_a_run_refreshes_the_index(lab, tmp_path):
    from kolora.launch.cluster import JOBS
    from kolora.launch.jobs import StageJob

    (lab / INDEX).unlink(missing_ok=True)
    run = lab / "demo"
    for job in ("render", "grid"):  # stages complete: skipped
        StageJob(str(run), str(run / "config.yaml"), str(tmp_path), "stamp", job, JOBS[job]).run_here(0)
        assert (lab / INDEX).is_file() == (job == "grid")
    assert 'data-name="demo"' in (lab / INDEX).read_text()
