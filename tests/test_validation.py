"""Validation samples during training (train.validation) and the training logs (TensorBoard, wandb)."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from conftest import untrained_copy
from test_train import stop_at

from kolora.core import interrupt
from kolora.core.rundir import RunDir
from kolora.pipeline.runner import run_stage

LORA = "pytorch_lora_weights.safetensors"
SAMPLED = [10, 20, 30]  # the demo's 30 steps, every 10


def _validation_run(demo_run, tmp_path, name) -> tuple[RunDir, object]:
    """A copy of the demo run with validation every 10 steps and no training yet; its cache stage reruns
    (validation prompts to encode) and reuses every training entry."""
    run, cfg = untrained_copy(demo_run, tmp_path / name)
    cfg.train.validation.every = 10
    cfg.train.validation.steps = 3
    summary = run_stage("cache", cfg, run)
    assert summary.get("skipped") is not True
    assert (summary["encoded_texts"], summary["encoded_images"]) == (3, 0)  # 2 prompts + the negative prompt
    return run, cfg


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _sample_steps(run: RunDir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run.train / "samples").glob("step-*")
                  if sorted(q.name for q in p.iterdir()) == ["0-0.png", "1-0.png"])


def _events(run: RunDir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.train / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def uninterrupted(demo_run, tmp_path_factory):
    run, cfg = _validation_run(demo_run, tmp_path_factory.mktemp("val"), "uninterrupted")
    run_stage("train", cfg, run)
    return run


def test_samples_at_every_tenth_step_and_training_unchanged(uninterrupted, demo_run):
    import torch
    from PIL import Image

    assert _sample_steps(uninterrupted) == SAMPLED
    with Image.open(uninterrupted.train / "samples" / "step-000030" / "0-0.png") as im:
        assert im.size == (64, 64)  # train.resolution (validation.size unset)
    # The same LoRA tensors as the demo trained without validation: sampling drew nothing from training's RNG.
    with_samples, without = _tensors(uninterrupted.lora / LORA), _tensors(demo_run / "lora" / LORA)
    assert with_samples.keys() == without.keys()
    assert all(torch.equal(with_samples[k], without[k]) for k in without)
    # later samples come from a LoRA that trained longer: not all steps give the same pixels
    first, last = (uninterrupted.train / "samples" / f"step-{s:06d}" / "0-0.png" for s in (10, 30))
    assert first.read_bytes() != last.read_bytes()


def test_tensorboard_events_hold_the_scalars_and_the_validation_images(uninterrupted):
    acc = _events(uninterrupted)
    tags = acc.Tags()
    assert {"loss", "lr", "step_time_s"} <= set(tags["scalars"]), tags["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 31))
    assert all(e.value > 0 for e in acc.Scalars("step_time_s"))
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([1e-3] * 30)
    assert {"validation/0-0", "validation/1-0"} <= set(tags["images"]), tags["images"]
    images = acc.Images("validation/0-0")
    assert [e.step for e in images] == SAMPLED
    assert (images[0].width, images[0].height) == (64, 64)
    assert images[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_new_event_file_sorts_after_the_previous_attempts(tmp_path):
    """TensorBoard reads event files in name order; a name starts with its creation second, then a per-process
    counter ("...10" sorts before "...9"): a writer made within the second of an earlier file waits it out."""
    import time

    from kolora.train.logs import _after_earlier_event_files

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.1.9").write_bytes(b"")
    _after_earlier_event_files(tmp_path)
    assert time.time() >= now + 1


def test_resumed_run_with_validation_ends_bit_identical(uninterrupted, demo_run, tmp_path, monkeypatch):
    run, cfg = _validation_run(demo_run, tmp_path, "uninterrupted")  # same name: same config digest
    stop_at(monkeypatch, {10, 25})  # at a sampling step (its samples are cut short by the stop) and between two
    for step in (10, 25):
        with pytest.raises(interrupt.Interrupted, match=f"step {step}/30"):
            run_stage("train", cfg, run)
        interrupt.clear()
    assert _sample_steps(run) == [10, 20]  # step 10's samples were made when training resumed there
    assert run_stage("train", cfg, run)["resumed_from_step"] == 25
    assert _sha(run.lora / LORA) == _sha(uninterrupted.lora / LORA)
    assert _sample_steps(run) == SAMPLED
    for step in SAMPLED:
        for name in ("0-0.png", "1-0.png"):
            rel = f"samples/step-{step:06d}/{name}"
            assert _sha(run.train / rel) == _sha(uninterrupted.train / rel), rel
    # each step once in TensorBoard: the attempts' writers purged what came after their checkpoint
    acc = _events(run)
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 31))
    assert [e.step for e in acc.Images("validation/1-0")] == SAMPLED


def test_validation_turned_on_after_training_reruns_nothing(demo_run, tiny_diffusers, tmp_path, capsys):
    from conftest import DEMO

    from kolora.cli.main import main
    from kolora.pipeline.registry import NAMES

    runs = tmp_path / "runs"
    shutil.copytree(demo_run, runs / "demo")
    lora = _sha(runs / "demo" / "lora" / LORA)
    assert main(["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}",
                 "--set", "train.validation.every=10"]) == 0
    assert capsys.readouterr().err.count("complete, skipped") == len(NAMES)  # the cache too: training is over
    assert _sha(runs / "demo" / "lora" / LORA) == lora
    assert not (runs / "demo" / "train" / "samples").exists()
    # more steps: training runs again, so the cache first encodes the validation prompts; the step it continues
    # from (30) and step 40 are sampled
    assert main(["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}",
                 "--set", "train.validation.every=10", "--set", "train.steps=40", "--stage", "cache",
                 "--stage", "train"]) == 0
    assert "encoded_texts=3" in capsys.readouterr().err.replace("\n", "")
    assert _sample_steps(RunDir(runs / "demo")) == [30, 40]


def test_wandb_mode_is_offline_in_slurm_jobs_unless_set():
    from kolora.train.logs import wandb_mode

    assert wandb_mode({"SLURM_JOB_ID": "12"}) == "offline"
    assert wandb_mode({}) == "online"
    assert wandb_mode({"SLURM_JOB_ID": "12", "WANDB_MODE": "online"}) == "online"


def test_wandb_asked_for_without_the_package_names_the_field(demo_run, tmp_path):
    pytest.importorskip("lightning")
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here: the missing-package message cannot be shown")
    from kolora.core.errors import InputError
    from kolora.train.logs import loggers

    run = RunDir(tmp_path / "r")
    cfg = RunDir(demo_run).load_config()
    cfg.train.wandb = "kolora-tests"
    with pytest.raises(InputError, match=r"train\.wandb.*pip install wandb"):
        loggers(cfg, run, 0)


def test_sampling_leaves_rng_mode_and_devices_as_it_found_them(uninterrupted):
    import random
    from types import SimpleNamespace

    import numpy as np
    import torch

    from kolora.formats import lora
    from kolora.models import kolors as models
    from kolora.train.validation_sampler import ValidationSampler

    cfg = uninterrupted.load_config()
    cfg.train.validation.every, cfg.train.validation.steps = 10, 2
    sampler = ValidationSampler(cfg, uninterrupted, torch.float32)
    sampler.embeds = sampler._read_embeddings()
    files = models.resolve(cfg.model)
    sampler.vae = models.load_vae(files, torch.float32)
    unet = models.load_unet(files, torch.float32).train()
    lora.add_lora(unet, cfg.train.rank, cfg.train.alpha, cfg.train.target_modules)
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    images = sampler.render(SimpleNamespace(unet=unet, device=torch.device("cpu")))
    assert len(images) == 2 and images[0].size == (64, 64)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert unet.training, "the UNet goes back to training mode"
    assert all(p.device.type == "cpu" for p in sampler.vae.parameters())  # the VAE waits off the GPU
    again = sampler.render(SimpleNamespace(unet=unet, device=torch.device("cpu")))
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]  # its own seeded generators
