"""A dead run is not "running" (issue #24, item 4). A run whose process was killed (kill -9, an out-of-memory
kill, SIGTERM then SIGKILL), whose stage raised an error its bookkeeping did not record, whose disk filled up,
or whose Slurm jobs are all gone, is "stopped": `kolora status` of the run (or of its sweep) says so with the
stage it was in and what is complete, exit status 3; the next `kolora run` / `kolora resume` says it continues
a stopped run. The verdict comes from the manifest and the run lock (kolora.pipeline.state.run_state), read-only.

The table: setup → argv → exit status, the words the output must hold, no traceback, and for `status`
nothing in the folder changed. Negative controls (a live holder stays "running") are a separate test."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import DEMO, PROMPTS, tree_state
from test_launch import FAKE, LOCAL

from kolora.cli.main import main
from kolora.pipeline import registry as stages

HOST = socket.gethostname()
STAMP = "20260101-000000-abcd"
SLURM_JOBS = {"filter": ("1001", ["ingest", "filter"], ["1001"]), "train": ("1002", ["cache", "train"], ["1002"]),
              "render": ("1003", ["render"], [f"1003_{i}" for i in range(4)]),
              "grid": ("1004", ["grid", "evaluate", "report"], ["1004"])}


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped): certainly not alive on this host."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


DEAD = _dead_pid()


# ---- the worlds ----------------------------------------------------------------------------------------------
def _config(w: Path) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw["model"]["path"] = str(w / "model-not-built")  # tiny: built on first use, which ingest never needs
    raw["render"]["prompts"] = str(PROMPTS)
    raw["scorers"]["dir"] = str(w / "scorers-not-built")
    (w / "demo.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    return w / "demo.yaml"


def _run(w: Path, statuses: dict[str, str | dict], lock: dict | None = None, name: str = "demo",
         slurm: bool = False, under: Path | None = None) -> Path:
    """A run folder as a process leaves it: its config, a manifest with these stage statuses, and maybe a lock."""
    root = (under or w / "runs") / name
    root.mkdir(parents=True)
    raw = yaml.safe_load((w / "demo.yaml").read_text())
    (root / "config.yaml").write_text(yaml.safe_dump({**raw, "name": name}, allow_unicode=True))
    entries = {s: v if isinstance(v, dict) else {"status": v} for s, v in statuses.items()}
    for n, entry in enumerate(entries.values()):
        entry.setdefault("started", f"2026-01-01T00:00:{n:02d}+0000")
    manifest = {"name": name, "created": "2026-01-01T00:00:00+00:00", "stages": entries}
    if slurm:
        jobs = {job: {"job_id": job_id, "stages": s, "task_ids": tasks, "array": len(tasks) > 1}
                for job, (job_id, s, tasks) in SLURM_JOBS.items()}
        manifest["slurm"] = {"latest": STAMP, "jobs": {j: i["job_id"] for j, i in jobs.items()}, "submissions": {
            STAMP: {"profile": "local", "profile_file": LOCAL, "folder": str(root / "slurm" / STAMP),
                    "config_file": str(root / "config.yaml"), "jobs": jobs}}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if lock is not None:
        (root / ".lock").write_text(json.dumps(lock))
    return root


def _lock(**fields) -> dict:
    return {"kind": "run", "host": HOST, "pid": DEAD, "user": "someone", "started": "2026-01-01T00:00:00+00:00",
            "heartbeat": time.time(), "token": "by-hand", **fields}


def _submission_lock(**fields) -> dict:
    return _lock(kind="submission", stamp=STAMP, job_ids=["1001", "1002", "1003", "1004"], **fields)


def _until(stage: str) -> dict[str, str]:
    """Every stage before `stage` complete."""
    return {s: "complete" for s in stages.NAMES[:stages.NAMES.index(stage)]}


def killed_in(stage: str):
    def setup(w):
        _run(w, {**_until(stage), stage: "running"}, _lock())
    return setup


def lock_gone_in(stage: str):
    def setup(w):  # its process ended without recording it, and without a lock (released or deleted)
        _run(w, {**_until(stage), stage: "running"})
    return setup


def other_host_silent(w):
    _run(w, {**_until("train"), "train": "running"},
         _lock(host="elsewhere.example", pid=12345, heartbeat=time.time() - 3600))


def damaged_lock_old(w):
    root = _run(w, {**_until("cache"), "cache": "running"})
    (root / ".lock").write_text('{"kind": "run", "ho')  # its writer died half-way through writing it
    old = time.time() - 3600
    os.utime(root / ".lock", (old, old))


def sigterm_in_render(w):
    """`kolora run` stopped on SIGTERM during render: the manifest says interrupted, the lock is released."""
    why = "render task 0 stopped after 1 of 16 tiles (SIGTERM); the rest render when it runs again"
    _run(w, {**_until("render"), "render": {"status": "interrupted", "error": why}})


def sigterm_then_sigkill_in_render(w):
    """SIGTERM during a tile that outlasted the grace time, then SIGKILL (Slurm's KillWait, `timeout -k`)."""
    _run(w, {**_until("render"), "render": "running"}, _lock())


def slurm_jobs_gone(stage: str, lock: bool = True, status: str = "running"):
    def setup(w):  # squeue and sacct know none of its jobs (fake clients answer nothing)
        _run(w, {**_until(stage), stage: status}, _submission_lock(heartbeat=time.time() - 3600) if lock else None,
             slurm=True)
    return setup


def sweep_variant_killed(w):
    sweep = w / "runs" / "sw"
    sweep.mkdir(parents=True)
    names = ["lr-1e-3", "lr-3e-3"]
    (sweep / "sweep.json").write_text(json.dumps({"name": "sw", "launcher": "in-process", "variants": [
        {"name": n, "overrides": {"train.lr": float(n[3:])}, "run_dir": n} for n in names]}))
    _run(w, {s: "complete" for s in stages.NAMES}, name=names[0], under=sweep)
    _run(w, {**_until("train"), "train": "running"}, _lock(), name=names[1], under=sweep)


def completion_check_raises(w):
    """An uncaught error after the stage's work (its completion check raised): recorded as failed."""
    def boom(cfg, run, complete):
        raise RuntimeError("the completion check broke")

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(stages.BY_NAME, "ingest", dataclasses.replace(stages.get("ingest"), done=boom))
        assert main(["run", str(w / "demo.yaml"), "--stage", "ingest", "--runs-dir", str(w / "runs")]) == 1


def disk_full(w):
    """The stage fails on a full disk, and recording the failure fails on it too."""
    from kolora.core.rundir import RunDir
    from kolora.ingest import stage as ingest

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    record = RunDir.record_stage
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ingest, "run", full)
        mp.setattr(RunDir, "record_stage",
                   lambda self, stage, **f: full() if f.get("status") != "running" else record(self, stage, **f))
        assert main(["run", str(w / "demo.yaml"), "--stage", "ingest", "--runs-dir", str(w / "runs")]) == 1


def killed_for_real(w):
    """kill -9 of a real `kolora run` while its ingest stage runs (made long enough to be caught at it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "kolora.cli.main", "run", str(w / "demo.yaml"), "--stage", "ingest",
                             "--set", "data.synthetic.count=3000", "--runs-dir", str(w / "runs")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest, deadline = w / "runs" / "demo" / "manifest.json", time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads(manifest.read_text())["stages"]["ingest"]["status"] == "running":
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(manifest.read_text())["stages"]["ingest"]["status"] == "running"
    (w / "killed.pid").write_text(str(proc.pid))


STATUS = ["status", "demo", "--runs-dir", "{W}/runs"]
DIED = "its process died (pid {DEAD} on host {HOST})"

# (id, setup, argv, exit status, what the output must hold, read-only); {W}: the world, {DEAD}: the dead pid
CASES = [
    ("kill-9-in-ingest", killed_in("ingest"), STATUS, 3,
     ["): stopped (ingest)", f"STOPPED: stage ingest was running when {DIED}; complete: none"], True),
    ("kill-9-in-cache", killed_in("cache"), STATUS, 3,
     ["stopped (cache)", f"stage cache was running when {DIED}; complete: ingest, filter"], True),
    ("kill-9-in-train", killed_in("train"), STATUS, 3,
     ["stopped (train)", f"stage train was running when {DIED}; complete: ingest, filter, cache"], True),
    ("kill-9-in-report", killed_in("report"), STATUS, 3,
     ["stopped (report)", f"stage report was running when {DIED}; complete: ingest, filter, cache, train, select, "
      "render, grid, evaluate"], True),
    ("lock-gone-in-filter", lock_gone_in("filter"), STATUS, 3,
     ["stopped (filter)", "stage filter was running when its process ended (no process holds the run lock); "
      "complete: ingest"], True),
    ("other-host-no-heartbeat", other_host_silent, STATUS, 3,
     ["stopped (train)", "stage train was running when its process stopped sending heartbeats "
      "(pid 12345 on host elsewhere.example: no heartbeat for 3"], True),
    ("damaged-lock-left-long-ago", damaged_lock_old, STATUS, 3,
     ["stopped (cache)", "stage cache was running when its writer left a damaged run lock"], True),
    ("sigterm-in-render", sigterm_in_render, STATUS, 3,
     ["stopped (render)", "STOPPED: stage render was interrupted: render task 0 stopped after 1 of 16 tiles "
      "(SIGTERM); the rest render when it runs again; complete: ingest, filter, cache, train"], True),
    ("sigterm-then-sigkill-in-render", sigterm_then_sigkill_in_render, STATUS, 3,
     ["stopped (render)", f"stage render was running when {DIED}"], True),
    ("kill-9-for-real", killed_for_real, STATUS, 3,
     ["stopped (ingest)", "stage ingest was running when its process died (pid {KILLED} on host {HOST}); "
      "complete: none"], True),
    ("uncaught-error-after-the-stage", completion_check_raises, STATUS, 1,
     ["): failed (ingest)", "FAILED: stage ingest: RuntimeError: the completion check broke"], True),
    ("disk-full-also-for-the-record", disk_full, STATUS, 3,
     ["stopped (ingest)", "stage ingest was running when its process ended"], True),
    ("slurm-jobs-gone-in-train", slurm_jobs_gone("train"), STATUS, 3,
     ["GONE", "STOPPED: stage train was running when its Slurm jobs ended (none of its Slurm jobs "
      "(1001 1002 1003 1004) is queued or running); complete: ingest, filter, cache", "`kolora resume demo`"], True),
    ("slurm-jobs-gone-no-lock", slurm_jobs_gone("filter", lock=False), STATUS, 3,
     ["STOPPED: stage filter was running when its process ended (no process holds the run lock); "
      "complete: ingest"], True),
    ("slurm-render-left-partial", slurm_jobs_gone("render", status="partial"), STATUS, 3,
     ["STOPPED: stage render was left partial (some of its tasks done) when its Slurm jobs ended"], True),
    ("sweep-variant-killed", sweep_variant_killed, ["status", "sw", "--runs-dir", "{W}/runs"], 3,
     ["stopped (train)", f"STOPPED: lr-3e-3: stage train was running when {DIED}; complete: ingest, filter, "
      "cache"], True),
    ("run-continues-a-killed-run", killed_in("ingest"),
     ["run", "{W}/demo.yaml", "--stage", "ingest", "--runs-dir", "{W}/runs"], 0,
     [f"kolora: continuing stopped run demo: stage ingest was running when {DIED}; complete: none\n"], False),
    ("run-continues-after-sigterm", sigterm_in_render,
     ["run", "{W}/demo.yaml", "--stage", "ingest", "--runs-dir", "{W}/runs"], 0,
     ["kolora: continuing stopped run demo: stage render was interrupted: render task 0 stopped after 1 of 16 "
      "tiles (SIGTERM)"], False),
    ("resume-continues-gone-jobs", slurm_jobs_gone("train"), ["resume", "demo", "--runs-dir", "{W}/runs"], 0,
     ["kolora: continuing stopped run demo: stage train was running when its Slurm jobs ended (none of its "
      "Slurm jobs (1001 1002 1003 1004) is queued or running); complete: ingest, filter, cache\n",
      "queued 4 jobs"], False),
]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo config and fake Slurm clients that know no job (squeue and sacct answer, with nothing)."""
    fake = tmp_path / "fake-slurm"
    fake.mkdir()
    for name, body in FAKE.items():
        (fake / name).write_text("#!/bin/bash\n" + body + "\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM", str(fake))
    monkeypatch.delenv("KOLORA_RUNS", raising=False)
    _config(tmp_path)
    return tmp_path


@pytest.mark.parametrize("setup, argv, code, words, read_only", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_dead_run_is_stopped_not_running(world, setup, argv, code, words, read_only, capsys):
    setup(world)
    capsys.readouterr()
    killed = (world / "killed.pid").read_text() if (world / "killed.pid").is_file() else ""
    before = tree_state(world / "runs")
    rc = main([a.replace("{W}", str(world)) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in err, out + err
    assert rc == code, out + err
    for word in words:
        word = word.format(W=world, DEAD=DEAD, HOST=HOST, KILLED=killed)
        assert word in out + err, f"{word!r} not in:\n{out}{err}"
    assert "running (" not in out and "): running" not in out, out
    if read_only:
        assert tree_state(world / "runs") == before, "status wrote or deleted something"


# ---- negative controls: a live holder stays "running" (these pass on the base too) -------------------------
def test_a_live_holder_is_running(world, capsys):
    holder = subprocess.Popen(["sleep", "30"])
    try:
        root = _run(world, {**_until("train"), "train": "running"}, _lock(pid=holder.pid))
        before = tree_state(root)
        assert main(STATUS[:2] + ["--runs-dir", str(world / "runs")]) == 0
        out = capsys.readouterr().out
        assert "): running (train)" in out and "STOPPED" not in out, out
        assert tree_state(root) == before
    finally:
        holder.kill()
        holder.wait()


def test_another_hosts_fresh_heartbeat_is_running(world, capsys):
    _run(world, {**_until("render"), "render": "running"}, _lock(host="elsewhere.example", pid=12345))
    assert main(STATUS[:2] + ["--runs-dir", str(world / "runs")]) == 0
    out = capsys.readouterr().out
    assert "): running (render)" in out and "STOPPED" not in out, out


def test_a_queued_slurm_job_is_running(world, capsys):
    _run(world, {**_until("train"), "train": "running"}, _submission_lock(heartbeat=time.time() - 3600), slurm=True)
    (world / "fake-slurm" / "squeue.txt").write_text("1002|RUNNING|gpu|None\n1003_[0-3]|PENDING|gpu|Dependency\n"
                                                     "1004|PENDING|cpu|Dependency\n")
    (world / "fake-slurm" / "sacct.txt").write_text("1001|COMPLETED|cpu|0:0|||||\n")
    assert main(STATUS[:2] + ["--runs-dir", str(world / "runs")]) == 0
    out = capsys.readouterr().out
    assert "STOPPED" not in out and "GONE" not in out and "RUNNING" in out, out


def test_a_stage_that_raises_system_exit_is_recorded_failed(world, capsys):
    """Any BaseException ends the stage as failed in the manifest (a stop request is "interrupted" instead)."""
    from kolora.ingest import stage as ingest
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit):
        mp.setattr(ingest, "run", lambda *a, **k: sys.exit(7))
        main(["run", str(world / "demo.yaml"), "--stage", "ingest", "--runs-dir", str(world / "runs")])
    entry = json.loads((world / "runs" / "demo" / "manifest.json").read_text())["stages"]["ingest"]
    assert entry["status"] == "failed" and entry["error"] == "SystemExit: 7", entry
    assert not (world / "runs" / "demo" / ".lock").exists()
    assert main(STATUS[:2] + ["--runs-dir", str(world / "runs")]) == 1
    assert "FAILED: stage ingest: SystemExit: 7" in capsys.readouterr().out


def test_without_an_answer_from_squeue_status_claims_nothing(world, capsys):
    _run(world, {**_until("train"), "train": "running"}, _submission_lock(heartbeat=time.time() - 3600), slurm=True)
    (world / "fake-slurm" / "squeue").write_text("#!/bin/bash\necho 'Unable to contact slurm controller' >&2\nexit 1\n")
    assert main(STATUS[:2] + ["--runs-dir", str(world / "runs"), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)["state"]
    assert state["state"] == "unknown" and "squeue did not answer" in state["detail"], state


def test_status_json_of_a_submitted_run_says_stopped(world, capsys):
    slurm_jobs_gone("train")(world)
    assert main(STATUS[:2] + ["--runs-dir", str(world / "runs"), "--json"]) == 3
    st = json.loads(capsys.readouterr().out)
    assert st["state"]["state"] == "stopped" and st["state"]["stage"] == "train", st["state"]
    assert st["state"]["complete"] == ["ingest", "filter", "cache"]
    assert {r["state"] for r in st["jobs"]} == {"GONE"}
