"""Rank 0 decides for every rank of a DDP job (launch.jobs): before each stage it writes run / skip / stop / fail
to a go file, and the train decision carries the rendezvous port and the checkpoint step every rank resumes
from. In process, without Slurm: rank 0's side runs StageJob._run on a copy of the demo run, a follower's side
StageJob._wait_go / _follow against go files written the way rank 0 writes them.

The dev-cluster version (a stop between the cache merge and the train decision of a 2-task job) is in
tests/test_ddp_slurm.py.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest
from conftest import stage_context, untrained_copy

from kolora.core import interrupt
from kolora.core.interrupt import Interrupted
from kolora.launch.jobs import Decision, StageJob
from kolora.pipeline import runner as pipeline
from kolora.pipeline.keys import Keys
from kolora.train import checkpoint as ckpt_io


@pytest.fixture
def flag():
    """This process's stop flag, cleared afterwards."""
    yield interrupt.request
    interrupt.clear()


def _job(tmp_path, run_root, monkeypatch) -> StageJob:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("MASTER_PORT", "1")  # restored afterwards: rank 0 and followers set it
    return StageJob(str(run_root), str(run_root / "config.yaml"), str(tmp_path / "job"), "stamp", "train",
                    ("cache", "train"), tasks_per_node=2)


def _train_go(job: StageJob) -> dict:
    return json.loads(job._go_file("train").read_text())


def _stage_calls(monkeypatch, after_cache=None) -> list[tuple[str, dict]]:
    """Record rank 0's run_stage calls: the cache stage runs for real, train is only recorded."""
    calls, real = [], pipeline.run_stage

    def run_stage(stage, cfg, run, **kw):
        calls.append((stage, kw))
        if stage == "train":
            return {"steps": cfg.train.steps}
        summary = real(stage, cfg, run, **kw)
        if after_cache:
            after_cache()
        return summary

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    return calls


def test_rank_0_stops_every_rank_when_a_stop_came_between_the_cache_and_the_train_decision(
        demo_run, tmp_path, monkeypatch, flag):
    run, cfg = untrained_copy(demo_run, tmp_path / "run")
    job = _job(tmp_path, run.root, monkeypatch)
    calls = _stage_calls(monkeypatch, after_cache=lambda: flag("SIGUSR2"))  # the signal lands after the merge
    with pytest.raises(Interrupted, match=r"rank 0: stopped \(SIGUSR2\) before train"):
        job._run(cfg, run, 0)
    assert [stage for stage, _ in calls] == ["cache"]  # rank 0 never entered training alone
    assert _train_go(job) == {"action": "stop"}
    with pytest.raises(Interrupted, match="rank 0 stopped on a signal before train"):
        job._wait_go(1, "train")  # what a follower then does


def test_rank_0_stops_before_the_cache_decision_too(demo_run, tmp_path, monkeypatch, flag):
    run, cfg = untrained_copy(demo_run, tmp_path / "run")
    (run.cache / "index.json").unlink()  # the cache has work to do: its decision would be "run"
    job = _job(tmp_path, run.root, monkeypatch)
    calls = _stage_calls(monkeypatch)
    flag("SIGTERM")
    with pytest.raises(Interrupted, match=r"rank 0: stopped \(SIGTERM\) before cache"):
        job._run(cfg, run, 0)
    assert calls == []
    assert Decision.parse((job._go_file("cache") / "decision").read_text()).action == "stop"
    assert _train_go(job) == {"action": "stop"}  # the followers never wait for a train decision in vain


def test_the_train_decision_carries_the_port_and_the_checkpoint_rank_0_chose(demo_run, tmp_path, monkeypatch):
    run, cfg = untrained_copy(demo_run, tmp_path / "run")
    ckpt_dir = run.train / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    for src in (demo_run / "train" / "checkpoints").glob("step=*.ckpt"):  # steps 10, 20, 30 of the demo
        (ckpt_dir / src.name).write_bytes(src.read_bytes())
    (ckpt_dir / "step=000030.ckpt").write_bytes(b"truncated")  # the newest is unreadable: rank 0 takes 20
    cfg.train.steps = 40  # more steps than the demo trained: train continues from a checkpoint
    job = _job(tmp_path, run.root, monkeypatch)
    calls = _stage_calls(monkeypatch)
    job._run(cfg, run, 0)
    go = _train_go(job)
    assert go["action"] == "run" and go["resume_step"] == 20 and isinstance(go["port"], int)
    train_kw = dict(calls)["train"]
    assert train_kw["extra"]["resume_step"] == 20  # rank 0 resumes from the step it told the others
    assert (train_kw["devices"], train_kw["nodes"]) == (2, 1)


def test_a_follower_follows_rank_0_not_its_own_stop_flag(tmp_path, monkeypatch, flag, caplog):
    job = _job(tmp_path, tmp_path / "run", monkeypatch)
    flag("SIGUSR2")  # the follower got the stop signal too, while rank 0 is still busy

    def rank_0_decides_later() -> None:
        time.sleep(1.5)
        job._decide("train", Decision("run", port=41234, resume_step=20))

    writer = threading.Thread(target=rank_0_decides_later)
    writer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="kolora.launch"):
            decision = job._wait_go(1, "train")
    finally:
        writer.join()
    assert (decision.action, decision.port, decision.resume_step) == ("run", 41234, 20)
    assert "rank 1: stop requested (SIGUSR2) while waiting for rank 0's decision on train" in caplog.text
    assert os.environ["MASTER_PORT"] == "41234"


def test_a_follower_resumes_from_the_step_in_the_decision(tmp_path, monkeypatch):
    job = _job(tmp_path, tmp_path / "run", monkeypatch)
    job._decide("cache", Decision("skip"))
    job._decide("train", Decision("run", port=41234, resume_step=20))
    calls = []
    monkeypatch.setattr(pipeline, "run_stage", lambda stage, cfg, run, **kw: calls.append((stage, kw)) or {})
    monkeypatch.setattr("kolora.launch.jobs._process_group", lambda rank: None)
    job._follow(None, None, 1)
    assert calls == [("train", {"follower": True, "rank": 1, "world": 2, "devices": 2, "nodes": 1,
                                "extra": {"resume_step": 20}})]


def test_decisions_are_json_and_the_earlier_words_still_read(tmp_path):
    decision = Decision("run", port=41234, resume_step=0)
    assert json.loads(decision.dumps()) == {"action": "run", "port": 41234, "resume_step": 0}
    assert Decision.parse(decision.dumps()) == decision
    assert Decision.parse("run 41234\n") == Decision("run", port=41234)  # no resume_step: each rank looks itself
    assert Decision.parse("skip\n") == Decision("skip")
    with pytest.raises(RuntimeError, match=r"go-file: not a decision of rank 0"):
        Decision.parse('{"action": "maybe"}', tmp_path / "go-file")
    with pytest.raises(RuntimeError, match=r"not a decision of rank 0"):
        Decision.parse("")


def test_train_resumes_from_exactly_the_chosen_checkpoint_or_fails_naming_it(demo_run, tmp_path, monkeypatch):
    from kolora.train import loop as train
    monkeypatch.setattr(ckpt_io, "VISIBLE_WITHIN_S", 2.0)

    run, cfg = untrained_copy(demo_run, tmp_path / "run")
    ckpt_dir = run.train / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    for src in (demo_run / "train" / "checkpoints").glob("step=*.ckpt"):
        (ckpt_dir / src.name).write_bytes(src.read_bytes())
    cfg.train.steps = 21
    summary = train.run(stage_context("train", cfg, run, extra={"resume_step": 20}))
    assert (summary["resumed_from_step"], summary["steps"]) == (20, 21)  # not the newest (30), rank 0's choice
    with pytest.raises(ckpt_io.CheckpointError, match=r"rank 0 chose .*step=000015\.ckpt.*did not appear here within 2 s"):
        train.run(stage_context("train", cfg, run, extra={"resume_step": 15}))
    (ckpt_dir / "step=000020.ckpt").write_bytes(b"truncated")
    with pytest.raises(ckpt_io.CheckpointError, match=r"step=000020\.ckpt.*cannot be read here"):
        ckpt_io.load_step(ckpt_dir, 20, Keys(cfg, run).work("train"))


def test_a_chosen_checkpoint_that_appears_late_on_this_node_is_waited_for(demo_run, tmp_path):
    """A network file system may show rank 0's new checkpoint on another node only after its directory cache
    expires: the rank waits for it (boundedly) instead of failing the job."""
    import threading

    run, cfg = untrained_copy(demo_run, tmp_path / "run")
    ckpt_dir = run.train / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    source = demo_run / "train" / "checkpoints" / "step=000020.ckpt"
    staged = tmp_path / source.name
    staged.write_bytes(source.read_bytes())
    late = threading.Timer(1.5, lambda: staged.rename(ckpt_dir / source.name))  # as Checkpointer: by rename
    late.start()
    try:
        path, ckpt = ckpt_io.load_step(ckpt_dir, 20, Keys(cfg, run).work("train"), visible_within_s=30)
    finally:
        late.join()
    assert path.name == "step=000020.ckpt" and int(ckpt["global_step"]) == 20
