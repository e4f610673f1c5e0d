"""status / logs / cancel for a submitted run: Slurm's view (squeue, sacct) joined with the run directory's.

Every Slurm client call is an argument list with a timeout; a missing or silent client degrades to "state
unknown" instead of hanging. Progress comes from files the stages write anyway (manifest, filter report,
train metrics, render tiles), so it works the same whoever launched the stages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from kolora.core.config import load_config
from kolora.core.errors import ConfigError, InputError
from kolora.core.rundir import RunDir
from kolora.launch.cluster import JOBS, job_of
from kolora.launch.plan import table
from kolora.pipeline.registry import NAMES
from kolora.render.tiles import all_tiles, missing_tiles
from kolora.train import metrics as train_metrics

# states after which a job never runs again (PREEMPTED/REQUEUED jobs come back as PENDING)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "REVOKED", "SPECIAL_EXIT")
GONE = "GONE"  # neither queued (squeue answered) nor accounted: Slurm has forgotten it, it runs no more
BAD = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT")
_BRACKET = re.compile(r"^(?P<base>\d+)_\[(?P<spec>[^\]]*)\]$")


def slurm_client(args: list[str], timeout: float = 20) -> subprocess.CompletedProcess | None:
    """A Slurm client's answer, None when it is missing or does not answer within `timeout` seconds."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):  # missing, not executable, or silent
        return None


def _expand_array_spec(base: str, spec: str) -> list[str]:
    """'125', '1-3%2' → ['125_1', '125_2', '125_3'] (sacct's and squeue's folded pending array tasks)."""
    out = []
    for part in spec.split("%")[0].split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += [f"{base}_{i}" for i in range(int(a), int(b) + 1)]
        elif part.strip():
            out.append(f"{base}_{int(part)}")
    return out


def _rows(text: str, fields: list[str]) -> list[dict[str, str]]:
    rows = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != len(fields):
            continue
        row = dict(zip(fields, parts, strict=True))
        row["State"] = row["State"].split()[0] if row["State"] else ""  # "CANCELLED by 0" → CANCELLED
        m = _BRACKET.match(row["JobID"])
        ids = _expand_array_spec(m["base"], m["spec"]) if m else [row["JobID"]]
        for task_id in ids:
            rows.append({**row, "JobID": task_id, "base": task_id.split("_")[0]})
    return rows


def queue_rows(ids: list[str]) -> list[dict[str, str]] | None:
    """Rows of the jobs (array tasks expanded) still in the queue; None when squeue does not answer (missing,
    timed out, controller down), which is not the same as "none"."""
    if not ids:
        return []
    proc = slurm_client(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%P|%r"])
    if proc is None:
        return None
    if proc.returncode != 0:  # one id the controller has already forgotten: "Invalid job id specified"
        return [] if "invalid job id" in (proc.stderr or "").lower() else None
    return _rows(proc.stdout, ["JobID", "State", "Partition", "Reason"])


def squeue(ids: list[str]) -> list[dict[str, str]]:
    """Rows of the jobs (array tasks expanded) still in the queue ([] also when squeue does not answer)."""
    return queue_rows(ids) or []


def still_queued(ids: list[str]) -> set[str] | None:
    """Which of the job ids (array job ids for arrays) Slurm still has pending or running; None when squeue does
    not answer."""
    rows = queue_rows(ids)
    return None if rows is None else {r["base"] for r in rows if r["State"] not in ENDED} & set(ids)


def sacct(ids: list[str]) -> list[dict[str, str]] | None:
    """Accounting rows (one per array task), or None when sacct does not answer (no accounting)."""
    if not ids:
        return []
    fields = ["JobID", "State", "Partition", "ExitCode", "Start", "End", "Elapsed", "AllocTRES", "NodeList"]
    proc = slurm_client(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), f"--format={','.join(fields)}"])
    if proc is None or proc.returncode != 0:
        return None
    return _rows(proc.stdout, fields)


ATTEMPT_FIELDS = ["JobID", "State", "NodeList", "Start", "End", "ExitCode", "Reason"]


def attempts(job_id: str) -> list[dict[str, Any]] | None:
    """Every attempt of a job Slurm requeued (a node failure, a preemption, kolora's own requeue at the time
    limit), oldest first, from `sacct --duplicates`: its state, nodes, start and end, exit code and the last
    reason it was held. None when sacct does not answer."""
    proc = slurm_client(["sacct", "-X", "-n", "-P", "-D", "-j", job_id, f"--format={','.join(ATTEMPT_FIELDS)}"])
    if proc is None or proc.returncode != 0:
        return None
    rows = [r for r in _rows(proc.stdout, ATTEMPT_FIELDS) if r["JobID"] == job_id]
    return [{"attempt": i, "state": r["State"], "nodes": "" if r["NodeList"] in ("", "None assigned") else r["NodeList"],
             "start": r["Start"], "end": r["End"], "exit_code": r["ExitCode"],
             "reason": "" if r["Reason"] == "None" else r["Reason"]} for i, r in enumerate(rows, 1)]


def failed_nodes_by_attempt(run: RunDir, job_id: str) -> dict[int, str]:
    """Which node failed in each attempt of `job_id` (1 = the first), as the job's own host saw it
    (launch.supervise records it in slurm/attempts.jsonl; sacct only says NODE_FAIL, for all of the job's nodes)."""
    path = run.slurm / "attempts.jsonl"
    out: dict[int, str] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        said = str(entry.get("node_failure") or "")
        if entry.get("slurm_job") == job_id and said.startswith("node failure: "):
            out[int(entry.get("restart", 0)) + 1] = said.removeprefix("node failure: ")
    return out


def describe_attempt(attempt: dict[str, Any], last: bool) -> str:
    """One line of `kolora status`: 'attempt 1: node failure: kolora-2 (of kolora-[1-2]) → requeued'."""
    state, nodes = attempt["state"], attempt["nodes"]
    on = f" ({nodes})" if nodes else ""
    failed = attempt.get("failed_nodes")
    what = {"NODE_FAIL": f"node failure: {failed} (of {nodes})" if failed and nodes else f"node failure{on}", "RUNNING": f"running on {nodes or '?'}", "PENDING": "waiting",
            "COMPLETED": f"completed{on}", "REQUEUED": f"requeued{on}", "PREEMPTED": f"preempted{on}",
            "TIMEOUT": f"time limit{on}"}.get(state, f"{state.lower()}{on}")
    if not last and state not in ("REQUEUED", "PENDING", "RUNNING"):
        what += " → requeued"
    return f"attempt {attempt['attempt']}: {what}"


# squeue's reason a job waits (%r), in words; Slurm's own text follows. Those of a multi-node job's node loss first.
PENDING_REASONS = {
    "ReqNodeNotAvail": "waiting: nodes down", "NodeDown": "waiting: a node it needs is down",
    "Resources": "waiting for free nodes/GPUs", "Priority": "waiting: other jobs go first",
    "Dependency": "waiting for the job before it", "BeginTime": "requeued, waiting for its start time",
    "PartitionNodeLimit": "waiting: asks for more nodes than the partition has up or allows",
    "JobHeldUser": "held (scontrol release JOBID)", "JobHeldAdmin": "held by an administrator",
    "JobHoldMaxRequeue": "held: requeued too often (scontrol release JOBID)",
}


def explain_pending(reason: str) -> str:
    """'ReqNodeNotAvail, UnavailableNodes:kolora-b' → 'waiting: nodes down (kolora-b); Slurm: ReqNodeNotAvail,
    UnavailableNodes:kolora-b'. A reason kolora has no words for is Slurm's text as it is."""
    words = PENDING_REASONS.get(reason.split(",")[0].strip())
    if words is None:
        return reason
    down = re.search(r"UnavailableNodes:(\S+)", reason)
    return f"{words}{f' ({down[1]})' if down else ''}; Slurm: {reason}"


def scancel(ids: list[str]) -> None:
    if ids:
        slurm_client(["scancel", *ids], timeout=30)


# manifest ------------------------------------------------------------------------------------------------
def resolve_run(name_or_path: str, runs_dir: Path) -> RunDir:
    p = Path(name_or_path).expanduser()
    for cand in (p, Path(runs_dir) / name_or_path):
        if (cand / "manifest.json").is_file():
            return RunDir(cand)
    raise ConfigError(f"no run {name_or_path!r}: neither {p} nor {Path(runs_dir) / name_or_path} holds a "
                      "manifest.json (give the run name with --runs-dir, or the run directory)")


def latest_submission(manifest: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    slurm = manifest.get("slurm") or {}
    stamp = slurm.get("latest")
    if not stamp or stamp not in slurm.get("submissions", {}):
        raise ConfigError(f"run {manifest.get('name')!r} was never submitted to Slurm (kolora submit CONFIG "
                          "--cluster PROFILE); `kolora run` runs in one process and has no jobs")
    return stamp, slurm["submissions"][stamp]


def all_job_ids(manifest: dict[str, Any]) -> list[str]:
    subs = (manifest.get("slurm") or {}).get("submissions", {})
    return [info["job_id"] for sub in subs.values() for info in sub.get("jobs", {}).values()]


def log_file(folder: Path, task_id: str, rank: int = 0, stream: str = "err") -> Path:
    """submitit's log of a job (`<id>_<rank>_log.err`) or array task (`<array>_<task>_<rank>_log.err`)."""
    return Path(folder) / f"{task_id}_{rank}_log.{stream}"


# status --------------------------------------------------------------------------------------------------
def summarize_states(states: dict[str, str]) -> str:
    """One state for a job's tasks: the common one, else each state with its count ("RUNNING 2/3, PENDING 1/3")."""
    if not states:
        return "UNKNOWN"
    values = list(states.values())
    if len(set(values)) == 1:
        return values[0]
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{s} {n}/{len(values)}" for s, n in counts.items())


def _job_states(sub: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ids = [info["job_id"] for info in sub["jobs"].values()]
    queue = queue_rows(ids)
    live = {r["JobID"]: r for r in queue or []}
    acct_rows = sacct(ids)
    acct = {r["JobID"]: r for r in acct_rows or []}
    out: dict[str, dict[str, Any]] = {}
    for job, info in sub["jobs"].items():
        tasks: dict[str, str] = {}
        partition = reason = nodes = ""
        for task_id in info["task_ids"]:
            row = live.get(task_id) or acct.get(task_id)
            if row is None:  # in neither: not yet in accounting (just queued), or gone from both
                tasks[task_id] = "UNKNOWN" if acct_rows is None else "PENDING" if queue is None else GONE
                continue
            tasks[task_id] = row["State"]
            partition = partition or row.get("Partition", "")
            nodes = nodes or row.get("NodeList", "")
            if task_id in live and row.get("Reason") not in (None, "", "None"):
                reason = row["Reason"]
        out[job] = {"state": summarize_states(tasks), "tasks": tasks, "partition": partition, "reason": reason,
                    "nodes": nodes, "accounting": acct_rows is not None}
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def progress(run: RunDir, sub: dict[str, Any], manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the run directory says about each job's stages."""

    stages = manifest.get("stages", {})
    status = {s: (stages.get(s) or {}).get("status", "-") for s in NAMES}
    job_stages = JOBS
    try:
        cfg = load_config(sub.get("config_file") or Path(sub["folder"]) / "config.yaml")  # a sweep's: per variant
    except (ConfigError, OSError):
        cfg = None
    out: dict[str, dict[str, Any]] = {}

    ingest = (stages.get("ingest") or {}).get("summary") or {}
    report = _read_json(run.filter / "report.json").get("summary") or {}
    info: dict[str, Any] = {"stages": {s: status[s] for s in job_stages["filter"]}}
    text = []
    if "samples" in ingest:
        info["samples"] = ingest["samples"]
        text.append(f"{ingest['samples']} samples")
    if report and status["filter"] in ("complete", "failed"):
        info.update(kept=report.get("kept"), dropped=report.get("dropped"))
        text.append(f"kept {report.get('kept')}, dropped {report.get('dropped')}")
    info["text"] = "; ".join(text)
    out["filter"] = info

    info = {"stages": {s: status[s] for s in job_stages["train"]}, "total_steps": cfg.train.steps if cfg else None}
    metrics = next(reversed(train_metrics.rows(run.root)), None)  # the kept step's, not a later one's
    text = [f"cache {status['cache']}"] if status["cache"] not in ("complete", "-") else []
    cache = (stages.get("cache") or {}).get("summary") or {}
    if "encoded" in cache:
        info.update(cache_encoded=cache["encoded"], cache_reused=cache["reused"])
        text.append(f"cache encoded {cache['encoded']}, reused {cache['reused']}")
    if metrics and status["train"] != "-":
        info.update(step=metrics["step"], loss=metrics["loss"])
        text.append(f"step {info['step']}/{info['total_steps']}, loss {info['loss']:.4g}")
    info["text"] = "; ".join(text)
    out["train"] = info

    info = {"stages": {"render": status["render"]}}
    if cfg is not None:

        try:  # tile keys need the model's files and the prompt set, which this machine may not see
            wanted = all_tiles(cfg, run)  # the LoRA's and, with evaluate on, the base model's
        except (InputError, OSError) as e:
            info["text"] = f"tiles unknown here ({str(e).splitlines()[0][:80]})"
        else:
            missing = missing_tiles(cfg, run, wanted)
            info.update(tiles_done=len(wanted) - len(missing), tiles_total=len(wanted))
            lora, base = ([sum(t.base == b for t in tiles) for tiles in (wanted, missing)] for b in (False, True))
            info["text"] = f"tiles {lora[0] - lora[1]}/{lora[0]}" + (
                f", base model {base[0] - base[1]}/{base[0]}" if base[0] else "")
    out["render"] = info

    text = [str(run.grid_file)] if status["grid"] == "complete" and run.grid_file.is_file() else []
    scores = (stages.get("evaluate") or {}).get("summary") or {}
    if status.get("evaluate") == "complete" and "clip_lora" in scores:
        text.append(f"clip {scores['clip_lora']:.3f} (base {scores['clip_base']:.3f}), aesthetic "
                    f"{scores['aesthetic_lora']:.3f} (base {scores['aesthetic_base']:.3f})")
    out["grid"] = {"stages": {s: status[s] for s in job_stages["grid"]}, "text": "; ".join(text)}
    return out


def status(run: RunDir) -> dict[str, Any]:
    manifest = run.read_manifest()
    stamp, sub = latest_submission(manifest)
    states = _job_states(sub)
    prog = progress(run, sub, manifest)
    stages = manifest.get("stages", {})
    rows, failed, cancelled = [], None, []
    for job, info in sub["jobs"].items():
        st = states[job]
        err = log_file(Path(sub["folder"]), info["task_ids"][0])
        bad = [t for t, s in st["tasks"].items() if s in BAD]
        unknown = all(s == "UNKNOWN" for s in st["tasks"].values())
        manifest_failed = [s for s in info["stages"] if (stages.get(s) or {}).get("status") == "failed"]
        if failed is None and (bad or (unknown and manifest_failed)):
            stage = (manifest_failed or [s for s in info["stages"]
                                         if (stages.get(s) or {}).get("status") != "complete"] or info["stages"])[0]
            task = bad[0] if bad else info["task_ids"][0]
            err = log_file(Path(sub["folder"]), task)
            failed = {"job": job, "stage": stage, "job_id": task, "state": st["tasks"].get(task, "UNKNOWN"),
                      "error": (stages.get(stage) or {}).get("error"), "log": str(err), "nodes": st["nodes"]}
        if any(s == "CANCELLED" for s in st["tasks"].values()):
            cancelled.append(job)
        job_label = info["job_id"] + (f"_[0-{len(info['task_ids']) - 1}]" if info.get("array") else "")
        rows.append({"job": job, "stages": "+".join(info["stages"]), "job_id": job_label, "state": st["state"],
                     "reason": st["reason"], "partition": st["partition"], "progress": prog[job].get("text", ""),
                     "detail": prog[job], "tasks": st["tasks"], "log": str(err),
                     # the train job's attempts: a multi-node job is requeued when a node fails
                     "attempts": _train_attempts(run, info["job_id"]) if job == "train" else []})
    done = all(r["state"] == "COMPLETED" for r in rows)
    return {"run": str(run.root), "name": run.root.name, "submission": stamp, "folder": sub["folder"],
            "profile": sub.get("profile"), "jobs": rows, "failed": failed, "cancelled": cancelled, "done": done,
            "grid": str(run.grid_file) if done and run.grid_file.is_file() else None}


def _train_attempts(run: RunDir, job_id: str) -> list[dict[str, Any]]:
    rows = attempts(job_id) or []
    if any(a["state"] == "NODE_FAIL" for a in rows):
        failed = failed_nodes_by_attempt(run, job_id)
        for a in rows:
            if a["state"] == "NODE_FAIL" and a["attempt"] in failed:
                a["failed_nodes"] = failed[a["attempt"]]
    return rows


def format_status(st: dict[str, Any]) -> str:

    rows = [{"job": r["job"], "stages": r["stages"], "job id": r["job_id"],
             "state": r["state"] + (f" ({explain_pending(r['reason'])})" if r["reason"] and r["state"] == "PENDING"
                                    else ""),
             "progress": r["progress"]} for r in st["jobs"]]
    lines = [f"run {st['name']} ({st['run']}), submission {st['submission']} on {st['profile']}", table(rows)]
    for r in st["jobs"]:
        if len(r.get("attempts") or []) > 1 or any(a["state"] == "NODE_FAIL" for a in r.get("attempts") or []):
            lines += [f"{r['job']} {describe_attempt(a, a is r['attempts'][-1])}" for a in r["attempts"]]
    f = st["failed"]
    if f:
        state = f"node failure on {f['nodes'] or '?'}" if f["state"] == "NODE_FAIL" else f["state"]
        lines.append(f"FAILED: stage {f['stage']} (job {f['job_id']}, {state})"
                     + (f": {f['error'].splitlines()[0]}" if f.get("error") else ""))
        lines.append(f"  log: {f['log']}")
        downstream = [r["job"] for r in st["jobs"] if r["job"] in st["cancelled"]]
        if downstream:
            lines.append(f"  cancelled after it: {', '.join(downstream)}")
    elif st["cancelled"]:
        lines.append(f"CANCELLED: {', '.join(st['cancelled'])}")
    if st.get("stopped") and not f:  # kolora.pipeline.state.run_state's verdict, added by `kolora status`
        lines.append(f"STOPPED: {st['stopped']} (`kolora resume {st['name']}` continues it)")
    elif st["done"]:
        lines.append(f"done: {st['grid']}")
    if st["jobs"] and not st["jobs"][0].get("tasks"):
        lines.append("(no Slurm state: sacct/squeue did not answer)")
    return "\n".join(lines)


# logs ----------------------------------------------------------------------------------------------------
def pick_log(run: RunDir, stage: str | None, task: int | None, rank: int = 0) -> tuple[str, str, list[Path]]:
    """(job, task id, [stdout, stderr] paths) for `kolora logs`: the given stage's job (a stage name or a job
    name), else the failed job, else the last job that started."""
    manifest = run.read_manifest()
    _, sub = latest_submission(manifest)
    job = job_of(stage) if stage in NAMES else stage
    if job is not None and job not in sub["jobs"]:
        raise ConfigError(f"--stage {stage}: choose one of {', '.join([*JOBS, *NAMES])}")
    st = None
    if job is None or (task is None and sub["jobs"][job].get("array")):
        st = status(run)
    if job is None:
        if st["failed"]:
            job = st["failed"]["job"]
        else:
            started = [r["job"] for r in st["jobs"] if r["state"] not in ("PENDING", "UNKNOWN")]
            job = started[-1] if started else next(iter(sub["jobs"]))
    info = sub["jobs"][job]
    if task is not None:
        if not 0 <= task < len(info["task_ids"]):
            raise ConfigError(f"--task {task}: job {job} has tasks 0..{len(info['task_ids']) - 1}")
        task_id = info["task_ids"][task]
    elif st is not None and st["failed"] and st["failed"]["job"] == job:
        task_id = st["failed"]["job_id"]
    else:
        task_id = info["task_ids"][0]
    folder = Path(sub["folder"])
    return job, task_id, [log_file(folder, task_id, rank, "out"), log_file(folder, task_id, rank, "err")]


def tail(path: Path, lines: int | None) -> str:
    text = path.read_text(errors="replace")
    if lines is None:
        return text
    return "\n".join(text.splitlines()[-lines:]) + ("\n" if text else "")


# cancel --------------------------------------------------------------------------------------------------
def cancel(run: RunDir, wait_s: float = 30) -> tuple[list[str], list[str]]:
    """scancel every job of the run still queued (all submissions); wait until the queue lets go of them.
    Returns (cancelled ids, ids still in the queue after wait_s)."""
    manifest = run.read_manifest()
    ids = all_job_ids(manifest)

    def queued_of(wanted: list[str]) -> list[str]:  # a sweep variant's own array task, not its whole array
        return sorted({r["base"] if r["base"] in wanted else r["JobID"] for r in squeue(wanted)
                       if r["base"] in wanted or r["JobID"] in wanted})

    queued = queued_of(ids)
    scancel(queued)
    deadline = time.monotonic() + wait_s
    left = queued
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = queued_of(left)
    if queued:
        with run.manifest() as m:
            stamp = (m.get("slurm") or {}).get("latest")
            if stamp:
                m["slurm"]["submissions"][stamp]["cancelled"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return queued, left


def environment_hint() -> str | None:
    if "SLURM_CONF" not in os.environ and not Path("/etc/slurm/slurm.conf").exists():
        return "SLURM_CONF is not set (on the dev cluster: source .devcluster/env.sh)"
    return None
