"""GPU training bench: the tutorial's LoRA step vs kolora's, full-size random-initialised Kolors at 1024².

    .venv/bin/python bench/gpu_train.py [--steps 20] [--warmup 5]      (bash bench/run_gpu.sh runs all GPU benches)

Models: UNet from kolors-unet-config.json, ChatGLM3-6B-shaped text encoder, SDXL VAE, random weights built on
the GPU. LoRA r16 / alpha 4 on to_q, to_k, to_v, to_out.0 (kolora.formats.lora.add_lora), LoRA weights in float32,
AdamW, batch 1, the tutorial's noise schedule (kolora.models.kolors.training_scheduler). The step body mirrors
kolora.train.loop.LoRATrainer.training_step in plain PyTorch (autocast + GradScaler for fp16, as Lightning's
16-mixed does), so the numbers are compute, not framework overhead.
  tutorial  fp16: ChatGLM3 (256 tokens) + VAE encoder on a 1024² image every step, then the UNet step;
            all three models on the GPU (what DiffSynth 1.1.9's recipe does)
  kolora    bf16 and fp16: cached prompt embeddings / latents, encoders not on the GPU
each with gradient checkpointing on and off, the kolora rows beside kolora.launch.memplan's estimate of their peak.
FLOPs per step are counted on the first measured step
(torch.utils.flop_counter), so achieved TFLOP/s and the floor (FLOPs / the GPU's dense peak) use the same count.
Without CUDA it prints "skipped: no CUDA" and exits 0; --tiny runs the same code on tiny models (any device:
a smoke test, not a benchmark).
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Any

from _common import (
    LORA_TARGETS,
    base_parser,
    environment,
    gpu_peak_tflops,
    kolors_models,
    median,
    report,
    skip,
    table,
)

NAME = "gpu_train"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class Step:
    """One training step of the LoRA UNet; `encode` adds the tutorial's text encoder + VAE encoder passes."""

    def __init__(self, unet, amp_dtype, device: str, res: int, tokens: int, text_hidden: int, encoders=None):
        import torch

        from kolora.models import kolors as models
        self.unet, self.amp_dtype, self.device, self.encoders = unet, amp_dtype, device, encoders
        params = [p for p in unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
        self.alphas = models.training_scheduler().alphas_cumprod.to(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        lat = res // 8
        # cached inputs (kolora) -- or the encoders' inputs (tutorial)
        self.latents = torch.randn(1, 4, lat, lat, generator=g).to(device, amp_dtype)
        self.embeds = torch.randn(1, tokens, text_hidden, generator=g).to(device, amp_dtype)
        self.pooled = torch.randn(1, text_hidden, generator=g).to(device, amp_dtype)
        self.time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=device)
        self.ids = torch.randint(3, 300, (1, tokens), generator=g).to(device)
        self.image = (torch.rand(1, 3, res, res, generator=g) * 2 - 1).to(device, amp_dtype)
        self.loss = float("nan")

    def encode(self):
        import torch

        te, vae = self.encoders
        with torch.no_grad():
            out = te(input_ids=self.ids, attention_mask=torch.ones_like(self.ids), output_hidden_states=True)
            embeds = out.hidden_states[-2].permute(1, 0, 2)  # Kolors: [seq, batch, hidden] -> [batch, seq, hidden]
            pooled = out.hidden_states[-1][-1, :, :]
            latents = vae.encode(self.image).latent_dist.sample() * vae.config.scaling_factor
        return latents, embeds, pooled

    def __call__(self) -> None:
        import torch

        latents, embeds, pooled = self.encode() if self.encoders else (self.latents, self.embeds, self.pooled)
        noise = torch.randn_like(latents, dtype=torch.float32)
        t = torch.randint(0, 1100, (1,), device=self.device)
        a = self.alphas[t].float().view(-1, 1, 1, 1)
        noisy = (a.sqrt() * latents.float() + (1 - a).sqrt() * noise).to(latents.dtype)
        with torch.autocast(self.device, dtype=self.amp_dtype):
            pred = self.unet(noisy, t, encoder_hidden_states=embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.detach()


def measure(step: Step, device: str, warmup: int, steps: int) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(warmup):
        step()
    _sync(device)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = float(counter.get_total_flops())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    s = median(times)
    return {"step_s": s, "steps_per_s": 1 / s, "tflop": flops / 1e12, "tflops": flops / s / 1e12, "peak_gib": peak,
            "loss_finite": bool(torch.isfinite(step.loss).item())}


def planned_gib(tiny: bool, dtype, ckpt: bool, res: int, tokens: int) -> float:
    """kolora.launch.memplan's estimate of a kolora step's peak (UNet weights, LoRA + fp32 grads + AdamW, activations),
    without its fixed CUDA-context overhead, which max_memory_allocated does not see either."""
    from kolora.launch import memplan
    from kolora.models import kolors as models
    config = (models.tiny_unet_config(models.TINY_TEXT["hidden_size"]) if tiny
              else models.packaged_config("kolors-unet-config.json"))
    precision = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}[str(dtype).removeprefix("torch.")]
    est = memplan.train_estimate(config, precision, ckpt, 1, res, tokens, 16, LORA_TARGETS)
    return est.total_gib - est.overhead


def set_base_dtype(unet, dtype) -> None:
    """Base weights to `dtype`, LoRA weights float32 (kolora.train.loop does the same)."""
    unet.to(dtype)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--tiny", action="store_true", help="tiny models on any device: a smoke test of this script")
    p.add_argument("--only", choices=["kolora", "tutorial"], help="run one of the two step kinds")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.tiny:
        return skip(NAME, "no CUDA (run on a GPU machine: bash bench/run_gpu.sh)", "no-cuda")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from kolora.formats.lora import add_lora
    from kolora.models.kolors import quiet_libraries

    quiet_libraries()
    env = environment(gpu=True)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak_tflops = gpu_peak_tflops(name) if device == "cuda" else None
    res = 64 if args.tiny else args.resolution
    tokens = 16 if args.tiny else args.tokens
    fp16, bf16 = torch.float16, torch.bfloat16

    unet = kolors_models(device, fp16, tiny=args.tiny, parts=("unet",))["unet"]
    unet.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(unet, 16, 4.0, LORA_TARGETS)
    text_hidden = unet.config.encoder_hid_dim
    rows: list[dict[str, Any]] = []

    def run(label: str, kind: str, dtype, ckpt: bool, encoders=None) -> None:
        set_base_dtype(unet, dtype)
        unet.train()
        if ckpt:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        row: dict[str, Any] = {"label": label, "kind": kind, "dtype": str(dtype).removeprefix("torch."),
                               "ckpt": ckpt}
        if kind == "kolora":  # the memory planner's estimate, made on the meta device before the step runs
            row["planned_gib"] = planned_gib(args.tiny, dtype, ckpt, res, tokens)
        try:
            step = Step(unet, dtype, device, res, tokens, text_hidden, encoders)
            row.update(measure(step, device, args.warmup, args.steps))
        except torch.OutOfMemoryError:
            row.update(oom=True)
        finally:
            step = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {label}: " + (f"{row['steps_per_s']:.3f} steps/s, {row['tflop']:.1f} TFLOP/step, "
                                f"peak {row['peak_gib']:.1f} GiB" if "step_s" in row else "out of memory"), flush=True)

    if args.only != "tutorial":
        for dtype, short in ((bf16, "bf16"), (fp16, "fp16")):
            for ckpt in (True, False):
                run(f"kolora {short} ckpt {'on' if ckpt else 'off'}", "kolora", dtype, ckpt)
    if args.only != "kolora":
        enc = kolors_models(device, fp16, tiny=args.tiny, parts=("text_encoder", "vae"))
        enc["text_encoder"].eval()
        enc["vae"].eval()
        for ckpt in (True, False):
            run(f"tutorial fp16 ckpt {'on' if ckpt else 'off'}", "tutorial", fp16, ckpt,
                (enc["text_encoder"], enc["vae"]))

    def cell(r: dict[str, Any], key: str, scale: float = 1.0) -> Any:
        return r[key] * scale if key in r else "OOM"

    table_rows = []
    for r in rows:
        floor_ms = r["tflop"] / peak_tflops * 1e3 if peak_tflops and "tflop" in r else float("nan")
        table_rows.append([r["label"], cell(r, "steps_per_s"), cell(r, "step_s", 1e3), floor_ms, cell(r, "tflop"),
                           cell(r, "tflops"), (r["tflops"] / peak_tflops if peak_tflops and "tflops" in r else "-"),
                           cell(r, "peak_gib"), r.get("planned_gib", "-"), r.get("loss_finite", "-")])
    body = (f"{name}{f', dense peak {peak_tflops:.0f} TFLOP/s' if peak_tflops else ''}; {res}², batch 1, "
            f"{tokens} tokens, LoRA r16; median of {args.steps} steps after {args.warmup} warm-up"
            + (" -- TINY MODELS, smoke test only" if args.tiny else "") + ".\n\n"
            + table(["step", "steps/s", "ms/step", "floor ms", "TFLOP/step", "achieved TFLOP/s", "of peak",
                     "peak GiB", "planned GiB", "loss finite"], table_rows))
    by = {r["label"]: r for r in rows}
    result: dict[str, Any] = {"device": name.replace(" ", "_"), "tiny": args.tiny}
    for r in rows:
        key = r["label"].replace(" ", "_").replace("_ckpt_on", "_ckpt").replace("_ckpt_off", "")
        result[f"{key}_steps_s"] = r.get("steps_per_s", 0.0)
        if "peak_gib" in r:
            result[f"{key}_peak_gib"] = r["peak_gib"]
        if "planned_gib" in r:
            result[f"{key}_planned_gib"] = r["planned_gib"]
    tut, kol = by.get("tutorial fp16 ckpt on"), by.get("kolora bf16 ckpt on")
    if tut and kol and "steps_per_s" in tut and "steps_per_s" in kol:
        result["kolora_vs_tutorial"] = kol["steps_per_s"] / tut["steps_per_s"]
    best = max((r for r in rows if "tflops" in r), key=lambda r: r["tflops"], default=None)
    if best and peak_tflops:
        result["best_of_peak"] = best["tflops"] / peak_tflops
    notes = ["floor ms = counted FLOPs of that step / the GPU's dense bf16 peak (fp16 peak is the same on these "
             "GPUs); 'of peak' = achieved / peak.",
             "peak GiB = torch.cuda.max_memory_allocated during the timed steps, weights included (tutorial rows "
             "hold ChatGLM3 and the VAE too).",
             "planned GiB = kolora.launch.memplan's estimate of the same step from the meta device (what `kolora validate "
             "--cluster` checks against gpu_mem_gb), less its fixed 1 GiB CUDA overhead."]
    report(NAME, "LoRA training step, tutorial vs kolora", env, body, result,
           record=not (args.no_record or args.tiny), notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
