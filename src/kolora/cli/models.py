"""`kolora fetch | check | export | import-lora`: real Kolors weights and LoRA interchange.

    kolora fetch models --to DIR [--layout diffusers|diffsynth]   # login node: download + verify
    kolora fetch dataset AI-ModelScope/lowres_anime --to DIR       # login node
    kolora fetch models --clip --aesthetics --to DIR               # login node: scorers, DIR/<hub id>/
    kolora fetch models --filters nsfw,watermark --to DIR          # login node: filter classifiers, same DIR
    kolora fetch models --scorers pickscore,hps,imagereward --to DIR  # login node: reward scorers, same DIR
    kolora fetch models --captioner [ID] --to DIR                  # login node: captioner, DIR/<hub id>/
    kolora check models DIR                                        # offline (compute node / before submit)
    kolora check dataset DIR
    kolora export RUN --format peft|kohya|diffsynth [--to PATH]   # + the run's model card beside the file
    kolora import-lora FILE --alpha 4 [--rank 16] --to lora/

`register(subparsers)` adds them to kolora.cli.main's parser; heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

from kolora.cli.args import whole_number
from kolora.core.config import load_config
from kolora.core.errors import EXIT_INPUT, EXIT_OK, InputError, RunFailure
from kolora.core.rundir import RunDir
from kolora.formats import interchange
from kolora.formats.lora import WEIGHT_NAME
from kolora.formats.peft_adapter import PEFT_WEIGHTS_NAME
from kolora.ingest.fetch import fetch_dataset
from kolora.ingest.sources import check_folder
from kolora.models import reward_ports, scorer_fetch, scorers
from kolora.models.check import check_models
from kolora.models.fetch import fetch_models
from kolora.report import card
from kolora.report.stage import read_scores
from kolora.sweep.names import folder_kind, listed_variants


def _report(report) -> int:
    print(report.render())
    return EXIT_OK if report.ok else EXIT_INPUT


def cmd_fetch(args) -> int:
    if args.what == "models" and args.captioner is not None:
        if args.clip or args.aesthetics or args.filters or args.scorers:
            raise InputError("--captioner fetches the captioner alone; fetch --clip/--aesthetics/--filters/--scorers "
                             "in another call")
        return _report(scorer_fetch.fetch_captioner(Path(args.to), [args.captioner] if args.captioner else None,
                                                    tiny=args.tiny, timeout=args.timeout))
    if args.what == "models" and (args.clip or args.aesthetics or args.filters or args.scorers):
        return _report(scorer_fetch.fetch(Path(args.to), args.clip, args.aesthetics, tiny=args.tiny,
                                          timeout=args.timeout, filters=args.filters or [],
                                          rewards=args.scorers or [], hps_version=args.hps_version))
    if args.tiny:
        raise InputError("--tiny goes with --clip/--aesthetics/--filters/--scorers/--captioner "
                         "(tiny Kolors: kolora make-tiny DIR)")
    if args.filters:
        raise InputError("--filters goes with `fetch models` (the filter ops' classifiers)")
    if args.scorers:
        raise InputError("--scorers goes with `fetch models` (the reward scorers of scorers.rewards)")
    if args.what == "models":
        if args.id:
            raise InputError(f"fetch models takes no id (got {args.id!r}); it downloads Kolors and the fp16-fix VAE")

        report = fetch_models(Path(args.to), layout=args.layout, timeout=args.timeout)
    else:
        if not args.id:
            raise InputError("fetch dataset needs a dataset id, e.g. kolora fetch dataset AI-ModelScope/lowres_anime "
                             "--to DIR")

        report = fetch_dataset(args.id, Path(args.to), timeout=args.timeout)
    return _report(report)


def cmd_check(args) -> int:
    if args.what == "models":

        report = check_models(Path(args.path), layout=args.layout)
    else:

        _not_a_run(Path(args.path))
        report = check_folder(Path(args.path))
    return _report(report)


def _not_a_run(path: Path) -> None:
    """A run or sweep folder is not a dataset: say which dataset inside it to check (InputError)."""

    kind = folder_kind(path)
    if kind == "run":
        raise InputError(f"{path} is a kolora run folder (manifest.json), not a dataset: check the training set "
                         f"its filter stage wrote with `kolora check dataset {path / 'trainset' / 'train'}`, or "
                         f"see the run with `kolora status {path}`")
    if kind == "sweep":
        first = next(iter(listed_variants(path)), "VARIANT")
        raise InputError(f"{path} is a kolora sweep folder (sweep.json), not a dataset: a variant's training set is "
                         f"`kolora check dataset {path / first / 'trainset' / 'train'}`; see the sweep with "
                         f"`kolora status {path}`")


def find_run(run: str, runs_dir: str | None) -> Path:
    """RUN is a run directory, or a run name under --runs-dir / $KOLORA_RUNS / ./runs."""
    p = Path(run)
    if (p / "config.yaml").is_file() or (p / "lora").is_dir():
        return p.resolve()
    base = Path(runs_dir or os.environ.get("KOLORA_RUNS", "runs"))
    if (base / run).is_dir():
        return (base / run).resolve()
    raise InputError(f"run {run}: neither a run directory (with config.yaml or lora/) nor a run under "
                     f"{base.resolve()}")


def run_unet_config(run_root: Path, override: str | None):
    """The UNet config a run was trained on: --unet-config, else its frozen config's model, else Kolors'."""
    if override:
        return override
    cfg_file = run_root / "config.yaml"
    if cfg_file.is_file():
        try:

            model = load_config(cfg_file).model
            if model.unet_config:
                return str(model.unet_config)
            if Path(model.path).is_dir():
                return str(model.path)  # unet/config.json, or tiny-configs/ of a tiny DiffSynth layout
        except Exception:  # noqa: BLE001 - an unreadable config only means "use the Kolors default"
            pass
    return None


def cmd_export(args) -> int:

    root = find_run(args.run, args.runs_dir)
    source = root / "lora" / WEIGHT_NAME
    if not source.is_file():
        raise InputError(f"{source} does not exist: train the run first (kolora run CONFIG --stage train)")
    to = interchange.output_path(Path(args.to) if args.to else None, interchange.default_export_path(root, args.format),
                                 args.format)
    out = interchange.export_lora(source, args.format, to, run_unet_config(root, args.unet_config))
    rank, alpha = interchange.rank_alpha(source)
    print(out)
    hint = {"peft": f"diffusers: pipe.load_lora_weights({str(out.parent)!r}, weight_name={out.name!r}); "
                    f"kolora: render.lora: {out}" if out.name != PEFT_WEIGHTS_NAME else
                    f"peft (diffusers' LoRA loader cannot read LoHa/LoKr): PeftModel.from_pretrained(unet, "
                    f"{str(out.parent)!r}); kolora: render.lora: {out.parent}",
            "kohya": "ComfyUI: copy it to models/loras/ and use a LoraLoaderModelOnly node; "
                     f"A1111/Forge: models/Lora/ (rank {rank}, alpha {alpha:g} inside)",
            "diffsynth": "DiffSynth 1.x (raw tensors, no alpha inside; load with the trained alpha): "
                         + interchange.diffsynth_usage(out, rank, alpha)}[args.format]
    print(hint, file=sys.stderr)
    note = export_card(root, out, args.format)
    if note:
        print(note, file=sys.stderr)
    return 0


def export_card(root: Path, out: Path, fmt: str) -> str | None:
    """The run's model card, about the exported file, beside it (with its images): a line saying what became of it."""
    run = RunDir(root)
    if not (run.lora / card.CARD).is_file():
        return (f"no model card beside it: {run.lora / card.CARD} does not exist (the report stage writes it: "
                f"kolora run CONFIG --stage report)")
    if out.parent.resolve() == run.lora.resolve():
        return None  # the run's own card is there already
    try:
        cfg = run.load_config()
        written = card.write(cfg, run, out.parent, read_scores(run), card.Weights(out.name, fmt), from_card=True)
    except (InputError, RunFailure, OSError) as e:  # the LoRA is exported: a card it cannot have is a note
        return f"no model card beside it: {e}"
    return f"model card: {written}"


def cmd_import_lora(args) -> int:
    out = interchange.import_lora(Path(args.file), Path(args.to), alpha=args.alpha, rank=args.rank,
                                  config=args.unet_config)
    rank, alpha = interchange.rank_alpha(out)
    print(out)
    # the file itself, absolute: its folder may hold other LoRA files, and --set is read from any directory
    print(f"imported {args.file}: rank {rank}, alpha {alpha:g}; render with it: --set "
          f"{shlex.quote(f'render.lora={out.resolve()}')}", file=sys.stderr)
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a number > 0")
    return value


def _filter_keys(text: str) -> list[str]:
    try:
        return scorers.filter_keys(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _reward_keys(text: str) -> list[str]:
    try:
        return scorers.reward_keys(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    p.add_argument("--timeout", type=_positive_float, default=5.0, help="seconds to wait for the hub before giving up")
    p.add_argument("--clip", action="store_true", help="models: the CLIP scorers instead of Kolors (OpenAI CLIP "
                                                       "and Chinese-CLIP, Hugging Face hub) into DIR/<hub id>/")
    p.add_argument("--aesthetics", action="store_true", help="models: the LAION aesthetic predictor into "
                                                             "DIR/<hub id>/ (set scorers.dir: DIR)")
    p.add_argument("--filters", type=_filter_keys, metavar="nsfw,watermark",
                   help="models: the image classifiers of the image_nsfw_filter / image_watermark_filter ops into "
                        "DIR/<hub id>/ (set scorers.dir: DIR)")
    p.add_argument("--scorers", type=_reward_keys, metavar="pickscore,hps,imagereward",
                   help="models: the reward scorers of scorers.rewards into DIR/<hub id>/ (set scorers.dir: DIR): "
                        "PickScore, with the processor files of the CLIP it started from; HPSv2 and ImageReward, "
                        "converted here to transformers folders")
    p.add_argument("--hps-version", choices=sorted(reward_ports.HPS_FILES), default=scorers.HPS_VERSION,
                   help="with --scorers hps: the HPS checkpoint (scorers.hps_version; default %(default)s)")
    p.add_argument("--captioner", nargs="?", const="", metavar="ID",
                   help="models: the captioner of data.captions into DIR/<hub id>/ (without ID both defaults: "
                        "Salesforce/blip-image-captioning-base and IDEA-CCNL/Taiyi-BLIP-750M-Chinese)")
    p.add_argument("--tiny", action="store_true", help="with --clip/--aesthetics/--filters/--scorers/--captioner: write tiny "
                                                       "random models (tests, demos; offline)")
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
    p.add_argument("--alpha", type=_positive_float, help="the lora_alpha it was TRAINED with (required for DiffSynth "
                                               "checkpoints, which do not store it; the tutorial trains with 4)")
    p.add_argument("--rank", type=whole_number(1), help="expected rank (checked against the tensors)")
    p.add_argument("--to", required=True, help="output folder (gets pytorch_lora_weights.safetensors) or file")
    p.add_argument("--unet-config", help="UNet config.json or model folder (default: full-size Kolors)")
    p.set_defaults(func=cmd_import_lora)
