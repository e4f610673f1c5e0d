"""Multi-node training without a cluster: `jobs.train.nodes` as a count or Slurm's MIN-MAX range (validation,
sbatch text, submission through submitit, `--nodes`), the global batch of a range, the node count an attempt
really got (SLURM_JOB_NUM_NODES), the rendezvous on the job's first node, per-rank placement over 2 nodes × 2
tasks, `kolora status` of a requeued multi-node job, and what a container carries over. The dev-cluster
version (two nodes, one killed) is in the Slurm tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import stage_context, untrained_copy
from test_launch import DEMO, LOCAL, fake_slurm, sbatch_scripts  # noqa: F401 - fake_slurm is a fixture

from kolora.cli.main import main
from kolora.core import devices, shards
from kolora.core.errors import ConfigError, InputError
from kolora.launch.cluster import load_profile, parse_nodes
from kolora.launch.jobs import Decision, StageJob
from kolora.pipeline import runner as pipeline
from kolora.train import distributed


def _profile(tmp_path: Path, **train) -> Path:
    data = yaml.safe_load(Path(LOCAL).read_text())
    data["jobs"]["train"].update(train)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- the profile field and --nodes ---------------------------------------------------------------------------
def test_nodes_is_a_count_or_a_range_and_bad_ones_name_the_field_and_the_fix(tmp_path):
    assert [parse_nodes(v) for v in (2, "2", "1-2", " 3-3 ")] == [(2, 2), (2, 2), (1, 2), (3, 3)]
    r = load_profile(_profile(tmp_path, nodes="1-2", gpus=2)).resources("train")
    assert (r.min_nodes, r.nodes, r.node_request, r.worlds()) == (1, 2, "1-2", [2, 4])
    fixed = load_profile(_profile(tmp_path, nodes="2-2")).resources("train")
    assert (fixed.min_nodes, fixed.nodes, fixed.node_request) == (2, 2, 2)
    for value, message in [("2-1", 'MIN must not exceed MAX \\(write "1-2"\\)'), (0, "at least 1 node"),
                           ("two", "a node count"), ("2-3", 'an attempt on 2 node\\(s\\).*use 3'),
                           ("1-3", "an attempt on 2 node"), ("3-4", 'use 4')]:
        with pytest.raises(ConfigError, match=f"jobs.train.nodes: .*{message}"):
            load_profile(_profile(tmp_path, nodes=value))
    data = yaml.safe_load(Path(LOCAL).read_text())
    data["defaults"]["nodes"] = 2
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="defaults.nodes: only the train job .*set jobs.train.nodes"):
        load_profile(tmp_path / "d.yaml")
    data = yaml.safe_load(Path(LOCAL).read_text())
    data["jobs"]["grid"]["nodes"] = "1-2"
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="jobs.grid.nodes: only the train job"):
        load_profile(tmp_path / "g.yaml")


def test_dry_run_asks_sbatch_for_the_range(tmp_path, capsys):
    assert main(["submit", DEMO, "--cluster", LOCAL, "--runs-dir", str(tmp_path), "--dry-run", "--nodes", "1-2"]) == 0
    out = capsys.readouterr().out
    train = out.split("# ---- train")[1].split("# ---- render")[0]
    for option in ("--nodes=1-2", "--gpus-per-node=1", "--cpus-per-task=1"):
        assert f"#SBATCH {option}\n" in train, train
    # no task count in the allocation (it would cap the job at MIN nodes): srun starts each node's tasks
    assert "#SBATCH --ntasks-per-node" not in train and "srun --unbuffered" in train
    assert "--kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=1" in train, train
    assert '"nodes": 2' in train  # the job is planned for the MAX
    assert "1-2x1" in out.split("# ----")[0]  # the table's nodes x tasks
    # the default is untouched: one node, one process, no srun tasks per node
    assert main(["submit", DEMO, "--cluster", LOCAL, "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    train = capsys.readouterr().out.split("# ---- train")[1].split("# ---- render")[0]
    assert "#SBATCH --nodes=1\n" in train and "ntasks-per-node" not in train and "--gres=gpu:1\n" in train


def test_a_range_with_several_gpus_per_node_asks_per_node_and_srun_starts_each_nodes_tasks(tmp_path):
    from kolora.core.config import load_config
    from kolora.launch.executor import RangeSlurmExecutor
    from kolora.launch.plan import plan_jobs

    profile = load_profile(_profile(tmp_path, nodes="1-2", gpus=2, cpus=3))
    [train] = [p for p in plan_jobs(load_config(DEMO), profile) if p.job == "train"]
    assert (train.params["nodes"], train.params["cpus_per_task"], train.tasks_per_node) == ("1-2", 6, 2)
    assert "ntasks_per_node" not in train.params
    assert train.params["srun_args"] == ["--kill-on-bad-exit=1", "--ntasks-per-node=2", "--cpus-per-task=3"]
    executor = RangeSlurmExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(**{k: v for k, v in train.params.items() if k != "setup"})
    assert executor._num_tasks() == 4  # 2 nodes × 2 tasks at most
    fixed = load_profile(_profile(tmp_path, nodes=2, gpus=2, cpus=3))
    [train] = [p for p in plan_jobs(load_config(DEMO), fixed) if p.job == "train"]
    assert (train.params["ntasks_per_node"], train.params["cpus_per_task"]) == (2, 3)


def test_a_bad_nodes_option_is_refused_naming_it(tmp_path, capsys):
    args = ["submit", DEMO, "--cluster", LOCAL, "--runs-dir", str(tmp_path), "--dry-run", "--nodes"]
    assert main([*args, "2-3"]) == 2
    assert "submit --nodes 2-3: " in capsys.readouterr().err
    for value, message in (("0", "argument --nodes: must be at least 1 node"),
                           ("a-b", "argument --nodes: must be a node count")):
        with pytest.raises(SystemExit) as exit_:
            main([*args, value])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_submit_and_resume_queue_a_node_range_and_status_explains_a_node_failure(
        tmp_path, fake_slurm, capsys):  # noqa: F811
    runs = tmp_path / "runs"
    assert main(["submit", DEMO, "--cluster", LOCAL, "--runs-dir", str(runs), "--name", "g", "--nodes", "1-2"]) == 0
    scripts = sbatch_scripts(fake_slurm)
    assert "#SBATCH --nodes=1-2\n" in scripts[1002] and "#SBATCH --nodes=1\n" in scripts[1003]
    sub = json.loads((runs / "g" / "manifest.json").read_text())["slurm"]
    assert sub["submissions"][sub["latest"]]["jobs"]["train"]["resources"]["nodes x tasks"] == "1-2x1"
    capsys.readouterr()

    # the train job lost a node: Slurm requeued it, it waits for the node (a fixed count would wait for it)
    (fake_slurm / "squeue.txt").write_text("1002|PENDING|gpu|ReqNodeNotAvail, UnavailableNodes:kolora-b\n"
                                           "1004|PENDING|cpu|Dependency\n")
    (fake_slurm / "sacct.txt").write_text(
        "1001|COMPLETED|cpu|0:0|||||\n"  # the states query's rows (9 fields), then the attempts query's (7)
        "1002|NODE_FAIL|kolora-a,kolora-b|2026-12-08T00:00:00|2026-12-08T00:10:00|0:0|None\n"
        "1002|PENDING|None assigned|Unknown|Unknown|0:0|ReqNodeNotAvail\n")
    main(["status", "g", "--runs-dir", str(runs)])
    out = capsys.readouterr().out
    assert "train attempt 1: node failure (kolora-a,kolora-b) → requeued\n" in out, out
    # the job's host recorded which node it lost (launch.supervise): status names it
    with open(runs / "g" / "slurm" / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"slurm_job": "1001", "restart": 0, "node_failure": "node failure: kolora-a"}) + "\n"
                + json.dumps({"slurm_job": "1002", "restart": 0, "node_failure": "node failure: kolora-b"}) + "\n")
    main(["status", "g", "--runs-dir", str(runs)])
    out = capsys.readouterr().out
    assert "train attempt 1: node failure: kolora-b (of kolora-a,kolora-b) → requeued\n" in out, out
    assert "train attempt 2: waiting\n" in out
    assert "PENDING (waiting: nodes down (kolora-b); Slurm: ReqNodeNotAvail, UnavailableNodes:kolora-b)" in out
    assert "PENDING (waiting for the job before it; Slurm: Dependency)" in out, out
    main(["status", "g", "--runs-dir", str(runs), "--json"])
    train = next(r for r in json.loads(capsys.readouterr().out)["jobs"] if r["job"] == "train")
    assert [(a["attempt"], a["state"], a["nodes"]) for a in train["attempts"]] == [
        (1, "NODE_FAIL", "kolora-a,kolora-b"), (2, "PENDING", "")]

    # resume --nodes overrides the profile like --gpus; a range that cannot keep the batch is refused first
    (fake_slurm / "squeue.txt").unlink()
    assert main(["resume", "g", "--runs-dir", str(runs), "--nodes", "2-3"]) == 2
    assert "resume --nodes 2-3" in capsys.readouterr().err
    assert len(sbatch_scripts(fake_slurm)) == 4
    assert main(["resume", "g", "--runs-dir", str(runs), "--nodes", "2"]) == 0
    train = next(s for n, s in sbatch_scripts(fake_slurm).items() if n > 1004 and "-train\n" in s)
    assert "#SBATCH --nodes=2\n" in train and "#SBATCH --ntasks-per-node=1\n" in train


# ---- the global batch of a range ------------------------------------------------------------------------------
def test_a_resume_must_keep_the_global_batch_on_every_node_count_of_the_range(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step=000004.ckpt").write_bytes(b"")
    (tmp_path / distributed.BATCH_FILE).write_text(json.dumps(distributed.GlobalBatch(1, 2, 1).record()))
    assert distributed.check_resume(tmp_path, 1, [1, 2]) == distributed.GlobalBatch(1, 2, 1)
    with pytest.raises(InputError, match="global batch of 2 .*3 processes"):
        distributed.check_resume(tmp_path, 1, [2, 3])


def _job(tmp_path, monkeypatch, nodes_now: str | None, tasks_per_node: int = 1) -> StageJob:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("MASTER_PORT", "1")  # restored afterwards: rank 0 and followers set it
    if nodes_now is None:
        monkeypatch.delenv("SLURM_JOB_NUM_NODES", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_NUM_NODES", nodes_now)
    return StageJob(str(tmp_path / "run"), DEMO, str(tmp_path / "job"), "stamp", "train", ("cache", "train"),
                    tasks_per_node=tasks_per_node, nodes=2)


def test_an_attempt_that_got_one_node_of_its_range_trains_alone_with_the_planned_batch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, cfg, run, **kw: calls.append((stage, kw)) or {})
    job = _job(tmp_path, monkeypatch, "1")
    assert (job.world, job.distributed) == (1, False)
    job._run(None, None, 0)  # one process: no go files, no process group, the plain single-process path
    assert calls == [("cache", {}), ("train", {"extra": {"planned_world": 2}})]
    job = _job(tmp_path, monkeypatch, None)  # outside Slurm: the submitted count
    assert (job.nodes_now, job.world, job.distributed) == (2, 2, True)
    job = _job(tmp_path, monkeypatch, "2")
    assert (job.world, job._planned()) == (2, {})  # all nodes: the planned world itself


def test_training_on_fewer_processes_than_planned_accumulates_to_the_planned_batch(demo_run, tmp_path, monkeypatch):
    from kolora.train import loop as train_mod

    run, cfg = untrained_copy(demo_run, tmp_path / "run")
    cfg.train.batch_size = 1
    built = []

    class _Built(Exception):
        pass

    def trainer(**kw):
        built.append(kw["accumulate_grad_batches"])
        raise _Built

    monkeypatch.setattr(train_mod.L, "Trainer", trainer)
    for extra in ({"planned_world": 2}, {}):
        with pytest.raises(_Built):
            train_mod.run(stage_context("train", cfg, run, extra=extra))
    assert built == [2, 1]


# ---- 2 nodes × 2 tasks: ranks, devices, rendezvous ------------------------------------------------------------
TWO_NODES = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "kolora-[a-b]", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NNODES": "2", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "MASTER_PORT": "41234"}


@pytest.fixture
def second_node(monkeypatch):
    """The environment of rank 3 of a 2-node × 2-task job (on kolora-b), with a MASTER_ADDR inherited from the
    submitting shell; os.environ restored afterwards (Lightning writes MASTER_ADDR into it)."""
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for key in [k for k in os.environ if k.startswith("SLURM_")] + ["LOCAL_RANK", "MASTER_ADDR"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in {**TWO_NODES, "MASTER_ADDR": "login01"}.items():
        monkeypatch.setenv(key, value)


def test_every_rank_meets_on_the_first_node_of_the_job(tmp_path, monkeypatch, second_node):
    job = StageJob(str(tmp_path / "run"), DEMO, str(tmp_path / "job"), "stamp", "train", ("cache", "train"),
                   tasks_per_node=2, nodes=2)
    seen = {}
    monkeypatch.setattr(StageJob, "_follow", lambda self, cfg, run, rank: seen.update(
        rank=rank, addr=os.environ.get("MASTER_ADDR")) or {})
    job.run_here(0)
    assert seen == {"rank": 3, "addr": "kolora-a"}
    [slurm] = distributed.cluster_plugins(os.environ)  # what the train stage hands L.Trainer
    assert slurm.main_address == "kolora-a" and slurm.main_port == 41234  # the port: rank 0's choice
    assert (slurm.world_size(), slurm.global_rank(), slurm.local_rank(), slurm.node_rank()) == (4, 3, 1, 1)
    slurm.validate_settings(num_devices=2, num_nodes=2)
    assert devices.local_rank() == 1 and devices.gpu_index(2, devices.local_rank()) == 1
    assert distributed.placement("cpu", 2, 2) == {"accelerator": "cpu", "devices": 2, "num_nodes": 2,
                                                  "strategy": "ddp"}


def test_the_cache_shards_over_every_rank_of_every_node(tmp_path, monkeypatch, second_node):
    job = StageJob(str(tmp_path / "run"), DEMO, str(tmp_path / "job"), "stamp", "train", ("cache", "train"),
                   tasks_per_node=2, nodes=2)
    job._decide("cache", Decision("run"))
    job._decide("train", Decision("run", port=41234, resume_step=0))
    calls = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, cfg, run, **kw: calls.append((stage, kw)) or {})
    monkeypatch.setattr("kolora.launch.jobs._process_group", lambda rank: None)
    job._follow(None, None, 3)
    placement = {"follower": True, "rank": 3, "world": 4, "devices": 2, "nodes": 2}
    assert calls == [("cache", {**placement, "extra": {"barrier": str(job._go_file("cache"))}}),
                     ("train", {**placement, "extra": {"resume_step": 0}})]
    assert list(shards.interleaved(10, 4, 3)) == [3, 7]  # rank 3's samples of the cache's 4-way split


# ---- containers -----------------------------------------------------------------------------------------------
def test_a_containerised_rank_gets_what_the_rendezvous_needs(tmp_path):
    job = StageJob(str(tmp_path / "run"), str(tmp_path / "run" / "config.yaml"), str(tmp_path / "jobs"), "stamp",
                   "train", ("cache", "train"), tasks_per_node=2, nodes=2,
                   container={"image": "/shared/containers/kolora.sif"}, binds=[str(tmp_path / "run")])
    host = {**TWO_NODES, "SLURM_NODELIST": "kolora-[a-b]", "GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "ib0",
            "PYTHONPATH": "/home/u/lib"}
    argv = job.child_command(0, environ=host)
    env = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--env")
    for name in (*TWO_NODES, "SLURM_NODELIST", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        assert env.get(name) == host[name], name
    assert "PYTHONPATH" not in env
