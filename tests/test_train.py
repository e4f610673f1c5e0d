"""Training: full-state checkpoints, exact resume after interruptions, corrupt-checkpoint fallback."""

from __future__ import annotations

import csv
import hashlib

import pytest
from conftest import stage_context, untrained_copy

from kolora.core import interrupt
from kolora.core.rundir import RunDir
from kolora.pipeline.runner import run_stage
from kolora.train import loop as train_mod
from kolora.train.checkpoint import CheckpointError, checkpoints

STEPS = 30


def fresh_train_run(demo_run, tmp_path, name) -> tuple[RunDir, object]:
    run, cfg = untrained_copy(demo_run, tmp_path / name)
    cfg.train.steps = STEPS
    cfg.train.checkpoint_every = 8
    cfg.train.keep_checkpoints = 2
    return run, cfg


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _steps(run) -> list[int]:
    with open(run.train / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def stop_at(monkeypatch, at_steps: set[int]):
    original = train_mod.Checkpointer.on_train_batch_end

    def patched(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in at_steps:
            at_steps.discard(trainer.global_step)
            interrupt.request("SIGUSR2")
        return original(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(train_mod.Checkpointer, "on_train_batch_end", patched)


@pytest.fixture(scope="module")
def reference(demo_run, tmp_path_factory):
    run, cfg = fresh_train_run(demo_run, tmp_path_factory.mktemp("ref"), "ref")
    run_stage("train", cfg, run)
    return run


def test_interrupted_twice_ends_bit_identical(reference, demo_run, tmp_path, monkeypatch):
    run, cfg = fresh_train_run(demo_run, tmp_path, "interrupted")
    stop_at(monkeypatch, {3, 7})  # between periodic checkpoints: the stop request itself must checkpoint
    for expected_step in (3, 7):
        with pytest.raises(interrupt.Interrupted, match=f"step {expected_step}/{STEPS}"):
            run_stage("train", cfg, run)
        interrupt.clear()
        assert checkpoints(run.train / "checkpoints")[0][0] == expected_step
        assert not (run.lora / "pytorch_lora_weights.safetensors").exists()
    summary = run_stage("train", cfg, run)
    assert summary["resumed_from_step"] == 7
    assert _sha(run.lora / "pytorch_lora_weights.safetensors") == _sha(
        reference.lora / "pytorch_lora_weights.safetensors")
    assert _steps(run) == list(range(1, STEPS + 1)) == _steps(reference)
    assert len(checkpoints(run.train / "checkpoints")) == 2  # keep_checkpoints


def test_corrupt_newest_checkpoint_falls_back(reference, demo_run, tmp_path, monkeypatch, caplog):
    run, cfg = fresh_train_run(demo_run, tmp_path, "corrupt")
    stop_at(monkeypatch, {10})
    with pytest.raises(interrupt.Interrupted):
        run_stage("train", cfg, run)
    interrupt.clear()
    (step, newest), (prev_step, _) = checkpoints(run.train / "checkpoints")[:2]
    assert (step, prev_step) == (10, 8)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated by a hard kill
    with caplog.at_level("WARNING", logger="kolora.train.checkpoint"):
        summary = run_stage("train", cfg, run)
    assert "unreadable" in caplog.text and "falling back" in caplog.text
    assert summary["resumed_from_step"] == 8
    assert _sha(run.lora / "pytorch_lora_weights.safetensors") == _sha(
        reference.lora / "pytorch_lora_weights.safetensors")
    assert _steps(run) == list(range(1, STEPS + 1))


def test_checkpoint_of_another_config_is_refused(demo_run, tmp_path, monkeypatch):
    run, cfg = fresh_train_run(demo_run, tmp_path, "other")
    stop_at(monkeypatch, {5})
    with pytest.raises(interrupt.Interrupted):
        run_stage("train", cfg, run)
    interrupt.clear()
    # Same folder, different lr: a resumed mix of two experiments must be impossible.
    cfg.train.lr = cfg.train.lr * 2
    (run.root / ".inputs" / "train").unlink()  # bypass the setting aside to reach the checkpoint check
    with pytest.raises(CheckpointError, match="different training config"):
        train_mod.run(stage_context("train", cfg, run))


KILLER = '''
import os, signal, sys
import torch
from kolora.train import checkpoint
from kolora.core.rundir import atomic_path

KILL_AT = int(os.environ["KOLORA_TEST_KILL_AT_STEP"])

def save_then_die(self, ckpt, path, storage_options=None):
    with atomic_path(__import__("pathlib").Path(path)) as tmp:
        torch.save(ckpt, tmp)
        if ckpt["global_step"] == KILL_AT:  # the temp file is complete, the rename has not happened
            os.kill(os.getpid(), signal.SIGKILL)

checkpoint.AtomicCheckpointIO.save_checkpoint = save_then_die
from kolora.cli.main import main
sys.exit(main(sys.argv[1:]))
'''


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(reference, demo_run, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    run, cfg = fresh_train_run(demo_run, tmp_path / "runs", "demo")  # the run dir must carry the config's name
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True))
    driver = tmp_path / "driver.py"
    driver.write_text(KILLER)
    args = [sys.executable, str(driver), "run", str(config), "--runs-dir", str(run.root.parent), "--stage", "train"]
    env = {**os.environ, "KOLORA_TEST_KILL_AT_STEP": "16"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt_dir = run.train / "checkpoints"
    assert [s for s, _ in checkpoints(ckpt_dir)] == [8]  # step 16 never got its name
    assert any(p.name.startswith(".step=000016") for p in ckpt_dir.iterdir())  # the orphaned temp file
    env["KOLORA_TEST_KILL_AT_STEP"] = "-1"
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed_from_step=8" in resumed.stderr.replace("\n", "")
    assert _sha(run.lora / "pytorch_lora_weights.safetensors") == _sha(
        reference.lora / "pytorch_lora_weights.safetensors")
    assert _steps(run) == list(range(1, STEPS + 1))


PACED = '''
import os, sys, time
from pathlib import Path
from kolora.train import loop as train
MARK = Path(os.environ["KOLORA_TEST_STEP_FILE"])
original = train.StepProgress.on_train_batch_end

def paced(self, trainer, *args):  # a step takes long enough for the test to signal mid-training
    original(self, trainer, *args)
    MARK.write_text(str(trainer.global_step))
    time.sleep(0.2)

train.StepProgress.on_train_batch_end = paced
from kolora.cli.main import main
sys.exit(main(sys.argv[1:]))
'''


def test_sigterm_to_the_process_group_with_dataloader_workers_checkpoints(reference, demo_run, tmp_path):
    """Slurm signals every process of a job step (preemption, scancel, the time limit), the DataLoader's
    workers included: the training still checkpoints at the next step and exits 3, and the rerun ends
    bit-identical to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    import yaml
    from safetensors.torch import load_file

    run, cfg = fresh_train_run(demo_run, tmp_path / "runs", "demo")
    cfg.train.num_workers = 2  # operational: the reference (no workers) trained on the same samples
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True))
    driver, mark = tmp_path / "driver.py", tmp_path / "step"
    driver.write_text(PACED)
    args = [sys.executable, str(driver), "run", str(config), "--runs-dir", str(run.root.parent), "--stage", "train"]
    env = {**os.environ, "KOLORA_TEST_STEP_FILE": str(mark)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        last, since = None, time.monotonic()
        while not (mark.is_file() and mark.read_text().strip() and int(mark.read_text()) >= 10):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            step = mark.read_text() if mark.is_file() else None
            if step != last:
                last, since = step, time.monotonic()
            assert time.monotonic() - since < 240, f"no training step for 4 minutes (last: {last})"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole process group: trainer and its 2 workers
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, err[-3000:]
    assert "DataLoader worker" not in err
    stopped = checkpoints(run.train / "checkpoints")[0][0]
    assert 10 <= stopped < STEPS, err[-3000:]
    assert f"training stopped at step {stopped}/{STEPS}" in err.replace("\n", " ")
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed_from_step={stopped}" in resumed.stderr.replace("\n", "")
    # bit-identical tensors (the file's metadata names the config, whose num_workers differs)
    ours, theirs = (load_file(str(r.lora / "pytorch_lora_weights.safetensors")) for r in (run, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _steps(run) == list(range(1, STEPS + 1))


def test_resume_continues_the_global_random_streams(demo_run, tmp_path, monkeypatch):
    """The checkpoint's RNG states carry what kolora's (seed, step) draws do not: dropout in a module, numpy and
    python draws continue after a resume exactly as in a run that never stopped."""
    import random

    import numpy as np
    import torch

    draws: dict[int, tuple] = {}
    original = train_mod.LoRATrainer.training_step

    def drawing(self, batch, batch_idx):
        mask = torch.nn.functional.dropout(torch.ones(16), 0.5, training=True)  # the global torch generator
        draws[self.global_step] = (tuple(mask.tolist()), float(np.random.rand()), random.random())
        return original(self, batch, batch_idx)

    monkeypatch.setattr(train_mod.LoRATrainer, "training_step", drawing)
    streams = []
    for name, stops in (("straight", set()), ("resumed", {2})):
        run, cfg = untrained_copy(demo_run, tmp_path / name)
        cfg.train.steps, cfg.train.checkpoint_every = 5, 100
        draws.clear()
        stop_at(monkeypatch, set(stops))
        if stops:
            with pytest.raises(interrupt.Interrupted, match="step 2/5"):
                run_stage("train", cfg, run)
            interrupt.clear()
        assert run_stage("train", cfg, run)["resumed_from_step"] == (2 if stops else 0)
        streams.append(dict(draws))
    assert sorted(streams[0]) == list(range(5)) and streams[0] == streams[1]
    assert len({d[0] for d in streams[0].values()}) == 5  # dropout masks differ from step to step
