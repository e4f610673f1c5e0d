"""Submit bench: `kolora submit` of the demo's whole job graph on the dev Slurm cluster, and queue latency.

    make cluster-up && source .devcluster/env.sh      # the project's single-machine Slurm
    .venv/bin/python bench/submit.py [--repeats 3] [--keep]

Per repeat: `kolora submit configs/demo.yaml --cluster slurm/clusters/local.yaml` in a new runs dir (CLI in a
subprocess: interpreter start, imports, preflight, sbatch of filter → train → render array → grid), then squeue
is polled every 0.1 s until the first job of the run is RUNNING (Slurm's own Submit → Start from sacct beside
it, 1 s resolution), then the run is cancelled (`kolora cancel`; --keep leaves the last one running).
Skips (exit 0) when the cluster is not up or `kolora submit` does not exist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import REPO, base_parser, environment, median, report, skip, table

NAME = "submit"
RUNNING = {"RUNNING", "COMPLETING", "COMPLETED"}


def kolora_cli() -> list[str]:
    exe = Path(sys.executable).parent / "kolora"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "kolora.cli.main"]


def slurm_env() -> dict[str, str]:
    """os.environ plus the dev cluster's env.sh (SLURM_CONF, KOLORA_DEVCLUSTER) when it exists."""
    env = dict(os.environ)
    state = Path(env.get("KOLORA_DEVCLUSTER") or REPO / ".devcluster")
    env_sh = state / "env.sh"
    if "SLURM_CONF" not in env and env_sh.is_file():
        for line in env_sh.read_text().splitlines():
            if line.startswith("export ") and "=" in line:
                key, value = line.removeprefix("export ").split("=", 1)
                env[key.strip()] = value.strip().strip("'\"")
    return env


def why_not(env: dict[str, str]) -> tuple[str, str] | None:
    """(reason, code) when this machine cannot run the bench, else None."""
    help_ = subprocess.run([*kolora_cli(), "submit", "--help"], capture_output=True, text=True, env=env)
    if help_.returncode != 0:
        return "kolora submit not available", "no-submit"
    for tool in ("sbatch", "squeue", "sacct", "scancel", "sinfo"):
        if shutil.which(tool, path=env.get("PATH")) is None:
            return f"{tool} not found (no Slurm here; on the dev cluster: make cluster-up)", "no-slurm"
    try:
        ok = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, env=env, timeout=5)
    except subprocess.TimeoutExpired:
        ok = None
    if ok is None or ok.returncode != 0 or not ok.stdout.strip():
        return ("the Slurm cluster does not answer (make cluster-up; source .devcluster/env.sh)",
                "cluster-down")
    return None


def job_ids(run_dir: Path) -> list[str]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return list(manifest["slurm"]["jobs"].values())


def manifest_submit_s(run_dir: Path) -> float | None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    sub = manifest["slurm"]["submissions"][manifest["slurm"]["latest"]]
    return sub.get("submit_s")


def first_running(ids: list[str], env: dict[str, str], timeout: float) -> float | None:
    """perf_counter() time at which squeue first shows one of `ids` (or an array task of them) RUNNING."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True, text=True,
                             env=env).stdout
        if any(line.split()[1] in RUNNING for line in out.splitlines() if len(line.split()) == 2):
            return time.perf_counter()
        if not out.strip():  # left the queue between two polls: it ran
            return time.perf_counter()
        time.sleep(0.1)
    return None


def sacct_queue_wait(ids: list[str], env: dict[str, str]) -> float | None:
    """Slurm's own Submit → Start of the first job to start (whole seconds)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,Submit,Start"],
                         capture_output=True, text=True, env=env).stdout
    waits = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            try:
                waits.append((datetime.fromisoformat(parts[2]) - datetime.fromisoformat(parts[1])).total_seconds())
            except ValueError:
                continue  # Start = Unknown / None
    return min(waits) if waits else None


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--cluster", default=str(REPO / "slurm" / "clusters" / "local.yaml"))
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the first job to run")
    p.add_argument("--keep", action="store_true", help="leave the last submitted run in the queue")
    args = p.parse_args(argv)
    env = slurm_env()
    reason = why_not(env)
    if reason:
        return skip(NAME, *reason)
    info = environment()
    cluster = Path(args.cluster).resolve()
    info["cluster"] = str(cluster.relative_to(REPO)) if cluster.is_relative_to(REPO) else args.cluster

    cli_s: list[float] = []
    inner_s: list[float] = []
    first_s: list[float] = []
    sacct_s: list[float] = []
    # Under the repo's .cache (the cluster's jobs must see the files; /tmp may be private to a job)
    base = REPO / ".cache" / "bench-submit"
    base.mkdir(parents=True, exist_ok=True)
    run_dir: Path | None = None
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    try:
        model = tmp / "tiny"
        subprocess.run([*kolora_cli(), "make-tiny", str(model)], check=True, env=env, capture_output=True)
        for r in range(args.repeats):
            runs = tmp / f"runs-{r}"
            cmd = [*kolora_cli(), "submit", str(args.config), "--cluster", args.cluster, "--runs-dir", str(runs),
                   "--set", f"model.path={model}"]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            t1 = time.perf_counter()
            if res.returncode != 0:
                print(res.stdout + res.stderr, file=sys.stderr)
                raise SystemExit(f"`{' '.join(cmd)}` failed (rc {res.returncode})")
            run_dir = next(d for d in runs.iterdir() if (d / "manifest.json").is_file())
            ids = job_ids(run_dir)
            t_run = first_running(ids, env, args.timeout)
            cli_s.append(t1 - t0)
            inner_s.append(manifest_submit_s(run_dir) or float("nan"))
            first_s.append((t_run - t0) if t_run else float("nan"))
            wait = sacct_queue_wait(ids, env)
            sacct_s.append(wait if wait is not None else float("nan"))
            print(f"  repeat {r + 1}: submit {cli_s[-1]:.2f} s (in kolora {inner_s[-1]:.2f} s), first job running "
                  f"after {first_s[-1]:.2f} s; {len(ids)} jobs {' '.join(ids)}", flush=True)
            if not (args.keep and r == args.repeats - 1):
                subprocess.run([*kolora_cli(), "cancel", str(run_dir)], env=env, capture_output=True)
    finally:
        if args.keep:
            print(f"left in the queue: {run_dir} (kolora status {run_dir}; kolora cancel {run_dir})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    rows: list[list[Any]] = [
        ["`kolora submit` command (interpreter + imports + preflight + sbatch × 4)", median(cli_s), min(cli_s)],
        ["  of which submit() itself (manifest submit_s)", median(inner_s), min(inner_s)],
        ["submit start → first job RUNNING (squeue, 0.1 s polls)", median(first_s), min(first_s)],
        ["Slurm Submit → Start of the first job (sacct, 1 s resolution)", median(sacct_s), min(sacct_s)],
    ]
    body = (f"{args.repeats} submissions of the demo's job graph (filter → train → render array → grid), each "
            "cancelled after its first job started.\n\n" + table(["", "median s", "min s"], rows))
    result = {"submit_s": median(cli_s), "submit_inner_s": median(inner_s), "first_running_s": median(first_s),
              "slurm_queue_wait_s": median(sacct_s), "repeats": args.repeats}
    report(NAME, "`kolora submit` on the dev cluster", info, body, result, record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
