"""The `gpu`-marked tests on this machine's GPU, recorded: one row per test (outcome, seconds, the numbers it
measured) in bench/RESULTS.md with the device name. bench/run_gpu.sh runs this first.

    .venv/bin/python bench/gpu_suite.py [--no-record] [-- extra pytest arguments]

The tests report their numbers with pytest's `record_property` (a peak in GiB, a loss, a difference); they come
back through the JUnit XML pytest writes. Without CUDA it prints "skipped: no CUDA" and exits 0.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from _common import REPO, base_parser, environment, report, skip, table

NAME = "gpu_suite"


def outcomes(junit: Path) -> list[dict[str, str]]:
    """(test, outcome, seconds, measured) of every test case in a JUnit XML file."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = f"{tag}: {(found.get('message') or '').splitlines()[0][:120]}" if found.get("message") \
                    else tag
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        rows.append({"test": case.get("name", "?"), "outcome": outcome, "seconds": case.get("time", "?"),
                     "measured": ", ".join(f"{k}={v}" for k, v in props.items())})
    return rows


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        return skip(NAME, "no CUDA", "no-cuda")
    env = environment(gpu=True)
    with tempfile.TemporaryDirectory(prefix="kolora-gpu-suite-") as tmp:
        junit = Path(tmp) / "junit.xml"
        done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rA", "-s",
                               f"--junitxml={junit}", "-o", "junit_family=xunit1", *args.pytest_args], cwd=REPO)
        rows = outcomes(junit) if junit.is_file() else []
    passed = sum(r["outcome"] == "passed" for r in rows)
    failed = sum(r["outcome"].startswith(("failure", "error")) for r in rows)
    body = table(["test", "outcome", "s", "measured"],
                 [[r["test"], r["outcome"], r["seconds"], r["measured"]] for r in rows])
    report(NAME, "the gpu-marked tests on this GPU", env, body,
           {"tests": len(rows), "passed": passed, "failed": failed, "pytest_rc": done.returncode},
           record=not args.no_record)
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
