"""memplan: the peak GPU memory of each GPU stage (cache, train, render), estimated before anything is queued.

From the configured model's own configs (unet/, vae/, text_encoder/ config.json; kolora's packaged UNet/VAE
configs for DiffSynth's layout), with the modules built on the meta device: no weight is read or allocated.
A stage runs in phases that hold different things on the GPU; each phase is planned and the stage's estimate
is its largest phase (named):
- cache: ChatGLM3 in fp16 on `cache.batch_size` prompts, freed, then the VAE encoder in `cache.vae_dtype` on
  `cache.batch_size` images (of the largest bucket with `train.buckets`);
- train: `train step` (the UNet in the precision's weight dtype, LoRA + gradients + optimizer states + EMA copy,
  a forward and backward at `train.batch_size` and `train.resolution`², or the largest bucket); `validation
  sample` with `train.validation.every` (the same resident state, plus the VAE in `cache.vae_dtype`, which the
  sampler moves to the GPU only while sampling, and the larger of the UNet's no-grad forward with classifier-free
  guidance — batch 2 — and the VAE decoder, at `train.validation.size`); `checkpoint save` (the resident state
  alone: the state dicts Lightning assembles refer to the GPU tensors, torch.save copies them to host memory one
  storage at a time, and the EMA's state is copied on the CPU);
- render: the text encoder alone, then UNet, LoRA and VAE, the VAE in fp32 where diffusers upcasts it.
What a phase holds, in GiB:
- weights: every parameter and buffer it keeps on the GPU, in the dtype it keeps them;
- trainable (train): the LoRA parameters (with DoRA, peft's magnitude vectors too; counted on the peft-wrapped
  UNet) in fp32, their fp32 gradients (kept from one step's backward to the next step's zero_grad, which
  Lightning calls after the forward), the optimizer's states (AdamW: 8 bytes a parameter, 8-bit AdamW: 2,
  Prodigy: 16) and, with `train.ema_decay`, the EMA's fp32 copy (kolora.train.ema keeps it on the module's
  device);
- activations: the most memory the phase's own tensors hold at one time, measured by running its forward
  (train: forward and backward, checkpointed blocks recomputed as torch.utils.checkpoint does) on meta tensors
  of the real shapes while following every tensor storage from creation to release. Two things CUDA does
  differently from the meta device are emulated: mixed precision's autocast casts (16-mixed / bf16-mixed:
  matmuls and convolutions in 16 bit, norms, softmax and the loss in fp32, the casts saved for backward as
  autocast's are) and attention as PyTorch's memory-efficient kernel (no sequence × sequence matrix);
- overhead: OVERHEAD_GIB for the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack.
Not modelled: fragmentation beyond that slack, per-GPU convolution workspaces, DDP's gradient buckets,
bitsandbytes keeping 32-bit states for tensors under 4096 elements.
"""

from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolora.cache import buckets
from kolora.core.config import ExperimentConfig, ModelConfig
from kolora.core.errors import ConfigError, InputError, read_text
from kolora.formats.lora import ADAPTER_NAMES, AdapterOptions, add_lora
from kolora.models import kolors as models
from kolora.models.kolors import quiet_libraries
from kolora.pipeline.registry import STAGES

# diffusers, torch: imported in the functions that use them (a login node's CLI starts without them)

GIB = 2**30
# CUDA context ≈ 0.3–0.6 GiB on current GPUs with lazy module loading, plus cuBLAS/cuDNN workspaces and the
# caching allocator's rounding: 1 GiB covers them without hiding a real shortfall.
OVERHEAD_GIB = 1.0
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
ADAM8BIT_STATE_BYTES = 2  # bitsandbytes' 8-bit Adam: one byte per state
PRODIGY_STATE_BYTES = 16  # exp_avg, exp_avg_sq, s, the initial weights p0 (fp32; at most: B's p0 is a scalar)
GPU_STAGES = tuple(s.name for s in STAGES if s.runs_on == "gpu")
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Phase:
    """What one phase of a stage holds on the GPU at its peak, in GiB; `detail` names the parts of weights,
    trainable and activations (they sum to them)."""

    weights: float
    trainable: float  # LoRA parameters + gradients + optimizer states + EMA copy (train only)
    activations: float
    overhead: float = OVERHEAD_GIB
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return self.weights + self.trainable + self.activations + self.overhead

    def breakdown(self) -> dict[str, float]:
        return {"weights": self.weights, "trainable+grads+optimizer": self.trainable,
                "activations": self.activations, "overhead": self.overhead}

    def describe(self) -> str:
        detail = "".join(f", {k} {v:.2f}" for k, v in self.detail.items())
        return f"{self.total_gib:.1f} GiB ({detail[2:]}{', ' if detail else ''}overhead {self.overhead:.1f})"


def _phase(weights: dict[str, float], trainable: dict[str, float], activations: dict[str, float]) -> Phase:
    """A phase from its named parts in bytes."""
    parts = {k: v / GIB for k, v in {**weights, **trainable, **activations}.items()}
    return Phase(sum(weights.values()) / GIB, sum(trainable.values()) / GIB, sum(activations.values()) / GIB,
                 detail=parts)


@dataclass(frozen=True)
class Estimate:
    """The peak GPU memory of one stage: each of its phases, in the order they run; the stage needs its largest
    (`peak_phase`), whose figures weights, trainable, activations and total_gib are."""

    stage: str
    phases: dict[str, Phase]
    lora_params: int = 0  # trainable parameters (train), or the LoRA's parameters (render)
    assumptions: str = ""  # the shapes and dtypes estimated

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: self.phases[name].total_gib)  # the first on a tie

    @property
    def peak(self) -> Phase:
        return self.phases[self.peak_phase]

    @property
    def weights(self) -> float:
        return self.peak.weights

    @property
    def trainable(self) -> float:
        return self.peak.trainable

    @property
    def activations(self) -> float:
        return self.peak.activations

    @property
    def overhead(self) -> float:
        return self.peak.overhead

    @property
    def total_gib(self) -> float:
        return self.peak.total_gib

    @property
    def parts(self) -> dict[str, float]:
        """Each phase's total in GiB (nothing for a stage of one phase)."""
        return {name: p.total_gib for name, p in self.phases.items()} if len(self.phases) > 1 else {}

    def breakdown(self) -> dict[str, float]:
        return self.peak.breakdown()

    def describe(self) -> str:
        trainable = f", LoRA+grads+optimizer {self.trainable:.2f}" if self.trainable else ""
        detail = "".join(f", {k} {v:.1f}" for k, v in self.parts.items()).replace(", ", "; ", 1)
        return (f"{self.total_gib:.1f} GiB (weights {self.weights:.1f}{trainable}, activations "
                f"{self.activations:.1f}, overhead {self.overhead:.1f}{detail})")


@dataclass(frozen=True)
class ValidationSampling:
    """Validation sampling during training (kolora.train.validation_sampler): what it adds to the train stage."""

    vae_config: dict[str, Any]
    vae_dtype: str  # the sampler's VAE dtype on a GPU: cache.vae_dtype
    size: int  # square side: train.validation.size, else train.resolution
    batch: int  # 2 with classifier-free guidance (render.cfg > 1): the negative prompt beside the prompt


# ---- the model's configs ------------------------------------------------------------------------------------
def _json(path: Path | None, field: str, packaged: str | None = None) -> dict[str, Any]:
    """A model config: `path`, else kolora's packaged `packaged`; ConfigError naming `field` and the file."""

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
    """{"unet", "vae", "text_encoder"} → their configs, found as kolora.models.kolors finds them to load the weights."""
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
def lora_param_count(key: str, rank: int, targets: tuple[str, ...], dora: bool = False,
                     adapter: AdapterOptions | None = None) -> int:
    """Trainable parameters kolora.formats.lora.add_lora puts on the UNet, DoRA's magnitude vectors included, of the
    adapter and per-block ranks `adapter` asks for (peft on the meta device: exact)."""

    unet = _build("unet", key)
    unet.requires_grad_(False)
    add_lora(unet, rank, 1.0, list(targets), dora=dora, options=adapter)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def _lora_unet(key: str, weight_dtype: str, rank: int, targets: tuple[str, ...], dora: bool,
               adapter: AdapterOptions | None = None):
    """The UNet as kolora.train.loop holds it: base weights in `weight_dtype`, LoRA (DoRA) parameters in float32."""
    import torch


    unet = _build("unet", key).to(getattr(torch, weight_dtype))
    unet.requires_grad_(False)
    add_lora(unet, rank, 1.0, list(targets), dora=dora, options=adapter)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


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
                           seq: int, rank: int, targets: tuple[str, ...], dora: bool = False,
                           width: int | None = None, adapter: AdapterOptions | None = None) -> int:
    """One step of kolora.train.loop.LoRATrainer: fp32 cached latents/embeddings of `res` (height) × `width` (`res`
    when None) pixels → UNet (base in `weight_dtype`, LoRA in fp32, under autocast when `mixed`) → MSE →
    backward. LoRA gradients are released as they arrive (they are counted in the trainable part)."""
    import torch
    from torch.autograd.variable import Variable

    unet = _lora_unet(key, weight_dtype, rank, targets, dora, adapter).train()
    for p in unet.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    if checkpointing:
        unet.enable_gradient_checkpointing()

    def step() -> None:
        sample, pred = _unet_call(unet, batch, res, width or res, seq, torch.float32)
        loss = torch.nn.functional.mse_loss(pred.float(), sample)
        # the engine itself, not loss.backward(): inside Tensor.backward (a torch function) the function mode is
        # switched off, and checkpoint recomputation has to run under it
        Variable._execution_engine.run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                                                allow_unreachable=True, accumulate_grad=True)

    return _peak_bytes(unet, step, getattr(torch, weight_dtype) if mixed else None)


@functools.lru_cache(maxsize=64)
def sampling_activation_bytes(key: str, weight_dtype: str, batch: int, size: int, seq: int, rank: int,
                              targets: tuple[str, ...], dora: bool = False,
                              adapter: AdapterOptions | None = None) -> int:
    """One denoising step of the validation sampler: the training UNet (base in `weight_dtype`, LoRA in fp32)
    without grad and without autocast, on `batch` latents of size² pixels and embeddings in `weight_dtype`."""
    import torch

    unet = _lora_unet(key, weight_dtype, rank, targets, dora, adapter).eval()

    def forward() -> Any:
        with torch.no_grad():
            return _unet_call(unet, batch, size, size, seq, getattr(torch, weight_dtype))

    return _peak_bytes(unet, forward)


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


def largest_bucket(sizes: list[tuple[int, int]], unet_config: dict[str, Any]) -> tuple[int, int]:
    """The (w, h) bucket whose UNet feature maps are largest: latent pixels summed over the UNet's resolutions,
    each downsampling rounding an odd side up (for a grid of 64 px this is the bucket with the most pixels)."""
    levels = len(unet_config.get("block_out_channels") or [0])

    def feature_pixels(size: tuple[int, int]) -> int:
        w, h, total = size[0] // 8, size[1] // 8, 0
        for _ in range(levels):
            total += w * h
            w, h = (w + 1) // 2, (h + 1) // 2
        return total

    return max(sizes, key=feature_pixels)


def train_estimate(unet_config: dict[str, Any], precision: str, checkpointing: bool, batch: int, resolution: int,
                   seq: int, rank: int, targets: tuple[str, ...] | list[str], optimizer: str = "adamw", *,
                   dora: bool = False, ema: bool = False, bucket: tuple[int, int] | None = None,
                   validation: ValidationSampling | None = None, adapter: AdapterOptions | None = None) -> Estimate:
    """The train stage from the UNet's config, phase by phase (bench/gpu_train.py compares its train step with
    CUDA's own peak). `bucket`: the (w, h) the step's activations are measured at instead of resolution²."""
    key, targets, wdt = _key(unet_config), tuple(targets), _weight_dtype(precision)
    lora = lora_param_count(key, rank, targets, dora, adapter)
    width, height = bucket or (resolution, resolution)
    act = train_activation_bytes(key, wdt, wdt != "float32", checkpointing, batch, height, seq, rank, targets,
                                 dora, width, adapter)
    states = {"adamw8bit": ADAM8BIT_STATE_BYTES, "prodigy": PRODIGY_STATE_BYTES}.get(optimizer, ADAMW_STATE_BYTES)
    named = {"adamw8bit": "8-bit AdamW", "prodigy": "Prodigy"}.get(optimizer, "AdamW")
    # resident through every phase: the frozen UNet, and what training keeps of the LoRA between steps
    resident = {f"UNet {wdt}": param_count("unet", key) * _BYTES[wdt]}
    trainable = {"LoRA fp32": lora * 4, "gradients": lora * 4,
                 f"{named} states": lora * states,
                 **({"EMA copy": lora * 4} if ema else {})}
    phases = {"train step": _phase(resident, trainable, {f"activations (batch {batch}, {width}×{height})": act})}
    sampled = ""
    if validation is not None:
        v, vkey = validation, _key(validation.vae_config)
        acts = {f"UNet sampling (batch {v.batch}, {v.size}²)":
                sampling_activation_bytes(key, wdt, v.batch, v.size, seq, rank, targets, dora, adapter),
                f"VAE decoder ({v.size}²)": inference_bytes("vae_decode", vkey, v.vae_dtype, 1, v.size, v.size)}
        largest = max(acts, key=lambda k: acts[k])  # the UNet's loop ends before the VAE decodes
        phases["validation sample"] = _phase({**resident, f"VAE {v.vae_dtype}": param_count("vae", vkey) *
                                              _BYTES[v.vae_dtype]}, trainable, {largest: acts[largest]})
        sampled = (f"; validation samples at {v.size}², UNet batch {v.batch}, VAE in {v.vae_dtype} (largest "
                   f"activations: {largest.split(' (')[0]})")
    phases["checkpoint save"] = _phase(resident, trainable, {})
    kind = adapter.kind if adapter is not None else "lora"
    options = "".join(f", {o}" for o, on in (("DoRA", dora), ("EMA", ema), (ADAPTER_NAMES[kind], kind != "lora"),
                                             ("per-block ranks/alphas", adapter is not None and (
                                                 adapter.block_ranks or adapter.block_alphas))) if on)
    return Estimate("train", phases, lora_params=lora,
                    assumptions=f"precision {precision}, gradient checkpointing {'on' if checkpointing else 'off'}, "
                                f"batch {batch}, {width}×{height}{' (the largest bucket)' if bucket else ''}, "
                                f"{seq} tokens, LoRA rank {rank} on {', '.join(targets)}{options}, "
                                f"{named}{sampled}")


def estimate(cfg: ExperimentConfig) -> dict[str, Estimate]:
    """{"cache", "train", "render"} → the stage's peak GPU memory, as if it ran on a GPU (the devices the config
    asks for are not looked at)."""
    vae_dtype = cfg.cache.vae_dtype
    confs = model_configs(cfg.model)
    keys = {name: _key(c) for name, c in confs.items()}
    n = {name: param_count(name, key) for name, key in keys.items()}
    t, seq = cfg.train, cfg.cache.max_sequence_length
    targets = tuple(t.target_modules)
    adapter = AdapterOptions.of(t)
    lora = lora_param_count(keys["unet"], t.rank, targets, t.dora, adapter)
    bucket = largest_bucket(buckets.for_config(cfg), confs["unet"]) if t.buckets else None
    width, height = bucket or (t.resolution, t.resolution)

    # cache: ChatGLM3 (fp16 on a GPU, cache.py), freed, then the VAE encoder on batches of one bucket
    bs = cfg.cache.batch_size
    cache = Estimate("cache", {
        "text encoder phase": _phase(
            {"ChatGLM3 float16": n["text_encoder"] * 2}, {},
            {"activations": inference_bytes("text_encoder", keys["text_encoder"], "float16", bs, 0, 0, seq)}),
        "VAE encoder phase": _phase(
            {f"VAE {vae_dtype}": n["vae"] * _BYTES[vae_dtype]}, {},
            {"activations": inference_bytes("vae_encode", keys["vae"], vae_dtype, bs, height, width)})},
        assumptions=f"text encoder fp16 on {bs} prompts × {seq} tokens, then the VAE encoder in {vae_dtype} on "
                    f"{bs} images of {width}×{height}{' (the largest bucket)' if bucket else ''}")

    v = t.validation
    sampling = ValidationSampling(confs["vae"], vae_dtype, v.size or t.resolution, 2 if cfg.render.cfg > 1 else 1)
    train = train_estimate(confs["unet"], t.precision, t.gradient_checkpointing, t.batch_size, t.resolution, seq,
                           t.rank, targets, t.optimizer, dora=t.dora, ema=t.ema_decay is not None, bucket=bucket,
                           adapter=adapter,
                           validation=sampling if v.every else None)

    # render (render.py): the task's prompts are encoded first, the text encoder freed, then UNet (+ LoRA) and VAE
    # run; diffusers decodes with an fp16 VAE upcast to fp32 when its config says force_upcast (its default)
    r, rdt = cfg.render, _render_dtype(cfg)
    dec = "float32" if rdt == "float16" and confs["vae"].get("force_upcast", True) else rdt
    batch = 2 if r.cfg > 1 else 1  # classifier-free guidance runs the negative prompt beside the prompt
    acts = {"UNet": inference_bytes("unet", keys["unet"], rdt, batch, r.height, r.width, seq),
            "VAE decoder": inference_bytes("vae_decode", keys["vae"], dec, 1, r.height, r.width)}
    largest = max(acts, key=lambda k: acts[k])
    render = Estimate("render", {
        "text encoder phase": _phase(
            {f"ChatGLM3 {rdt}": n["text_encoder"] * _BYTES[rdt]}, {},
            {"activations": inference_bytes("text_encoder", keys["text_encoder"], rdt, 1, 0, 0, seq)}),
        "image phase": _phase({"UNet+LoRA weights": (n["unet"] + lora) * _BYTES[rdt],
                               "VAE weights": n["vae"] * _BYTES[dec]}, {}, {f"{largest} activations": acts[largest]})},
        lora_params=lora,
        assumptions=f"{rdt}, text encoder alone first (freed), then UNet batch {batch} (cfg {r.cfg:g}), "
                    f"{r.width}×{r.height}, {seq} tokens, VAE decode in {dec}; the largest activations: {largest}")
    return {"cache": cache, "train": train, "render": render}


class GPUMemoryError(ConfigError):
    """A GPU stage needs more memory than its job's GPU has (jobs.<job>.gpu_mem_gb)."""
