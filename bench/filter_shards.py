"""Sharded filter bench: filter.shards 1 vs 4 on the dev cluster, same synthetic dataset, same ops.

    KOLORA_DEVCLUSTER=/tmp/kdc-bench bash slurm/devcluster/up.sh    # or make cluster-up (.devcluster)
    KOLORA_DEVCLUSTER=/tmp/kdc-bench .venv/bin/python bench/filter_shards.py [--count 20000] [--shards 4]

The dataset (kolora.ingest.synthetic's images: 32-160 px JPEG/PNG, every aspect kind; cached under
.cache/bench-filter-shards/) is a local jsonl dataset, so ingest only hard-links it. Each variant is a fresh
`kolora submit configs/demo.yaml --set filter.shards=N` on the dev cluster's cpu partition (4 CPUs, one per
shard task); the rest of the graph is cancelled once the filter job ended. Times:
- filter wall: from ingest's completion marker to the filter's (mtimes): every shard's header pass and
  Data-Juicer run plus the merge, without Slurm's scheduling and Python's start;
- job span: sacct's first Start to last End of the filter job (ingest, start-up and scheduling included).
Scaling efficiency = (filter wall at 1 shard / filter wall at N) / N. The kept sets and the report rows must
be equal (the run directory's path taken out). Skips (exit 0) when there is no dev cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, base_parser, environment, report, skip, table
from interrupt import cluster_env

NAME = "filter_shards"
DEMO = REPO / "configs" / "demo.yaml"
LOCAL = REPO / "slurm" / "clusters" / "local.yaml"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def dataset(count: int, cache: Path) -> Path:
    """metadata.jsonl + images of `count` synthetic samples (made once per count)."""
    from kolora.core.rundir import atomic_write_text
    from kolora.ingest.synthetic import make_synthetic

    folder = cache / f"synthetic-{count}"
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        t0 = time.perf_counter()
        items = make_synthetic(folder, count, seed=0)
        atomic_write_text(meta, "".join(json.dumps({"text": text, "image": [path.name]}, ensure_ascii=False) + "\n"
                                        for path, text in items))
        print(f"made {count} synthetic images in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    return meta


def kolora(env: dict[str, str], *args: Any, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kolora.cli.main", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def sacct_rows(env: dict[str, str], job: str) -> list[dict[str, str]]:
    fields = ["JobID", "State", "Start", "End"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, f"--format={','.join(fields)}"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line.strip()]


def ts(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def one_variant(env: dict[str, str], runs: Path, meta: Path, shards: int, stall_s: float = 600) -> dict[str, Any]:
    name = f"shards{shards}"
    sets = ["data.source=jsonl", f"data.path={meta}", f"filter.shards={shards}"]
    proc = kolora(env, "submit", DEMO, "--cluster", LOCAL, "--runs-dir", runs, "--name", name,
                  *[x for s in sets for x in ("--set", s)])
    if proc.returncode != 0:
        raise SystemExit(f"kolora submit failed: {proc.stderr}")
    run = runs / name
    slurm = json.loads((run / "manifest.json").read_text())["slurm"]
    job = slurm["submissions"][slurm["latest"]]["jobs"]["filter"]["job_id"]
    tasks = max(shards, 1) if shards > 1 else 1
    last, since = None, time.monotonic()
    try:
        while True:  # until every filter task ended; fail when nothing changes for stall_s
            rows = sacct_rows(env, job)
            states = sorted((r["JobID"], r["State"].split()[0]) for r in rows)
            if len(rows) >= tasks and all(s.startswith(ENDED) for _, s in states) and all(r["End"] for r in rows):
                break
            if states != last:
                last, since = states, time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise SystemExit(f"filter job {job}: no state change for {stall_s:.0f} s: {states}")
            time.sleep(1)
    finally:
        kolora(env, "cancel", name, "--runs-dir", runs, timeout=120)
    if {s for _, s in states} != {"COMPLETED"}:
        raise SystemExit(f"filter job {job} did not complete: {states}; logs: kolora logs {name} --runs-dir {runs}")
    ingest_done = (run / ".complete" / "ingest.json").stat().st_mtime
    filter_done = (run / ".complete" / "filter.json").stat().st_mtime
    summary = json.loads((run / "filter" / "report.json").read_text())["summary"]
    if shards > 1:
        parts = [json.loads(p.read_text())["seconds"] for p in (run / "filter" / "shards").glob("*/done.json")]
    else:
        parts = [summary["seconds"]]
    slice_s = max(s["header"] + s["data_juicer"] for s in parts)
    return {"shards": shards, "job": job, "wall_s": filter_done - ingest_done, "samples": summary["samples"],
            "slice_s": slice_s, "load": os.getloadavg()[0],
            "kept": summary["kept"], "span_s": max(ts(r["End"]) for r in rows) - min(ts(r["Start"]) for r in rows),
            "outputs": outputs(run)}


def outputs(run: Path) -> dict[str, Any]:
    """The kept set and the report rows, the run directory's own path taken out."""
    report_text = (run / "filter" / "report.json").read_text(encoding="utf-8").replace(str(run), "<run>")
    rep = json.loads(report_text)
    result = (run / "filter" / "result.jsonl").read_text(encoding="utf-8").replace(str(run), "<run>")
    return {"samples": rep["samples"], "result": result,
            "summary": {k: v for k, v in rep["summary"].items() if k not in ("seconds", "shards")},
            "trainset": (run / "trainset" / "train" / "metadata.csv").read_text(encoding="utf-8")}


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=20_000, help="synthetic images (default 20000)")
    p.add_argument("--shards", type=int, default=4, help="shards of the sharded variant (default 4)")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-filter-shards")
    args = p.parse_args()
    env = cluster_env()
    if env is None:
        return skip(NAME, "no dev cluster answering (make cluster-up, or KOLORA_DEVCLUSTER=...)", "no_cluster")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    meta = dataset(args.count, args.cache)
    with tempfile.TemporaryDirectory(prefix="kolora-bench-shards-") as tmp:
        results = [one_variant(env, Path(tmp) / "runs", meta, n) for n in (1, args.shards)]
    one, many = results
    equal = one["outputs"] == many["outputs"]
    speedup = one["wall_s"] / many["wall_s"]
    efficiency = speedup / args.shards
    rows = [[f"{r['shards']} shard{'s' if r['shards'] > 1 else ''}", r["samples"], r["kept"], round(r["wall_s"], 1),
             round(r["samples"] / r["wall_s"], 1), round(r["slice_s"], 1), round(r["wall_s"] - r["slice_s"], 1),
             round(r["span_s"]), round(one["wall_s"] / r["wall_s"], 2), round(r["load"], 1)] for r in results]
    body = (f"{args.count} synthetic images (kolora.ingest.synthetic, 32-160 px JPEG/PNG), configs/demo.yaml's two ops "
            f"(header-only), Data-Juicer np=1 per task; dev cluster cpu partition, one CPU per shard task; "
            f"{os.cpu_count()} cores on this machine.\n\n"
            + table(["variant", "samples", "kept", "filter wall s", "images/s", "slowest slice s", "rest s",
                     "job span s", "speed-up", "load avg"], rows)
            + f"\n\nscaling efficiency at {args.shards} shards: {efficiency:.0%}; kept sets and report rows equal: "
            f"{'yes' if equal else 'NO'}\n")
    notes = ["filter wall: ingest's completion marker to the filter's (every shard + merge); job span: sacct, "
             "first Start to last End of the filter job (ingest, start-up and scheduling included).",
             "slowest slice: the longest header pass + Data-Juicer run of one shard (its own CPU-seconds on a busy "
             "machine); rest: the filter wall minus that (Data-Juicer's import and op check per task, waiting for "
             "a CPU, the in-order merge: report.json, result.jsonl, trainset/ links).",
             "load avg: the machine's 1-minute load average when the variant ended (other work on the same cores "
             "slows both variants, the sharded one more)."]
    if os.cpu_count() and os.cpu_count() < args.shards:
        notes.append(f"this machine has {os.cpu_count()} cores for the dev cluster's 4 CPUs: the {args.shards} "
                     f"shard tasks share them, so the efficiency is bounded by {os.cpu_count()}/{args.shards}.")
    report(NAME, f"filter.shards 1 vs {args.shards} on the dev cluster, {args.count} images",
           {**environment(), "cluster": "dev cluster (slurm/devcluster)"}, body,
           {"images": args.count, "shards": args.shards, "wall_1_s": one["wall_s"], f"wall_{args.shards}_s": many["wall_s"],
            "img_s_1": one["samples"] / one["wall_s"], f"img_s_{args.shards}": many["samples"] / many["wall_s"],
            "efficiency": efficiency, "equal": equal}, record=not args.no_record, notes=notes)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
