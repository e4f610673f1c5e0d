"""`kolora fetch | check | export | import-lora`: real Kolors weights and LoRA interchange.

    kolora fetch models --to DIR [--layout diffusers|diffsynth]   # login node: download + verify
    kolora fetch dataset AI-ModelScope/lowres_anime --to DIR       # login node
    kolora check models DIR                                        # offline (compute node / before submit)
    kolora check dataset DIR
    kolora export RUN --format peft|kohya|diffsynth [--to PATH]
    kolora import-lora FILE --alpha 4 [--rank 16] --to lora/

`register(subparsers)` adds them to the main parser; heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _err(msg: str) -> int:
    print(f"kolora: error: {msg}", file=sys.stderr)
    return 1


def _report(report) -> int:
    print(report.render())
    return 0 if report.ok else 1


def cmd_fetch(args) -> int:
    from kolora import fetch

    try:
        if args.what == "models":
            if args.id:
                return _err(f"fetch models takes no id (got {args.id!r}); it downloads Kolors and the fp16-fix VAE")
            report = fetch.fetch_models(Path(args.to), layout=args.layout, timeout=args.timeout)
        else:
            if not args.id:
                return _err("fetch dataset needs a dataset id, e.g. kolora fetch dataset AI-ModelScope/lowres_anime "
                            "--to DIR")
            report = fetch.fetch_dataset(args.id, Path(args.to), timeout=args.timeout)
    except fetch.FetchError as e:
        return _err(str(e))
    return _report(report)


def cmd_check(args) -> int:
    from kolora import fetch

    try:
        report = (fetch.check_models(Path(args.path), layout=args.layout) if args.what == "models"
                  else fetch.check_dataset(Path(args.path)))
    except fetch.FetchError as e:
        return _err(str(e))
    return _report(report)


def find_run(run: str, runs_dir: str | None) -> Path:
    """RUN is a run directory, or a run name under --runs-dir / $KOLORA_RUNS / ./runs."""
    p = Path(run)
    if (p / "config.yaml").is_file() or (p / "lora").is_dir():
        return p.resolve()
    base = Path(runs_dir or os.environ.get("KOLORA_RUNS", "runs"))
    if (base / run).is_dir():
        return (base / run).resolve()
    raise FileNotFoundError(f"run {run!r}: neither a run directory nor a run under {base.resolve()}")


def run_unet_config(run_root: Path, override: str | None):
    """The UNet config a run was trained on: --unet-config, else its frozen config's model, else Kolors'."""
    if override:
        return override
    cfg_file = run_root / "config.yaml"
    if cfg_file.is_file():
        try:
            from kolora.config import load_config

            model = load_config(cfg_file).model
            if model.unet_config:
                return str(model.unet_config)
            if Path(model.path).is_dir():
                return str(model.path)  # unet/config.json, or tiny-configs/ of a tiny DiffSynth layout
        except Exception:  # noqa: BLE001 - an unreadable config only means "use the Kolors default"
            pass
    return None


def cmd_export(args) -> int:
    from kolora import interchange
    from kolora.lora import WEIGHT_NAME, LoraFileError

    try:
        root = find_run(args.run, args.runs_dir)
        source = root / "lora" / WEIGHT_NAME
        if not source.is_file():
            return _err(f"{source} does not exist: train the run first (kolora run CONFIG --stage train)")
        to = interchange.output_path(Path(args.to) if args.to else None, interchange.default_export_path(root, args.format),
                                 args.format)
        out = interchange.export_lora(source, args.format, to, run_unet_config(root, args.unet_config))
        rank, alpha = interchange.rank_alpha(source)
    except LoraFileError as e:
        return _err(str(e))
    print(out)
    hint = {"peft": f"diffusers: pipe.load_lora_weights({str(out.parent)!r}, weight_name={out.name!r}); "
                    f"kolora: render.lora: {out}",
            "kohya": "ComfyUI: copy it to models/loras/ and use a LoraLoaderModelOnly node; "
                     f"A1111/Forge: models/Lora/ (rank {rank}, alpha {alpha:g} inside)",
            "diffsynth": "DiffSynth 1.x (raw tensors, no alpha inside; load with the trained alpha): "
                         + interchange.diffsynth_usage(out, rank, alpha)}[args.format]
    print(hint, file=sys.stderr)
    return 0


def cmd_import_lora(args) -> int:
    from kolora import interchange
    from kolora.lora import LoraFileError

    try:
        out = interchange.import_lora(Path(args.file), Path(args.to), alpha=args.alpha, rank=args.rank,
                                      config=args.unet_config)
        rank, alpha = interchange.rank_alpha(out)
    except LoraFileError as e:
        return _err(str(e))
    print(out)
    print(f"imported {args.file}: rank {rank}, alpha {alpha:g}; render with it: --set render.lora={out.parent}",
          file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("fetch", help="download Kolors or a dataset from ModelScope (login node)",
                              description="Download with ModelScope's snapshot download, then verify what "
                                          "arrived and print the config lines to use. Needs network: run it on "
                                          "a login node.")
    p.add_argument("what", choices=["models", "dataset"])
    p.add_argument("id", nargs="?", help="dataset id for `fetch dataset` (e.g. AI-ModelScope/lowres_anime)")
    p.add_argument("--to", required=True, help="destination folder")
    p.add_argument("--layout", choices=["diffusers", "diffsynth"], default="diffusers",
                   help="models: Kwai-Kolors/Kolors-diffusers (diffusers) or Kwai-Kolors/Kolors as DiffSynth lays "
                        "it out (diffsynth); both add the fp16-fix SDXL VAE")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the hub before giving up")
    p.set_defaults(func=cmd_fetch)

    p = subparsers.add_parser("check", help="verify downloaded models or a dataset offline",
                              description="Offline check: expected files present and non-empty, safetensors "
                                          "headers readable, every indexed shard present. Names what is missing.")
    p.add_argument("what", choices=["models", "dataset"])
    p.add_argument("path")
    p.add_argument("--layout", choices=["diffusers", "diffsynth"], help="expect this layout (default: detect)")
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser("export", help="export a run's LoRA for diffusers/peft, ComfyUI/WebUI or DiffSynth")
    p.add_argument("run", help="run directory, or run name under --runs-dir")
    p.add_argument("--format", required=True, choices=["peft", "kohya", "diffsynth"])
    p.add_argument("--to", help="output file or folder (default: RUN/lora/<format>/)")
    p.add_argument("--runs-dir", help="where run directories are (default: $KOLORA_RUNS or ./runs)")
    p.add_argument("--unet-config", help="UNet config.json or model folder (default: the run's model, else Kolors)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("import-lora", help="convert a LoRA (DiffSynth checkpoint, kohya, diffusers) to "
                                                  "kolora's file for render.lora")
    p.add_argument("file", help="e.g. lightning_logs/version_0/checkpoints/epoch=0-step=500.ckpt")
    p.add_argument("--alpha", type=float, help="the lora_alpha it was TRAINED with (required for DiffSynth "
                                               "checkpoints, which do not store it; the tutorial trains with 4)")
    p.add_argument("--rank", type=int, help="expected rank (checked against the tensors)")
    p.add_argument("--to", required=True, help="output folder (gets pytorch_lora_weights.safetensors) or file")
    p.add_argument("--unet-config", help="UNet config.json or model folder (default: full-size Kolors)")
    p.set_defaults(func=cmd_import_lora)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (tests; until cli.py wires `register`)."""
    parser = argparse.ArgumentParser(prog="kolora")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
