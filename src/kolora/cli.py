"""The `kolora` command. Starts fast on a login node: stage modules (torch, diffusers, Data-Juicer) are
imported only by the commands that run them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from kolora.config import ConfigError
from kolora.interrupt import Interrupted


def _runs_dir(args) -> Path:
    return Path(args.runs_dir or os.environ.get("KOLORA_RUNS", "runs")).resolve()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (e.g. configs/demo.yaml)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--runs-dir", help="where run directories go (default: $KOLORA_RUNS or ./runs)")


def cmd_run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kolora.config import load_config
    from kolora.pipeline import open_run, preflight, run_stage
    from kolora.rundir import STAGES

    console = Console(stderr=True)
    cfg = load_config(args.config, args.overrides, args.name)
    preflight(cfg)
    run = open_run(cfg, _runs_dir(args))
    console.print(f"[bold]kolora run[/] {cfg.name} → {run.root}")
    stages = STAGES if not args.stage else tuple(args.stage)
    t0 = time.time()
    for n, stage in enumerate(stages, 1):
        with Progress(TextColumn(f"[{n}/{len(stages)}] {stage:<7}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(stage, total=None)

            def progress(done: int, total: int, _bar=bar, _task=task) -> None:
                _bar.update(_task, completed=done, total=total)

            summary = run_stage(stage, cfg, run, force=args.force and stage in (args.stage or STAGES),
                                progress=progress)
        if summary.get("skipped"):
            console.print(f"[{n}/{len(stages)}] {stage:<7} [dim]complete, skipped[/]")
        else:
            shown = ", ".join(f"{k}={v}" for k, v in summary.items() if k not in ("wall_s",) and
                              not isinstance(v, dict | list))
            console.print(f"[{n}/{len(stages)}] {stage:<7} [green]done[/] in {summary['wall_s']:.1f} s  [dim]{shown}[/]")
    with run.manifest() as m:
        m["last_run_wall_s"] = round(time.time() - t0, 2)
    if run.grid_file.is_file():
        console.print(f"[bold green]grid:[/] {run.grid_file}")
        print(run.grid_file)
    return 0


def cmd_validate(args) -> int:
    from kolora.config import load_config
    from kolora.pipeline import preflight

    cfg = load_config(args.config, args.overrides, args.name)
    preflight(cfg)
    print(f"{args.config}: OK (run {cfg.name}, config {cfg.digest()})")
    return 0


def cmd_make_tiny(args) -> int:
    from kolora.models import build_tiny

    path = build_tiny(Path(args.path), layout=args.layout, seed=args.seed)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kolora", description="Kolors LoRA training kit for Slurm clusters.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline (or --stage ones) in this process")
    _add_config_args(p)
    p.add_argument("--stage", action="append", choices=["ingest", "filter", "cache", "train", "render", "grid"],
                   help="run only this stage (repeatable); default all")
    p.add_argument("--force", action="store_true", help="rerun the selected stages even if complete")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a config, its prompt set, model and data paths; run nothing")
    _add_config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("make-tiny", help="write tiny random Kolors-shaped models (tests, demos)")
    p.add_argument("path")
    p.add_argument("--layout", choices=["diffusers", "diffsynth"], default="diffusers")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kolora").setLevel(logging.INFO)
    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except Interrupted as e:
        print(f"kolora: interrupted: {e}. Run the same command again to resume.", file=sys.stderr)
        return 3
    except ConfigError as e:
        print(f"kolora: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"kolora: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
