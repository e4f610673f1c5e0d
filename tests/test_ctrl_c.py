"""Ctrl-C in `kolora run` and `kolora sweep` (in process) is a stop request like SIGTERM: the stage stops at its
next safe point (a stage without one finishes first and the run stops before the next), one line says what was
kept, the exit status is 3 and the rerun continues; a second Ctrl-C stops at once. No traceback either way."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import DEMO
from test_train import PACED, STEPS, fresh_train_run

from kolora.cli.main import main
from kolora.core.rundir import RunDir
from kolora.pipeline import registry as stages
from kolora.pipeline.keys import marker_file
from kolora.train import loop as train_mod
from kolora.train.checkpoint import checkpoints

STOP_STEP = 5  # between the demo's periodic checkpoints (every 10): only the stop request itself saves it


@pytest.fixture(autouse=True)
def _ctrl_c_as_in_a_terminal():
    """Python's own Ctrl-C handler before and after each test, whatever pytest was started with (a background
    job ignores SIGINT) or a test left behind (Lightning's KeyboardInterrupt path leaves SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _ctrl_c(times: int = 1) -> None:
    for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)


def _main(argv: list[str]) -> int:
    """cli.main, with whatever escapes it (a KeyboardInterrupt, Lightning's SystemExit) turned into this test's
    failure instead of the end of the pytest session."""
    try:
        return main(argv)
    except BaseException as e:  # noqa: BLE001 - see above
        pytest.fail(f"kolora let {type(e).__name__}({e}) escape")


def _ctrl_c_at_step(monkeypatch, step: int, times: int = 1) -> None:
    """Ctrl-C (the real signal, `times` in a row) once training has done `step` optimizer steps."""
    original = train_mod.Checkpointer.on_train_batch_end
    pending = [step]

    def patched(self, trainer, *args):
        if trainer.global_step in pending:
            pending.remove(trainer.global_step)
            _ctrl_c(times)
        return original(self, trainer, *args)

    monkeypatch.setattr(train_mod.Checkpointer, "on_train_batch_end", patched)


def _ctrl_c_at_start_of(monkeypatch, stage: str) -> None:
    module_name, _, function = stages.get(stage).entry.partition(":")
    module = importlib.import_module(module_name)
    original = getattr(module, function)

    def started(*args, **kw):
        _ctrl_c()
        return original(*args, **kw)

    monkeypatch.setattr(module, function, started)


def _undone_copy(demo_run, tmp_path, stage: str):
    """A copy of the complete demo run in which `stage` has to run again (its marker and outputs gone; the
    cache's entries too, so that it encodes)."""
    root = tmp_path / "runs" / "demo"
    shutil.copytree(demo_run, root)
    marker_file(RunDir(root), stage).unlink()
    for out in {o.split("/")[0] for o in stages.get(stage).outputs}:
        path = root / out
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return root


def _manifest(root) -> dict:
    return json.loads((root / "manifest.json").read_text())


NEXT = dict(zip(stages.NAMES, stages.NAMES[1:], strict=False))


@pytest.mark.parametrize("stage", stages.NAMES)
def test_ctrl_c_in_each_stage_stops_with_exit_3_and_the_rerun_continues(stage, demo_run, tiny_diffusers, tmp_path,
                                                                       monkeypatch, capfd):
    root = _undone_copy(demo_run, tmp_path, stage)
    argv = ["run", str(DEMO), "--runs-dir", str(root.parent), "--set", f"model.path={tiny_diffusers}"]
    if stage == "train":
        _ctrl_c_at_step(monkeypatch, STOP_STEP)
    else:
        _ctrl_c_at_start_of(monkeypatch, stage)
    rc = _main(argv)
    monkeypatch.undo()
    out, err = capfd.readouterr()
    said = (out + err).replace("\n", " ")
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-3000:]
    entry = _manifest(root)["stages"][stage]
    if stages.get(stage).stoppable:  # stopped part-way
        assert f"kolora: Ctrl-C: stopping {stage} at its next safe point (Ctrl-C again to stop at once)" in said
        assert rc == 3, err[-3000:]
        assert entry["status"] == "interrupted" and "SIGINT" in entry["error"], entry
        assert said.count(f"kolora: interrupted during {stage}: ") == 1, said
        assert "Run the same command again to resume." in said
    else:  # finishes, then the run stops before the next stage; after the last one nothing is left to stop
        assert f"kolora: Ctrl-C: {stage} cannot stop part-way: stopping once it finishes" in said
        assert entry["status"] == "complete", entry
        if stage in NEXT:
            assert rc == 3, err[-3000:]
            assert f"kolora: interrupted: stopped on SIGINT before {NEXT[stage]}; the stages before it are complete" \
                in said
        else:
            assert rc == 0, err[-3000:]
            assert f"SIGINT came during {stage}, which finished: nothing was left to stop" in said
    if stage == "train":  # the checkpoint is the stop's step: the rerun redoes no finished step
        assert f"training stopped at step {STOP_STEP}/30 (SIGINT); checkpoint step={STOP_STEP:06d} kept" in said
        assert checkpoints(root / "train" / "checkpoints")[0][0] == STOP_STEP

    assert _main(argv) == 0
    assert "Traceback" not in capfd.readouterr().err
    manifest = _manifest(root)
    assert all(manifest["stages"][s]["status"] == "complete" for s in stages.NAMES), manifest["stages"]
    if stage == "train":
        assert manifest["stages"]["train"]["summary"]["resumed_from_step"] == STOP_STEP


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(demo_run, tiny_diffusers, tmp_path,
                                                                   monkeypatch, capfd):
    """Inside Lightning's fit: the second Ctrl-C must not become Lightning's KeyboardInterrupt → sys.exit(1)."""
    root = _undone_copy(demo_run, tmp_path, "train")
    argv = ["run", str(DEMO), "--runs-dir", str(root.parent), "--set", f"model.path={tiny_diffusers}",
            "--stage", "train"]
    _ctrl_c_at_step(monkeypatch, 12, times=2)  # the periodic checkpoint of step 10 is on disk, 12 is not
    rc = _main(argv)
    monkeypatch.undo()
    err = capfd.readouterr().err
    assert rc == 3, err[-3000:]
    assert "Traceback" not in err
    assert ("kolora: second Ctrl-C: stopped at once during train (kept: ingest, filter, cache complete; newest "
            "checkpoint step 10; 16 tiles). Run the same command again to resume.") in err.replace("\n", " "), \
        err[-3000:]
    entry = _manifest(root)["stages"]["train"]
    assert entry["status"] == "interrupted" and entry["error"].startswith("stopped at once"), entry
    assert checkpoints(root / "train" / "checkpoints")[0][0] == 10
    assert _main(argv) == 0
    assert _manifest(root)["stages"]["train"]["summary"]["resumed_from_step"] == 10


def test_ctrl_c_in_a_sweep_stops_it_with_exit_3(tiny_diffusers, tmp_path, monkeypatch, capfd):
    runs = tmp_path / "runs"
    _ctrl_c_at_step(monkeypatch, 2)
    rc = _main(["sweep", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}",
                "--set", "train.steps=6", "--set", "train.checkpoint_every=3", "--vary", "train.lr=1e-3,3e-3"])
    err = capfd.readouterr().err
    assert rc == 3, err[-3000:]
    assert "Traceback" not in err
    assert "kolora: interrupted during train: training stopped at step 2/6 (SIGINT)" in err.replace("\n", " ")
    first, second = runs / "demo-sweep" / "lr-1e-3", runs / "demo-sweep" / "lr-3e-3"
    assert _manifest(first)["stages"]["train"]["status"] == "interrupted"
    assert checkpoints(first / "train" / "checkpoints")[0][0] == 2
    assert not (second / "manifest.json").exists() or not _manifest(second).get("stages")


def test_a_command_started_ignoring_ctrl_c_keeps_ignoring_it():
    """A background job of a shell script starts with SIGINT ignored: the terminal's Ctrl-C is not for it."""
    from kolora.core import interrupt
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interrupt.for_command():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        _ctrl_c()
        assert interrupt.requested() is None
    with interrupt.for_command():  # the stop signals are still routed
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested() == "SIGTERM"
    assert interrupt.requested() is None  # a command ends with no stop requested


# ---- a real terminal: Ctrl-C reaches the whole process group (trainer and DataLoader workers) ------------------
SLOW_STOP = '''
import os, time
from pathlib import Path
from kolora.core import interrupt
from kolora.train import loop as train
MARK = Path(os.environ["KOLORA_TEST_STEP_FILE"])
save = train.Checkpointer.save

def slow_save(self, trainer):  # the stop's checkpoint takes long (a big LoRA, a slow file system)
    if interrupt.requested():
        MARK.write_text("saving")
        time.sleep(120)
    save(self, trainer)

train.Checkpointer.save = slow_save
'''


def _start(tmp_path, demo_run, driver_code: str):
    """`kolora run --stage train` of a fresh copy of the demo run, through a driver that paces the steps,
    in a new session (its own process group, like a terminal's foreground job). (process, run, step file)"""
    import yaml

    run, cfg = fresh_train_run(demo_run, tmp_path / "runs", "demo")
    cfg.train.num_workers = 2  # the workers get the Ctrl-C as well
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True))
    driver, mark = tmp_path / "driver.py", tmp_path / "step"
    # a terminal's foreground job gets Ctrl-C, also when this test runs where SIGINT is ignored
    driver.write_text("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n" + driver_code)
    args = [sys.executable, str(driver), "run", str(config), "--runs-dir", str(run.root.parent), "--stage", "train"]
    env = {**os.environ, "KOLORA_TEST_STEP_FILE": str(mark)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, run, mark


def _wait_for(proc, mark, ready, what: str, limit_s: float = 240) -> None:
    started = time.monotonic()
    while not (mark.is_file() and ready(mark.read_text().strip())):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - started < limit_s, f"no {what} in {limit_s} s"
        time.sleep(0.05)


def test_ctrl_c_to_the_process_group_checkpoints_at_that_step_and_exits_3(demo_run, tmp_path):
    proc, run, mark = _start(tmp_path, demo_run, PACED)
    try:
        _wait_for(proc, mark, lambda s: s.isdigit() and int(s) >= 5, "fifth training step")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    stopped = checkpoints(run.train / "checkpoints")[0][0]
    assert 5 <= stopped < STEPS, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("kolora: interrupted")]
    assert lines == [f"kolora: interrupted during train: training stopped at step {stopped}/{STEPS} (SIGINT); "
                     f"checkpoint step={stopped:06d} kept in {run.train / 'checkpoints'}. Run the same command again "
                     "to resume."], err[-3000:]
    assert _manifest(run.root)["stages"]["train"]["status"] == "interrupted"


def test_second_ctrl_c_to_the_process_group_stops_at_once(demo_run, tmp_path):
    proc, run, mark = _start(tmp_path, demo_run, SLOW_STOP + PACED)
    try:
        _wait_for(proc, mark, lambda s: s.isdigit() and int(s) >= 9, "ninth training step")  # step 8 is saved
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for(proc, mark, lambda s: s == "saving", "stop's checkpoint being written")
        os.killpg(proc.pid, signal.SIGINT)
        second = time.monotonic()
        out, err = proc.communicate(timeout=100)  # well before the 120 s checkpoint write would end
        took = time.monotonic() - second
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, err[-3000:]
    assert took < 60, took
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    newest = checkpoints(run.train / "checkpoints")[0][0]
    assert newest == 8, err[-3000:]
    assert "kolora: Ctrl-C: stopping train at its next safe point (Ctrl-C again to stop at once)" in err
    assert ("kolora: second Ctrl-C: stopped at once during train (kept: ingest, filter, cache complete; newest "
            f"checkpoint step {newest}). Run the same command again to resume.") in err.replace("\n", " "), \
        err[-3000:]
    entry = _manifest(run.root)["stages"]["train"]
    assert entry["status"] == "interrupted" and "SystemExit" not in entry["error"], entry
