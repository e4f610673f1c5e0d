"""Demo bench: wall time of `kolora run configs/demo.yaml` (the CLI in a subprocess), cold and warm.

    .venv/bin/python bench/demo.py [--repeats 1]

- cold:  a new runs dir and a new tiny-model folder (the model is built, every stage runs; first use on a machine)
- warm:  a second new runs dir, the model from the cold run (every stage runs again: what `make demo` costs
         after the first time)
- rerun: the warm command once more in the same runs dir (every stage is complete and skipped)
Stage seconds of the warm run come from its manifest.
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

from _common import REPO, base_parser, environment, median, report, table

NAME = "demo"


def kolora_cli() -> list[str]:
    exe = Path(sys.executable).parent / "kolora"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "kolora.cli.main"]


def run_demo(runs: Path, model: Path, config: Path, log: Path) -> float:
    cmd = [*kolora_cli(), "run", str(config), "--runs-dir", str(runs), "--set", f"model.path={model}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (rc {rc}); its output: {log}\n"
                         + log.read_text(errors="replace")[-3000:])
    return seconds


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """{stage: wall seconds} as the run's manifest records them (stages[<stage>].wall_s)."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: float(info["wall_s"]) for name, info in (manifest.get("stages") or {}).items()
            if isinstance(info, dict) and isinstance(info.get("wall_s"), int | float)}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="cold/warm/rerun sequences (default 3)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    args = p.parse_args(argv)
    env = environment()
    cold, warm, rerun = [], [], []
    stages: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kolora-bench-demo-") as tmp_name:
        tmp = Path(tmp_name)
        log = tmp / "demo.log"
        for r in range(args.repeats):
            model = tmp / f"tiny-{r}"
            cold.append(run_demo(tmp / f"cold-{r}", model, args.config, log))
            warm.append(run_demo(tmp / f"warm-{r}", model, args.config, log))
            rerun.append(run_demo(tmp / f"warm-{r}", model, args.config, log))
            print(f"  repeat {r + 1}: cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s, rerun {rerun[-1]:.1f} s", flush=True)
            name = next((d.name for d in (tmp / f"warm-{r}").iterdir() if d.is_dir()), "demo")
            stages = stage_seconds(tmp / f"warm-{r}" / name)
    rows = [["cold (new model + new runs dir)", median(cold), min(cold)],
            ["warm (model built, new runs dir)", median(warm), min(warm)],
            ["rerun (same runs dir, all stages complete)", median(rerun), min(rerun)]]
    body = (f"`kolora run {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}` "
            f"as a subprocess, {args.repeats} repeat(s); seconds of wall time.\n\n"
            + table(["run", "median s", "min s"], rows))
    if stages:
        body += "\n\nwarm run, by stage (manifest):\n\n" + table(["stage", "s"], [[k, f"{v:.2f}"] for k, v in stages.items()])
    result = {"cold_s": median(cold), "warm_s": median(warm), "rerun_s": median(rerun), "repeats": args.repeats}
    report(NAME, "`kolora run configs/demo.yaml` wall time", env, body, result, record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
