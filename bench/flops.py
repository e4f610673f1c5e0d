"""FLOPs of full-size Kolors at 1024² on the meta device (no weights allocated), and the floor times they imply.

    .venv/bin/python bench/flops.py [--resolution 1024] [--tokens 256]

Counted with torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; 1 multiply-add = 2 FLOPs;
norms, activations and softmax are not counted), each forward also re-counted independently with module hooks
(nn.Linear, nn.Conv2d) plus F.scaled_dot_product_attention, and the SDXL UNet (same blocks, 77 tokens of 2048-d
CLIP context) beside Kolors' for comparison with published SDXL figures:
- UNet (kolors-unet-config.json, 2.58 B parameters): forward at batch 1, CFG off; LoRA training step (r16 on
  to_q/to_k/to_v/to_out.0, base frozen): forward + MSE + backward, without and with gradient checkpointing.
- ChatGLM3-6B (diffusers' ChatGLMConfig defaults + Kolors' multi-query attention, 2 groups): one 256-token prompt.
- SDXL VAE: encoder of a 1024² image, decoder of a 128² latent.
Independent estimates by hand (printed beside the counts as "pencil", `pencil_estimates` below; the test suite
checks the agreement):
- ChatGLM3-6B: a decoder forward is 2 FLOPs per weight per token, plus attention scores and values:
  2 · (P − 2 · V · h) · T + 4 · L · T² · h, with P = 6.24 B parameters, the input embedding and the unused
  output layer (V · h = 65,024 · 4,096 = 0.27 B each) taken out, T = 256 tokens, L = 28 layers, h = 4,096:
  2 · 5.71e9 · 256 + 4 · 28 · 256² · 4,096 = 2.92 + 0.03 ≈ 2.95 TFLOP.
- UNet at 1024² (latent 128², so N = 16,384 / 4,096 / 1,024 positions at widths d = 320 / 640 / 1,280):
  a transformer layer costs ≈ 36 d² N (q/k/v/out 8 d² N, cross-attention q/out 4 d² N, GEGLU feed-forward
  24 d² N) + 4 N² d (self-attention) + 4 N M d (cross-attention over M = 256 tokens); a ResNet block ≈ 36 d² N
  (two 3×3 convolutions; 54 d² N in the up path, whose first convolution takes the skip concatenation).
  Kolors/SDXL have 10 such layers at 64² (2 down blocks × 2 + 3 up × 2) and 60 at 32² (2 × 10 down, 10 mid,
  3 × 10 up); ResNet blocks: 2 down + 3 up per level, 2 mid. That gives 4.03 (32² layers) + 1.06 (64² layers)
  + 1.30 (ResNets) ≈ 6.4 TFLOP; the count must be within 2× of it (it is ≈ 1.09×: the estimate leaves out
  the transformers' in/out projections, the time embedding, downsamplers and upsamplers).
Floors = FLOPs / a GPU's dense bf16 peak: one kolora step (cached embeddings/latents: UNet only), the tutorial's
step (text encoder + VAE encoder + UNet every step) and one 50-step CFG render (2 UNet forwards per step, 2 prompt
encodings, 1 VAE decode).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from _common import base_parser, environment, report, table

NAME = "flops"
T = 1e12
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
GPU_PEAK_BF16 = {
    "H200 SXM": 989, "H100 SXM": 989, "H100 PCIe": 756, "A100 (SXM/PCIe)": 312, "L40S": 362, "A40": 150,
    "RTX 4090": 165, "A10": 125, "L4": 121,
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def counted(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    by_op = {str(k).removeprefix("aten."): v for k, v in mode.get_flop_counts().get("Global", {}).items()}
    return float(mode.get_total_flops()), by_op


@contextlib.contextmanager
def hook_counter(model) -> Iterator[list[float]]:
    """Independent forward count: 2·in·out per token for every nn.Linear, 2·Cin/groups·k·k per output element
    for every nn.Conv2d, 2·L·S·(E + Ev) per batch-head for every F.scaled_dot_product_attention call."""
    import math

    import torch
    import torch.nn.functional as F

    total = [0.0]

    def linear(mod, _inp, out):
        total[0] += 2.0 * mod.in_features * out.numel()

    def conv(mod, _inp, out):
        k = math.prod(mod.kernel_size)
        total[0] += 2.0 * (mod.in_channels // mod.groups) * k * out.numel()

    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        batch_heads = math.prod(q.shape[:-2])
        total[0] += 2.0 * batch_heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return real_sdpa(q, k, v, *args, **kwargs)

    handles = [m.register_forward_hook(linear if isinstance(m, torch.nn.Linear) else conv)
               for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    F.scaled_dot_product_attention = sdpa
    try:
        yield total
    finally:
        F.scaled_dot_product_attention = real_sdpa
        for h in handles:
            h.remove()


def _config(name: str) -> dict[str, Any]:
    from kolora.models.kolors import packaged_config

    return {k: v for k, v in packaged_config(name).items() if not k.startswith("_")}


def sdxl_unet_config() -> dict[str, Any]:
    """The SDXL base UNet: Kolors' blocks without the 4096→2048 text projection; pooled CLIP-G (1280) + 6 × 256."""
    cfg = _config("kolors-unet-config.json")
    cfg.update(encoder_hid_dim=None, encoder_hid_dim_type=None, projection_class_embeddings_input_dim=2816)
    return cfg


def unet_inputs(res: int, tokens: int, ctx_dim: int, pooled_dim: int, batch: int = 1) -> dict[str, Any]:
    import torch

    lat = res // 8
    return {"sample": torch.randn(batch, 4, lat, lat), "timestep": torch.tensor([500] * batch),
            "encoder_hidden_states": torch.randn(batch, tokens, ctx_dim),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled_dim),
                                  "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * batch, dtype=torch.float32)}}


def chatglm3_config():
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    # diffusers' defaults are ChatGLM3-6B's sizes (28 layers, 4096 hidden, 13696 ffn, 32 heads × 128, vocab 65024);
    # Kolors' text encoder adds multi-query attention with 2 key/value groups and qkv bias.
    return ChatGLMConfig(multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True, original_rope=True,
                         use_cache=False)


def pencil_estimates(res: int, tokens: int, text_encoder_params: int) -> dict[str, float]:
    """The docstring's hand estimates, in FLOPs, from the architecture numbers alone (no FLOP counter, no
    module hooks): UNet forward and ChatGLM3 forward."""
    unet = _config("kolors-unet-config.json")
    glm = chatglm3_config()
    m = tokens  # cross-attention context length
    unet_flops = 0.0
    side = res // 8
    for level, (d, depth) in enumerate(zip(unet["block_out_channels"], unet["transformer_layers_per_block"],
                                           strict=True)):
        n = (side >> level) ** 2
        has_attn = unet["down_block_types"][level].startswith("CrossAttn")
        down, up = unet["layers_per_block"], unet["layers_per_block"] + 1
        unet_flops += down * 36 * d * d * n + up * 54 * d * d * n  # ResNet blocks
        if has_attn:
            unet_flops += (down + up) * depth * (36 * d * d * n + 4 * n * n * d + 4 * n * m * d)
    d, depth = unet["block_out_channels"][-1], unet["transformer_layers_per_block"][-1]
    n = (side >> (len(unet["block_out_channels"]) - 1)) ** 2
    unet_flops += 2 * 36 * d * d * n + depth * (36 * d * d * n + 4 * n * n * d + 4 * n * m * d)  # mid block
    h, layers, vocab = glm.hidden_size, glm.num_layers, glm.padded_vocab_size
    text = 2 * (text_encoder_params - 2 * vocab * h) * tokens + 4 * layers * tokens * tokens * h
    return {"unet_fwd": unet_flops, "text_encoder": text}


def measure(res: int, tokens: int, quick: bool = False) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel

    from kolora.formats.lora import add_lora

    out: dict[str, Any] = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config("kolors-unet-config.json")).eval()
        sdxl = UNet2DConditionModel.from_config(sdxl_unet_config()).eval()
        # empty_init=False: ChatGLMModel's default (skip_init) would materialise 6 B parameters on the CPU
        text_encoder = ChatGLMModel(chatglm3_config(), empty_init=False).eval()
        vae = AutoencoderKL.from_config(_config("sdxl-vae-config.json")).eval()
        kin = unet_inputs(res, tokens, 4096, 4096)
        sin = unet_inputs(res, 77, 2048, 1280)
        ids = torch.zeros(1, tokens, dtype=torch.long)
        image = torch.randn(1, 3, res, res)
        latent = torch.randn(1, 4, res // 8, res // 8)
    out["params"] = {"unet": sum(p.numel() for p in unet.parameters()),
                     "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                     "vae_encoder": sum(p.numel() for p in vae.encoder.parameters()) +
                     sum(p.numel() for p in vae.quant_conv.parameters()),
                     "vae_decoder": sum(p.numel() for p in vae.decoder.parameters()) +
                     sum(p.numel() for p in vae.post_quant_conv.parameters())}
    forwards = {
        "unet_fwd": (unet, lambda: unet(**kin)),
        "sdxl_unet_fwd": (sdxl, lambda: sdxl(**sin)),
        "text_encoder": (text_encoder, lambda: text_encoder(input_ids=ids, output_hidden_states=True)),
        "vae_encode": (vae, lambda: vae.encode(image).latent_dist.mode()),
        "vae_decode": (vae, lambda: vae.decode(latent).sample),
    }
    for key, (model, fn) in forwards.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            flops, by_op = counted(fn)
            hooks = [float("nan")]
            if not quick:
                with hook_counter(model) as hooks:
                    fn()
        out[key] = {"flops": flops, "by_op": by_op, "hooks": hooks[0], "count_s": time.perf_counter() - t0}
    if quick:
        return out

    # LoRA training step: base frozen, LoRA trainable (kolora.formats.lora.add_lora = what kolora's train stage does)
    unet.requires_grad_(False)
    add_lora(unet, 16, 4.0, LORA_TARGETS)
    out["params"]["lora"] = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    unet.train()

    def train_step() -> None:
        pred = unet(**kin).sample
        torch.nn.functional.mse_loss(pred.float(), torch.zeros_like(pred, dtype=torch.float32)).backward()

    with torch.no_grad():
        out["unet_fwd_lora"] = {"flops": counted(lambda: unet(**kin))[0]}
    for key, ckpt in (("unet_train", False), ("unet_train_ckpt", True)):
        if ckpt:
            unet.enable_gradient_checkpointing()
        t0 = time.perf_counter()
        flops, by_op = counted(train_step)
        out[key] = {"flops": flops, "by_op": by_op, "count_s": time.perf_counter() - t0}
    return out


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=256, help="text encoder sequence length (Kolors: 256)")
    p.add_argument("--render-steps", type=int, default=50)
    p.add_argument("--quick", action="store_true",
                   help="forward passes only (no training-step counts, no hook cross-check); not recorded")
    args = p.parse_args(argv)

    from kolora.models.kolors import quiet_libraries

    quiet_libraries()
    env = environment()
    m = measure(args.resolution, args.tokens, quick=args.quick)
    tf = {k: v["flops"] / T for k, v in m.items() if isinstance(v, dict) and "flops" in v}
    pencil = {k: v / T for k, v in pencil_estimates(args.resolution, args.tokens,
                                                     m["params"]["text_encoder"]).items()}
    vs_pencil = {f"{k}_vs_pencil": tf[k] / v for k, v in pencil.items()}
    if args.quick:
        rows = [[k, v] for k, v in tf.items()]
        render = args.render_steps * 2 * tf["unet_fwd"] + 2 * tf["text_encoder"] + tf["vae_decode"]
        rows += [[f"{k} (pencil estimate, docstring)", v] for k, v in pencil.items()]
        result = {"resolution": args.resolution, "tokens": args.tokens, "quick": True,
                  **{f"{k}_tflop": v for k, v in tf.items()}, "render_tflop": render, **vs_pencil}
        report(NAME, f"Kolors forward FLOPs at {args.resolution}² (quick)", env, table(["pass", "TFLOP"], rows),
               result, record=False)
        return 0
    kolora_step = tf["unet_train_ckpt"]  # kolora's default: gradient checkpointing on, encoders cached
    kolora_step_nockpt = tf["unet_train"]
    tutorial_step = tf["text_encoder"] + tf["vae_encode"] + tf["unet_train_ckpt"]
    render = args.render_steps * 2 * tf["unet_fwd"] + 2 * tf["text_encoder"] + tf["vae_decode"]
    agree = {k: m[k]["hooks"] / m[k]["flops"] for k in ("unet_fwd", "sdxl_unet_fwd", "text_encoder", "vae_encode",
                                                        "vae_decode")}

    res, pm = args.resolution, m["params"]
    rows = [
        [f"Kolors UNet forward, {res}², batch 1, CFG off", pm["unet"] / 1e9, tf["unet_fwd"], 1.0, agree["unet_fwd"]],
        ["  + LoRA r16 (forward)", pm["lora"] / 1e9, tf["unet_fwd_lora"], tf["unet_fwd_lora"] / tf["unet_fwd"], "-"],
        ["  LoRA train step: fwd + bwd (base frozen)", "", tf["unet_train"], tf["unet_train"] / tf["unet_fwd"], "-"],
        ["  LoRA train step with gradient checkpointing", "", tf["unet_train_ckpt"],
         tf["unet_train_ckpt"] / tf["unet_fwd"], "-"],
        [f"SDXL UNet forward, {res}², 77 CLIP tokens (comparison)", "", tf["sdxl_unet_fwd"],
         tf["sdxl_unet_fwd"] / tf["unet_fwd"], agree["sdxl_unet_fwd"]],
        [f"ChatGLM3-6B text encoder, {args.tokens} tokens", pm["text_encoder"] / 1e9, tf["text_encoder"],
         tf["text_encoder"] / tf["unet_fwd"], agree["text_encoder"]],
        [f"SDXL VAE encoder, {res}²", pm["vae_encoder"] / 1e9, tf["vae_encode"], tf["vae_encode"] / tf["unet_fwd"],
         agree["vae_encode"]],
        [f"SDXL VAE decoder, {res}²", pm["vae_decoder"] / 1e9, tf["vae_decode"], tf["vae_decode"] / tf["unet_fwd"],
         agree["vae_decode"]],
    ]
    for row in rows:
        key = {rows[0][0]: "unet_fwd", rows[5][0]: "text_encoder"}.get(row[0])
        row.append(pencil[key] if key else "-")
        row.append(tf[key] / pencil[key] if key else "-")
    body = table(["model / pass", "params (B)", "TFLOP", "× UNet fwd", "hook count / counter",
                  "pencil TFLOP (docstring)", "counter / pencil"], rows)
    body += "\n\n" + table(
        ["per unit of work", "TFLOP", "what runs"],
        [["kolora training step (default: checkpointing on)", kolora_step, "UNet fwd+bwd+recompute; cached inputs"],
         ["kolora training step, checkpointing off", kolora_step_nockpt, "UNet fwd+bwd"],
         ["tutorial training step", tutorial_step, "ChatGLM3 + VAE encoder + UNet fwd+bwd+recompute"],
         [f"one {args.render_steps}-step CFG render", render,
          f"{2 * args.render_steps} UNet fwd + 2 ChatGLM3 + VAE decoder"]])
    floor_rows = [[gpu, peak, kolora_step / peak * 1e3, tutorial_step / peak * 1e3, tutorial_step / kolora_step,
                   render / peak] for gpu, peak in GPU_PEAK_BF16.items()]
    body += "\n\nFloor times at 100 % of the dense bf16 peak (real runs reach a fraction of it; see gpu_train):\n\n"
    body += table(["GPU", "bf16 TFLOP/s", "kolora step ms", "tutorial step ms", "tutorial/kolora", "render s"],
                  floor_rows)
    h100 = GPU_PEAK_BF16["H100 SXM"]
    result = {
        "resolution": res, "tokens": args.tokens, "unet_fwd_tflop": tf["unet_fwd"], "unet_train_tflop": tf["unet_train"],
        "unet_train_ckpt_tflop": tf["unet_train_ckpt"], "text_encoder_tflop": tf["text_encoder"],
        "vae_encode_tflop": tf["vae_encode"], "vae_decode_tflop": tf["vae_decode"], "render_tflop": render,
        "sdxl_unet_fwd_tflop": tf["sdxl_unet_fwd"], "kolora_step_tflop": kolora_step,
        "tutorial_step_tflop": tutorial_step, "h100_kolora_step_ms": kolora_step / h100 * 1e3,
        "h100_tutorial_step_ms": tutorial_step / h100 * 1e3, "h100_render_s": render / h100,
        "hook_check_max_dev": max(abs(a - 1) for a in agree.values()), **vs_pencil,
    }
    notes = [f"Counting took {sum(v.get('count_s', 0) for v in m.values() if isinstance(v, dict)):.0f} s on the "
             "meta device (no weights allocated).",
             "A frozen base needs input gradients but no weight gradients, so fwd+bwd is about 2× the forward (not "
             "3× as in full fine-tuning); checkpointing adds about one more forward.",
             "UNet forward FLOPs by op: " + ", ".join(f"{k} {v / T:.2f}" for k, v in m["unet_fwd"]["by_op"].items())]
    report(NAME, f"Kolors FLOPs at {res}² and floor times", env, body, result, record=not args.no_record, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
