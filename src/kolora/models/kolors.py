"""Kolors components from disk, in the two layouts users have, and tiny Kolors-shaped models for CPU.

Layouts:
- ``diffusers``: ``Kwai-Kolors/Kolors-diffusers`` (model_index.json; unet/ vae/ text_encoder/ tokenizer/
  scheduler/ each with their config).
- ``diffsynth``: what DiffSynth's ``download_models(["Kolors", "SDXL-vae-fp16-fix"])`` leaves:
  ``models/kolors/Kolors/{text_encoder/, unet/diffusion_pytorch_model.safetensors, vae/...}`` and
  ``models/sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors``. unet/ and vae/ have no config.json: they are
  built from the Kolors UNet / SDXL VAE configs shipped in kolora/data and loaded from the safetensors.

Which VAE decodes in float16 is decided by its weights, never by its file name or a config's word
(`decodes_in_float16`): Kolors' own VAE, like the stock SDXL VAE, overflows in float16 and decodes to nan
(a black tile), while the fp16-fix VAE, the same architecture, was finetuned to stay small inside. A VAE
loaded in float16 gets `force_upcast` (diffusers then decodes in float32) unless a probe decode shows its
activations far below float16's range.

The tiny factory writes random Kolors-shaped models in both layouts; tests load them through the very
functions below that load real weights.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kolora.core.config import ModelConfig
from kolora.core.devices import is_cuda
from kolora.core.errors import ConfigError
from kolora.core.files import FileChecker, Report
from kolora.core.rundir import shareable

# Imported in the functions that use them (a login node's CLI starts without them):
#   diffusers, safetensors, sentencepiece, torch, transformers

log = logging.getLogger("kolora.models.kolors")

PARTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")

# The Kolors sampler/training schedule (Kolors-diffusers scheduler_config.json; DiffSynth's trainer).
SCHEDULE = dict(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear")


def quiet_libraries() -> None:
    """transformers 5 and diffusers print deprecation chatter from the vendored ChatGLM on every call."""

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*srun.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def packaged_config(name: str) -> dict[str, Any]:
    return json.loads(resources.files("kolora").joinpath("data", name).read_text())


@dataclass
class ModelFiles:
    """Where each component lives on disk (resolved, validated)."""

    layout: str
    tokenizer: Path
    text_encoder: Path
    unet: Path  # folder (diffusers) or safetensors file (diffsynth)
    vae: Path
    unet_config: Path | None = None
    vae_config: Path | None = None
    scheduler: Path | None = None
    variant: str | None = None


def resolve(cfg: ModelConfig) -> ModelFiles:
    """Find every component of `cfg` on disk; raise ConfigError naming the missing file and the fix."""
    root = Path(cfg.path)
    if not root.exists():
        raise ConfigError(f"model.path: {root} does not exist. Download Kolors on a login node "
                          f"(Kwai-Kolors/Kolors-diffusers with layout 'diffusers', or DiffSynth's models/ folder "
                          f"with layout 'diffsynth') and point model.path at it.")
    if cfg.layout == "diffusers":
        if not (root / "model_index.json").is_file():
            hint = " (it looks like DiffSynth's layout: set model.layout: diffsynth)" if (
                (root / "kolors").is_dir() or (root / "unet" / "diffusion_pytorch_model.safetensors").is_file()
                and not (root / "unet" / "config.json").is_file()) else ""
            raise ConfigError(f"model.path: {root} has no model_index.json, so it is not a diffusers "
                              f"Kolors folder{hint}")
        files = ModelFiles("diffusers", tokenizer=Path(cfg.tokenizer_path or root / "tokenizer"),
                           text_encoder=root / "text_encoder", unet=root / "unet",
                           vae=Path(cfg.vae_path) if cfg.vae_path else root / "vae",
                           scheduler=root / "scheduler", variant=cfg.variant)
        for name in ("unet", "vae"):
            folder = getattr(files, name)
            if folder.is_dir():
                _require(folder / "config.json", f"model.path ({name})")
        _require(files.text_encoder / "config.json", "model.path (text_encoder)")
    else:
        kolors = root / "kolors" / "Kolors" if (root / "kolors" / "Kolors").is_dir() else root
        models_dir = kolors.parent.parent if kolors != root else root
        fp16_fix = models_dir / "sdxl-vae-fp16-fix" / "diffusion_pytorch_model.safetensors"
        vae = Path(cfg.vae_path) if cfg.vae_path else (
            fp16_fix if fp16_fix.is_file() else kolors / "vae" / "diffusion_pytorch_model.safetensors")
        tok = cfg.tokenizer_path
        if tok is None:
            for cand in (kolors / "tokenizer", kolors / "text_encoder"):
                if (cand / "tokenizer.model").is_file():
                    tok = cand
                    break
        if tok is None:
            raise ConfigError(
                f"model.tokenizer_path: no tokenizer.model under {kolors}/tokenizer or {kolors}/text_encoder. "
                "DiffSynth keeps the ChatGLM tokenizer inside its package (diffsynth/tokenizer_configs/kolors/"
                "tokenizer); set model.tokenizer_path to that folder or to Kolors-diffusers' tokenizer/.")
        files = ModelFiles("diffsynth", tokenizer=Path(tok), text_encoder=kolors / "text_encoder",
                           unet=kolors / "unet" / "diffusion_pytorch_model.safetensors", vae=vae,
                           unet_config=cfg.unet_config, vae_config=cfg.vae_config)
        _require(files.unet, "model.path (unet)")
        _require(files.vae, "model.vae_path" if cfg.vae_path else "model.path (vae)")
        _require(files.text_encoder / "config.json", "model.path (text_encoder)")
    _require(files.tokenizer / "tokenizer.model", "model.tokenizer_path" if cfg.tokenizer_path else "model.path (tokenizer)")
    return files


def check_files(cfg: ModelConfig) -> ModelFiles:
    """`resolve`, then every file the stages load checked as `kolora check models` checks a download
    (kolora.core.files.FileChecker: present, not empty, safetensors header and tensor sizes, every indexed shard),
    so that a model folder missing its weights is refused before a run writes anything, not by the stage
    that loads them. Only headers are read."""
    files = resolve(cfg)
    report = Report(root=Path(cfg.path), kind="model")
    c = FileChecker(report)

    def component(path: Path, what: str, folder: bool) -> Callable[[], Any]:
        if not folder:  # a safetensors file (DiffSynth's layout, model.vae_path)
            return lambda: c.file(path, f"the {what} weights")

        def diffusers_folder() -> None:  # its config and the weights file the loader picks (load_unet/load_vae)
            c.file(path / "config.json")
            weights = find_weights(path, files.variant)
            if weights is None:
                report.problems.append(f"missing: {c.rel(path / 'diffusion_pytorch_model.safetensors')} "
                                       f"(the {what} weights)")
            else:
                c.file(weights, f"the {what} weights")
        return diffusers_folder

    checks: list[tuple[str, Callable[[], Any]]] = [
        ("model.path (unet)", component(files.unet, "UNet", folder=files.layout == "diffusers")),
        ("model.vae_path" if cfg.vae_path else "model.path (vae)",
         component(files.vae, "VAE", folder=files.vae.is_dir() or files.layout == "diffusers" and not cfg.vae_path)),
        ("model.path (text_encoder)", lambda: c.weights(files.text_encoder, ("model", "pytorch_model"))),
        ("model.tokenizer_path" if cfg.tokenizer_path else "model.path (tokenizer)",
         lambda: c.file(files.tokenizer / "tokenizer.model", "ChatGLM sentencepiece model")),
        *((field, lambda p=Path(path): c.file(p)) for field, path in
          (("model.unet_config", files.unet_config), ("model.vae_config", files.vae_config)) if path),
    ]
    problems: list[str] = []
    for field, check in checks:
        before = len(report.problems)
        check()
        problems += [f"{field}: {p}" for p in report.problems[before:]]
    if problems:
        raise ConfigError(f"model.path: the model at {cfg.path} is incomplete or damaged ({len(problems)} "
                          "problem(s), as `kolora check models` finds them):\n  " + "\n  ".join(problems)
                          + "\nRe-download it on a login node (`kolora fetch models` resumes) or fix the path.")
    return files


def _require(path: Path, field: str) -> None:
    if not Path(path).exists():
        raise ConfigError(f"{field}: {path} is missing; the model folder is incomplete (re-download it "
                          f"or fix the path)")


# loading ---------------------------------------------------------------------------------------------------
def load_tokenizer(files: ModelFiles):
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    return ChatGLMTokenizer.from_pretrained(str(files.tokenizer))


def load_text_encoder(files: ModelFiles, dtype=None, device: str = "cpu"):
    import torch
    from diffusers.pipelines.kolors import ChatGLMModel


    # ChatGLM3 checkpoints (both layouts) are sharded .bin/.safetensors with a `transformer.` prefix that
    # transformers strips; .bin files are read with weights_only=True by transformers 5. On a GPU the shards
    # load straight onto it: no 12.5 GB host copy in each rank of a multi-GPU job.
    placement = {"device_map": {"": device}} if is_cuda(device) else {}
    model = ChatGLMModel.from_pretrained(str(files.text_encoder), torch_dtype=dtype or torch.float32, **placement)
    return model.eval().requires_grad_(False)


def prompt_encoder(files: ModelFiles, dtype, device: str):
    """ChatGLM3 + its tokenizer in a KolorsPipeline without UNet and VAE: diffusers' own encode_prompt, shared by
    the cache and render stages so both compute the same embeddings."""
    from diffusers import KolorsPipeline

    return KolorsPipeline(vae=None, text_encoder=load_text_encoder(files, dtype, device).to(device),
                          tokenizer=load_tokenizer(files), unet=None, scheduler=None)


def free_gpu(device: str) -> None:
    """Give a freed model's GPU memory back before the next one is loaded in the same process."""

    import torch


    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def _build_and_load(cls, config: dict[str, Any], weights: Path, dtype):
    """Build a diffusers model on the meta device and assign the safetensors weights (no 2x memory)."""
    import torch
    from safetensors.torch import load_file

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(config)
    state = load_file(str(weights))
    hint = "set model.unet_config / model.vae_config to the matching config"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:200])
        raise ConfigError(f"{weights}: weights do not fit the {cls.__name__} config ({first}); {hint}") from None
    if missing or unexpected:
        raise ConfigError(f"{weights}: weights do not match the {cls.__name__} config "
                          f"({len(missing)} missing e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. "
                          f"{unexpected[:2]}); {hint}")
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model


def find_weights(folder: Path, variant: str | None) -> Path | None:
    """The safetensors file a diffusers component folder is loaded from (the variant's first), None if none."""
    names = ["diffusion_pytorch_model.safetensors"]
    if variant:
        names.insert(0, f"diffusion_pytorch_model.{variant}.safetensors")
    names.append("diffusion_pytorch_model.fp16.safetensors")
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _weights_file(folder: Path, variant: str | None) -> Path:
    found = find_weights(folder, variant)
    if found is None:
        raise ConfigError(f"model.path: no diffusion_pytorch_model*.safetensors in {folder}")
    return found


def load_unet(files: ModelFiles, dtype=None):
    from diffusers import UNet2DConditionModel

    if files.layout == "diffusers":
        cfg = json.loads((files.unet / "config.json").read_text())
        model = _build_and_load(UNet2DConditionModel, cfg, _weights_file(files.unet, files.variant), dtype)
    else:
        cfg = json.loads(Path(files.unet_config).read_text()) if files.unet_config else \
            packaged_config("kolors-unet-config.json")
        model = _build_and_load(UNet2DConditionModel, cfg, files.unet, dtype)
    return model.eval().requires_grad_(False)


def load_vae(files: ModelFiles, dtype=None):
    """The VAE in `dtype`; in float16 its `force_upcast` is the probe's verdict (decodes_in_float16), whatever
    its config says: diffusers' pipelines then decode in float32 unless the weights survive float16."""
    import torch
    from diffusers import AutoencoderKL

    if files.vae.is_dir():
        cfg = json.loads((files.vae / "config.json").read_text())
        weights = _weights_file(files.vae, files.variant)
    else:
        cfg = json.loads(Path(files.vae_config).read_text()) if files.vae_config else \
            packaged_config("sdxl-vae-config.json")
        weights = files.vae
    model = _build_and_load(AutoencoderKL, cfg, weights, None).eval().requires_grad_(False)
    if dtype == torch.float16:
        peak = decoder_peak(model.float())
        safe = decodes_in_float16(peak)
        model.register_to_config(force_upcast=not safe)
        log.info("%s: largest decoder activation on the probe image %.3g: %s", weights, peak,
                 "decodes in float16" if safe else "upcast to float32 for decoding (stock SDXL VAE behaviour)")
    return model.to(dtype) if dtype is not None else model


# float16's largest finite value, and how far below it a VAE's activations on the probe must stay for it to
# decode in float16: real images drive a VAE harder than one small probe does, and a wrong "yes" costs a
# black tile (caught before it is written: render.UnusableTile) where a wrong "no" costs only a float32 decode.
FLOAT16_MAX = 65504.0
FLOAT16_HEADROOM = 16


def decodes_in_float16(peak: float) -> bool:
    """The rule: a VAE decodes in float16 only when its largest decoder activation on the probe (decoder_peak)
    is finite and at most FLOAT16_MAX / FLOAT16_HEADROOM (4094); every other VAE is upcast."""

    return math.isfinite(peak) and peak <= FLOAT16_MAX / FLOAT16_HEADROOM


def probe_image(size: int = 64):
    """A fixed picture with smooth ramps, fine stripes and a saturated block, [1, 3, size, size] in [-1, 1]."""
    import torch

    ramp = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    stripes = torch.sin(x * 40) * torch.cos(y * 25)
    image = torch.stack([x, y, stripes])
    image[:, : size // 4, : size // 4] = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1)  # a saturated block
    return image.unsqueeze(0)


def decoder_peak(vae) -> float:
    """The largest |value| any decoder layer outputs while the float32 `vae` decodes the latent of probe_image:
    the number that decides whether float16 (largest finite value 65504) overflows inside it. The fp16-fix
    VAE differs from the stock SDXL VAE only in its weights, finetuned to keep these activations small."""
    import torch

    peak = torch.zeros((), dtype=torch.float64)

    def record(module, inputs, output):
        nonlocal peak
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            peak = torch.maximum(peak, out.detach().abs().max().double().nan_to_num(float("inf")))

    hooks = [m.register_forward_hook(record) for m in (vae.post_quant_conv, *vae.decoder.modules())
             if m is not None]
    try:
        with torch.no_grad():
            latent = vae.encode(probe_image().to(vae.device, vae.dtype)).latent_dist.mean
            vae.decode(latent)
    finally:
        for h in hooks:
            h.remove()
    return float(peak)


def make_scheduler(files: ModelFiles | None = None):
    from diffusers import EulerDiscreteScheduler

    if files is not None and files.scheduler is not None and (files.scheduler / "scheduler_config.json").is_file():
        return EulerDiscreteScheduler.from_pretrained(str(files.scheduler))
    return EulerDiscreteScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="leading")


def training_scheduler():
    """The tutorial's training noise schedule (scaled-linear, beta_end 0.014, 1100 steps, epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, prediction_type="epsilon")


def ensure_model(cfg: ModelConfig) -> None:
    """Build tiny random models at cfg.path when cfg.tiny and the folder does not exist yet."""
    if cfg.tiny and not Path(cfg.path).exists():
        build_tiny(Path(cfg.path), layout=cfg.layout, replace=False)


# tiny Kolors ---------------------------------------------------------------------------------------------
TINY_TEXT = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, kv_channels=8, num_attention_heads=4,
                 multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=512, seq_length=256,
                 add_qkv_bias=True, original_rope=True, use_cache=False)


def tiny_unet_config(text_hidden: int = 32) -> dict[str, Any]:
    time_dim = 8
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
        cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True, transformer_layers_per_block=1,
        encoder_hid_dim_type="text_proj", encoder_hid_dim=text_hidden, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=text_hidden + 6 * time_dim,
    )


def tiny_vae_config() -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, sample_size=64, scaling_factor=0.13025, force_upcast=False,
    )


def _train_tokenizer(folder: Path) -> Path:
    """A sentencepiece BPE model in ChatGLM's id layout, trained on the prompts it will see (0.1 s)."""

    import sentencepiece as spm

    corpus = [
        "二次元,日系动漫,演唱会的观众席,人山人海,一个紫色短发小女孩穿着粉色吊带漏肩连衣裙坐在演唱会的观众席",
        "舞台上衣着华丽的歌星们在唱歌,露出憧憬的神情,对着流星许愿,闭着眼睛,十指交叉,侧面",
        "一个紫色中等长度头发小女孩穿着粉色吊带漏肩连衣裙,在练习室练习唱歌,手持话筒",
        "紫色长发少女,穿着黑色连衣裙,试衣间,心情忐忑,穿着黑色礼服,在台上唱歌",
        "丑陋、变形、嘈杂、模糊、低对比度,色情擦边,扭曲的手指,多余的手指",
        "a red green blue yellow purple white black circle square triangle stripe on a background",
    ] * 20
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    path = folder / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def init_chatglm(text_encoder, std: float = 0.02):
    """ChatGLMModel leaves weights uninitialised (skip_init / torch.empty): give every parameter a value
    (norms 1, biases 0, the rest N(0, std)) or its outputs are NaN."""
    import torch

    with torch.no_grad():
        for name, p in text_encoder.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
    return text_encoder


def build_tiny_components(tokenizer_dir: Path, seed: int = 0):
    """Random tiny Kolors: (tokenizer, text_encoder, unet, vae, scheduler), all float32 on CPU.
    The tokenizer's sentencepiece file is written to `tokenizer_dir` (the tokenizer keeps reading it)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    torch.manual_seed(seed)
    tokenizer = ChatGLMTokenizer(vocab_file=str(_train_tokenizer(Path(tokenizer_dir))))
    text_encoder = init_chatglm(ChatGLMModel(ChatGLMConfig(**TINY_TEXT), empty_init=False), std=0.05)
    unet = UNet2DConditionModel(**tiny_unet_config(TINY_TEXT["hidden_size"]))
    vae = AutoencoderKL(**tiny_vae_config())
    return tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), make_scheduler()


def build_tiny(path: Path, layout: str = "diffusers", seed: int = 0, replace: bool = True) -> Path:
    """Write tiny random Kolors weights at `path` in `layout`; atomic (temp folder, then rename). replace=False
    keeps a model another process put at `path` meanwhile (it may be loading it), rather than swapping it."""

    from safetensors.torch import save_file


    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        shareable(tmp, folder=True)
        tokenizer, text_encoder, unet, vae, scheduler = build_tiny_components(tmp / ".sp", seed)
        if layout == "diffusers":
            from diffusers import KolorsPipeline

            KolorsPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                           scheduler=scheduler).save_pretrained(str(tmp))
        elif layout == "diffsynth":
            kolors = tmp / "kolors" / "Kolors"
            (kolors / "unet").mkdir(parents=True)
            (kolors / "vae").mkdir(parents=True)
            (tmp / "sdxl-vae-fp16-fix").mkdir()
            save_file(unet.state_dict(), str(kolors / "unet" / "diffusion_pytorch_model.safetensors"))
            vae_sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
            save_file(vae_sd, str(kolors / "vae" / "diffusion_pytorch_model.safetensors"))
            save_file(vae_sd, str(tmp / "sdxl-vae-fp16-fix" / "diffusion_pytorch_model.safetensors"))
            _save_chatglm_like_thudm(text_encoder, kolors / "text_encoder")
            # DiffSynth's folders have no configs or tokenizer; a tiny model needs its own, kept beside them.
            extra = tmp / "tiny-configs"
            extra.mkdir()
            (extra / "unet_config.json").write_text(json.dumps(dict(unet.config), indent=1, default=list))
            (extra / "vae_config.json").write_text(json.dumps(dict(vae.config), indent=1, default=list))
            tokenizer.save_pretrained(str(extra / "tokenizer"))
        else:
            raise ValueError(f"unknown layout {layout!r}")
        shutil.rmtree(tmp / ".sp")
        (tmp / "TINY_RANDOM_MODEL.txt").write_text("Random tiny Kolors-shaped weights made by kolora for tests and "
                                                   "the demo. Not a real model.\n")
        if path.exists() and replace:
            shutil.rmtree(path)
        if not path.exists():
            try:
                tmp.rename(path)
            except OSError:  # another process renamed its copy into place first
                if replace or not path.is_dir():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def tiny_diffsynth_overrides(path: Path) -> dict[str, str]:
    """Config fields a tiny diffsynth-layout model needs (the real one uses kolora's packaged configs)."""
    extra = Path(path) / "tiny-configs"
    return {"unet_config": str(extra / "unet_config.json"), "vae_config": str(extra / "vae_config.json"),
            "tokenizer_path": str(extra / "tokenizer")}


def _save_chatglm_like_thudm(model, folder: Path) -> None:
    """Save like THUDM's chatglm3-6b: config.json + sharded pytorch_model-*.bin with `transformer.` keys."""
    import torch

    folder.mkdir(parents=True)
    model.config.save_pretrained(str(folder))
    state = {f"transformer.{k}": v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in shard}, folder / name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
