"""Interrupt bench: per kind of interruption, training steps redone and seconds from requeue to the first new step.

    KOLORA_DEVCLUSTER=/tmp/kdc-bench bash slurm/devcluster/up.sh    # or make cluster-up (.devcluster)
    KOLORA_DEVCLUSTER=/tmp/kdc-bench .venv/bin/python bench/interrupt.py [--steps 1500] [--kinds preempt,requeue,kill]

Kinds (configs/demo.yaml with train.steps=STEPS, train.checkpoint_every=50, render.steps=2, each in a fresh runs dir):
- preempt: `kolora submit`, wait for the first checkpoint, then `sbatch -p gpu-urgent --gres=gpu:2 --wrap 'sleep 5'`
  preempts the training job (USR2 → checkpoint at the next step → the job host `scontrol requeue`s it);
  seconds are from the host's "requeued job" log line to the first training step after the resume.
- requeue: `scontrol requeue <train job>` (SIGTERM → checkpoint → Slurm requeues); seconds from the host's
  "job received SIGTERM" line to the first new step.
- kill: in process, no Slurm: `kolora run --stage train` (ingest/filter/cache done once before), SIGKILL after
  its first checkpoint plus a few seconds, rerun; seconds from the rerun's start to its first new step.
- preempt-ddp, requeue-ddp: the same with `jobs.train.gpus: 2` (2 srun tasks, DDP over gloo): rank 0 decides the
  stop and broadcasts it, both ranks checkpoint at the same step, rank 0's host requeues once.
Steps redone = steps trained before the interruption − step resumed from (the "training stopped at step K" and
"resuming from ... (step N" log lines; K = N when the stop line is missing but N is off the
checkpoint_every grid, i.e. the signal's checkpoint; for kill, K is estimated from the step rate up to the kill). Step times are
metrics.csv's wall-clock column. Skips (exit 0) when there is no dev cluster (the kill kind alone: --kinds kill).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import REPO, base_parser, environment, report, skip, table

NAME = "interrupt"
DEMO = REPO / "configs" / "demo.yaml"
LOCAL = REPO / "slurm" / "clusters" / "local.yaml"
ENDED = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def cluster_env() -> dict[str, str] | None:
    """os.environ plus the dev cluster's env.sh ($KOLORA_DEVCLUSTER or .devcluster, as tests/conftest.py), or None
    when there is none or it does not answer."""
    root = os.environ.get("KOLORA_DEVCLUSTER")
    path = (Path(root) if root else REPO / ".devcluster") / "env.sh"
    if not path.is_file():
        return None
    values = dict(re.findall(r"^export ([A-Za-z_][A-Za-z0-9_]*)=['\"]?(.*?)['\"]?$", path.read_text(), re.M))
    env = {**os.environ, **values}
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%a"], env=env, capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return env if proc.returncode == 0 and "up" in proc.stdout.split() else None


def kolora(env: dict[str, str], *args: Any, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kolora.cli.main", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def stamp(line: str) -> float | None:
    m = STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def metrics(run: Path) -> list[dict[str, str]]:
    path = run / "train" / "metrics.csv"
    return list(csv.DictReader(open(path))) if path.is_file() else []


def step_time(rows: list[dict[str, str]], step: int) -> float | None:
    return next((float(r["time"]) for r in rows if int(r["step"]) == step and r.get("time")), None)


def redone(log: str) -> tuple[int | None, int | None]:
    """(K stopped at, N resumed from) of the first interruption in a job log."""
    stopped = re.search(r"training stopped at step (\d+)/", log)
    if not stopped:
        return None, None
    resumed = re.search(r"resuming from \S+ \(step (\d+) of", log[stopped.end():])
    return int(stopped.group(1)), (int(resumed.group(1)) if resumed else None)


def train_job(run: Path) -> str:
    slurm = json.loads((run / "manifest.json").read_text())["slurm"]
    return slurm["submissions"][slurm["latest"]]["jobs"]["train"]["job_id"]


def job_state(env: dict[str, str], job: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"], env=env, capture_output=True,
                         text=True, timeout=30).stdout.split()
    return out[-1] if out else ""


def wait_for(what: str, ready, timeout: float, failed=lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        why = failed()
        if why:
            raise SystemExit(f"{what}: {why}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.5)


def two_gpu_profile(base: Path) -> Path:
    import yaml

    profile = yaml.safe_load(LOCAL.read_text())
    profile["jobs"]["train"]["gpus"] = 2
    path = base / "ddp.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def slurm_kind(kind: str, env: dict[str, str], base: Path, overrides: list[str], timeout: float,
               every: int = 50) -> dict[str, Any]:
    runs = base / f"runs-{kind}"
    profile = two_gpu_profile(base) if kind.endswith("-ddp") else LOCAL
    proc = kolora(env, "submit", DEMO, "--cluster", profile, "--runs-dir", runs, "--name", kind, *overrides)
    if proc.returncode != 0:
        raise SystemExit(f"kolora submit failed: {proc.stderr[-2000:]}")
    run = runs / kind
    job = train_job(run)
    try:
        ended = lambda: job_state(env, job) if job_state(env, job).startswith(ENDED) else None  # noqa: E731
        wait_for(f"{kind}: first checkpoint of job {job}",
                 lambda: any((run / "train" / "checkpoints").glob("step=*.ckpt")), timeout, ended)
        if kind.startswith("preempt"):
            cmd = ["sbatch", "--parsable", "-p", "gpu-urgent", "--gres=gpu:2", "-J", "urgent",
                   "-o", str(base / "urgent.out"), "--wrap", "sleep 5"]
        else:
            cmd = ["scontrol", "requeue", job]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}: {out.stderr}")
        status_failed = lambda: ("the run failed" if job_state(env, job).startswith(ENDED) else None)  # noqa: E731
        wait_for(f"{kind}: grid.png", lambda: (run / "grid.png").is_file(), timeout, status_failed)
    finally:
        kolora(env, "cancel", kind, "--runs-dir", runs, timeout=60)
    log = "\n".join(p.read_text(errors="replace") for p in sorted((run / "slurm").rglob(f"{job}_*_log.err")))
    k, n = redone(log)
    if n is None:  # the child's "training stopped" line can be lost when Slurm ends the step (scontrol requeue)
        m = re.search(r"resuming from \S+ \(step (\d+) of", log)
        n = int(m.group(1)) if m else None
        # a checkpoint off the checkpoint_every grid was written on the signal, at the stop step
        k = n if n is not None and n % every != 0 else None
    mark = "requeued job" if kind.startswith("preempt") else "job received SIGTERM"
    t0 = next((stamp(line) for line in log.splitlines() if mark in line and stamp(line)), None)
    t1 = step_time(metrics(run), n + 1) if n is not None else None
    return {"stopped": k, "resumed": n, "redone": (k - n) if k is not None and n is not None else float("nan"),
            "to_step": (t1 - t0) if t0 and t1 else float("nan"), "from": mark}


def kill_kind(env: dict[str, str], base: Path, overrides: list[str], timeout: float, after: float) -> dict[str, Any]:
    runs = base / "runs-kill"
    common = ["run", DEMO, "--runs-dir", runs, "--name", "kill", *overrides]
    prep = kolora(env, *common, "--stage", "ingest", "--stage", "filter", "--stage", "cache", timeout=timeout)
    if prep.returncode != 0:
        raise SystemExit(f"kolora run (ingest, filter, cache) failed: {prep.stderr[-2000:]}")
    run = runs / "kill"
    train = [sys.executable, "-m", "kolora.cli.main", *map(str, common), "--stage", "train"]
    child = subprocess.Popen(train, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("kill: first checkpoint", lambda: any((run / "train" / "checkpoints").glob("step=*.ckpt")),
                 timeout, lambda: f"exited with {child.poll()}" if child.poll() is not None else None)
        time.sleep(after)
        before = metrics(run)  # rows up to the newest checkpoint
        t_kill = time.time()
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    ckpts = sorted(int(m.group(1)) for p in (run / "train" / "checkpoints").glob("step=*.ckpt")
                   if (m := re.search(r"step=(\d+)", p.name)))
    last = int(before[-1]["step"])
    first = next(r for r in before if int(r["step"]) > 1)
    rate = (last - int(first["step"])) / (float(before[-1]["time"]) - float(first["time"]))  # steps/s
    reached = last + round((t_kill - float(before[-1]["time"])) * rate)  # estimated: rows past it were not written
    t0 = time.time()
    rerun = subprocess.run(train, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if rerun.returncode != 0:
        raise SystemExit(f"kolora run --stage train (rerun) failed: {rerun.stderr[-2000:]}")
    m = re.search(r"resuming from \S+ \(step (\d+) of", rerun.stderr)
    n = int(m.group(1)) if m else (ckpts[-1] if ckpts else 0)
    t1 = step_time(metrics(run), n + 1)
    return {"stopped": reached, "resumed": n, "redone": reached - n, "to_step": (t1 - t0) if t1 else float("nan"),
            "from": "rerun start"}


ALL_OPTIONS = ["train.buckets=true", "train.min_snr_gamma=5", "train.noise_offset=0.05", "train.caption_dropout=0.1",
               "train.ema_decay=0.99", "train.dora=true"]


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--kinds", default="preempt,requeue,kill")
    p.add_argument("--timeout", type=float, default=420, help="seconds for each bounded wait")
    p.add_argument("--kill-after", type=float, default=3.0, help="seconds after the first checkpoint to SIGKILL")
    p.add_argument("--keep", action="store_true", help="keep the run dirs (under .cache/bench-interrupt)")
    p.add_argument("--options", choices=["off", "all"], default="off",
                   help="all: buckets, min-SNR, noise offset, caption dropout, EMA and DoRA on (what a run with "
                        "every training option loses to an interruption)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    env = cluster_env()
    if env is None and any(k != "kill" for k in kinds):
        return skip(NAME, "no dev cluster", "no-cluster")
    env = env or dict(os.environ)
    info = environment()
    # which Slurm, not where its conf lives on this machine (no machine path in RESULTS.md)
    info["cluster"] = ("dev cluster (slurm/devcluster)" if env.get("KOLORA_DEVCLUSTER") else "a Slurm cluster") \
        if env.get("SLURM_CONF") else "none (kill only)"
    from kolora.core.config import load_config
    from kolora.models.kolors import ensure_model

    ensure_model(load_config(DEMO).model)  # once here, not by two jobs at the same time
    overrides = ["--set", f"train.steps={args.steps}", "--set", "train.checkpoint_every=50",
                 "--set", "render.steps=2"]
    if args.options == "all":
        overrides += [arg for option in ALL_OPTIONS for arg in ("--set", option)]
    info["training options"] = args.options
    base = REPO / ".cache" / "bench-interrupt"  # the cluster's jobs must see the files
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    res: dict[str, dict[str, Any]] = {}
    try:
        for kind in kinds:
            t = time.monotonic()
            if kind == "kill":
                res[kind] = kill_kind(env, tmp, overrides, args.timeout, args.kill_after)
            else:
                res[kind] = slurm_kind(kind, env, tmp, overrides, args.timeout)
            print(f"  {kind}: {res[kind]} ({time.monotonic() - t:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    label = {"preempt": "preemption by gpu-urgent (USR2 → checkpoint → host requeue)",
             "requeue": "`scontrol requeue` (SIGTERM → checkpoint → Slurm requeue)",
             "preempt-ddp": "2-task DDP, preemption by gpu-urgent (rank 0 decides, both save, one requeue)",
             "requeue-ddp": "2-task DDP, `scontrol requeue` (SIGTERM to both ranks → one decision)",
             "kill": "SIGKILL of `kolora run --stage train`, rerun (no signal checkpoint)"}
    rows = [[label[k], r["stopped"], r["resumed"], r["redone"], r["from"], r["to_step"]] for k, r in res.items()]
    ddp = " DDP rows: jobs.train.gpus 2 (2 srun tasks, gloo), global batch 2 × train.batch_size." \
        if any(k.endswith("-ddp") for k in res) else ""
    body = (f"demo config, train.steps={args.steps}, checkpoint_every=50; one interruption per kind after the "
            f"first checkpoint.{ddp}\n\n" + table(["interruption", "stopped at step", "resumed from", "steps redone",
                                             "clock from", "s to first new step"], rows))
    keys = {"preempt": ("preempt_steps_redone", "preempt_requeue_to_step_s"),
            "requeue": ("requeue_steps_redone", "requeue_to_step_s"),
            "preempt-ddp": ("ddp_preempt_steps_redone", "ddp_preempt_requeue_to_step_s"),
            "requeue-ddp": ("ddp_requeue_steps_redone", "ddp_requeue_to_step_s"),
            "kill": ("kill_steps_redone", "kill_restart_to_step_s")}
    result: dict[str, Any] = {}
    for k, r in res.items():
        result[keys[k][0]] = r["redone"]
        result[keys[k][1]] = r["to_step"]
    notes = ["kill: the stop step is estimated from the step rate up to the kill (its rows were never written)."]
    report(NAME, "steps redone and restart latency per interruption", info, body, result,
           record=not args.no_record, notes=notes if "kill" in res else ())
    return 0


if __name__ == "__main__":
    sys.exit(main())
