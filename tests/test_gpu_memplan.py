"""kolora.launch.memplan against CUDA's own count: full-size Kolors with random weights (the configs of the
`kolors_configs` fixture: packaged Kolors UNet, SDXL VAE with force_upcast, ChatGLM3-6B's shape), built directly
on the GPU as bench/_common.py builds them, run as configs/kolors-anime.yaml runs them at 1024² (plus an EMA).

Each phase's plan without its fixed overhead (the CUDA context, which torch.cuda.max_memory_allocated does not
see) must be within 15 % of the peak CUDA's allocator reports for that phase: the cache stage's text encoder and
VAE encoder, the train step, the validation sample phase (its resident training state included), and render's
text encoder and image phases. Needs a CUDA GPU with about 16 GB free; a few minutes on an H100."""

from __future__ import annotations

import functools
import gc
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kolora.core.config import load_config
from kolora.launch import memplan

REPO = Path(__file__).resolve().parents[1]
KOLORS = str(REPO / "configs" / "kolors-anime.yaml")
GIB = 2**30
TOLERANCE = 0.15


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)")]


@pytest.fixture(scope="module")
def recipe(kolors_configs: Path):
    """The recipe on the config-only model, with an EMA (its copy stays on the GPU) and short sampling loops
    (the number of denoising steps does not change a phase's peak)."""
    return load_config(KOLORS, [f"model.path={kolors_configs}", "model.vae_path=null", "data.source=synthetic",
                                "train.ema_decay=0.999", "train.validation.count=1", "train.validation.steps=2",
                                "render.steps=2"])


@pytest.fixture(scope="module")
def plan(recipe) -> dict[str, memplan.Estimate]:
    return memplan.estimate(recipe)


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _allocated_gib() -> float:
    """What is allocated now: measured before a test builds its models, it is subtracted from their phases'
    peaks (a failed test's models can outlive it in its traceback)."""
    import torch

    _free()
    return torch.cuda.memory_allocated() / GIB


def _peak_gib(run: Callable[[], Any]) -> tuple[float, Any]:
    """(the most memory CUDA's allocator held while `run()` ran, what was already allocated included (a phase's
    resident models are built before it); what `run()` returned)."""
    import torch

    _free()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB, out


def _compare(what: str, planned: memplan.Phase, measured_gib: float, capsys: pytest.CaptureFixture) -> str | None:
    """Prints the plan (without its fixed overhead) beside the measured peak; the mismatch, if any."""
    expected = planned.total_gib - planned.overhead
    with capsys.disabled():
        print(f"\n{what}: planned {expected:.2f} GiB, CUDA's peak {measured_gib:.2f} GiB "
              f"({(expected / measured_gib - 1) * 100:+.1f} %)  [{planned.describe()}]")
    if abs(expected - measured_gib) > TOLERANCE * measured_gib:
        return f"{what}: planned {expected:.2f} GiB, measured {measured_gib:.2f} GiB"
    return None


def _model(kind: str, config: dict[str, Any], dtype, device: str = "cuda"):
    """`kind` from its config with random weights, built directly on `device` in `dtype` (no CPU copy)."""
    import torch

    from kolora.models.kolors import init_chatglm

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if kind == "unet":
                from diffusers import UNet2DConditionModel

                model = UNet2DConditionModel.from_config(config)
            elif kind == "vae":
                from diffusers import AutoencoderKL

                model = AutoencoderKL.from_config(config)
            else:
                from diffusers.pipelines.kolors import ChatGLMModel
                from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

                model = init_chatglm(ChatGLMModel(ChatGLMConfig.from_dict(config), empty_init=False), std=0.02)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # buffers made in float32 follow


def _prompt_encoder(config: dict[str, Any], tmp_path: Path):
    """ChatGLM3 in fp16 on the GPU in a KolorsPipeline without UNet and VAE (models.prompt_encoder's shape), with
    kolora's tiny sentencepiece tokenizer (any ChatGLM tokenizer serves random weights)."""
    import torch
    from diffusers import KolorsPipeline

    from kolora.models.kolors import build_tiny_components

    tokenizer = build_tiny_components(tmp_path)[0]
    return KolorsPipeline(vae=None, text_encoder=_model("text_encoder", config, torch.float16), tokenizer=tokenizer,
                          unet=None, scheduler=None)


def _encode_texts(encoder, texts: str | list[str], seq: int, guidance: bool = False,
                  negative: str | None = None) -> dict[str, Any]:
    """encode_prompt as kolora.cache.stage (captions, no guidance) or kolora.render.stage (a prompt and its negative) call it."""
    import torch

    with torch.no_grad():
        pe, ne, pp, npp = encoder.encode_prompt(texts, device="cuda", num_images_per_prompt=1,
                                                do_classifier_free_guidance=guidance, negative_prompt=negative,
                                                max_sequence_length=seq)
    return {"prompt_embeds": pe, "pooled_prompt_embeds": pp, "negative_prompt_embeds": ne,
            "negative_pooled_prompt_embeds": npp}


def _encode_images(vae, pixels) -> None:
    import torch

    with torch.no_grad():  # kolora.cache.stage: the latent distribution's mean, scaled
        vae.encode(pixels.to("cuda", vae.dtype)).latent_dist.mean * vae.config.scaling_factor


def test_cache_encoders_match_the_plan(recipe, plan, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """kolora.cache.stage: ChatGLM3 (fp16) on cache.batch_size captions, freed, then the VAE encoder in cache.vae_dtype
    on cache.batch_size images of train.resolution²."""
    import torch

    confs, c, res = memplan.model_configs(recipe.model), recipe.cache, recipe.train.resolution
    before = _allocated_gib()
    encoder = _prompt_encoder(confs["text_encoder"], tmp_path)
    captions = [f"an anime girl under cherry blossoms, picture {i}" for i in range(c.batch_size)]
    text = _peak_gib(functools.partial(_encode_texts, encoder, captions, c.max_sequence_length))[0] - before
    del encoder
    vae = _model("vae", confs["vae"], getattr(torch, c.vae_dtype))
    pixels = torch.rand(c.batch_size, 3, res, res).mul(2).sub(1)  # on the CPU, as the loader gives them
    images = _peak_gib(functools.partial(_encode_images, vae, pixels))[0] - before
    del vae
    phases = plan["cache"].phases
    mismatches = [_compare("cache, text encoder phase", phases["text encoder phase"], text, capsys),
                  _compare("cache, VAE encoder phase", phases["VAE encoder phase"], images, capsys)]
    assert not any(mismatches), mismatches


def _train_step(s: types.SimpleNamespace) -> None:
    """kolora.train.loop.LoRATrainer.training_step as Lightning's 16-mixed runs it: the forward and the loss under
    autocast, zero_grad after the forward (the previous step's gradients live through it), GradScaler's backward
    and step, then the EMA callback."""
    import torch

    from kolora.train import objective
    latents = s.batch["latents"]
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1100, (latents.shape[0],), device="cuda")
    a = s.alphas[timesteps].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    with torch.autocast("cuda", dtype=s.weight_dtype):
        pred = s.unet(noisy, timesteps, encoder_hidden_states=s.batch["prompt_embeds"],
                      added_cond_kwargs={"text_embeds": s.batch["pooled"], "time_ids": s.batch["time_ids"]}).sample
        loss = objective.loss(pred, noise, a.flatten())
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.trainer.global_step += 1
    s.ema.on_train_batch_end(s.trainer, s.unet, None, s.batch, 0)


def test_train_step_and_validation_sample_match_the_plan(recipe, plan, capsys: pytest.CaptureFixture) -> None:
    """The train step (the UNet fp16, the LoRA fp32 with its gradients, AdamW states and EMA copy), then
    kolora.train.validation_sampler's render on that state, its VAE brought from the CPU."""
    import torch

    from kolora.cache.validation import prompt_texts
    from kolora.formats.lora import add_lora
    from kolora.models import kolors as models
    from kolora.train.ema import LoraEMA
    from kolora.train.validation_sampler import ValidationSampler

    t, confs = recipe.train, memplan.model_configs(recipe.model)
    seq, res, weight_dtype = recipe.cache.max_sequence_length, t.resolution, torch.float16  # 16-mixed
    before = _allocated_gib()
    unet = _model("unet", confs["unet"], weight_dtype).train()
    add_lora(unet, t.rank, t.alpha, t.target_modules)
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:  # the LoRA trains in float32 (kolora.train.loop)
        p.data = p.data.float()
    unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora, lr=t.lr)
    for p in lora:  # AdamW's states from the start, whatever GradScaler makes of the random weights' first steps
        p.grad = torch.zeros_like(p)
    optimizer.step()
    ema = LoraEMA(t.ema_decay)
    ema.on_fit_start(None, unet)
    hidden = unet.config.encoder_hid_dim
    state = types.SimpleNamespace(
        unet=unet, optimizer=optimizer, scaler=torch.amp.GradScaler("cuda"), ema=ema, weight_dtype=weight_dtype,
        trainer=types.SimpleNamespace(global_step=0),  # what LoraEMA reads of Lightning's trainer
        alphas=models.training_scheduler().alphas_cumprod.to("cuda"),
        batch={"latents": torch.randn(t.batch_size, 4, res // 8, res // 8, device="cuda"),  # cached in fp32
               "prompt_embeds": torch.randn(t.batch_size, seq, hidden, device="cuda", dtype=weight_dtype),
               "pooled": torch.randn(t.batch_size, hidden, device="cuda", dtype=weight_dtype),
               "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * t.batch_size, device="cuda",
                                        dtype=torch.float32)})
    _train_step(state)
    step = _peak_gib(functools.partial(_train_step, state))[0] - before

    sampler = ValidationSampler(recipe, None, weight_dtype)
    sampler.vae = _model("vae", confs["vae"], getattr(torch, recipe.cache.vae_dtype), device="cpu")
    sampler.embeds = {text: {"prompt_embeds": torch.randn(seq, hidden), "pooled": torch.randn(hidden)}
                      for text in [*prompt_texts(recipe), recipe.render.negative_prompt]}
    module = types.SimpleNamespace(unet=unet, device=torch.device("cuda"))  # what the sampler reads of it
    sample = _peak_gib(functools.partial(sampler.render, module))[0] - before
    del state, unet, lora, optimizer, ema, sampler, module
    phases = plan["train"].phases
    mismatches = [_compare("train, train step", phases["train step"], step, capsys),
                  _compare("train, validation sample", phases["validation sample"], sample, capsys)]
    assert not any(mismatches), mismatches


def test_render_at_1024_matches_the_plan(recipe, plan, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """kolora.render.stage: the tile's prompt encoded (ChatGLM3 fp16, with the negative prompt), the text encoder freed,
    then render_tile with UNet + LoRA (fp16) and the VAE (fp16, upcast to fp32 to decode: force_upcast)."""
    import torch
    from diffusers import KolorsPipeline

    from kolora.core.prompts import PromptItem
    from kolora.formats.lora import add_lora
    from kolora.models import kolors as models
    from kolora.render import stage as render

    r, confs, t = recipe.render, memplan.model_configs(recipe.model), recipe.train
    assert r.dtype in ("auto", "float16") and (r.width, r.height) == (1024, 1024)
    item = PromptItem(prompt="an anime girl under cherry blossoms", seed=0, negative_prompt=r.negative_prompt)
    before = _allocated_gib()
    encoder = _prompt_encoder(confs["text_encoder"], tmp_path)
    text, embeds = _peak_gib(functools.partial(_encode_texts, encoder, item.prompt, recipe.cache.max_sequence_length,
                                               r.cfg > 1, item.negative_prompt))
    text -= before
    del encoder

    unet = _model("unet", confs["unet"], torch.float16)
    add_lora(unet, t.rank, t.alpha, t.target_modules)  # peft puts the adapter in the base layer's dtype
    pipe = KolorsPipeline(vae=_model("vae", confs["vae"], torch.float16), text_encoder=None, tokenizer=None,
                          unet=unet, scheduler=models.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()  # as render.build_pipeline on a GPU (no change at 1024²)
    image = _peak_gib(functools.partial(render.render_tile, pipe, recipe, item, "cuda", embeds))[0] - before
    del pipe, unet, embeds
    phases = plan["render"].phases
    mismatches = [_compare("render, text encoder phase", phases["text encoder phase"], text, capsys),
                  _compare("render, image phase", phases["image phase"], image, capsys)]
    assert not any(mismatches), mismatches
