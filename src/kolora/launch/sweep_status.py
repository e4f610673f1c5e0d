"""`kolora status SWEEP`: every variant's state and progress, the sweep's own Slurm jobs, and the best
variant so far (kolora.sweep.ranking). Reads the sweep manifest, the variants' run folders and Slurm's view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kolora.core.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK
from kolora.core.rundir import RunDir
from kolora.launch import monitor
from kolora.launch.monitor import sacct, squeue, still_queued, summarize_states
from kolora.launch.plan import table
from kolora.pipeline.registry import NAMES
from kolora.pipeline.state import run_state
from kolora.sweep.manifest import read_manifest
from kolora.sweep.ranking import indistinct_runner_up, rank, score_run


def _variant_row(run: RunDir) -> dict[str, Any]:
    """A run's state (kolora.pipeline.state.run_state; for a submitted run, Slurm's job states unless it stopped),
    each stage's manifest status, its progress, and what failed or stopped."""

    manifest = run.read_manifest() if run.manifest_file.is_file() else {}
    stages = manifest.get("stages", {})
    statuses = {s: (stages.get(s) or {}).get("status", "-") for s in NAMES}
    row: dict[str, Any] = {"stages": statuses, "failed": None, "stopped": None}
    if not manifest:
        return {**row, "state": "not started", "progress": ""}
    state = run_state(run, manifest, queued=still_queued)
    if (manifest.get("slurm") or {}).get("latest"):
        st = monitor.status(run)
        jobs = {r["job"]: r for r in st["jobs"]}
        active = next((r for r in st["jobs"] if r["state"] not in ("COMPLETED",)), None)
        row["state"] = "COMPLETED" if st["done"] else (active or st["jobs"][-1])["state"]
        row["progress"] = "; ".join(r["progress"] for r in jobs.values() if r["progress"])
        row["failed"] = st["failed"]
        if state.state == "stopped" and not st["failed"]:  # Slurm's own words for a dead job are better
            row.update(state=state.label(), stopped=state.line())
        return row
    prog = monitor.progress(run, {"folder": str(run.root)}, manifest)
    row["state"] = state.label()
    if state.state == "failed":
        row["failed"] = {"stage": state.stage, "error": (stages.get(state.stage) or {}).get("error")}
    elif state.state == "stopped":
        row["stopped"] = state.line()
    row["progress"] = "; ".join(p["text"] for p in prog.values() if p.get("text"))
    return row


def _sweep_jobs(entry: dict[str, Any]) -> list[dict[str, str]]:
    """State of the sweep's own jobs (prep, cache, the train array's tasks, sheet)."""

    jobs = entry.get("jobs", {})
    ids = list(jobs.values())
    live = {r["JobID"]: r["State"] for r in squeue(ids)}
    acct = {r["JobID"]: r["State"] for r in sacct(ids) or []}
    rows = []
    for job, job_id in jobs.items():
        task_ids = list(entry.get("task_ids", {}).values()) if job == "train" else [job_id]
        states = {t: live.get(t) or acct.get(t) or "UNKNOWN" for t in task_ids}
        label = f"{job_id}_[0-{len(task_ids) - 1}]%{entry.get('throttle')}" if job == "train" and \
            len(task_ids) > 1 else job_id
        rows.append({"job": job, "job id": label, "state": summarize_states(states)})
    return rows


def status(sweep_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(sweep_dir)
    variants = []
    for v in manifest["variants"]:
        run = RunDir(Path(sweep_dir) / v.get("run_dir", v["name"]))
        row = _variant_row(run)
        score = score_run(v["name"], run.root)
        variants.append({"name": v["name"], "overrides": v["overrides"], "run": str(run.root), **row,
                         "score": score.describe(), "_score": score})
    ranked = [s for s in rank([r["_score"] for r in variants]) if s.scored or s.final_loss is not None]
    best = ranked[0] if ranked else None
    for r in variants:
        r.pop("_score")
    slurm = manifest.get("slurm")
    sheet = Path(sweep_dir) / "sweep.html"
    return {"name": manifest["name"], "dir": str(sweep_dir), "launcher": manifest.get("launcher", "-"),
            "slurm": slurm, "jobs": _sweep_jobs(slurm) if slurm else [], "variants": variants,
            "best": {"name": best.name, "why": best.describe(), "scored": best.scored,
                     "not_distinguishable_from": getattr(indistinct_runner_up(ranked), "name", None)}
            if best else None,
            "sheet": str(sheet) if sheet.is_file() else None,
            "superseded": [str(v.get("name")) for v in manifest.get("superseded", [])],
            "failed": [r["name"] for r in variants if r["failed"]],
            "stopped": [r["name"] for r in variants if r["stopped"]]}


def exit_code(failed: bool, stopped: bool) -> int:
    """`kolora status`: 1 when something failed, 3 when something was stopped (cut short: `kolora run` or
    `kolora resume` continues it), else 0."""

    return EXIT_FAILURE if failed else EXIT_INTERRUPTED if stopped else EXIT_OK


def format_status(st: dict[str, Any]) -> str:

    head = f"sweep {st['name']} ({st['dir']}): {len(st['variants'])} variants"
    if st["slurm"]:
        head += f", submission {st['slurm']['stamp']} on {st['slurm']['profile']}"
    else:
        head += f", {st['launcher']}"
    lines = [head]
    if st["jobs"]:
        lines += ["", table(st["jobs"])]
    rows = [{"variant": r["name"], "overrides": ", ".join(f"{k}={v}" for k, v in r["overrides"].items()),
             "state": r["state"], "progress": r["progress"]} for r in st["variants"]]
    lines += ["", table(rows), ""]
    for r in st["variants"]:
        if r["failed"]:
            f = r["failed"]
            lines.append(f"FAILED: {r['name']}: stage {f.get('stage')}"
                         + (f": {str(f['error']).splitlines()[0]}" if f.get("error") else "")
                         + (f" (log: {f['log']})" if f.get("log") else ""))
        elif r["stopped"]:
            lines.append(f"STOPPED: {r['name']}: {r['stopped']}")
    if st["best"]:
        basis = "by scores" if st["best"]["scored"] else "by final training loss (no scores yet)"
        lines.append(f"best so far ({basis}): {st['best']['name']}: {st['best']['why']}")
        if st["best"].get("not_distinguishable_from"):
            lines.append(f"  not distinguishable from {st['best']['not_distinguishable_from']} (their 95 % "
                         "intervals overlap): no clear best yet")
    else:
        lines.append("best so far: none yet (no variant has a loss or scores)")
    if st["sheet"]:
        lines.append(f"sheet: {st['sheet']}")
    if st["superseded"]:
        lines.append(f"superseded (an earlier plan replaced with --force; kept, each `kolora status "
                     f"{st['name']}/VARIANT`): {', '.join(st['superseded'])}")
    return "\n".join(lines)


def format_local_run(run: RunDir) -> tuple[str, int]:
    """`kolora status RUN` for a run made in process (`kolora run`, an in-process sweep): its state, each
    stage's, and the progress the run folder shows. Returns (text, exit status: see exit_code)."""
    row = _variant_row(run)
    stages = ", ".join(f"{s} {v}" for s, v in row["stages"].items())
    lines = [f"run {run.root.name} ({run.root}), in process (no Slurm submission): {row['state']}",
             f"stages: {stages}", f"progress: {row['progress'] or '-'}"]
    score = score_run(run.root.name, run.root)
    if score.scored or score.final_loss is not None:
        lines.append(f"result: {score.describe()}")
    if row["failed"]:
        f = row["failed"]
        error = f": {str(f['error']).splitlines()[0]}" if f.get("error") else ""
        lines.append(f"FAILED: stage {f['stage']}{error}")
    elif row["stopped"]:
        lines.append(f"STOPPED: {row['stopped']} (the same `kolora run` continues it)")
    return "\n".join(lines), exit_code(bool(row["failed"]), bool(row["stopped"]))
