"""The `kolora` command. Starts fast on a login node: stage modules (torch, diffusers, Data-Juicer) are
imported only by the commands that run them."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from kolora.core import interrupt
from kolora.core.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    ConfigError,
    InputError,
    KoloraError,
    describe_os_error,
    disk_full,
)


def resolve_runs_dir(args) -> Path:
    given = args.runs_dir or os.environ.get("KOLORA_RUNS")
    path = Path(given or "runs").expanduser().resolve()
    if path.exists() and not path.is_dir():
        where = "--runs-dir" if args.runs_dir else "$KOLORA_RUNS" if given else "./runs"
        raise InputError(f"{where} {path} is a file, not a folder; give a folder for the run directories")
    return path


def print_warnings(lines: list[str]) -> None:
    """What runs but is likely not meant (preflight's, the cluster checks'): printed, not refused."""
    for line in lines:
        print(f"kolora: warning: {line}", file=sys.stderr)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (e.g. configs/demo.yaml)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--runs-dir", help="where run directories go (default: $KOLORA_RUNS or ./runs)")


def cmd_run(args) -> int:
    with interrupt.for_command():  # Ctrl-C included, from the first line on
        return _run(args)


def _run(args) -> int:
    from rich.console import Console

    from kolora.core.config import load_config
    from kolora.core.rundir import RunDir, sweep_temp
    from kolora.core.runlock import acquire
    from kolora.launch.monitor import still_queued
    from kolora.pipeline.runner import open_run, preflight
    from kolora.pipeline.state import stopped_before
    from kolora.sweep.names import check_name

    console = Console(stderr=True)
    cfg = load_config(args.config, args.overrides, args.name)
    runs_dir = resolve_runs_dir(args)
    check_name(runs_dir, cfg.name, "run")  # before the lock: a refused name leaves the runs dir as it was
    print_warnings(preflight(cfg, here=True))
    RunDir(runs_dir / cfg.name).read_manifest()  # an unusable run folder stops this before the lock is written
    stopped = stopped_before(runs_dir / cfg.name, still_queued)  # read before this run holds the lock
    # the run lock before anything of the run is written: no other `kolora run` or live submission's jobs
    # write it meanwhile (RunLocked names the holder)
    with acquire(runs_dir / cfg.name, "run", queued=still_queued):
        if removed := sweep_temp(runs_dir / cfg.name):  # leftovers of a writer that was killed
            console.print(f"[dim]removed {removed} temp files of an interrupted earlier run[/]")
        run = open_run(cfg, runs_dir)
        console.print(f"[bold]kolora run[/] {cfg.name} → {run.root}")
        if stopped:
            print(stopped.continuing(cfg.name), file=sys.stderr)
        t0 = time.time()
        _run_stages(console, cfg, run, tuple(args.stage or ()), args.force)
        with run.manifest() as m:
            m["last_run_wall_s"] = round(time.time() - t0, 2)
        if run.grid_file.is_file():
            console.print(f"[bold green]grid:[/] {run.grid_file}")
            print(run.grid_file)
    return 0


def _run_stages(console, cfg, run, selected: tuple[str, ...], force: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kolora.pipeline import registry
    from kolora.pipeline.runner import run_stage

    stages = selected or registry.NAMES
    for n, stage in enumerate(stages, 1):
        if why := interrupt.requested():  # a stage that cannot stop part-way finished first
            raise interrupt.Interrupted(f"stopped on {why} before {stage}; the stages before it are complete")
        label = f"[{n}/{len(stages)}] {stage:<7}"
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as bar, interrupt.running(stage, registry.get(stage).stoppable):
            task = bar.add_task(stage, total=None)

            def progress(done: int, total: int, _bar=bar, _task=task) -> None:
                _bar.update(_task, completed=done, total=total)

            try:
                summary = run_stage(stage, cfg, run, force=force and stage in stages, progress=progress)
            except interrupt.StopNow as e:
                with contextlib.suppress(Exception):  # telling what is kept must not turn the stop into an error
                    e.kept = _kept(cfg, run)
                raise
        for note in summary.get("notes", []):
            console.print(f"{label} [yellow]{note}[/]")
        if summary.get("skipped"):
            console.print(f"{label} [dim]complete, skipped[/]")
        else:
            shown = ", ".join(f"{k}={v}" for k, v in summary.items() if k not in ("wall_s",) and
                              not isinstance(v, dict | list))
            console.print(f"{label} [green]done[/] in {summary['wall_s']:.1f} s  [dim]{shown}[/]")
    if why := interrupt.requested():
        console.print(f"[yellow]{why} came during {stages[-1]}, which finished: nothing was left to stop[/]")


def _kept(cfg, run) -> str:
    """What the run has on disk for this config, in a few words (for a stop that cut a stage short)."""
    from kolora.pipeline.keys import Keys, is_complete, progress
    from kolora.pipeline.registry import NAMES
    keys = Keys(cfg, run)
    complete = [s for s in NAMES if is_complete(s, cfg, run, keys)]
    written = progress(run)
    parts = [f"{', '.join(complete)} complete" if complete else "no stage complete"]
    if written["checkpoint_step"] is not None:
        parts.append(f"newest checkpoint step {written['checkpoint_step']}")
    if written["tiles"]:
        parts.append(f"{written['tiles']} tiles")
    return "; ".join(parts)


def cmd_validate(args) -> int:
    from kolora.core.config import load_config
    from kolora.pipeline.runner import preflight

    cfg = load_config(args.config, args.overrides, args.name)
    resolve_runs_dir(args)
    print_warnings(preflight(cfg))
    if args.cluster:
        from kolora.launch.cluster import find_profile, load_profile

        profile_file = find_profile(args.cluster)
        profile = load_profile(profile_file)
        from kolora.cli.slurm import check_gpu_memory, warn_attempt_window
        from kolora.launch.cluster_check import check_cluster

        check_cluster(cfg, profile, str(profile_file))
        warn_attempt_window(cfg, profile)
        for line in check_gpu_memory(cfg, profile, profile_file, show=True):
            print(line)
    print(f"{args.config}: OK (run {cfg.name}, config {cfg.digest()})")
    return 0


def cmd_make_tiny(args) -> int:
    from kolora.models.kolors import build_tiny

    target = Path(args.path)
    if target.exists() and not (target / "TINY_RANDOM_MODEL.txt").is_file():
        kind = "a folder" if target.is_dir() else "a file"
        raise InputError(f"{target} exists and is {kind} that is not a tiny model made by kolora; make-tiny "
                         "replaces its target, so give a new path")
    path = build_tiny(target, layout=args.layout, seed=args.seed)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kolora.cli import models as cli_models  # fetch, check, export, import-lora
    from kolora.cli import slurm as cli_slurm  # submit, status, logs, cancel, resume
    from kolora.cli import sweep as cli_sweep
    from kolora.pipeline.registry import NAMES as stage_names

    parser = argparse.ArgumentParser(
        prog="kolora", description="Kolors LoRA training kit for Slurm clusters.",
        epilog="exit status: 0 ok; 1 a failure while running; 2 input to fix (config, cluster profile, prompt set, "
               "dataset, LoRA file, run folder, argument: the message names the file and field); 3 interrupted "
               "(run the same command again to resume). Add -v to see the traceback of an error.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks with errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline (or --stage ones) in this process")
    add_config_args(p)
    p.add_argument("--stage", action="append", choices=list(stage_names),
                   help="run only this stage (repeatable); default all")
    p.add_argument("--force", action="store_true",
                   help="rerun the selected stages even if complete; train starts over (its checkpoints and LoRA "
                        "are discarded, not moved to superseded/)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a config, its prompt set, model and data paths; run nothing")
    add_config_args(p)
    p.add_argument("--cluster", metavar="PROFILE", help="also check the run against this cluster profile "
                   "(whether each requeued job's time limit leaves room to load the models; each GPU "
                   "stage's estimated peak memory against jobs.<job>.gpu_mem_gb)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("make-tiny", help="write tiny random Kolors-shaped models (tests, demos)")
    p.add_argument("path")
    p.add_argument("--layout", choices=["diffusers", "diffsynth"], default="diffusers")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)
    cli_slurm.register(sub)
    cli_models.register(sub)
    cli_sweep.register(sub)
    for command in sub.choices.values():  # -v also after the command: `kolora run X -v`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kolora").setLevel(logging.INFO)
    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except interrupt.Interrupted as e:
        during = f" during {e.stage}" if e.stage else ""
        print(f"kolora: interrupted{during}: {e}. Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except interrupt.StopNow as e:  # the second Ctrl-C: no traceback, the same exit status (outputs are atomic)
        during = f" during {e.stage}" if e.stage else ""
        kept = f" (kept: {e.kept})" if e.kept else ""
        print(f"kolora: second Ctrl-C: stopped at once{during}{kept}. Run the same command again to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KoloraError as e:
        _explain(e, verbose, "config error" if isinstance(e, ConfigError) else "error")
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - a full disk, however its writer said so; else an OSError, or a bug
        if full := disk_full(e):  # a stage's is a DiskFull already (kolora.pipeline.runner); this is any other command's
            _explain(e, verbose, "error", str(full))
            return full.exit_code
        if isinstance(e, OSError):  # a permission, a path that is not a folder
            _explain(e, verbose, "error", describe_os_error(e))
            return EXIT_FAILURE
        traceback.print_exc()
        print(f"kolora: internal error ({type(e).__name__}): this is a bug in kolora, not in your input; please "
              "report it with the traceback above", file=sys.stderr)
        return EXIT_FAILURE


def _explain(e: BaseException, verbose: bool, label: str, text: str | None = None) -> None:
    if verbose:
        traceback.print_exc()
    notes = "".join(f"\n  {note}" for note in getattr(e, "__notes__", []))
    print(f"kolora: {label}: {text or e}{notes}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
