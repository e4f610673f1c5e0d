"""Multi-node training on the dev cluster's two nodes (partition `multi`: kolora-1 and kolora-2, each a slurmd of
its own with 1 fake GPU; gloo on the CPU), and a node that dies in the middle of it.

A node dies as `slurm/devcluster/node.sh fail` makes it: every process of the node killed at once (its slurmd, the
job step, the rank on it), the node set DOWN (and drained) as slurmctld does after missed heartbeats. The rank
left on the other node loses its peer, its host waits for Slurm's word, Slurm requeues the job (NODE_FAIL); with
`nodes: 1-2` the job comes back on the node left and resumes from its last checkpoint, with a fixed `nodes: 2`
it waits until the node is back.

The reference is one process with the doubled batch, trained without Slurm on a copy of the run's cache
(tests/ddp_worker.py): 2 nodes × 1 task × batch 1 is the same global batch of 2.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from slurmkit import LOCAL, REPO, kolora, run_progress, submit, wait_for
from test_ddp import TOLERANCE, lora_tensors, max_rel_diff, metric_steps, train_ranks

from kolora.core.rundir import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.multinode, pytest.mark.usefixtures("cancel_leftovers")]

NODE_SH = str(REPO / "slurm" / "devcluster" / "node.sh")
NODES = ("kolora-1", "kolora-2")
STEPS, EVERY = 40, 10
TRAIN = ["--set", f"train.steps={STEPS}", "--set", "train.batch_size=1", "--set", f"train.checkpoint_every={EVERY}",
         "--set", "render.steps=2"]


def _profile(tmp_path: Path, nodes) -> str:
    """The dev cluster's profile with every job on the two-node partition and the train job on `nodes`."""
    profile = yaml.safe_load(Path(LOCAL).read_text())
    for job in profile["jobs"].values():
        job["partition"] = "multi"
    profile["jobs"]["train"]["nodes"] = nodes
    profile["defaults"]["mem"] = "1G"
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def _node(env, action: str, node: str) -> str:
    proc = subprocess.run(["bash", NODE_SH, action, node], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _idle(env) -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "multi", "-o", "%N %T"], env=env, capture_output=True, text=True,
                         timeout=30).stdout.split()
    return dict(zip(out[::2], out[1::2], strict=True)) == dict.fromkeys(NODES, "idle")


@pytest.fixture
def nodes_back(env):
    """Both nodes idle when the test starts (Slurm gives a `1-2` job as many nodes as are free: the jobs of the test
    before, cancelled, may still be stopping), and up again after it, whatever it did to them."""
    wait_for("both nodes of partition multi to be idle", lambda: _idle(env),
             lambda: subprocess.run(["squeue", "-h", "-p", "multi"], env=env, capture_output=True, text=True).stdout)
    yield
    for node in NODES:
        _node(env, "revive", node)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=env, capture_output=True,
                       timeout=30)


def _train_job(run: Path) -> str:
    slurm = json.loads((run / "manifest.json").read_text())["slurm"]
    return slurm["submissions"][slurm["latest"]]["jobs"]["train"]["job_id"]


def _attempts(env, job_id: str) -> list[dict[str, str]]:
    """Every attempt of the job (sacct --duplicates), each with its state and nodes."""
    fields = ["JobID", "State", "NodeList"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-j", job_id, f"--format={','.join(fields)}"],
                         env=env, capture_output=True, text=True, timeout=30).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line.strip()]


def _steps(env, job_id: str) -> list[dict[str, str]]:
    fields = ["JobID", "State", "NodeList", "NTasks"]
    out = subprocess.run(["sacct", "-n", "-P", "-j", job_id, f"--format={','.join(fields)}"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line.strip()]


def _job_log(run: Path, job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run / "slurm").rglob(f"{job_id}_*_log.err")))


def _wait_trained(env, run: Path, job: str) -> None:
    def trained() -> bool:
        states = [a["State"].split()[0] for a in _attempts(env, job)]
        if states and states[-1] in ("FAILED", "CANCELLED", "TIMEOUT"):
            pytest.fail(f"training job {job} ended {states}:\n{_job_log(run, job)[-4000:]}")
        return bool(states) and states[-1] == "COMPLETED" and (run / "lora" / "pytorch_lora_weights.safetensors").is_file()

    wait_for(f"the training job {job} to complete", trained, lambda: (_attempts(env, job), run_progress(run)))


def _fail_after_a_checkpoint(env, run: Path, job: str) -> int:
    """node.sh fail kolora-2 once training has checkpointed and gone on past it; returns the steps logged then."""
    def past_checkpoint() -> int | None:
        states = [a["State"].split()[0] for a in _attempts(env, job)]
        if states and states[-1] not in ("PENDING", "RUNNING"):
            pytest.fail(f"training job {job} ended {states} before the node failed:\n{_job_log(run, job)[-4000:]}")
        steps = len(metric_steps(RunDir(run))) if (run / "train" / "metrics.csv").is_file() else 0
        return steps if list((run / "train" / "checkpoints").glob("step=*.ckpt")) and steps > EVERY else None

    wait_for("a checkpoint and a step past it", past_checkpoint, lambda: run_progress(run), poll_s=0.3)
    steps = len(metric_steps(RunDir(run)))
    out = _node(env, "fail", "kolora-2")
    assert "node kolora-2 failed" in out
    return steps


def _uninterrupted(run: Path, dst: Path) -> RunDir:
    """The run's config and cache, trained by one process with the doubled batch, without Slurm."""
    import shutil

    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("train", "lora", "render", "slurm", "grid.png"))
    twin = RunDir(dst)
    [p] = train_ranks(twin, 1, batch_size=2)
    assert p.returncode == 0, p.stderr[-4000:]
    return twin


def _no_processes_left(env) -> None:
    for node in NODES:
        assert _node(env, "procs", node).strip() == "", f"processes left on {node}"


def _submitted(env, tmp_path: Path, name: str, nodes) -> tuple[Path, Path, str]:
    """The demo submitted to the two-node partition with the train job on `nodes`: (runs dir, run, train job id)."""
    runs = tmp_path / "runs"
    submit(env, runs, name, *TRAIN, profile=_profile(tmp_path, nodes))
    run = runs / name
    return runs, run, _train_job(run)


def test_two_node_training_matches_one_process_with_the_doubled_batch(env, tmp_path, nodes_back):
    runs, run, job = _submitted(env, tmp_path, "two-nodes", 2)
    _wait_trained(env, run, job)
    kolora(env, "cancel", "two-nodes", "--runs-dir", runs, timeout=60)  # render and grid: not the point here
    steps = {s["JobID"]: s for s in _steps(env, job)}
    assert steps[f"{job}.0"]["NodeList"] == "kolora-[1-2]" and steps[f"{job}.0"]["NTasks"] == "2", steps
    summary = json.loads((run / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert (summary["world_size"], summary["accumulate"], summary["global_batch"]) == (2, 1, 2)
    log = _job_log(run, job)
    assert "rank 0 of world 2" in log and "rank 1 of world 2" in log
    # each rank's log, wherever it ran: the job's own node sees its name as hostname
    for rank, node in ((0, "kolora-1"), (1, "kolora-2")):
        logs = kolora(env, "logs", "two-nodes", "--runs-dir", runs, "--stage", "train", "--rank", str(rank))
        assert logs.returncode == 0 and f"rank {rank} on {node})" in logs.stdout, logs.stdout[-3000:]
        assert f"rank {rank} of world 2" in logs.stdout
    twin = _uninterrupted(run, tmp_path / "twin" / "two-nodes")
    diff = max_rel_diff(lora_tensors(RunDir(run)), lora_tensors(twin))
    print(f"\n2 nodes × 1 task vs 1 process × batch 2, {STEPS} steps: LoRA max relative |Δ| {diff:.2e}")
    assert diff <= TOLERANCE
    _no_processes_left(env)


def test_a_node_failure_with_a_node_range_resumes_on_the_node_left(env, tmp_path, nodes_back):
    runs, run, job = _submitted(env, tmp_path, "range", "1-2")
    done_at_failure = _fail_after_a_checkpoint(env, run, job)
    _wait_trained(env, run, job)
    kolora(env, "cancel", "range", "--runs-dir", runs, timeout=60)
    attempts = _attempts(env, job)
    log = _job_log(run, job)
    assert [a["State"].split()[0] for a in attempts] == ["NODE_FAIL", "COMPLETED"], (attempts, log[-4000:])
    assert [a["NodeList"] for a in attempts] == ["kolora-[1-2]", "kolora-1"], attempts
    summary = json.loads((run / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert (summary["world_size"], summary["accumulate"], summary["global_batch"]) == (1, 2, 2), summary
    resumed = summary["resumed_from_step"]
    assert 0 < resumed <= done_at_failure and done_at_failure - resumed <= EVERY, (resumed, done_at_failure)
    assert metric_steps(RunDir(run)) == list(range(1, STEPS + 1))
    assert "node failure: kolora-2" in log or "Slurm stopped the job" in log, log[-4000:]
    status = kolora(env, "status", "range", "--runs-dir", runs, timeout=60)
    assert "train attempt 1: node failure: kolora-2 (of kolora-[1-2]) → requeued" in status.stdout, status.stdout
    assert "train attempt 2: completed (kolora-1)" in status.stdout, status.stdout
    twin = _uninterrupted(run, tmp_path / "twin" / "range")
    diff = max_rel_diff(lora_tensors(RunDir(run)), lora_tensors(twin))
    print(f"\nkolora-2 failed after step {done_at_failure}, resumed from step {resumed} on kolora-1 alone: "
          f"LoRA max relative |Δ| {diff:.2e} from 1 uninterrupted process")
    assert diff <= TOLERANCE
    _no_processes_left(env)


def test_a_node_failure_with_fixed_nodes_waits_for_the_node_and_then_finishes(env, tmp_path, nodes_back):
    runs, run, job = _submitted(env, tmp_path, "fixed", 2)
    _fail_after_a_checkpoint(env, run, job)

    def waiting() -> str | None:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], env=env, capture_output=True, text=True,
                             timeout=30).stdout.strip()
        return out if out.startswith("PENDING|") and "DOWN" in out else None

    reason = wait_for("the requeued job to wait for the node", waiting, lambda: (_attempts(env, job), run_progress(run)))
    status = kolora(env, "status", "fixed", "--runs-dir", runs, timeout=60)
    assert "PENDING" in status.stdout and "DOWN" in status.stdout, (reason, status.stdout)
    _node(env, "revive", "kolora-2")
    resumed = subprocess.run(["scontrol", "update", "nodename=kolora-2", "state=resume"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert resumed.returncode == 0, resumed.stderr
    _wait_trained(env, run, job)
    kolora(env, "cancel", "fixed", "--runs-dir", runs, timeout=60)
    attempts = _attempts(env, job)
    assert [a["State"].split()[0] for a in attempts] == ["NODE_FAIL", "COMPLETED"], attempts
    assert [a["NodeList"] for a in attempts] == ["kolora-[1-2]", "kolora-[1-2]"], attempts
    summary = json.loads((run / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert summary["world_size"] == 2 and summary["resumed_from_step"] > 0, summary
    assert metric_steps(RunDir(run)) == list(range(1, STEPS + 1))
    twin = _uninterrupted(run, tmp_path / "twin" / "fixed")
    assert max_rel_diff(lora_tensors(RunDir(run)), lora_tensors(twin)) <= TOLERANCE
    _no_processes_left(env)
