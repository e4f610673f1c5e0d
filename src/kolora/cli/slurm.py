"""`kolora submit|resume|status|logs|cancel`: the commands that talk to Slurm (their pre-queue checks are
kolora.cli.checks'; `status` and `cancel` of a sweep are kolora.cli.sweep's)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kolora.cli.args import add_config_args, resolve_runs_dir, whole_number
from kolora.cli.checks import check_gpu_memory, print_warnings, warn_attempt_window
from kolora.cli.sweep import cmd_sweep_cancel, cmd_sweep_status
from kolora.core.config import load_config
from kolora.core.errors import EXIT_INPUT, ConfigError, InputError
from kolora.launch import container
from kolora.launch.cluster import (
    ClusterProfile,
    find_profile,
    load_profile,
    node_range_problem,
    node_request,
    parse_nodes,
)
from kolora.launch.cluster_check import check_cluster
from kolora.launch.monitor import (
    cancel,
    environment_hint,
    format_status,
    pick_log,
    resolve_run,
    status,
    still_queued,
    tail,
)
from kolora.launch.submit import LaunchError, dry_run, format_submitted, submit
from kolora.launch.sweep_status import exit_code, format_local_run
from kolora.pipeline import runner
from kolora.pipeline.state import run_state, stopped_before
from kolora.sweep.manifest import find_sweep
from kolora.sweep.names import NameTaken, check_name, describe_sweep
from kolora.train import distributed


def run_named(args):
    """The run folder `args.run` names; a sweep's folder is refused with the VARIANT paths to give instead."""

    runs_dir = resolve_runs_dir(args)
    try:
        return resolve_run(args.run, runs_dir)
    except ConfigError:
        for cand in (Path(args.run).expanduser(), Path(runs_dir) / args.run):
            if sweep := describe_sweep(cand):
                raise NameTaken(sweep) from None
        raise


def node_range(text: str) -> int | str:
    """argparse type of --nodes: a node count or MIN-MAX, as jobs.train.nodes takes it."""
    try:
        return node_request(*parse_nodes(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def override_train(profile: ClusterProfile, command: str, gpus: int | None = None,
                   nodes: int | str | None = None) -> ClusterProfile:
    """The profile with `--gpus` / `--nodes` in place of its jobs.train.gpus / nodes; InputError naming the
    option when the node range cannot keep one global batch."""
    changes = {key: value for key, value in (("gpus", gpus), ("nodes", nodes)) if value is not None}
    if not changes:
        return profile
    jobs = profile.jobs.model_copy(update={"train": profile.jobs.train.model_copy(update=changes)})
    profile = profile.model_copy(update={"jobs": jobs})
    r = profile.resources("train")
    if nodes is not None and (problem := node_range_problem(r.gpus, r.min_nodes, r.nodes)):
        raise InputError(f"{command} --nodes {nodes}: {problem}")
    return profile


def cmd_submit(args) -> int:

    cfg = load_config(args.config, args.overrides, args.name)
    profile_file = find_profile(args.cluster)
    profile = override_train(load_profile(profile_file), "submit", nodes=args.nodes)
    runs_dir = resolve_runs_dir(args)
    check_name(runs_dir, cfg.name, "run")  # --dry-run too: it shows what a submission would do
    print_warnings(runner.preflight(cfg))
    check_cluster(cfg, profile, str(profile_file))
    warn_attempt_window(cfg, profile)
    gpu_memory = check_gpu_memory(cfg, profile, profile_file, show=args.dry_run)
    if profile.container is not None and not args.dry_run:

        container.check_image(profile.container)
    if args.dry_run:
        print(dry_run(cfg, profile, runs_dir))
        for line in gpu_memory:
            print(line)
        return 0
    return _queue("submit", cfg, profile, runs_dir, profile_file)


def cmd_resume(args) -> int:

    run = run_named(args)
    # the folder's name, not the one its config.yaml was written with: a copied or renamed run folder resumes
    # itself, never the run it was copied from
    cfg = run.load_config(name=run.root.name)
    check_name(run.root.parent, cfg.name, "run")
    manifest = run.read_manifest().get("slurm", {})
    profile_ref = args.cluster or (manifest.get("submissions", {}).get(manifest.get("latest"), {})
                                   .get("profile_file"))
    if not profile_ref:
        print(f"kolora: resume: run {run.root.name} was never submitted; pass --cluster PROFILE",
              file=sys.stderr)
        return EXIT_INPUT
    profile_file = find_profile(profile_ref)
    # elastic: training continues on M GPUs / N nodes, accumulating to keep its global batch
    profile = override_train(load_profile(profile_file), "resume", gpus=args.gpus, nodes=args.nodes)
    print_warnings(runner.preflight(cfg))
    check_cluster(cfg, profile, str(profile_file))
    try:  # a checkpoint's global batch that this GPU count cannot keep: refused before queueing
        distributed.check_resume(run.train, cfg.train.batch_size, profile.resources("train").worlds())
    except InputError as e:
        print(f"kolora: resume: {e}", file=sys.stderr)
        return EXIT_INPUT
    warn_attempt_window(cfg, profile)
    check_gpu_memory(cfg, profile, profile_file, show=False)
    return _queue("resume", cfg, profile, run.root.parent, profile_file, only_incomplete=True)


def _queue(command: str, cfg, profile, runs_dir, profile_file, **kw) -> int:

    stopped = stopped_before(runs_dir / cfg.name, still_queued)  # read before the submission takes the run lock
    try:
        sub = submit(cfg, profile, runs_dir, profile_file.resolve(), check=False, **kw)
    except LaunchError as e:
        print(f"kolora: {command}: {e}", file=sys.stderr)
        return 1
    if stopped:
        print(stopped.continuing(cfg.name), file=sys.stderr)
    print(format_submitted(sub))
    return 0


def cmd_status(args) -> int:


    if sweep_dir := find_sweep(args.run, resolve_runs_dir(args)):
        return cmd_sweep_status(args, sweep_dir)
    run = run_named(args)
    if not (run.read_manifest().get("slurm") or {}).get("latest") and not args.json:

        text, code = format_local_run(run)
        print(text)
        return code

    st = status(run)
    state = run_state(run, queued=still_queued)
    st["state"] = {"state": state.state, "stage": state.stage, "detail": state.detail, "complete": list(state.complete)}
    st["stopped"] = state.line() if state.state == "stopped" and not st["failed"] else None
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        print(format_status(st))
        hint = environment_hint()
        if hint and all(r["state"] == "UNKNOWN" for r in st["jobs"]):
            print(f"hint: {hint}", file=sys.stderr)
    return exit_code(bool(st["failed"]), bool(st["stopped"]))


def cmd_logs(args) -> int:

    run = run_named(args)
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

    if sweep_dir := find_sweep(args.run, resolve_runs_dir(args)):
        return cmd_sweep_cancel(sweep_dir)
    run = run_named(args)
    cancelled, left = cancel(run)
    if not cancelled:
        print(f"run {run.root.name}: no job in the queue")
    else:
        print(f"run {run.root.name}: cancelled {' '.join(cancelled)}")
    if left:
        print(f"kolora: still in the queue after 30 s: {' '.join(left)}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("submit", help="queue the pipeline on Slurm (filter → train → render array → grid); "
                                      "returns at once")
    add_config_args(p)
    p.add_argument("--cluster", required=True, metavar="PROFILE",
                   help="cluster profile: a YAML path or a name in slurm/clusters/ (e.g. local)")
    p.add_argument("--dry-run", action="store_true", help="print every job's sbatch parameters; queue nothing")
    p.add_argument("--nodes", type=node_range, metavar="N|MIN-MAX",
                   help="nodes of the train job (overrides the profile's jobs.train.nodes): a count, or a range "
                        "such as 1-2 (starts on what is free; the global batch is planned for MAX)")
    p.set_defaults(func=cmd_submit)

    def _add_run_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("run", help="run name (under --runs-dir) or run directory (status: also a sweep)")
        p.add_argument("--runs-dir", help="where run directories are (default: $KOLORA_RUNS or ./runs)")

    p = sub.add_parser("status", help="Slurm state and progress of every job of a submitted run, or of every "
                                      "variant of a sweep (and the best so far); exit status 1 when a stage "
                                      "failed, 3 when the run stopped (its process or jobs are gone)")
    _add_run_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="print (or follow) a job's submitit log; default: the failed or latest job")
    _add_run_arg(p)
    p.add_argument("--stage", help="a stage (ingest, filter, cache, train, render, grid) or job name")
    p.add_argument("--task", type=whole_number(0), help="render array task index")
    p.add_argument("--rank", type=whole_number(0), default=0,
                   help="global rank (srun task) of a multi-GPU or multi-node train job (default 0)")
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
    p.add_argument("--nodes", type=node_range, metavar="N|MIN-MAX",
                   help="nodes of the train job (overrides the profile's jobs.train.nodes), like --gpus")
    p.set_defaults(func=cmd_resume)

