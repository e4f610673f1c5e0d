"""The `kolora` command. Starts fast on a login node: stage modules (torch, diffusers, Data-Juicer) are
imported only by the commands that run them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from kolora.config import ConfigError
from kolora.errors import (
    EXIT_FAILURE,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    InputError,
    KoloraError,
    describe_os_error,
)
from kolora.interrupt import Interrupted


def _runs_dir(args) -> Path:
    given = args.runs_dir or os.environ.get("KOLORA_RUNS")
    path = Path(given or "runs").expanduser().resolve()
    if path.exists() and not path.is_dir():
        where = "--runs-dir" if args.runs_dir else "$KOLORA_RUNS" if given else "./runs"
        raise InputError(f"{where} {path} is a file, not a folder; give a folder for the run directories")
    return path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (e.g. configs/demo.yaml)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--runs-dir", help="where run directories go (default: $KOLORA_RUNS or ./runs)")


def cmd_run(args) -> int:
    from rich.console import Console

    from kolora.config import load_config
    from kolora.pipeline import open_run, preflight
    from kolora.rundir import RunDir, sweep_temp
    from kolora.runlock import acquire

    console = Console(stderr=True)
    cfg = load_config(args.config, args.overrides, args.name)
    runs_dir = _runs_dir(args)
    preflight(cfg, here=True)
    RunDir(runs_dir / cfg.name).read_manifest()  # an unusable run folder stops this before the lock is written
    # the run lock before anything of the run is written: no other `kolora run` or live submission's jobs
    # write it meanwhile (RunLocked names the holder)
    with acquire(runs_dir / cfg.name, "run"):
        if removed := sweep_temp(runs_dir / cfg.name):  # leftovers of a writer that was killed
            console.print(f"[dim]removed {removed} temp files of an interrupted earlier run[/]")
        run = open_run(cfg, runs_dir)
        console.print(f"[bold]kolora run[/] {cfg.name} → {run.root}")
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

    from kolora.pipeline import run_stage
    from kolora.stages import NAMES

    stages = selected or NAMES
    for n, stage in enumerate(stages, 1):
        label = f"[{n}/{len(stages)}] {stage:<7}"
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task(stage, total=None)

            def progress(done: int, total: int, _bar=bar, _task=task) -> None:
                _bar.update(_task, completed=done, total=total)

            summary = run_stage(stage, cfg, run, force=force and stage in stages, progress=progress)
        for note in summary.get("notes", []):
            console.print(f"{label} [yellow]{note}[/]")
        if summary.get("skipped"):
            console.print(f"{label} [dim]complete, skipped[/]")
        else:
            shown = ", ".join(f"{k}={v}" for k, v in summary.items() if k not in ("wall_s",) and
                              not isinstance(v, dict | list))
            console.print(f"{label} [green]done[/] in {summary['wall_s']:.1f} s  [dim]{shown}[/]")


def cmd_validate(args) -> int:
    from kolora.config import load_config
    from kolora.pipeline import preflight

    cfg = load_config(args.config, args.overrides, args.name)
    _runs_dir(args)
    preflight(cfg)
    if args.cluster:
        from kolora.cluster import find_profile, load_profile

        profile_file = find_profile(args.cluster)
        profile = load_profile(profile_file)
        _warn_attempt_window(cfg, profile)
        for line in _check_gpu_memory(cfg, profile, profile_file, show=True):
            print(line)
    print(f"{args.config}: OK (run {cfg.name}, config {cfg.digest()})")
    return 0


def _warn_attempt_window(cfg, profile) -> None:
    from kolora.launch.plan import attempt_window_warnings

    for line in attempt_window_warnings(cfg, profile):
        print(f"kolora: warning: {line}", file=sys.stderr)


def _check_gpu_memory(cfg, profile, profile_file, show: bool) -> list[str]:
    """One line per GPU stage: its estimated peak GPU memory (kolora.memplan) against the profile's
    jobs.<job>.gpu_mem_gb. A stage that does not fit stops the command (exit 2) before anything is queued.
    Without `show`, nothing is estimated unless the profile gives a gpu_mem_gb."""
    from kolora.launch.plan import gpu_memory_check, has_gpu_mem_limits
    from kolora.memplan import GPUMemoryError

    if not (show or has_gpu_mem_limits(profile)):
        return []
    try:
        lines, refusals = gpu_memory_check(cfg, profile, str(profile_file))
    except KoloraError:
        raise
    except Exception as e:  # noqa: BLE001 - an estimate that cannot be made must not block a submission
        print(f"kolora: warning: GPU memory not estimated ({type(e).__name__}: {e})", file=sys.stderr)
        return []
    if refusals:
        for line in lines if show else []:
            print(line)
        raise GPUMemoryError("\n".join(refusals))
    return lines


def cmd_make_tiny(args) -> int:
    from kolora.models import build_tiny

    target = Path(args.path)
    if target.exists() and not (target / "TINY_RANDOM_MODEL.txt").is_file():
        kind = "a folder" if target.is_dir() else "a file"
        raise InputError(f"{target} exists and is {kind} that is not a tiny model made by kolora; make-tiny "
                         "replaces its target, so give a new path")
    path = build_tiny(target, layout=args.layout, seed=args.seed)
    print(path)
    return 0


def cmd_submit(args) -> int:
    from kolora.cluster import find_profile, load_profile
    from kolora.config import load_config
    from kolora.launch.submit import LaunchError, dry_run, format_submitted, submit
    from kolora.pipeline import preflight

    cfg = load_config(args.config, args.overrides, args.name)
    profile_file = find_profile(args.cluster)
    profile = load_profile(profile_file)
    runs_dir = _runs_dir(args)
    preflight(cfg)
    _warn_attempt_window(cfg, profile)
    gpu_memory = _check_gpu_memory(cfg, profile, profile_file, show=args.dry_run)
    if profile.container is not None and not args.dry_run:
        from kolora.container import check_image

        check_image(profile.container)
    if args.dry_run:
        print(dry_run(cfg, profile, runs_dir))
        for line in gpu_memory:
            print(line)
        return 0
    try:
        sub = submit(cfg, profile, runs_dir, profile_file.resolve(), check=False)
    except LaunchError as e:
        print(f"kolora: submit: {e}", file=sys.stderr)
        return 1
    print(format_submitted(sub))
    return 0


def cmd_resume(args) -> int:
    from kolora import distributed
    from kolora.cluster import find_profile, load_profile
    from kolora.launch.monitor import resolve_run
    from kolora.launch.submit import LaunchError, format_submitted, submit
    from kolora.pipeline import preflight

    run = resolve_run(args.run, _runs_dir(args))
    cfg = run.load_config()
    manifest = run.read_manifest().get("slurm", {})
    profile_ref = args.cluster or (manifest.get("submissions", {}).get(manifest.get("latest"), {})
                                   .get("profile_file"))
    if not profile_ref:
        print(f"kolora: resume: run {run.root.name} was never submitted; pass --cluster PROFILE",
              file=sys.stderr)
        return EXIT_INPUT
    profile_file = find_profile(profile_ref)
    profile = load_profile(profile_file)
    if args.gpus is not None:  # elastic: training continues on M GPUs, accumulating to keep its global batch
        jobs = profile.jobs.model_copy(update={"train": profile.jobs.train.model_copy(update={"gpus": args.gpus})})
        profile = profile.model_copy(update={"jobs": jobs})
    preflight(cfg)
    try:  # a checkpoint's global batch that this GPU count cannot keep: refused before queueing
        distributed.check_resume(run.train, cfg.train.batch_size, profile.resources("train"))
    except InputError as e:
        print(f"kolora: resume: {e}", file=sys.stderr)
        return EXIT_INPUT
    _warn_attempt_window(cfg, profile)
    _check_gpu_memory(cfg, profile, profile_file, show=False)
    try:
        sub = submit(cfg, profile, run.root.parent, profile_file.resolve(), check=False, only_incomplete=True)
    except LaunchError as e:
        print(f"kolora: resume: {e}", file=sys.stderr)
        return 1
    print(format_submitted(sub))
    return 0


def cmd_status(args) -> int:
    import json

    from kolora.launch.monitor import environment_hint, format_status, resolve_run, status
    from kolora.sweep import find_sweep

    if sweep_dir := find_sweep(args.run, _runs_dir(args)):
        from kolora.cli_sweep import cmd_sweep_status

        return cmd_sweep_status(args, sweep_dir)
    run = resolve_run(args.run, _runs_dir(args))
    if not (run.read_manifest().get("slurm") or {}).get("latest") and not args.json:
        from kolora.sweep_status import format_local_run

        text, failed = format_local_run(run)
        print(text)
        return 1 if failed else 0
    st = status(run)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        print(format_status(st))
        hint = environment_hint()
        if hint and all(r["state"] == "UNKNOWN" for r in st["jobs"]):
            print(f"hint: {hint}", file=sys.stderr)
    return 1 if st["failed"] else 0


def cmd_logs(args) -> int:
    from kolora.launch.monitor import pick_log, resolve_run, tail

    run = resolve_run(args.run, _runs_dir(args))
    job, task_id, (out, err) = pick_log(run, args.stage, args.task, args.rank)
    paths = {"out": [out], "err": [err], "both": [out, err]}[args.stream]
    existing = [p for p in paths if p.is_file()]
    if not existing:
        print(f"kolora: job {job} ({task_id}) has no log yet: {' '.join(map(str, paths))}", file=sys.stderr)
        return 1
    if args.follow:
        # tail -F: follows the files across requeues (submitit appends); Ctrl-C to stop
        os.execvp("tail", ["tail", "-n", str(args.tail or 50), "-F", *map(str, existing)])
    for p in existing:
        if len(existing) > 1:
            print(f"==> {p} <==")
        sys.stdout.write(tail(p, args.tail))
    return 0


def cmd_cancel(args) -> int:
    from kolora.launch.monitor import cancel, resolve_run
    from kolora.sweep import find_sweep

    if sweep_dir := find_sweep(args.run, _runs_dir(args)):
        from kolora.cli_sweep import cmd_sweep_cancel

        return cmd_sweep_cancel(sweep_dir)
    run = resolve_run(args.run, _runs_dir(args))
    cancelled, left = cancel(run)
    if not cancelled:
        print(f"run {run.root.name}: no job in the queue")
    else:
        print(f"run {run.root.name}: cancelled {' '.join(cancelled)}")
    if left:
        print(f"kolora: still in the queue after 30 s: {' '.join(left)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kolora import cli_models  # fetch, check, export, import-lora
    from kolora.cli_models import whole_number
    from kolora.stages import NAMES as stage_names

    parser = argparse.ArgumentParser(
        prog="kolora", description="Kolors LoRA training kit for Slurm clusters.",
        epilog="exit status: 0 ok; 1 a failure while running; 2 input to fix (config, cluster profile, prompt set, "
               "dataset, LoRA file, run folder, argument: the message names the file and field); 3 interrupted "
               "(run the same command again to resume). Add -v to see the traceback of an error.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks with errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline (or --stage ones) in this process")
    _add_config_args(p)
    p.add_argument("--stage", action="append", choices=list(stage_names),
                   help="run only this stage (repeatable); default all")
    p.add_argument("--force", action="store_true",
                   help="rerun the selected stages even if complete; train starts over (its checkpoints and LoRA "
                        "are discarded, not moved to superseded/)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a config, its prompt set, model and data paths; run nothing")
    _add_config_args(p)
    p.add_argument("--cluster", metavar="PROFILE", help="also check the run against this cluster profile "
                   "(whether each requeued job's time limit leaves room to load the models; each GPU "
                   "stage's estimated peak memory against jobs.<job>.gpu_mem_gb)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("submit", help="queue the pipeline on Slurm (filter → train → render array → grid); "
                                      "returns at once")
    _add_config_args(p)
    p.add_argument("--cluster", required=True, metavar="PROFILE",
                   help="cluster profile: a YAML path or a name in slurm/clusters/ (e.g. local)")
    p.add_argument("--dry-run", action="store_true", help="print every job's sbatch parameters; queue nothing")
    p.set_defaults(func=cmd_submit)

    def _add_run_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("run", help="run name (under --runs-dir) or run directory (status: also a sweep)")
        p.add_argument("--runs-dir", help="where run directories are (default: $KOLORA_RUNS or ./runs)")

    p = sub.add_parser("status", help="Slurm state and progress of every job of a submitted run, or of every "
                                      "variant of a sweep (and the best so far)")
    _add_run_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="print (or follow) a job's submitit log; default: the failed or latest job")
    _add_run_arg(p)
    p.add_argument("--stage", help="a stage (ingest, filter, cache, train, render, grid) or job name")
    p.add_argument("--task", type=whole_number(0), help="render array task index")
    p.add_argument("--rank", type=whole_number(0), default=0, help="srun task of a multi-GPU train job (default 0)")
    p.add_argument("--stream", choices=["out", "err", "both"], default="both")
    p.add_argument("-n", "--tail", type=whole_number(1), metavar="N", help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows (tail -F)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel every queued or running job of a run (or of a sweep)")
    _add_run_arg(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", help="resubmit only the stages of a run that are not complete (after a "
                                      "crash, a cancel, or a job that ran out of requeues)")
    _add_run_arg(p)
    p.add_argument("--cluster", help="cluster profile (default: the one of the run's last submission)")
    p.add_argument("--gpus", type=whole_number(1), metavar="M",
                   help="GPUs per node for the train job (overrides the profile's jobs.train.gpus): a run "
                        "checkpointed on another GPU count continues with gradient accumulation keeping its global "
                        "batch, or is refused when M cannot keep it")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("make-tiny", help="write tiny random Kolors-shaped models (tests, demos)")
    p.add_argument("path")
    p.add_argument("--layout", choices=["diffusers", "diffsynth"], default="diffusers")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)
    cli_models.register(sub)
    from kolora import cli_sweep

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
    except Interrupted as e:
        print(f"kolora: interrupted: {e}. Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KoloraError as e:
        _explain(e, verbose, "config error" if isinstance(e, ConfigError) else "error")
        return e.exit_code
    except OSError as e:  # a full disk, a permission, a path that is not a folder
        _explain(e, verbose, "error", describe_os_error(e))
        return EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - anything else is a bug: show where
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
