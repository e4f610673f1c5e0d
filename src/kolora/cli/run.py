"""`kolora run | validate | make-tiny`: the commands that work in this process, without Slurm."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kolora.cli.args import add_config_args, resolve_runs_dir
from kolora.cli.checks import check_gpu_memory, print_warnings, warn_attempt_window
from kolora.cli.display import RichStageDisplay
from kolora.core import interrupt
from kolora.core.config import load_config
from kolora.core.errors import InputError
from kolora.core.rundir import RunDir, sweep_temp
from kolora.core.runlock import acquire
from kolora.launch.cluster import find_profile, load_profile
from kolora.launch.cluster_check import check_cluster
from kolora.launch.monitor import still_queued
from kolora.models.kolors import build_tiny
from kolora.pipeline import runner
from kolora.pipeline.registry import NAMES as STAGE_NAMES
from kolora.pipeline.sequence import run_all
from kolora.pipeline.state import stopped_before
from kolora.sweep.index import refreshed_after
from kolora.sweep.names import check_name

# rich: imported in the functions that use them (a login node's CLI starts without them)


def cmd_run(args) -> int:
    with interrupt.for_command():  # Ctrl-C included, from the first line on
        return _run(args)


def _run(args) -> int:
    from rich.console import Console


    console = Console(stderr=True)
    cfg = load_config(args.config, args.overrides, args.name)
    runs_dir = resolve_runs_dir(args)
    check_name(runs_dir, cfg.name, "run")  # before the lock: a refused name leaves the runs dir as it was
    print_warnings(runner.preflight(cfg, here=True))
    RunDir(runs_dir / cfg.name).read_manifest()  # an unusable run folder stops this before the lock is written
    stopped = stopped_before(runs_dir / cfg.name, still_queued)  # read before this run holds the lock
    # the run lock before anything of the run is written: no other `kolora run` or live submission's jobs
    # write it meanwhile (RunLocked names the holder)
    # RUNS_DIR/index.html after the lock is released, however the run ends (it then shows complete, failed, stopped)
    with (refreshed_after(runs_dir, armed=False) as index_due,
          acquire(runs_dir / cfg.name, "run", queued=still_queued)):
        index_due()  # this run holds its lock: whatever happens now, the index shows it
        if removed := sweep_temp(runs_dir / cfg.name):  # leftovers of a writer that was killed
            console.print(f"[dim]removed {removed} temp files of an interrupted earlier run[/]")
        run = runner.open_run(cfg, runs_dir)
        console.print(f"[bold]kolora run[/] {cfg.name} → {run.root}")
        if stopped:
            print(stopped.continuing(cfg.name), file=sys.stderr)
        t0 = time.time()
        run_all(cfg, run, tuple(args.stage or ()), args.force, RichStageDisplay(console))
        with run.manifest() as m:
            m["last_run_wall_s"] = round(time.time() - t0, 2)
        if run.grid_file.is_file():
            console.print(f"[bold green]grid:[/] {run.grid_file}")
            print(run.grid_file)
    return 0


def cmd_validate(args) -> int:

    cfg = load_config(args.config, args.overrides, args.name)
    resolve_runs_dir(args)
    print_warnings(runner.preflight(cfg))
    if args.cluster:

        profile_file = find_profile(args.cluster)
        profile = load_profile(profile_file)

        check_cluster(cfg, profile, str(profile_file))
        warn_attempt_window(cfg, profile)
        for line in check_gpu_memory(cfg, profile, profile_file, show=True):
            print(line)
    print(f"{args.config}: OK (run {cfg.name}, config {cfg.digest()})")
    return 0


def cmd_make_tiny(args) -> int:

    target = Path(args.path)
    if target.exists() and not (target / "TINY_RANDOM_MODEL.txt").is_file():
        kind = "a folder" if target.is_dir() else "a file"
        raise InputError(f"{target} exists and is {kind} that is not a tiny model made by kolora; make-tiny "
                         "replaces its target, so give a new path")
    path = build_tiny(target, layout=args.layout, seed=args.seed)
    print(path)
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline (or --stage ones) in this process")
    add_config_args(p)
    p.add_argument("--stage", action="append", choices=list(STAGE_NAMES),
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
