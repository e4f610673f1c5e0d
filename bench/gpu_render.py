"""GPU render bench: seconds per 1024² image, 50-step CFG, full-size random-initialised Kolors (KolorsPipeline).

    .venv/bin/python bench/gpu_render.py [--images 3]      (bash bench/run_gpu.sh runs all GPU benches)

The pipeline kolora's render stage builds (diffusers KolorsPipeline, the Kolors Euler scheduler from
kolora.models.kolors.make_scheduler), with random weights (bench/_common.kolors_models) and an unfused LoRA r16
adapter like a trained one loaded by kolora.formats.interchange.load_into_pipeline. Prompt and negative prompt are encoded by
the pipeline itself (ChatGLM3-shaped, 256 tokens). Rows: fp16 (kolora's default on CUDA) with and without the
LoRA, bf16 with it. FLOPs per image are counted on the first measured image, the floor is FLOPs / the GPU's
dense peak. Without CUDA it prints "skipped: no CUDA" and exits 0; --tiny runs the same code on tiny models.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path
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

NAME = "gpu_render"
PROMPT = "二次元,日系动漫,演唱会的观众席,人山人海,一个紫色短发小女孩穿着粉色吊带漏肩连衣裙坐在演唱会的观众席"
NEGATIVE = "丑陋、变形、嘈杂、模糊、低对比度"


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3, help="timed images per configuration (median)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--tiny", action="store_true", help="tiny models on any device: a smoke test of this script")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.tiny:
        return skip(NAME, "no CUDA (run on a GPU machine: bash bench/run_gpu.sh)", "no-cuda")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from diffusers import KolorsPipeline
    from torch.utils.flop_counter import FlopCounterMode

    from kolora.formats.lora import add_lora
    from kolora.models import kolors as models

    models.quiet_libraries()
    env = environment(gpu=True)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak_tflops = gpu_peak_tflops(name) if device == "cuda" else None
    res = 64 if args.tiny else args.resolution
    tokens = 32 if args.tiny else 256
    steps = 4 if args.tiny else args.steps

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kolora-bench-render-") as tok_dir:
        parts = kolors_models(device, torch.float16, tiny=args.tiny, tokenizer_dir=Path(tok_dir))
        pipe = KolorsPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                              unet=parts["unet"], scheduler=models.make_scheduler())
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(0)
        add_lora(pipe.unet, 16, 4.0, LORA_TARGETS)

        def sync() -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        def render(seed: int) -> None:
            pipe(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=args.cfg, num_inference_steps=steps,
                 height=res, width=res, generator=torch.Generator("cpu").manual_seed(seed),
                 max_sequence_length=tokens, output_type="np")

        for label, dtype, lora in (("fp16 + LoRA (kolora default)", torch.float16, True),
                                   ("fp16, no LoRA", torch.float16, False),
                                   ("bf16 + LoRA", torch.bfloat16, True)):
            pipe.to(dtype=dtype)
            if lora:
                pipe.unet.enable_adapters()
            else:
                pipe.unet.disable_adapters()
            row: dict[str, Any] = {"label": label}
            try:
                render(0)  # warm-up
                sync()
                counter = FlopCounterMode(display=False)
                with counter:
                    render(1)
                row["tflop"] = counter.get_total_flops() / 1e12
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for i in range(args.images):
                    sync()
                    t0 = time.perf_counter()
                    render(2 + i)
                    sync()
                    times.append(time.perf_counter() - t0)
                row["s"] = median(times)
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            except torch.OutOfMemoryError:
                row["oom"] = True
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"  {label}: " + (f"{row['s']:.2f} s/image" if "s" in row else "out of memory"), flush=True)

    table_rows = []
    for r in rows:
        floor = r["tflop"] / peak_tflops if peak_tflops and "tflop" in r else float("nan")
        achieved = r["tflop"] / r["s"] if "s" in r else float("nan")
        table_rows.append([r["label"], r.get("s", "OOM"), floor, r.get("tflop", "-"), achieved,
                           achieved / peak_tflops if peak_tflops else "-", r.get("peak_gib", "-")])
    body = (f"{name}{f', dense peak {peak_tflops:.0f} TFLOP/s' if peak_tflops else ''}; {res}², {steps} steps, "
            f"CFG {args.cfg} (2 UNet passes per step), {tokens}-token prompts; median of {args.images} images "
            "after one warm-up" + (" -- TINY MODELS, smoke test only" if args.tiny else "") + ".\n\n"
            + table(["config", "s/image", "floor s", "TFLOP/image", "achieved TFLOP/s", "of peak", "peak GiB"],
                    table_rows))
    result: dict[str, Any] = {"device": name.replace(" ", "_"), "tiny": args.tiny, "steps": steps}
    for key, r in zip(("fp16_lora", "fp16", "bf16_lora"), rows, strict=True):
        result[f"{key}_s_per_image"] = r.get("s", 0.0)
    if peak_tflops and "tflop" in rows[0]:
        result["floor_s"] = rows[0]["tflop"] / peak_tflops
    report(NAME, f"{steps}-step CFG render at {res}²", env, body, result, record=not (args.no_record or args.tiny))
    return 0


if __name__ == "__main__":
    sys.exit(main())
