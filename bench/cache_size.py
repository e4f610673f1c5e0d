"""Cache size bench: bytes of one text entry (ChatGLM3's [seq, 4096] embeddings + [4096] pooled) and one latent
entry as kolora writes them, per storage dtype and caption length, at Kolors size; what a dataset's captions cost.

    .venv/bin/python bench/cache_size.py [--seq 256] [--captions 10000] [--no-record]

The bytes are computed by writing the real safetensors layout (kolora.cache.stage.text_entry_bytes), not estimated;
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

    from kolora.cache.stage import text_dtype, text_entry_bytes

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=256, help="cache.max_sequence_length (default 256)")
    p.add_argument("--captions", type=int, default=10_000, help="captions in the dataset (default 10,000)")
    p.add_argument("--resolution", type=int, default=1024)
    args = p.parse_args(argv)

    rows, result = [], {}
    for precision in ("32", "16-mixed"):
        dtype = text_dtype(precision)
        for tokens in (8, 77, args.seq):
            size = text_entry_bytes(args.seq, HIDDEN, dtype, tokens=tokens)
            rows.append([f"text, {tokens} tokens, train.precision {precision}", str(dtype).removeprefix("torch."),
                         size, f"{size / 2**20:.3f}", f"{size * args.captions / 2**30:.2f}"])
            result[f"text_{precision}_{tokens}tok_bytes"] = size
        # before this layout: every entry all seq rows in float32, whatever the caption's length
    full32 = args.seq * HIDDEN * 4 + HIDDEN * 4
    rows.insert(0, ["text, any caption, float32, every row (the earlier layout, ≈ payload)", "float32", full32,
                    f"{full32 / 2**20:.3f}", f"{full32 * args.captions / 2**30:.2f}"])
    result["text_32_bytes"] = result[f"text_32_{args.seq}tok_bytes"]
    result["text_16-mixed_bytes"] = result[f"text_16-mixed_{args.seq}tok_bytes"]
    with tempfile.TemporaryDirectory() as d:
        latent = Path(d) / "latent.safetensors"
        save_file({"latents": torch.zeros(4, args.resolution // 8, args.resolution // 8)}, str(latent))
        size = latent.stat().st_size
    rows.append([f"latents {args.resolution}²", "float32", size, f"{size / 2**20:.3f}",
                 f"{size * args.captions / 2**30:.1f}"])
    result["latent_bytes"] = size
    result["fp16_vs_fp32"] = result["text_16-mixed_bytes"] / result["text_32_bytes"]
    body = table(["entry", "stored as", "bytes", "MiB", f"GiB for {args.captions:,}"], rows)
    notes = [f"text entry = the caption's token rows of prompt_embeds [{args.seq}, {HIDDEN}] + one of its "
             "bit-identical left-padding rows + pooled [" + str(HIDDEN) + "] + safetensors header (kolora.cache.stage."
             "compact_text; read_text restores the exact tensor). A caption filling all 256 tokens has no padding: "
             "2 MiB of embeddings in 16 bits + 8 KiB pooled, the largest entry.",
             "Training reads the same numbers either way: autocast casts the embeddings to the training dtype in "
             "the first layer that reads them (tests/test_numerics.py: bit-identical LoRA, bf16 vs float32 entries)."]
    report(NAME, f"Cache entry sizes at {args.seq} tokens × {HIDDEN}", environment(), body, result,
           record=not args.no_record, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
