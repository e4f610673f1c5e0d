"""Numerics at Kolors size, tested on the tiny model: non-finite latents stop the cache with the reason, a nan
loss stops training at that step keeping the last good checkpoint (its message shows the loss before the gradient
scaler), text embeddings are stored in the dtype training feeds the UNet, and what that costs per caption at
256 × 4096; a VAE decodes in float16 only when its weights survive it, and a tile that decodes to no picture is
never written."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import stage_context

from kolora.cache import stage as cache_mod
from kolora.core.errors import RunFailure
from kolora.core.rundir import RunDir
from kolora.pipeline.runner import run_stage
from kolora.train import loop as train_mod
from kolora.train.checkpoint import checkpoints


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _copy(demo_run, tmp_path) -> RunDir:
    shutil.copytree(demo_run, tmp_path / "demo")
    return RunDir(tmp_path / "demo")


def test_non_finite_latents_stop_the_cache_naming_the_image(demo_run, tmp_path, monkeypatch):
    run = _copy(demo_run, tmp_path)
    cfg = run.load_config()
    cfg.cache.dir = tmp_path / "fresh-store"  # nothing cached there yet (operational: --force to encode into it)
    index = (run.cache / "index.json").read_bytes()
    row = cache_mod.read_trainset(run)[5]
    real = cache_mod.load_image_tensor

    def nan_for_victim(path, *a, **k):
        pixels = real(path, *a, **k)
        return pixels * float("nan") if path == row["path"] else pixels

    monkeypatch.setattr(cache_mod, "load_image_tensor", nan_for_victim)
    with pytest.raises(cache_mod.NonFiniteCache, match=rf"latents of {row['file_name']} has \d+ non-finite") as e:
        run_stage("cache", cfg, run, force=True)
    assert "cache.vae_dtype: float32" in str(e.value) and "fp16-fix" in str(e.value)
    written = list((cfg.cache.dir / "latents").glob("*.safetensors"))
    assert written and all(torch.isfinite(_load(p)["latents"]).all() for p in written)  # others kept, no nan
    assert (run.cache / "index.json").read_bytes() == index  # the complete cache it had is untouched
    monkeypatch.setattr(cache_mod, "load_image_tensor", real)
    # the image is fine again: only what is missing is encoded (without --force, which encodes every entry again;
    # the index goes so that the stage runs)
    (run.cache / "index.json").unlink()
    summary = run_stage("cache", cfg, run)
    assert summary["encoded_texts"] == 0 and 0 < summary["encoded_images"] < summary["samples"]


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_nan_loss_stops_training_at_that_step_and_keeps_the_last_good_checkpoint(demo_run, tmp_path, monkeypatch):
    run = _copy(demo_run, tmp_path)
    for d in ("train", "lora"):
        shutil.rmtree(run.root / d)
    cfg = run.load_config()
    real = train_mod.LoRATrainer.training_step

    def nan_at_step_15(self, batch, batch_idx):
        loss = real(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 14 else loss

    monkeypatch.setattr(train_mod.LoRATrainer, "training_step", nan_at_step_15)
    with pytest.raises(train_mod.NonFiniteLoss, match=r"the loss at step 15 is nan") as e:
        run_stage("train", cfg, run)
    assert "step=000010.ckpt (step 10), is kept" in str(e.value) and "bf16-mixed" in str(e.value)
    assert [step for step, _ in checkpoints(run.train / "checkpoints")] == [10]
    assert not (run.lora / "pytorch_lora_weights.safetensors").exists()
    monkeypatch.setattr(train_mod.LoRATrainer, "training_step", real)
    assert run_stage("train", cfg, run)["resumed_from_step"] == 10
    # the rerun ends where the uninterrupted demo did
    assert _sha(run.lora / "pytorch_lora_weights.safetensors") == _sha(demo_run / "lora" /
                                                                       "pytorch_lora_weights.safetensors")


def test_text_embeddings_are_stored_in_the_training_dtype(demo_run, tmp_path):
    """bf16-mixed training stores bfloat16 embeddings (16-mixed: float16): autocast casts them to that in the
    first layer that reads them, so the training is the same as from float32 entries (checked: bit-identical
    LoRA on this CPU), at half the bytes."""
    import json

    def train(name: str, store_dtype) -> dict:
        run = _copy(demo_run, tmp_path / name)
        for d in ("train", "lora"):
            shutil.rmtree(run.root / d)
        cfg = run.load_config()
        cfg.train.precision, cfg.train.steps = "bf16-mixed", 6
        cfg.cache.dir = tmp_path / name / "store"
        run_stage("cache", cfg, run)
        index = json.loads((run.cache / "index.json").read_text())
        text = _load(cfg.cache.dir / "text" / f"{index['entries'][0]['text_key']}.safetensors")
        assert text["prompt_embeds"].dtype == torch.bfloat16 and text["pooled"].dtype == torch.bfloat16
        if store_dtype is not torch.bfloat16:  # the float32 layout: the same entries, widened
            for p in (cfg.cache.dir / "text").glob("*.safetensors"):
                from safetensors.torch import save_file

                save_file({k: v.to(store_dtype) for k, v in _load(p).items()}, str(p))
        run_stage("train", cfg, run)
        return _load(run.lora / "pytorch_lora_weights.safetensors")

    half, full = train("bf16", torch.bfloat16), train("fp32", torch.float32)
    assert half.keys() == full.keys() and all(torch.equal(half[k], full[k]) for k in half)


def test_text_entry_bytes_at_kolors_size():
    """ChatGLM3's [256, 4096] embeddings + [4096] pooled, as the cache writes them: a short caption (the tutorial's
    "二次元" is a handful of tokens) keeps its token rows and one pad row; a caption filling all 256 tokens is the
    largest entry."""
    short = cache_mod.text_entry_bytes(256, 4096, torch.float16, tokens=8)
    assert short < 100 * 2**10  # 9 rows × 8 KiB + the pooled vector
    assert cache_mod.text_entry_bytes(256, 4096, torch.float16) < 2 * 2**20 + 16 * 2**10  # 2 MiB + pooled
    assert cache_mod.text_entry_bytes(256, 4096, torch.float32, tokens=8) > 1.9 * short  # float32: twice the rows


def test_text_entries_drop_repeated_pad_rows_and_restore_them_exactly(demo_run, tiny_diffusers):
    """ChatGLM pads on the left with rows that are bit-identical within a caption: the entry keeps one, and what
    training reads is exactly diffusers' encode_prompt output."""
    import json

    from diffusers import KolorsPipeline

    from kolora.models import kolors as models
    run = RunDir(demo_run)
    cfg = run.load_config()
    index = json.loads((run.cache / "index.json").read_text())
    files = models.resolve(cfg.model)
    encoder = KolorsPipeline(vae=None, text_encoder=models.load_text_encoder(files), unet=None, scheduler=None,
                             tokenizer=models.load_tokenizer(files))
    seq = cfg.cache.max_sequence_length
    entries = [(e["text"], e["text_key"]) for e in index["entries"][:4]] + [("", index["empty_text_key"])]
    for text, key in entries:
        with torch.no_grad():
            embeds, _, pooled, _ = encoder.encode_prompt([text], device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False, max_sequence_length=seq)
        path = run.cache / "text" / f"{key}.safetensors"
        stored = _load(path)
        pad = seq - int(sum(encoder.tokenizer([text], padding="max_length", max_length=seq,
                                              truncation=True)["attention_mask"][0]))
        if pad > 1:  # compacted: the token rows and one pad row
            assert stored["prompt_embeds"].shape[0] == seq - pad and stored["pad_row"].shape[0] == 1
        entry = cache_mod.read_text(path, seq, f"caption {text!r}")
        assert torch.equal(entry["prompt_embeds"], embeds[0]) and torch.equal(entry["pooled"], pooled[0])
    assert "pad_row" in _load(run.cache / "text" / f"{index['empty_text_key']}.safetensors")  # "" has 30 pads


# ---- float16 decoding: judged by the VAE's weights ---------------------------------------------------------
def _stock_like_vae(fix_like: Path, dest: Path) -> Path:
    """The tiny VAE made to behave like the stock SDXL (and Kolors) VAE: one decoder layer's weights × 1e5, so
    activations inside go far beyond float16's range while the picture out stays the same kind (the next
    GroupNorm scales them back). The tiny fp16-fix VAE is the unchanged one: small activations throughout."""
    from safetensors.torch import save_file

    state = _load(fix_like)
    for name in ("decoder.mid_block.resnets.0.conv2.weight", "decoder.mid_block.resnets.0.conv2.bias"):
        state[name] = state[name] * 1e5
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dest))
    return dest


def _diffsynth_with_stock_vae(tiny_diffsynth, tmp_path) -> Path:
    """DiffSynth's models/ folder as the tutorial has it: Kolors' own (stock-like) VAE in kolors/Kolors/vae/, the
    fp16-fix one in sdxl-vae-fp16-fix/."""
    models_dir = tmp_path / "models"
    shutil.copytree(tiny_diffsynth, models_dir)
    _stock_like_vae(models_dir / "sdxl-vae-fp16-fix" / "diffusion_pytorch_model.safetensors",
                    models_dir / "kolors" / "Kolors" / "vae" / "diffusion_pytorch_model.safetensors")
    return models_dir


def _diffsynth_config(models_dir: Path, **model):
    from conftest import PROMPTS

    from kolora.core.config import validate_config
    from kolora.models import kolors as models

    # the tiny VAE config says force_upcast: false, like the packaged SDXL config before this rule
    return validate_config({"name": "t", "model": {"path": str(models_dir), "layout": "diffsynth",
                                                   **models.tiny_diffsynth_overrides(models_dir), **model},
                            "render": {"prompts": str(PROMPTS), "steps": 2, "width": 32, "height": 32},
                            "cache": {"max_sequence_length": 16, "vae_dtype": "float16"}})


def test_a_float16_vae_is_upcast_unless_its_weights_survive_float16(tiny_diffsynth, tmp_path):
    """By content, not by name or config: the stock-like VAE copied into a folder named sdxl-vae-fp16-fix is still
    upcast, the fp16-fix one under a neutral name still decodes in float16; both configs say force_upcast: false."""
    from types import SimpleNamespace

    from kolora.models import kolors as models
    from kolora.train.validation_sampler import ValidationSampler

    models_dir = _diffsynth_with_stock_vae(tiny_diffsynth, tmp_path)
    fix = models_dir / "sdxl-vae-fp16-fix" / "diffusion_pytorch_model.safetensors"
    stock = models_dir / "kolors" / "Kolors" / "vae" / "diffusion_pytorch_model.safetensors"
    neutral = tmp_path / "downloads" / "vae.safetensors"
    neutral.parent.mkdir()
    shutil.copyfile(fix, neutral)
    misnamed = tmp_path / "elsewhere" / "sdxl-vae-fp16-fix" / "diffusion_pytorch_model.safetensors"
    misnamed.parent.mkdir(parents=True)
    shutil.copyfile(stock, misnamed)

    def config(vae_path=None):
        return _diffsynth_config(models_dir, **({"vae_path": str(vae_path)} if vae_path else {}))

    def upcast(vae_path=None) -> bool:
        vae = models.load_vae(models.resolve(config(vae_path).model), torch.float16)
        assert vae.dtype == torch.float16
        return vae.config.force_upcast

    # None: the default diffsynth VAE, models/sdxl-vae-fp16-fix
    assert [upcast(path) for path in (None, stock, neutral, misnamed)] == [False, True, False, True]
    stock_vae = models.load_vae(models.resolve(config(stock).model))
    assert models.decoder_peak(stock_vae) > models.FLOAT16_MAX  # the stock-like VAE does overflow float16 inside
    assert models.packaged_config("sdxl-vae-config.json")["force_upcast"] is True  # diffusers' SDXL default
    # the validation sampler decodes itself (cache.vae_dtype: float16 on a GPU): in float32 where render upcasts
    for path, decodes_in in ((stock, torch.float32), (neutral, torch.float16)):
        sampler = ValidationSampler(config(path), None, torch.float16)
        assert sampler._load_vae(SimpleNamespace(type="cuda")).dtype == decodes_in


def _record_decode_dtypes(vae) -> list:
    """The dtype `vae` has at each decode call, from now on."""
    seen, decode = [], vae.decode

    def recording(*args, **kwargs):
        seen.append(vae.dtype)
        return decode(*args, **kwargs)

    vae.decode = recording
    return seen


def test_a_float16_render_with_kolors_own_vae_decodes_in_float32(tiny_diffsynth, tmp_path):
    """The tutorial's DiffSynth folder with Kolors' own VAE (model.vae_path at kolors/Kolors/vae): a float16 render
    decodes in float32 and gives a picture; the fp16-fix VAE decodes in float16."""
    import numpy as np

    from kolora.core.prompts import load_prompts
    from kolora.render import stage as render

    models_dir = _diffsynth_with_stock_vae(tiny_diffsynth, tmp_path)
    stock = models_dir / "kolors" / "Kolors" / "vae" / "diffusion_pytorch_model.safetensors"
    for vae_path, decoded_in in ((stock, torch.float32), (None, torch.float16)):
        cfg = _diffsynth_config(models_dir, **({"vae_path": str(stock)} if vae_path else {}))
        pipe = render.build_pipeline(cfg, None, "cpu", torch.float16)
        seen = _record_decode_dtypes(pipe.vae)
        item = load_prompts(cfg.render.prompts, cfg.render.negative_prompt)[0]
        tile = np.asarray(render.render_tile(pipe, cfg, item, "cpu"))
        assert seen == [decoded_in], vae_path
        assert pipe.vae.dtype == torch.float16  # back in float16 after decoding
        assert tile.std() > 0  # a picture, not the black tile a float16 decode of this VAE gives


# ---- no PNG for a tile that is no picture ------------------------------------------------------------------
@pytest.mark.parametrize(("broken", "dtype"), [("nan", "float16"), ("flat", "float32")])
def test_a_tile_that_decodes_to_nan_or_one_colour_stops_the_render_without_its_png(demo_run, tmp_path, monkeypatch,
                                                                                   broken, dtype):
    from kolora.render import stage as render
    run = _copy(demo_run, tmp_path)
    cfg = run.load_config()
    cfg.render.dtype = dtype
    shutil.rmtree(run.render)
    real_build = render.build_pipeline

    def fourth_decode_broken(*args, **kwargs):
        pipe = real_build(*args, **kwargs)
        decode, calls = pipe.vae.decode, []

        def decode_and_break(z, *a, **k):
            out = decode(z, *a, **k)
            calls.append(1)
            if len(calls) == 4:  # the tile of prompt 3 (the LoRA tiles render first, in order)
                pixels = out[0] * float("nan") if broken == "nan" else torch.zeros_like(out[0])
                return (pixels, *out[1:])
            return out

        pipe.vae.decode = decode_and_break
        return pipe

    monkeypatch.setattr(render, "build_pipeline", fourth_decode_broken)
    with pytest.raises(RunFailure) as e:
        render.run(stage_context("render", cfg, run))
    message = str(e.value)
    assert isinstance(e.value, render.UnusableTile), message
    assert "tile render/003-" in message and "(prompt 3, seed" in message and "LoRA)" in message
    assert ("non-finite values (nan or inf)" if broken == "nan" else "one flat colour (every pixel (128, 128, 128))") \
        in message
    assert "no PNG was written" in message and "the tiles before it are kept" in message
    if dtype == "float16":
        assert "set render.dtype: float32" in message and "fp16-fix VAE (model.vae_path" in message
    else:
        assert "no float16 overflow" in message and "render.lora_scale" in message
    assert sorted(p.name[:3] for p in run.render.iterdir()) == ["000", "001", "002"]  # no temp file either


def test_a_validation_sample_that_decodes_to_nan_is_left_out_with_a_warning(demo_run, tmp_path, caplog):
    """Training goes on (only rank 0 samples: stopping it alone would leave the other ranks waiting); the other
    samples of that step are written."""
    import logging
    from types import SimpleNamespace

    from test_validation import _validation_run

    from kolora.formats import lora
    from kolora.models import kolors as models
    from kolora.train.validation_sampler import ValidationSampler

    run, cfg = _validation_run(demo_run, tmp_path, "val")
    sampler = ValidationSampler(cfg, run, torch.float32)
    sampler.embeds = sampler._read_embeddings()
    files = models.resolve(cfg.model)
    sampler.vae = models.load_vae(files, torch.float32)
    decode, calls = sampler.vae.decode, []

    def second_decode_nan(z, *args, **kwargs):
        out = decode(z, *args, **kwargs)
        calls.append(1)
        return SimpleNamespace(sample=out.sample * float("nan")) if len(calls) == 2 else out

    sampler.vae.decode = second_decode_nan
    unet = models.load_unet(files, torch.float32).train()
    lora.add_lora(unet, cfg.train.rank, cfg.train.alpha, cfg.train.target_modules)
    with caplog.at_level(logging.WARNING, logger="kolora.train.loop"):
        sampler.sample(SimpleNamespace(global_step=10, loggers=[]), SimpleNamespace(unet=unet, device=torch.device("cpu")))
    assert sorted(p.name for p in (run.train / "samples" / "step-000010").iterdir()) == ["0-0.png"]
    assert "sample 1-0.png of step 10 (prompt 1, seed 0) decoded to" in caplog.text
    assert "non-finite values (nan or inf)" in caplog.text and "no PNG was written" in caplog.text


# ---- the non-finite loss as training_step returned it ------------------------------------------------------
def test_the_non_finite_loss_message_shows_the_loss_before_the_gradient_scaler(tmp_path):
    """Under 16-mixed Lightning's gradient scaler multiplies the loss (65536 at first) and accumulation divides it
    before on_before_backward sees it. A rank whose own loss is finite stops with the others (one decision for
    all) and says so, with its loss as training_step returned it."""
    from types import SimpleNamespace

    from kolora.core.config import TrainConfig

    scaler = torch.amp.GradScaler("cpu")  # the CPU twin of the scaler MixedPrecision("16-mixed") holds on a GPU
    module = train_mod.LoRATrainer(torch.nn.Linear(2, 2), TrainConfig(), "digest", tmp_path / "checkpoints")

    def before_backward(raw: float, all_finite: bool) -> str:
        module.trainer = SimpleNamespace(
            global_step=14, accumulate_grad_batches=2, precision_plugin=SimpleNamespace(scaler=scaler),
            strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: all_finite and decision))
        with pytest.raises(train_mod.NonFiniteLoss) as e:
            module.on_before_backward(scaler.scale(torch.tensor(raw) / 2))  # as Lightning's hook receives it
        return str(e.value)

    message = before_backward(0.375, all_finite=False)
    assert "the loss at step 15 is not finite on another rank (this rank's: 0.375)" in message
    assert "12288" not in message  # 0.375 / 2 × 65536
    assert "the loss at step 15 is nan (not finite)" in before_backward(float("nan"), all_finite=True)
    assert "no checkpoint was written yet" in message and "bf16-mixed" in message
