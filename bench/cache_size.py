"""Cache size bench: bytes of one text entry (ChatGLM3's [seq, 4096] embeddings + [4096] pooled) and one latent
entry as kolora writes them, per storage dtype, at Kolors size; and what a dataset's captions cost.

    .venv/bin/python bench/cache_size.py [--seq 256] [--captions 10000] [--no-record]

The bytes are computed by writing the real safetensors layout (kolora.cache.text_entry_bytes), not estimated;
the float32 row is the layout before text entries followed the training dtype.
"""

from __future__ import annotations

from _common import base_parser, environment, report, table

NAME = "cache_size"
HIDDEN = 4096  # ChatGLM3-6B's hidden size


def main(argv: list[str] | None = None) -> int:
    import tempfile
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from kolora.cache import text_dtype, text_entry_bytes

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=256, help="cache.max_sequence_length (default 256)")
    p.add_argument("--captions", type=int, default=10_000, help="captions in the dataset (default 10,000)")
    p.add_argument("--resolution", type=int, default=1024)
    args = p.parse_args(argv)

    rows, result = [], {}
    for precision in ("32", "bf16-mixed", "16-mixed"):
        dtype = text_dtype(precision)
        size = text_entry_bytes(args.seq, HIDDEN, dtype)
        rows.append([f"text, train.precision {precision}", str(dtype).removeprefix("torch."), size,
                     f"{size / 2**20:.3f}", f"{size * args.captions / 2**30:.1f}"])
        result[f"text_{precision}_bytes"] = size
    with tempfile.TemporaryDirectory() as d:
        latent = Path(d) / "latent.safetensors"
        save_file({"latents": torch.zeros(4, args.resolution // 8, args.resolution // 8)}, str(latent))
        size = latent.stat().st_size
    rows.append([f"latents {args.resolution}²", "float32", size, f"{size / 2**20:.3f}",
                 f"{size * args.captions / 2**30:.1f}"])
    result["latent_bytes"] = size
    result["fp16_vs_fp32"] = result["text_16-mixed_bytes"] / result["text_32_bytes"]
    body = table(["entry", "stored as", "bytes", "MiB", f"GiB for {args.captions:,}"], rows)
    notes = [f"text entry = prompt_embeds [{args.seq}, {HIDDEN}] + pooled [{HIDDEN}] + safetensors header; the "
             "embeddings alone are exactly 2 MiB in 16 bits at 256 tokens, the pooled vector adds 8 KiB.",
             "Training reads the same numbers either way: autocast casts the embeddings to the training dtype in "
             "the first layer that reads them (tests/test_numerics.py: bit-identical LoRA, bf16 vs float32 entries)."]
    report(NAME, f"Cache entry sizes at {args.seq} tokens × {HIDDEN}", environment(), body, result,
           record=not args.no_record, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
