"""`kolora sweep`, and `kolora status | cancel` of a sweep (kolora.cli.slurm hands a sweep's folder here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kolora.cli.args import add_config_args, resolve_runs_dir
from kolora.cli.checks import check_gpu_memory, print_warnings, warn_attempt_window
from kolora.cli.display import RichStageDisplay
from kolora.core import interrupt
from kolora.launch.cluster import find_profile, load_profile
from kolora.launch.cluster_check import check_cluster
from kolora.launch.monitor import scancel, squeue, still_queued
from kolora.launch.submit import LaunchError
from kolora.launch.sweep import submit_sweep
from kolora.launch.sweep_status import exit_code, format_status, status
from kolora.pipeline import runner
from kolora.sweep.index import refreshed_after
from kolora.sweep.manifest import read_manifest
from kolora.sweep.names import check_name
from kolora.sweep.plan import plan, run_in_process

# rich: imported in the functions that use them (a login node's CLI starts without them)


def cmd_sweep(args) -> int:
    from rich.console import Console


    console = Console(stderr=True)
    runs_dir = resolve_runs_dir(args)
    sweep = plan(args.config, args.vary, runs_dir, args.name, args.overrides)
    check_name(runs_dir, sweep.name, "sweep", {v.name: v.overrides for v in sweep.variants}, force=args.force)
    if args.cluster:
        return _submit(args, sweep)

    # Ctrl-C stops the variant running now like `kolora run`, and the sweep; RUNS_DIR/index.html afterwards
    with refreshed_after(runs_dir), interrupt.for_command():
        outcome = run_in_process(sweep, console, RichStageDisplay(console), force=args.force,
                                 queued=still_queued)
    failed = {n: o for n, o in outcome.items() if o != "complete"}

    print(format_status(status(sweep.dir)))
    print(sweep.dir / "sweep.html")
    if failed:
        print(f"kolora: sweep: {len(failed)} of {len(outcome)} variants failed: "
              + "; ".join(f"{n}: {o}" for n, o in failed.items()), file=sys.stderr)
        return 1
    return 0


def _submit(args, sweep) -> int:

    profile_file = find_profile(args.cluster)
    profile = load_profile(profile_file)
    print_warnings(list(dict.fromkeys(line for v in sweep.variants for line in runner.preflight(v.cfg))))
    check_cluster(sweep.variants[0].cfg, profile, str(profile_file), variants=len(sweep.variants))
    warn_attempt_window(sweep.variants[0].cfg, profile)
    for v in sweep.variants:
        check_gpu_memory(v.cfg, profile, profile_file, show=False)
    try:
        entry = submit_sweep(sweep, profile, profile_file.resolve())
    except LaunchError as e:
        print(f"kolora: sweep: {e}", file=sys.stderr)
        return 1
    jobs = entry["jobs"]
    print(f"sweep {sweep.name}: {len(sweep.variants)} variants, queued prep {jobs['prep']} → cache {jobs['cache']} "
          f"→ train array {jobs['train']} ({len(sweep.variants)} tasks, at most {entry['throttle']} at once) → "
          f"sheet {jobs['sheet']}; job folder {entry['folder']}")
    for v in sweep.variants:
        print(f"  {v.name}: {Path(sweep.dir) / v.name}")
    print(f"follow with: kolora status {sweep.name}   (per variant: kolora status {sweep.name}/<variant>)")
    return 0


def cmd_sweep_status(args, sweep_dir: Path) -> int:


    st = status(sweep_dir)
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
    return exit_code(bool(st["failed"]), bool(st["stopped"]))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="train several variants of a config (the product of --vary values) and compare them",
        description="One run folder per variant under RUNS/<name>/ (a normal run: status, resume and export work "
                    "on it); ingest/filter/cache run once and are shared; a comparison sheet sweep.html + "
                    "sweep.png ranks the variants. Without --cluster the variants run one after another here; "
                    "with it, one submission (training is one Slurm array, a task per variant).")
    add_config_args(p)
    p.add_argument("--vary", action="append", default=[], required=True, metavar="FIELD=V1,V2",
                   help="a field and its values, e.g. --vary train.lr=1e-4,3e-4 (repeatable: the product)")
    p.add_argument("--cluster", metavar="PROFILE", help="submit to Slurm with this cluster profile")
    p.add_argument("--force", action="store_true",
                   help="replace the plan of an earlier sweep of this name that has other variants (their folders "
                        "are kept, listed as superseded in sweep.json); in process also: rerun every stage of "
                        "every variant")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep_cancel(sweep_dir: Path) -> int:
    """Cancel every queued job of the sweep's latest submission (the variants' tasks included)."""

    entry = read_manifest(sweep_dir).get("slurm") or {}
    ids = list((entry.get("jobs") or {}).values())
    queued = sorted({r["base"] for r in squeue(ids)})
    scancel(queued)
    name = Path(sweep_dir).name
    print(f"sweep {name}: cancelled {' '.join(queued)}" if queued else f"sweep {name}: no job in the queue")
    return 0
