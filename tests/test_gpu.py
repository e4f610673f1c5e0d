"""The CUDA paths for real, on the first GPU at hand (`pytest -m gpu`; `bash bench/run_gpu.sh` runs them first
and records their numbers in bench/RESULTS.md). Skipped with a reason on a machine without CUDA; the same code
paths run on the CPU in test_devices.py, test_train.py and test_render.py.

- a 16-mixed and a bf16-mixed training step of kolora's LoRATrainer on the full-size Kolors UNet (random
  weights built on the GPU), through Lightning as `kolora run` trains: finite loss, the LoRA moves;
- a deterministic run stopped and resumed on the GPU ends bit-identical to an uninterrupted one (a LoRA with
  AdamW, and a LoKr with per-block ranks, Prodigy and a cosine schedule);
- a float16 render writes finite, non-constant tiles;
- this process's device is the rank's own GPU.
The memory planner against torch.cuda.max_memory_allocated is in test_gpu_memplan.py.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import stage_context

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")]

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """The demo config on a tiny model with its training set written directly (a GPU image need not have
    Data-Juicer): cached on this GPU. Returns (run, config)."""
    import csv

    from kolora.core.config import load_config
    from kolora.ingest.synthetic import make_synthetic
    from kolora.models.kolors import build_tiny
    from kolora.pipeline.runner import open_run, run_stage

    root = tmp_path_factory.mktemp("gpu")
    model = build_tiny(root / "tiny-kolors")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.path={model}", "cache.device=cuda"], name="gpu")
    run = open_run(cfg, root / "runs")
    train_dir = run.trainset / "train"
    items = make_synthetic(train_dir, 8, min_side=64, max_side=160)
    with open(train_dir / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        w.writerows((path.name, caption) for path, caption in items)
    summary = run_stage("cache", cfg, run)
    assert summary["device"] == "cuda:0", summary
    return run, cfg


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_this_process_computes_on_its_own_gpu(monkeypatch):
    from kolora.core import devices
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.pick("auto") == "cuda:0" and torch.cuda.current_device() == 0


class _Batches(torch.utils.data.Dataset):
    """Random inputs of the shapes the cache writes for a 1024² Kolors sample (latents 4×128×128, 256 tokens of
    ChatGLM3's 4096-wide hidden states)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return {"latents": torch.randn(4, 128, 128, generator=g), "prompt_embeds": torch.randn(256, 4096, generator=g),
                "pooled": torch.randn(4096, generator=g), "position": torch.tensor(i),
                "time_ids": torch.tensor([1024.0, 1024, 0, 0, 1024, 1024])}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_a_training_step_on_the_full_size_kolors_unet_is_finite(precision, record_property):
    import lightning as L

    sys.path.insert(0, str(BENCH))
    from _common import kolors_models

    from kolora.core import devices
    from kolora.core.config import TrainConfig
    from kolora.formats import lora as lora_io
    from kolora.train import distributed
    from kolora.train.loop import LoRATrainer

    device = devices.pick("cuda")
    weight_dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    unet = kolors_models(device, weight_dtype, parts=("unet",))["unet"].train()
    tcfg = TrainConfig(precision=precision, steps=2, rank=16, alpha=4, gradient_checkpointing=True)
    torch.manual_seed(0)
    lora_io.add_lora(unet, tcfg.rank, tcfg.alpha, tcfg.target_modules)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    unet.enable_gradient_checkpointing()
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    module = LoRATrainer(unet, tcfg, "gpu-test", loader=lambda rank, world: torch.utils.data.DataLoader(
        _Batches(2), batch_size=1))
    trainer = L.Trainer(**distributed.placement(device), precision=precision, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Losses()], use_distributed_sampler=False)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.fit(module)
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30
    record_property("loss", losses)
    record_property("peak_gib", round(peak, 2))
    record_property("two_steps_s", round(wall, 2))
    print(f"\n{precision}: losses {losses}, peak {peak:.2f} GiB, 2 steps {wall:.1f} s")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in unet.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert moved, "no LoRA weight changed after two optimizer steps"
    assert all(bool(torch.isfinite(p).all()) for p in unet.parameters() if p.requires_grad)


# LoKr with per-block ranks, a cosine schedule with warmup and Prodigy: their state (Prodigy's d, the scheduler's
# step) must come back from a checkpoint written under 16-mixed on the GPU as under fp32 on the CPU
LYCORIS = {"adapter": "lokr", "block_ranks": {"mid": 8, "up.0": 2}, "lr_scheduler": "cosine", "warmup_steps": 2,
           "optimizer": "prodigy", "lr": 1.0}


@pytest.mark.parametrize("options", [{}, LYCORIS], ids=["lora-adamw", "lokr-prodigy-cosine"])
def test_a_deterministic_run_resumed_on_the_gpu_is_bit_identical(gpu_run, tmp_path, record_property, options):
    import shutil

    from safetensors.torch import load_file

    from kolora.core import interrupt
    from kolora.core.rundir import RunDir
    from kolora.train import loop as train_mod

    lora = "lora/pytorch_lora_weights.safetensors"
    base, cfg = gpu_run
    cfg = cfg.model_copy(deep=True)
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.deterministic = 12, 4, True
    cfg.train.precision = "16-mixed"
    for field, value in options.items():  # in this order: each assignment is validated
        setattr(cfg.train, field, value)

    def fresh(name):
        shutil.copytree(base.root, tmp_path / name, ignore=shutil.ignore_patterns("train", "lora", "render"))
        return RunDir(tmp_path / name)

    ref = fresh("reference")
    assert train_mod.run(stage_context("train", cfg, ref))["precision"] == "16-mixed"
    run = fresh("resumed")
    original = train_mod.Checkpointer.on_train_batch_end

    def stop_at_6(self, trainer, *args):
        if trainer.global_step == 6:
            interrupt.request("SIGUSR2")
        return original(self, trainer, *args)

    train_mod.Checkpointer.on_train_batch_end = stop_at_6
    try:
        with pytest.raises(interrupt.Interrupted):
            train_mod.run(stage_context("train", cfg, run))
    finally:
        train_mod.Checkpointer.on_train_batch_end = original
        interrupt.clear()
    assert train_mod.run(stage_context("train", cfg, run))["resumed_from_step"] == 6
    a, b = load_file(str(ref.root / lora)), load_file(str(run.root / lora))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    record_property("max_abs_diff", diff)
    print(f"\ndeterministic 16-mixed {options or 'LoRA, AdamW'} on {torch.cuda.get_device_name(0)}: stopped at 6 of 12, resumed: "
          f"LoRA max |Δ| {diff:.3g}")
    assert _sha(ref.root / lora) == _sha(run.root / lora), f"resumed LoRA differs: max |Δ| {diff:.3g}"


def test_a_float16_render_writes_finite_tiles(gpu_run, record_property):
    import numpy as np
    from PIL import Image

    from kolora.render import stage as render
    from kolora.train import loop as train_mod
    run, cfg = gpu_run
    cfg = cfg.model_copy(deep=True)
    cfg.train.steps = 4
    cfg.render.dtype, cfg.render.device = "float16", "cuda"
    if not (run.lora / "pytorch_lora_weights.safetensors").is_file():
        train_mod.run(stage_context("train", cfg, run))
    render.run(stage_context("render", cfg, run))
    tiles = sorted(run.render.glob("*.png"))
    assert tiles
    for tile in tiles:
        pixels = np.asarray(Image.open(tile), dtype=np.float32)
        assert pixels.std() > 0, f"{tile.name} is a constant image"
    record_property("tiles", len(tiles))
