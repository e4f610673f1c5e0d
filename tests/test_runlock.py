"""The run lock (kolora.core.runlock) and the durability helpers of kolora.core.rundir, without Slurm: who may write a
run directory, how a stale lock is broken (also by several takers at once), how a submission hands its lock
to its jobs, and what sweep_temp removes. Fake squeue scripts stand in for Slurm where it matters."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kolora.core import runlock
from kolora.core.rundir import fsync_dir, sweep_temp
from kolora.core.runlock import RunLocked
from kolora.launch.monitor import still_queued


# the lock as every entry point takes it: with the launcher's squeue reader
def acquire(*args, **kw):
    return runlock.acquire(*args, queued=still_queued, **kw)


def claim_for_submission(*args, **kw):
    return runlock.claim_for_submission(*args, queued=still_queued, **kw)


def job_heartbeat(*args, **kw):
    return runlock.job_heartbeat(*args, queued=still_queued, **kw)


REPO = Path(__file__).resolve().parents[1]


def _write_lock(run: Path, **fields) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    info = {"kind": "run", "host": socket.gethostname(), "pid": os.getpid(), "user": "someone",
            "started": "2026-01-01T00:00:00+00:00", "heartbeat": time.time(), "token": "by-hand", **fields}
    (run / ".lock").write_text(json.dumps(info))
    return run / ".lock"


def _lock(run: Path) -> dict:
    return json.loads((run / ".lock").read_text())


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)  # reaped by subprocess.run: no such process any more


@pytest.fixture
def squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """PATH without Slurm's clients; squeue(script) puts a fake squeue on it."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")

    def install(body: str) -> None:
        (folder / "squeue").write_text("#!/bin/bash\n" + body + "\n")
        (folder / "squeue").chmod(0o755)
    return install


def test_a_second_taker_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    with acquire(run, "run") as lock:
        assert lock == run / ".lock" and _lock(run)["pid"] == os.getpid() and _lock(run)["kind"] == "run"
        with pytest.raises(RunLocked) as e, acquire(run, "run"):
            pass
        msg = str(e.value)
        assert f"run demo is being written by `kolora run` (pid {os.getpid()} on host {socket.gethostname()}" in msg
        assert f"delete {run / '.lock'}" in msg and e.value.exit_code == 2
        assert lock.is_file()  # the refused taker left the holder's lock alone
    assert not lock.exists()  # released on exit


def test_a_lock_whose_process_has_ended_is_broken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "demo"
    pid = _dead_pid()
    _write_lock(run, pid=pid)
    with acquire(run, "run"):
        assert _lock(run)["pid"] == os.getpid()
    assert f"process {pid} on {socket.gethostname()} has ended" in caplog.text
    assert sorted(p.name for p in run.iterdir()) == []  # neither the old lock nor .lock.breaking is left


def test_a_lock_without_heartbeat_for_long_is_broken(tmp_path: Path, squeue) -> None:
    run = tmp_path / "demo"
    _write_lock(run, host="elsewhere.example", pid=12345, heartbeat=time.time() - 3600)
    with acquire(run, "run"):
        assert _lock(run)["host"] == socket.gethostname()
    # the same lock with a fresh heartbeat: a live writer on another host (its pid cannot be checked from here)
    _write_lock(run, host="elsewhere.example", pid=12345)
    with pytest.raises(RunLocked, match="pid 12345 on host elsewhere.example"), acquire(run, "run"):
        pass


def test_the_heartbeat_advances_while_held(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    with acquire(run, "run", heartbeat_s=0.05):
        first = _lock(run)
        deadline = time.monotonic() + 5
        while _lock(run)["heartbeat"] <= first["heartbeat"] and time.monotonic() < deadline:
            time.sleep(0.02)
        later = _lock(run)
        assert later["heartbeat"] > first["heartbeat"] and later["token"] == first["token"]
    assert not (run / ".lock").exists()


def _contend(run: str, barrier, results) -> None:
    barrier.wait()
    try:
        with acquire(run, "run", heartbeat_s=0.05):
            results.put("won")
            time.sleep(0.5)  # hold it while the others try (they started together)
    except RunLocked:
        results.put("locked")


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale-lock"])
def test_of_four_takers_at_once_exactly_one_wins(tmp_path: Path, stale: bool) -> None:
    run = tmp_path / "demo"
    run.mkdir()
    if stale:  # all four judge it stale and try to break it at the same moment
        _write_lock(run, pid=_dead_pid())
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(run), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert sorted(results.get(timeout=5) for _ in procs) == ["locked", "locked", "locked", "won"]
    assert sorted(p.name for p in run.iterdir()) == []


def test_a_submission_keeps_the_lock_for_its_jobs(tmp_path: Path, squeue) -> None:
    run = tmp_path / "demo"
    with acquire(run, "submission", stamp="20260101-000000-abcd"):
        claim_for_submission(run, "20260101-000000-abcd", ["12", "13", "14"])
    lock = _lock(run)  # handed over, not released
    assert lock["kind"] == "submission" and lock["job_ids"] == ["12", "13", "14"]

    # no squeue here: a fresh heartbeat says the jobs may live
    with pytest.raises(RunLocked) as e, acquire(run, "run"):
        pass
    assert "submission 20260101-000000-abcd (Slurm jobs 12 13 14)" in str(e.value)
    assert "`kolora cancel demo`" in str(e.value)
    squeue('echo "13|RUNNING|gpu|None"')  # a job still running: refused even without heartbeat
    _write_lock(run, **{**lock, "heartbeat": time.time() - 3600})
    with pytest.raises(RunLocked, match="Slurm jobs 12 13 14"), acquire(run, "run"):
        pass
    squeue('echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')  # forgotten by Slurm: gone
    with acquire(run, "run"):
        assert _lock(run)["kind"] == "run"


def test_a_job_heartbeat_keeps_its_submissions_lock(tmp_path: Path, squeue, monkeypatch) -> None:
    run, stamp = tmp_path / "demo", "20260101-000000-abcd"
    monkeypatch.setenv("SLURM_JOB_ID", "15")
    with acquire(run, "submission", stamp=stamp):
        claim_for_submission(run, stamp, ["12", "13"])
    before = _lock(run)
    with job_heartbeat(run, stamp, heartbeat_s=0.05):
        time.sleep(0.3)
        assert _lock(run)["heartbeat"] > before["heartbeat"]
    assert _lock(run)["job_ids"] == ["12", "13", "15"] and _lock(run)["token"] == before["token"]  # kept on exit

    (run / ".lock").unlink()  # deleted by hand: the job takes it again for its submission
    with job_heartbeat(run, stamp):
        assert _lock(run)["stamp"] == stamp and _lock(run)["job_ids"] == ["15"]
    assert (run / ".lock").is_file()

    with pytest.raises(RunLocked, match="submission 20260101-000000-abcd"), job_heartbeat(run, "another-stamp"):
        pass
    (run / ".lock").unlink()
    with acquire(run, "run"), pytest.raises(RunLocked, match="`kolora run`"), job_heartbeat(run, stamp):
        pass


def test_a_stage_job_fails_when_a_kolora_run_holds_the_lock(tmp_path: Path) -> None:
    from kolora.launch.jobs import StageJob

    run = tmp_path / "demo"
    job = StageJob(run_root=str(run), config_file=str(run / "config.yaml"), folder=str(tmp_path / "jobs"),
                   stamp="20260101-000000-abcd", job="filter", stages=("ingest", "filter"))
    with acquire(run, "run"), pytest.raises(RunLocked, match=f"`kolora run` \\(pid {os.getpid()}"):
        job(0)


def test_sweep_temp_removes_only_kolora_temp_files(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    (run / "render").mkdir(parents=True)
    keep = [run / ".hidden", run / "render" / ".notes.tmp", run / "render" / "a.png", run / "x.kolora-tmp",
            run / ".manifest.lock"]
    for p in keep:
        p.write_text("mine\n")
    (run / ".hf_home").mkdir()
    # writers killed half-way (os._exit: no cleanup), as a crashed node leaves them
    script = ("import os, sys\nfrom pathlib import Path\nfrom kolora.core import rundir\nroot = Path(sys.argv[1])\n"
              "with rundir.atomic_path(root / 'render' / 't.png') as tmp, rundir.atomic_dir(root / 'lora') as d:\n"
              "    tmp.write_bytes(b'x'); (d / 'w.safetensors').write_bytes(b'x')\n"
              "    os.replace = lambda *a: os._exit(0)\n"
              "    rundir.atomic_write_json(root / 'manifest.json', {})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", script, str(run)], check=True, env=env)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p not in keep and p.name not in (".hf_home", "render"))
    assert len(left) == 4 and all(".kolora-tmp" in p or ".dirtmp" in p for p in left), left
    assert any(p.startswith("render/.t.png.") and p.endswith(".kolora-tmp.png") for p in left), left
    assert sweep_temp(run) == 3  # the png's and the manifest's temp files, the folder of atomic_dir
    assert sorted(run.rglob("*")) == sorted([*keep, run / "render", run / ".hf_home"])
    assert sweep_temp(run) == 0


def test_fsync_dir_on_a_folder(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    fsync_dir(str(tmp_path))


def _demo_config(tmp_path: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["model"]["path"] = str(tmp_path / "model-not-built")  # tiny, not needed by ingest
    raw["render"]["prompts"] = str(REPO / "configs" / "prompts" / "anime-story.yaml")
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def test_kolora_run_is_refused_while_another_process_holds_the_lock(tmp_path: Path, capsys) -> None:
    from kolora.cli.main import main

    config, runs = _demo_config(tmp_path), tmp_path / "runs"
    holder = subprocess.Popen(["sleep", "30"])
    try:
        _write_lock(runs / "demo", pid=holder.pid)
        assert main(["run", str(config), "--stage", "ingest", "--runs-dir", str(runs)]) == 2
        err = capsys.readouterr().err
        assert f"kolora: error: run demo is being written by `kolora run` (pid {holder.pid} on host" in err
        assert f"delete {runs / 'demo' / '.lock'}" in err and "Traceback" not in err
        assert sorted(p.name for p in (runs / "demo").iterdir()) == [".lock"]  # nothing of the run written
    finally:
        holder.kill()
        holder.wait()
    assert main(["run", str(config), "--stage", "ingest", "--runs-dir", str(runs)]) == 0  # its owner is gone
    assert not (runs / "demo" / ".lock").exists() and (runs / "demo" / ".complete" / "ingest.json").is_file()


def test_kolora_submit_hands_the_lock_to_its_jobs(tmp_path: Path, squeue, capsys) -> None:
    from kolora.cli.main import main

    config, runs, fake = _demo_config(tmp_path), tmp_path / "runs", tmp_path / "bin"
    for name, body in {"sbatch": 'n=$(( $(cat "$0.next" 2>/dev/null || echo 1000) + 1 )); echo $n > "$0.next"; '
                                 'echo "Submitted batch job $n"', "srun": "exit 0", "scancel": "exit 0"}.items():
        (fake / name).write_text("#!/bin/bash\n" + body + "\n")
        (fake / name).chmod(0o755)
    squeue(f'cat "{fake}/squeue.txt" 2>/dev/null; exit 0')
    assert main(["submit", str(config), "--cluster", str(REPO / "slurm" / "clusters" / "local.yaml"),
                 "--runs-dir", str(runs)]) == 0
    lock = _lock(runs / "demo")
    stamp = json.loads((runs / "demo" / "manifest.json").read_text())["slurm"]["latest"]
    assert lock["kind"] == "submission" and lock["stamp"] == stamp and lock["job_ids"] == ["1001", "1002", "1003", "1004"]

    (fake / "squeue.txt").write_text("1003_1|PENDING|gpu|Dependency\n")
    capsys.readouterr()
    assert main(["run", str(config), "--stage", "ingest", "--runs-dir", str(runs)]) == 2
    assert f"submission {stamp} (Slurm jobs 1001 1002 1003 1004)" in capsys.readouterr().err
    (fake / "squeue.txt").unlink()  # the jobs are gone: the lock lapses
    assert main(["run", str(config), "--stage", "ingest", "--runs-dir", str(runs)]) == 0
    assert not (runs / "demo" / ".lock").exists()
