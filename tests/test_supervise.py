"""The job supervisor's signal handling, without Slurm: a stop signal that arrives before a process has its
handler (while Python is still starting, in the supervisor or in the stage process) must wait for the handler
instead of killing the job, and a time-limit warning that never arrived is replaced by the supervisor's timer.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kolora.launch import supervise as sv

# The stage process: like launch.child, but it reports what it saw instead of running stages.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    if os.environ.get("SIGNAL_PARENT_FIRST"):  # a stop signal reaches the supervisor while we still import
        os.kill(os.getppid(), signal.SIGUSR2)
    time.sleep(0.3)  # the imports before the handler is installed
    from kolora.core import interrupt
    with interrupt.handle((signal.SIGUSR2, signal.SIGTERM)):
        deadline = time.monotonic() + float(os.environ.get("CHILD_WAIT_S", "20"))
        while interrupt.requested() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    if interrupt.requested():
        print("child stopped on", interrupt.requested(), file=sys.stderr, flush=True)
        sys.exit(75)
    open(sys.argv[-1], "w").write('{"done": true}')
""")

# The job process: what StageJob.__call__ does, with the child above.
SUPERVISOR = textwrap.dedent("""
    import json, logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO)
    from kolora.launch.supervise import supervise
    end = float(os.environ["END_TIME"]) if os.environ.get("END_TIME") else None
    result = supervise([sys.executable, "-c", sys.argv[1]], signal_lead_s=5, max_requeues=1,
                       counter=Path(sys.argv[2]) / "timeouts.json", key="k", result_dir=Path(sys.argv[2]),
                       end_time=end)
    print("result", json.dumps(result), file=sys.stderr)
""")


def job(tmp_path: Path, boot: bool = True, **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    command = [sys.executable, "-c", SUPERVISOR, CHILD, str(tmp_path)]
    if boot:
        command = sv.boot_command(command)
    return subprocess.Popen(command, env={**environ, **env}, stderr=subprocess.PIPE, text=True)


def blocked_after_boot(pid: int) -> set[int]:
    """Wait until BOOT has exec'd the real interpreter; the signals that process starts with blocked."""
    cmdline, deadline = Path(f"/proc/{pid}/cmdline"), time.monotonic() + 30
    # Empty while an exec is still under way (Popen returns as soon as the vfork'd child starts its exec).
    while sv.BOOT in (text := cmdline.read_bytes().decode(errors="replace")) or "supervise" not in text:
        assert time.monotonic() < deadline, f"BOOT never exec'd the job's command ({text!r})"
        time.sleep(0.0005)
    mask = next(int(line.split()[1], 16) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("SigBlk:"))
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_a_signal_before_python_has_started_waits_for_the_handler(tmp_path: Path) -> None:
    proc = job(tmp_path)
    assert {signal.SIGUSR2, signal.SIGTERM} <= blocked_after_boot(proc.pid)
    proc.send_signal(signal.SIGUSR2)  # the interpreter is still importing: no handler anywhere yet
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == sv.EXIT_INTERRUPTED, err
    assert "job received SIGUSR2" in err and "child stopped on SIGUSR2" in err, err


def test_without_boot_the_same_signal_kills_the_job(tmp_path: Path) -> None:
    """The premise of the test above: this is how a job died FAILED instead of being requeued."""
    proc = job(tmp_path, boot=False)
    proc.send_signal(signal.SIGUSR2)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGUSR2


def test_a_signal_while_the_stage_process_starts_reaches_its_handler(tmp_path: Path) -> None:
    # without BOOT: the supervisor itself blocks the stop signals while it starts the stage process
    proc = job(tmp_path, boot=False, SIGNAL_PARENT_FIRST="1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == sv.EXIT_INTERRUPTED, err
    assert "child stopped on SIGUSR2" in err, err  # not killed by it: it stopped at its safe point


def test_no_warning_from_slurm_by_the_lead_time_stops_the_stage_anyway(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = job(tmp_path, END_TIME=str(time.time() + 5 + 1.5))  # lead 5 s: the timer fires in 1.5 s
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == sv.EXIT_INTERRUPTED, err
    assert "no SIGUSR2 from Slurm 5 s before the time limit" in err and "child stopped on SIGUSR2" in err, err
    assert 1.0 < time.monotonic() - started < 15


def test_a_stage_that_finishes_before_the_timer_returns_its_result(tmp_path: Path) -> None:
    proc = job(tmp_path, END_TIME=str(time.time() + 3600), CHILD_WAIT_S="0.5")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert 'result {"done": true}' in err and "SIGUSR2" not in err, err


def test_boot_wraps_python_interpreters_only() -> None:
    assert sv.boot_command(["/opt/venv/bin/python3.11", "-X", "dev"]) == [
        "/opt/venv/bin/python3.11", "-S", "-I", "-c", sv.BOOT, "/opt/venv/bin/python3.11", "-X", "dev"]
    apptainer = ["apptainer", "exec", "/shared/kolora.sif", "python"]
    assert sv.boot_command(apptainer) == apptainer


def test_job_end_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1790000000")
    assert sv.job_end_time("7") == 1790000000.0
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    monkeypatch.setattr(sv, "_squeue_field", lambda job_id, fmt: "2026-11-25T22:03:15" if fmt == "%e" else None)
    assert sv.job_end_time("7") == datetime.datetime(2026, 11, 25, 22, 3, 15).timestamp()
    monkeypatch.setattr(sv, "_squeue_field", lambda job_id, fmt: "N/A")
    assert sv.job_end_time("7") is None
    assert sv.job_end_time(None) is None


# A stage process that, when told to stop, writes a checkpoint (PROGRESS_FILE) or nothing at all.
STOPPING_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from kolora.core import interrupt
    with interrupt.handle():
        deadline = time.monotonic() + 30
        while interrupt.requested() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    if os.environ.get("PROGRESS_FILE"):
        Path(os.environ["PROGRESS_FILE"]).write_text("step 7")
    sys.exit(75)
""")


@pytest.mark.parametrize("progressed", [True, False])
def test_a_time_limit_attempt_without_progress_is_not_requeued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                progressed: bool) -> None:
    """Time limit reached: requeue when the attempt wrote something durable, fail with the reason when it did not
    (a window shorter than loading the models would otherwise requeue forever)."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    requeued: list[str] = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(sv, "_squeue_field", lambda job_id, fmt: "0:20" if fmt == "%L" else None)
    monkeypatch.setattr(sv, "requeue", lambda job_id: requeued.append(job_id) or True)
    monkeypatch.setattr(sv, "cancelled", lambda job_id: False)
    env = {"PROGRESS_FILE": str(checkpoints / "step=7.ckpt")} if progressed else {}
    attempts = tmp_path / "attempts.jsonl"
    call = dict(signal_lead_s=5, max_requeues=3, counter=tmp_path / "timeouts.json", key="train/0", env=env,
                result_dir=tmp_path, end_time=time.time() + 5 + 1.0,
                progress=lambda: sorted(p.name for p in checkpoints.iterdir()), attempts=attempts)
    if progressed:
        with pytest.raises(SystemExit) as stop:
            sv.supervise([sys.executable, "-c", STOPPING_CHILD], **call)
        assert stop.value.code == sv.EXIT_INTERRUPTED and requeued == ["4242"]
    else:
        with pytest.raises(sv.JobFailed, match="time limit without progress.*raise the job's time") as failed:
            sv.supervise([sys.executable, "-c", STOPPING_CHILD], **call)
        assert requeued == [] and "signal_lead_s (5 s)" in str(failed.value)
    entry = json.loads(attempts.read_text())
    assert entry["slurm_job"] == "4242" and entry["exit"] == sv.EXIT_INTERRUPTED and entry["signals"] == ["SIGUSR2"]
    assert entry["progress_before"] == [] and entry["progress_after"] == (["step=7.ckpt"] if progressed else [])


@pytest.mark.parametrize("case", ["cancelled meanwhile", "rank 1"])
def test_only_rank_0_requeues_and_never_a_cancelled_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       case: str) -> None:
    """A stop (here the supervisor's own deadline, as for a preemption) is requeued by rank 0 only; the other
    ranks exit 0 (srun --kill-on-bad-exit would otherwise kill rank 0 before its requeue); and a job cancelled
    while it stopped is not brought back (`scontrol requeue` also takes a finished job)."""
    requeued: list[str] = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(sv, "_squeue_field", lambda job_id, fmt: "25:00" if fmt == "%L" else "RUNNING")
    monkeypatch.setattr(sv, "requeue", lambda job_id: requeued.append(job_id) or True)
    monkeypatch.setattr(sv, "cancelled", lambda job_id: case == "cancelled meanwhile")
    with pytest.raises(SystemExit) as stop:
        sv.supervise([sys.executable, "-c", STOPPING_CHILD], signal_lead_s=5, max_requeues=3,
                     counter=tmp_path / "timeouts.json", key="train/0", result_dir=tmp_path,
                     end_time=time.time() + 5 + 1.0, rank=1 if case == "rank 1" else 0)
    assert requeued == []
    assert stop.value.code == (0 if case == "rank 1" else sv.EXIT_INTERRUPTED)


# ---- a node that dies under a multi-node job ---------------------------------------------------------------
LOST_PEER_CHILD = "import sys; sys.exit(76)"  # what launch.child returns when a collective lost another rank
ABORTED_CHILD = "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"  # NCCL's watchdog tearing it down


@pytest.mark.parametrize("case", ["node down", "nodes up", "one node", "aborted, node down"])
def test_a_rank_that_lost_its_peer_waits_for_slurms_word_on_the_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      case: str) -> None:
    """A node down (here kolora-2, as sinfo reports it) is a node failure: rank 0 requeues a job Slurm still
    counts as running, the attempt says which node, and the job is not failed (no later job is cancelled). With
    every node up until the wait ends, the rank failed on its own: JobFailed. A single-node job does not wait."""
    requeued: list[str] = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "kolora-[1-2]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1" if case == "one node" else "2")
    monkeypatch.setattr(sv, "_squeue_field", lambda job_id, fmt: "RUNNING")
    monkeypatch.setattr(sv, "requeue", lambda job_id: requeued.append(job_id) or True)
    monkeypatch.setattr(sv, "cancelled", lambda job_id: False)
    monkeypatch.setattr(sv, "slurmd_timeout_s", lambda: -59)  # a 1 s wait
    asked: list[str] = []
    monkeypatch.setattr(sv, "failed_nodes",
                        lambda nodes: asked.append(nodes) or (["kolora-2"] if case.endswith("node down") else []))
    attempts = tmp_path / "attempts.jsonl"
    call = dict(signal_lead_s=5, max_requeues=3, counter=tmp_path / "timeouts.json", key="train/0",
                result_dir=tmp_path, attempts=attempts)
    child = ABORTED_CHILD if case.startswith("aborted") else LOST_PEER_CHILD
    if case.endswith("node down"):
        with pytest.raises(SystemExit) as stop:
            sv.supervise([sys.executable, "-c", child], **call)
        assert stop.value.code == sv.EXIT_INTERRUPTED and requeued == ["4242"]
        entry = json.loads(attempts.read_text())
        assert entry["node_failure"] == "node failure: kolora-2" and entry["nodes"] == "kolora-[1-2]"
    else:
        with pytest.raises(sv.JobFailed, match="exited with status 76"):
            sv.supervise([sys.executable, "-c", LOST_PEER_CHILD], **call)
        assert requeued == [] and "node_failure" not in json.loads(attempts.read_text())
    assert bool(asked) == (case != "one node")  # a single-node job fails at once, without asking


def test_failed_nodes_reads_down_drained_and_silent_nodes_from_sinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    out = "kolora-1 allocated\nkolora-2 down*\nkolora-3 drained\nkolora-4 idle*\nkolora-5 mixed\n"
    monkeypatch.setattr(sv.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, out, ""))
    assert sv.failed_nodes("kolora-[1-5]") == ["kolora-2", "kolora-3", "kolora-4"]


def test_the_stage_process_tells_a_lost_peer_from_other_errors() -> None:
    from kolora.core.errors import RunFailure
    from kolora.launch.child import lost_peer

    def raised(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as e:
                raise RunFailure("stage train failed") from e
        except RunFailure as outer:
            return outer

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:21871")
    assert lost_peer(raised(gloo)) and lost_peer(gloo)
    dist = type("DistNetworkError", (RuntimeError,), {})("failed to recv")
    assert lost_peer(dist)
    assert not lost_peer(raised(ValueError("train.lr must be positive"))) and not lost_peer(None)
