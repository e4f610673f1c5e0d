"""The options users of kohya / SimpleTuner / OneTrainer expect: min-SNR-γ, noise offset, caption dropout, EMA,
DoRA, 8-bit AdamW, per-sample timesteps. Each test would fail if its option were ignored; with every option on, an interrupted and
resumed training still ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import fresh_train_run, stop_at

from kolora.core import interrupt
from kolora.pipeline.runner import run_stage
from kolora.train import objective

ALL_ON = {"min_snr_gamma": 5.0, "noise_offset": 0.1, "caption_dropout": 0.3, "ema_decay": 0.9, "dora": True,
          "timesteps": "per_sample"}


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _lora(run):
    return run.lora / "pytorch_lora_weights.safetensors"


def _train(demo_run, tmp_path, name, steps=12, **options):
    run, cfg = fresh_train_run(demo_run, tmp_path, name)
    cfg.train.steps = steps
    for k, v in options.items():
        setattr(cfg.train, k, v)
    return run, cfg


# ---- each option does what it says -------------------------------------------------------------------------
def test_min_snr_weights_each_sample_by_min_snr_over_snr():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    a = torch.tensor([0.999, 0.5, 0.01])  # SNR 999, 1, 0.0101
    plain = objective.loss(pred, target, a)
    weighted = objective.loss(pred, target, a, min_snr_gamma=5.0)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(weighted, (per_sample * torch.tensor([5 / 999, 1.0, 1.0])).mean())
    assert not torch.allclose(plain, weighted)
    assert torch.equal(plain, torch.nn.functional.mse_loss(pred, target))  # off: the tutorial's loss, bit for bit


def test_noise_offset_shifts_each_channel_and_keeps_the_base_draws():
    base = objective.draw(0, 7, [28, 29, 30, 31], (4, 4, 8, 8), 1100)
    off = objective.draw(0, 7, [28, 29, 30, 31], (4, 4, 8, 8), 1100, noise_offset=0.1)
    assert torch.equal(base.timestep, off.timestep)
    shift = off.noise - base.noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # one value per (sample, channel)
    assert 0.02 < shift[:, :, 0, 0].abs().mean() < 0.3


def test_per_sample_timesteps_differ_within_a_batch_and_not_with_the_gpu_count():
    """Each sample's timestep comes from its own position's generator: the global batch of step 5 (positions
    40-47) drawn by one process, or split over 2 or 4 ranks, gets the same timesteps. per_batch: one for all."""
    positions, shape = list(range(40, 48)), (8, 4, 8, 8)
    whole = objective.draw(3, 5, positions, shape, 1100, caption_dropout=0.3, per_sample_timesteps=True)
    assert whole.timestep.shape == (8,) and len(set(whole.timestep.tolist())) > 1
    for ranks in (2, 4):
        n = 8 // ranks
        parts = [objective.draw(3, 5, positions[r * n:(r + 1) * n], (n, 4, 8, 8), 1100, caption_dropout=0.3,
                                per_sample_timesteps=True) for r in range(ranks)]
        assert torch.equal(torch.cat([p.timestep for p in parts]), whole.timestep)
        assert torch.equal(torch.cat([p.noise for p in parts]), whole.noise)
    batch = objective.draw(3, 5, positions, shape, 1100, caption_dropout=0.3)
    assert batch.timestep.shape == (1,)
    assert torch.equal(objective.draw(3, 5, positions[:2], (2, 4, 8, 8), 1100).timestep, batch.timestep)
    # drawn after everything else of its sample: the noise and dropout draws are the per_batch run's
    assert torch.equal(batch.noise, whole.noise) and torch.equal(batch.drop, whole.drop)


def test_per_batch_timesteps_are_left_out_of_keys_and_digests(demo_run, tiny_diffusers):
    """The default is how every run drew timesteps before the field existed: no stage key or config digest holds
    it, so an upgrade reruns nothing; per_sample is a training input (train and what follows reruns)."""
    from conftest import DEMO

    from kolora.core.config import load_config
    from kolora.core.rundir import RunDir
    from kolora.pipeline.keys import Keys
    from kolora.pipeline.registry import NAMES

    run = RunDir(demo_run)
    default = load_config(DEMO, [f"model.path={tiny_diffusers}"])
    explicit = load_config(DEMO, [f"model.path={tiny_diffusers}", "train.timesteps=per_batch"])
    per_sample = load_config(DEMO, [f"model.path={tiny_diffusers}", "train.timesteps=per_sample"])
    assert "timesteps" not in explicit.model_dump(mode="json")["train"] and explicit.digest() == default.digest()
    assert "train.timesteps" not in Keys(explicit, run).inputs("train")["fields"]
    assert Keys(per_sample, run).inputs("train")["fields"]["train.timesteps"] == "per_sample"
    differs = [s for s in NAMES if Keys(default, run).output(s) != Keys(per_sample, run).output(s)]
    assert differs[0] == "train" and "cache" not in differs


def test_caption_dropout_uses_the_empty_caption_at_the_rate():
    drops = torch.cat([objective.draw(3, k, range(8 * k, 8 * k + 8), (8, 4, 8, 8), 1100, caption_dropout=0.25).drop for k in range(400)])
    assert abs(drops.float().mean().item() - 0.25) < 0.03  # 3,200 draws: 4.5 standard deviations
    batch = {"prompt_embeds": torch.randn(3, 5, 6), "pooled": torch.randn(3, 6)}
    empty = torch.zeros(5, 6), torch.full((6,), 7.0)
    embeds, pooled = objective.drop_captions(batch, torch.tensor([False, True, False]), *empty)
    assert torch.equal(embeds[1], empty[0]) and torch.equal(pooled[1], empty[1])
    assert torch.equal(embeds[[0, 2]], batch["prompt_embeds"][[0, 2]])
    assert objective.draw(3, 0, range(8), (8, 4, 8, 8), 1100).drop is None  # off: nothing more is drawn


@pytest.mark.parametrize("option", ["min_snr_gamma", "noise_offset", "caption_dropout", "timesteps"])
def test_each_loss_option_changes_the_trained_lora(demo_run, tmp_path, option):
    plain_run, plain_cfg = _train(demo_run, tmp_path, "plain", steps=6)
    run_stage("train", plain_cfg, plain_run)
    run, cfg = _train(demo_run, tmp_path, option, steps=6, **{option: ALL_ON[option]})
    run_stage("train", cfg, run)
    assert _sha(_lora(run)) != _sha(_lora(plain_run))
    with safe_open(str(_lora(run)), framework="pt") as f:
        assert f.metadata()[f"kolora.{option}"] == str(ALL_ON[option])


def test_ema_is_what_gets_exported(demo_run, tmp_path):
    run, cfg = _train(demo_run, tmp_path, "ema", steps=6, ema_decay=0.5)
    run_stage("train", cfg, run)
    raw_run, raw_cfg = _train(demo_run, tmp_path, "raw", steps=6)
    run_stage("train", raw_cfg, raw_run)
    ema, raw = load_file(str(_lora(run))), load_file(str(_lora(raw_run)))
    assert ema.keys() == raw.keys()
    ups = [k for k in ema if "lora_B" in k or "lora.up" in k]
    assert ups and all(not torch.equal(ema[k], raw[k]) for k in ups)  # B starts at 0: the EMA lags behind it
    assert all(ema[k].abs().sum() < raw[k].abs().sum() for k in ups)


def test_dora_trains_magnitude_vectors_that_render_loads_and_kohya_cannot_carry(demo_run, tmp_path):
    from kolora.formats import interchange
    from kolora.formats.lora import LoraFileError
    from kolora.render import stage as render

    run, cfg = _train(demo_run, tmp_path, "dora", steps=6, dora=True)
    run_stage("train", cfg, run)
    with safe_open(str(_lora(run)), framework="pt") as f:
        assert any("lora_magnitude_vector" in k for k in f.keys())
    pipe = render.build_pipeline(cfg, _lora(run), "cpu", torch.float32, text_encoder=False)
    assert any("lora_magnitude_vector" in n for n, _ in pipe.unet.named_parameters())
    assert interchange.rank_alpha(_lora(run))[0] == cfg.train.rank
    with pytest.raises(LoraFileError, match="DoRA.*cannot be exported as one"):
        interchange.export_lora(_lora(run), "kohya", tmp_path / "k.safetensors")
    assert _sha(interchange.export_lora(_lora(run), "peft", tmp_path / "p.safetensors")) == _sha(_lora(run))


def test_adamw8bit_is_refused_on_a_cpu_naming_the_fix(tmp_path, tiny_diffusers, capsys):
    from conftest import DEMO

    from kolora.cli.main import main

    rc = main(["run", str(DEMO), "--runs-dir", str(tmp_path), "--set", f"model.path={tiny_diffusers}",
               "--set", "train.optimizer=adamw8bit", "--set", "train.accelerator=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.optimizer: adamw8bit" in err and "GPU only" in err and "train.optimizer: adamw" in err
    assert not (tmp_path / "demo").exists()  # refused before anything ran


def test_adamw8bit_uses_bitsandbytes(monkeypatch):
    import sys
    import types

    from kolora.train.loop import make_optimizer

    class AdamW8bit(torch.optim.AdamW):
        pass

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=types.SimpleNamespace(
        AdamW8bit=AdamW8bit)))
    assert type(make_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(2))], 1e-4)) is AdamW8bit
    assert type(make_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], 1e-4)) is torch.optim.AdamW


# ---- exact resume with every option on ---------------------------------------------------------------------
def test_every_option_on_interrupted_twice_ends_bit_identical(demo_run, tmp_path, monkeypatch):
    """Buckets + min-SNR + noise offset + caption dropout + EMA + DoRA."""
    ref_run, ref_cfg = _train(demo_run, tmp_path, "ref", steps=20, buckets=True, **ALL_ON)
    run_stage("cache", ref_cfg, ref_run)
    run_stage("train", ref_cfg, ref_run)
    assert len({tuple(e["bucket"]) for e in json.loads((ref_run.cache / "index.json").read_text())["entries"]}) > 1
    run, cfg = _train(demo_run, tmp_path, "stopped", steps=20, buckets=True, **ALL_ON)
    run_stage("cache", cfg, run)
    cfg.train.checkpoint_every = 100  # only the stop requests checkpoint
    stop_at(monkeypatch, {5, 13})
    for _ in range(2):
        with pytest.raises(interrupt.Interrupted):
            run_stage("train", cfg, run)
        interrupt.clear()
    summary = run_stage("train", cfg, run)
    assert summary["resumed_from_step"] == 13
    got, want = load_file(str(_lora(run))), load_file(str(_lora(ref_run)))  # the exported EMA of the DoRA weights
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


# LoKr with per-block ranks, loss masks, a cosine schedule with warmup and Prodigy: what DoRA excludes (a LoRA variant)
LYCORIS_ON = {"adapter": "lokr", "block_ranks": {"mid": 8, "up.0": 2}, "lr_scheduler": "cosine", "warmup_steps": 4,
              "optimizer": "prodigy", "lr": 1.0}


def test_every_new_option_on_interrupted_twice_ends_bit_identical(demo_run, tmp_path, monkeypatch):
    """LoKr + per-block ranks + masks + cosine with warmup + Prodigy, with buckets, min-SNR, noise offset, caption
    dropout and the EMA: stopped twice, the LoKr file equals the uninterrupted run's bit for bit."""
    import shutil

    from kolora.core.rundir import RunDir

    options = {k: v for k, v in ALL_ON.items() if k != "dora"}
    ref_run, ref_cfg = _train(demo_run, tmp_path, "ref", steps=16, buckets=True, **options, **LYCORIS_ON)
    ref_cfg.data.synthetic.masks = True
    for stage in ("ingest", "filter", "cache"):
        run_stage(stage, ref_cfg, ref_run)
    assert json.loads((ref_run.root / "manifest.json").read_text())["stages"]["cache"]["summary"]["masked_samples"]
    shutil.copytree(ref_run.root, tmp_path / "stopped")
    run = RunDir(tmp_path / "stopped")
    run_stage("train", ref_cfg, ref_run)

    cfg = ref_cfg.model_copy(deep=True)
    cfg.train.checkpoint_every = 100  # only the stop requests checkpoint
    stop_at(monkeypatch, {3, 9})  # in the warmup, and on the cosine
    for _ in range(2):
        with pytest.raises(interrupt.Interrupted):
            run_stage("train", cfg, run)
        interrupt.clear()
    assert run_stage("train", cfg, run)["resumed_from_step"] == 9
    got, want = load_file(str(_lora(run))), load_file(str(_lora(ref_run)))
    assert any("lokr_w1" in k for k in got) and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    with safe_open(str(_lora(run)), "pt") as f:
        assert f.metadata()["kolora.adapter"] == "lokr"
