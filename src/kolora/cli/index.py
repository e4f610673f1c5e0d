"""`kolora index [RUNS_DIR]`: the lab's page of every run and sweep of a runs dir (kolora.sweep.index)."""

from __future__ import annotations

import sys

from kolora.cli.args import resolve_runs_dir
from kolora.core.errors import InputError
from kolora.sweep.index import write_index
from kolora.sweep.names import folder_kind


def cmd_index(args) -> int:
    runs_dir = resolve_runs_dir(args)
    if not runs_dir.is_dir():
        raise InputError(f"{runs_dir} does not exist; give the folder that holds the runs (default: $KOLORA_RUNS "
                         "or ./runs)")
    if (kind := folder_kind(runs_dir)) in ("run", "sweep"):
        own = "report/report.html" if kind == "run" else "sweep.html"
        raise InputError(f"{runs_dir} is the folder of {kind} {runs_dir.name} (its page is {runs_dir / own}); "
                         f"give the folder that holds the runs (e.g. kolora index {runs_dir.parent})")
    path, rows = write_index(runs_dir)
    runs = sum(r.kind != "sweep" for r in rows)
    unreadable = [r.name for r in rows if r.state == "unreadable"]
    print(f"{runs} runs, {len(rows) - runs} sweeps" + (f"; unreadable: {', '.join(unreadable)}" if unreadable
                                                      else ""), file=sys.stderr)
    print(path)
    return 0


def register(sub) -> None:
    p = sub.add_parser("index", help="write RUNS_DIR/index.html: every run and sweep, sortable",
                       description="One self-contained page (no network) of every run and sweep of the runs dir: "
                                   "state, steps, the settings that differ, the selected checkpoint, scores with "
                                   "intervals, a grid thumbnail and a link to each report. `kolora run` and a "
                                   "run's last Slurm job refresh it.")
    p.add_argument("runs_dir", nargs="?", metavar="RUNS_DIR", help="default: $KOLORA_RUNS or ./runs")
    p.set_defaults(func=cmd_index)
