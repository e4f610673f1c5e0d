"""memplan: the peak GPU memory of each GPU stage (cache, train, render), estimated before anything is queued.

From the configured model's own configs (unet/, vae/, text_encoder/ config.json; kolora's packaged UNet/VAE
configs for DiffSynth's layout), with the modules built on the meta device: no weight is read or allocated.
Per stage, in GiB:
- weights: every parameter and buffer the stage keeps on the GPU, in the dtype it keeps them (train: the UNet
  in the precision's weight dtype; cache: ChatGLM3 in fp16, then the VAE in `cache.vae_dtype`; render: the text
  encoder alone, then UNet, LoRA and VAE, the VAE in fp32 where diffusers upcasts it; each stage's peak is its
  larger phase);
- trainable (train): the LoRA parameters in fp32, their fp32 gradients and AdamW's two fp32 states;
- activations: the most memory the stage's own tensors hold at one time, measured by running its forward (train:
  forward and backward, checkpointed blocks recomputed as torch.utils.checkpoint does) on meta tensors of the
  real shapes while following every tensor storage from creation to release. Two things CUDA does differently
  from the meta device are emulated: mixed precision's autocast casts (16-mixed / bf16-mixed: matmuls and
  convolutions in 16 bit, norms, softmax and the loss in fp32, the casts saved for backward as autocast's are)
  and attention as PyTorch's memory-efficient kernel (no sequence × sequence matrix);
- overhead: OVERHEAD_GIB for the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack.
Not modelled: fragmentation beyond that slack, per-GPU convolution workspaces, DDP's gradient buckets.
"""

from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolora.config import ConfigError, ExperimentConfig, ModelConfig

GIB = 2**30
# CUDA context ≈ 0.3–0.6 GiB on current GPUs with lazy module loading, plus cuBLAS/cuDNN workspaces and the
# caching allocator's rounding: 1 GiB covers them without hiding a real shortfall.
OVERHEAD_GIB = 1.0
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
ADAM8BIT_STATE_BYTES = 2  # bitsandbytes' 8-bit Adam: one byte per state
GPU_STAGES = ("cache", "train", "render")
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Estimate:
    """The peak GPU memory of one stage, in GiB, and what it is made of."""

    stage: str
    weights: float
    trainable: float  # LoRA parameters + gradients + optimizer states (train only)
    activations: float
    overhead: float = OVERHEAD_GIB
    parts: dict[str, float] = field(default_factory=dict)  # finer detail in GiB (per phase, per model)
    lora_params: int = 0
    assumptions: str = ""  # the shapes and dtypes estimated

    @property
    def total_gib(self) -> float:
        return self.weights + self.trainable + self.activations + self.overhead

    def breakdown(self) -> dict[str, float]:
        return {"weights": self.weights, "trainable+grads+optimizer": self.trainable,
                "activations": self.activations, "overhead": self.overhead}

    def describe(self) -> str:
        trainable = f", LoRA+grads+AdamW {self.trainable:.2f}" if self.trainable else ""
        detail = "".join(f", {k} {v:.1f}" for k, v in self.parts.items()).replace(", ", "; ", 1)
        return (f"{self.total_gib:.1f} GiB (weights {self.weights:.1f}{trainable}, activations "
                f"{self.activations:.1f}, overhead {self.overhead:.1f}{detail})")


# ---- the model's configs ------------------------------------------------------------------------------------
def _json(path: Path | None, field: str, packaged: str | None = None) -> dict[str, Any]:
    """A model config: `path`, else kolora's packaged `packaged`; ConfigError naming `field` and the file."""
    from kolora import models
    from kolora.errors import InputError, read_text

    if path is None and packaged:
        return models.packaged_config(packaged)
    try:
        data = json.loads(read_text(Path(path)))
    except (InputError, json.JSONDecodeError) as e:
        raise ConfigError(f"{field}: {e if isinstance(e, InputError) else f'{path} is not valid JSON ({e})'}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: {path} must hold a JSON object (a model config)")
    return data


def model_configs(m: ModelConfig) -> dict[str, dict[str, Any]]:
    """{"unet", "vae", "text_encoder"} → their configs, found as kolora.models finds them to load the weights."""
    from kolora import models

    if m.tiny and not Path(m.path).exists():  # the demo's tiny model, not built yet: the configs it will have
        return {"unet": models.tiny_unet_config(models.TINY_TEXT["hidden_size"]), "vae": models.tiny_vae_config(),
                "text_encoder": dict(models.TINY_TEXT)}
    f = models.resolve(m)
    diffusers = f.layout == "diffusers"
    return {"unet": _json(f.unet / "config.json" if diffusers else f.unet_config,
                          "model.path (unet)" if diffusers else "model.unet_config", "kolors-unet-config.json"),
            "vae": _json(f.vae / "config.json" if f.vae.is_dir() else f.vae_config,
                         "model.path (vae)" if f.vae.is_dir() else "model.vae_config", "sdxl-vae-config.json"),
            "text_encoder": _json(f.text_encoder / "config.json", "model.path (text_encoder)")}


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _build(kind: str, key: str):
    """The module of `kind` from its config (JSON text), on the meta device, float32."""
    import torch

    from kolora.models import quiet_libraries

    quiet_libraries()  # diffusers warns about every .to(dtype), transformers about ChatGLM's old arguments
    config = {k: v for k, v in json.loads(key).items() if not k.startswith("_")}
    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if kind == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        from diffusers.pipelines.kolors import ChatGLMModel
        from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

        # empty_init=False: the default (skip_init) would allocate the weights on the CPU
        return ChatGLMModel(ChatGLMConfig.from_dict(config), empty_init=False)


@functools.lru_cache(maxsize=32)
def param_count(kind: str, key: str) -> int:
    """Parameters (and buffer elements) of one model, by the content of its config."""
    model = _build(kind, key)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


@functools.lru_cache(maxsize=32)
def lora_param_count(key: str, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA parameters kolora.lora.add_lora puts on the UNet (peft on the meta device: exact)."""
    from kolora.lora import add_lora

    unet = _build("unet", key)
    unet.requires_grad_(False)
    add_lora(unet, rank, 1.0, list(targets))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


# ---- measuring activations on the meta device ---------------------------------------------------------------
class _LiveBytes:
    """Follows every tensor storage the ops create (a TorchDispatchMode) until it is released (weak
    references); `peak` is the most bytes alive at once. Storages that existed before (weights) are left out."""

    def __init__(self, exclude: list[Any]):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.now = self.peak = 0
        self._refs: dict[int, Any] = {}
        self._keep = [t.untyped_storage() for t in exclude]  # held, so their ids stay theirs
        self._skip = {id(s) for s in self._keep}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                from torch.utils._pytree import tree_leaves

                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if hasattr(t, "untyped_storage"):
                        tracker.add(t)
                return out

        self.mode = Mode()

    def add(self, t) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._refs or key in self._skip:
            return
        n = st.nbytes()
        self._refs[key] = weakref.ref(st, functools.partial(self._gone, key, n))
        self.now += n
        self.peak = max(self.peak, self.now)

    def _gone(self, key: int, n: int, _ref) -> None:
        self.now -= n
        self._refs.pop(key, None)


def _simulated_cuda(low_dtype):
    """A TorchFunctionMode that runs attention as CUDA's memory-efficient kernel and, with `low_dtype`, casts the
    arguments of each op as CUDA autocast does (its documented fp16 / fp32 op lists). Autocast only acts while
    grad mode is on: the forward and checkpoint recomputation, not the backward ops themselves."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_map

    low_ops = {F.linear, F.conv1d, F.conv2d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul,
               torch.Tensor.__matmul__, torch.bmm, torch.baddbmm, torch.addmm, torch.mm, torch.einsum,
               F.scaled_dot_product_attention}
    fp32_ops = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
                F.mse_loss, torch.exp, torch.Tensor.exp, torch.rsqrt, torch.Tensor.rsqrt}

    def cast(dtype):
        def one(x):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype not in (dtype, torch.float64):
                return x.to(dtype)
            return x
        return one

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if k.shape[-3] != q.shape[-3]:  # grouped key/value heads
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
        bias = None
        if attn_mask is not None:  # the kernel takes an additive bias of the scores' shape
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).expand(
                q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, grad, dropout_p, is_causal, scale=scale)[0]

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if low_dtype is not None and torch.is_grad_enabled():
                if func in low_ops:
                    args, kwargs = tree_map(cast(low_dtype), (args, kwargs))
                elif func in fp32_ops:
                    args, kwargs = tree_map(cast(torch.float32), (args, kwargs))
            if func is F.scaled_dot_product_attention:
                return sdpa(*args, **kwargs)
            return func(*args, **kwargs)

    return Mode()


def _peak_bytes(model, run, low_dtype=None) -> int:
    """`run()` (it makes its own inputs) under both modes: the peak of what it created, in bytes."""
    live = _LiveBytes([*model.parameters(), *model.buffers()])
    with _simulated_cuda(low_dtype), live.mode:
        run()
    return live.peak


def _meta(shape, dtype):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")


def _unet_call(unet, batch: int, height: int, width: int, seq: int, dtype):
    import torch

    c = unet.config
    pooled = max(1, (c.projection_class_embeddings_input_dim or 0) - 6 * (c.addition_time_embed_dim or 0))
    sample = _meta((batch, c.in_channels, height // 8, width // 8), dtype)
    return sample, unet(sample, torch.zeros(batch, dtype=torch.long, device="meta"),
                        encoder_hidden_states=_meta((batch, seq, c.encoder_hid_dim or c.cross_attention_dim), dtype),
                        added_cond_kwargs={"text_embeds": _meta((batch, pooled), dtype),
                                           "time_ids": _meta((batch, 6), torch.float32)}).sample


@functools.lru_cache(maxsize=64)
def train_activation_bytes(key: str, weight_dtype: str, mixed: bool, checkpointing: bool, batch: int, res: int,
                           seq: int, rank: int, targets: tuple[str, ...]) -> int:
    """One step of kolora.train.LoRATrainer: fp32 cached latents/embeddings → UNet (base in `weight_dtype`, LoRA
    in fp32, under autocast when `mixed`) → MSE → backward. LoRA gradients are released as they arrive (they are
    counted in the trainable part)."""
    import torch
    from torch.autograd.variable import Variable

    from kolora.lora import add_lora

    unet = _build("unet", key).to(getattr(torch, weight_dtype)).train()
    unet.requires_grad_(False)
    add_lora(unet, rank, 1.0, list(targets))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    if checkpointing:
        unet.enable_gradient_checkpointing()

    def step() -> None:
        sample, pred = _unet_call(unet, batch, res, res, seq, torch.float32)
        loss = torch.nn.functional.mse_loss(pred.float(), sample)
        # the engine itself, not loss.backward(): inside Tensor.backward (a torch function) the function mode is
        # switched off, and checkpoint recomputation has to run under it
        Variable._execution_engine.run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                                                allow_unreachable=True, accumulate_grad=True)

    return _peak_bytes(unet, step, getattr(torch, weight_dtype) if mixed else None)


@functools.lru_cache(maxsize=64)
def inference_bytes(kind: str, key: str, dtype_name: str, batch: int, height: int, width: int, seq: int = 0) -> int:
    """No-grad forward of one model in `dtype_name`: "unet" (one denoising step of KolorsPipeline), "text_encoder"
    (encode_prompt: ChatGLM3 keeping every hidden state; `height` is ignored), "vae_encode" (`batch` images) or
    "vae_decode" (one latent of height × width pixels)."""
    import torch

    dtype = getattr(torch, dtype_name)
    model = _build({"vae_encode": "vae", "vae_decode": "vae"}.get(kind, kind), key).to(dtype).eval()

    def forward() -> Any:
        with torch.no_grad():
            if kind == "unet":
                return _unet_call(model, batch, height, width, seq, dtype)
            if kind == "text_encoder":
                # without attention_mask: a padding mask needs values (meta tensors have none); the causal path
                # runs the same kernels on the same shapes
                ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
                out = model(input_ids=ids, position_ids=ids, output_hidden_states=True)
                return out.hidden_states[-2].permute(1, 0, 2).clone()
            c = model.config
            if kind == "vae_encode":
                return model.encode(_meta((batch, c.in_channels, height, width), dtype)).latent_dist.mean
            down = 2 ** (len(c.block_out_channels) - 1)
            return model.decode(_meta((batch, c.latent_channels, height // down, width // down), dtype)).sample

    return _peak_bytes(model, forward)


# ---- the estimate -------------------------------------------------------------------------------------------
def _weight_dtype(precision: str) -> str:
    return {"16-mixed": "float16", "bf16-mixed": "bfloat16"}.get(precision, "float32")


def _render_dtype(cfg: ExperimentConfig) -> str:
    return "float16" if cfg.render.dtype == "auto" else cfg.render.dtype  # auto on a GPU: float16 (render.py)


def train_estimate(unet_config: dict[str, Any], precision: str, checkpointing: bool, batch: int, resolution: int,
                   seq: int, rank: int, targets: tuple[str, ...] | list[str], optimizer: str = "adamw") -> Estimate:
    """The train stage alone, from the UNet's config (bench/gpu_train.py compares it with CUDA's own peak)."""
    key, targets, wdt = _key(unet_config), tuple(targets), _weight_dtype(precision)
    lora = lora_param_count(key, rank, targets)
    act = train_activation_bytes(key, wdt, wdt != "float32", checkpointing, batch, resolution, seq, rank, targets)
    states = ADAM8BIT_STATE_BYTES if optimizer == "adamw8bit" else ADAMW_STATE_BYTES
    return Estimate("train", param_count("unet", key) * _BYTES[wdt] / GIB, lora * (4 + 4 + states) / GIB,
                    act / GIB, lora_params=lora,
                    assumptions=f"precision {precision}, gradient checkpointing {'on' if checkpointing else 'off'}, "
                                f"batch {batch}, {resolution}², {seq} tokens, LoRA rank {rank} on {', '.join(targets)}, "
                                f"{'8-bit AdamW' if optimizer == 'adamw8bit' else 'AdamW'}")


def estimate(cfg: ExperimentConfig) -> dict[str, Estimate]:
    """{"cache", "train", "render"} → the stage's peak GPU memory, as if it ran on a GPU (the devices the config
    asks for are not looked at)."""
    vae_dtype = cfg.cache.vae_dtype
    confs = model_configs(cfg.model)
    keys = {name: _key(c) for name, c in confs.items()}
    n = {name: param_count(name, key) for name, key in keys.items()}
    t, seq = cfg.train, cfg.cache.max_sequence_length
    targets = tuple(t.target_modules)
    lora = lora_param_count(keys["unet"], t.rank, targets)

    # cache: ChatGLM3 (fp16 on a GPU, cache.py), freed, then the VAE encoder: the peak is the larger phase
    bs = cfg.cache.batch_size
    te_w = n["text_encoder"] * 2 / GIB
    te_a = inference_bytes("text_encoder", keys["text_encoder"], "float16", bs, 0, 0, seq) / GIB
    vae_w = n["vae"] * _BYTES[vae_dtype] / GIB
    vae_a = inference_bytes("vae_encode", keys["vae"], vae_dtype, bs, t.resolution, t.resolution) / GIB
    w, a = (te_w, te_a) if te_w + te_a >= vae_w + vae_a else (vae_w, vae_a)
    cache = Estimate("cache", w, 0.0, a, parts={"text encoder phase": te_w + te_a + OVERHEAD_GIB,
                                                "VAE encoder phase": vae_w + vae_a + OVERHEAD_GIB},
                     assumptions=f"text encoder fp16 on {bs} prompts × {seq} tokens, then the VAE encoder in "
                                 f"{vae_dtype} on {bs} images of {t.resolution}²")

    train = train_estimate(confs["unet"], t.precision, t.gradient_checkpointing, t.batch_size, t.resolution, seq,
                           t.rank, targets, t.optimizer)

    # render (render.py): the task's prompts are encoded first, the text encoder freed, then UNet (+ LoRA) and VAE
    # run; diffusers decodes with an fp16 VAE upcast to fp32 when its config says force_upcast (its default)
    r, rdt = cfg.render, _render_dtype(cfg)
    dec = "float32" if rdt == "float16" and confs["vae"].get("force_upcast", True) else rdt
    batch = 2 if r.cfg > 1 else 1  # classifier-free guidance runs the negative prompt beside the prompt
    text_w = n["text_encoder"] * _BYTES[rdt] / GIB
    text_a = inference_bytes("text_encoder", keys["text_encoder"], rdt, 1, 0, 0, seq) / GIB
    image_w = {"UNet+LoRA weights": (n["unet"] + lora) * _BYTES[rdt] / GIB, "VAE weights": n["vae"] * _BYTES[dec] / GIB}
    acts = {"UNet": inference_bytes("unet", keys["unet"], rdt, batch, r.height, r.width, seq),
            "VAE decoder": inference_bytes("vae_decode", keys["vae"], dec, 1, r.height, r.width)}
    image_a = max(acts.values()) / GIB
    phases = {"text encoder phase": text_w + text_a + OVERHEAD_GIB,
              "image phase": sum(image_w.values()) + image_a + OVERHEAD_GIB}
    w, a = (text_w, text_a) if text_w + text_a >= sum(image_w.values()) + image_a else (sum(image_w.values()), image_a)
    render = Estimate("render", w, 0.0, a, parts=phases, lora_params=lora,
                      assumptions=f"{rdt}, text encoder alone first (freed), then UNet batch {batch} (cfg {r.cfg:g}), "
                                  f"{r.width}×{r.height}, {seq} tokens, VAE decode in {dec}; the largest activations: "
                                  f"{max(acts, key=lambda k: acts[k])}")
    return {"cache": cache, "train": train, "render": render}


class GPUMemoryError(ConfigError):
    """A GPU stage needs more memory than its job's GPU has (jobs.<job>.gpu_mem_gb)."""
