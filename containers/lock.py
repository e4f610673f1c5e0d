"""containers/requirements.lock: what the image installs on top of its base, pinned.

    python containers/lock.py            # regenerate the lock (make container-lock)
    python containers/lock.py --check    # resolve the lock as the image build would; report what is off

The lock is kolora's run-time dependency closure resolved with pip for the image's Python (3.11, Linux
x86_64: run this with such an interpreter) against the public package index only (`pip --isolated`, as in
the image build), at the versions of constraints.txt (the tested CPU environment), with torch held at the
base image's version (read from kolora.def's From: tag). torch, its CUDA wheels and Triton are the base
image's and stay out of the lock. Nothing is installed: pip runs with --dry-run --report.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEF_FILE = HERE / "kolora.def"
LOCK_FILE = HERE / "requirements.lock"
CONSTRAINTS = REPO / "constraints.txt"
PYTHON = (3, 11)
# provided by the base image (the CUDA build of torch and what it pins exactly), never in the lock
BASE_PROVIDED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_image(def_file: Path = DEF_FILE) -> str:
    for line in def_file.read_text(encoding="utf-8").splitlines():
        if line.lower().startswith("from:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"{def_file}: no From: line")


def base_torch_version(def_file: Path = DEF_FILE) -> str:
    """`pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime` → `2.7.1`."""
    image = base_image(def_file)
    m = re.fullmatch(r"(?:docker\.io/)?pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", image)
    if not m:
        raise ValueError(f"{def_file}: From: {image} is not an official pytorch/pytorch CUDA runtime tag")
    return m.group(1)


def check_interpreter() -> str | None:
    """Why this interpreter cannot resolve for the image (None when it can)."""
    if sys.version_info[:2] != PYTHON or sys.platform != "linux" or platform.machine() != "x86_64":
        return (f"the lock is for Python {PYTHON[0]}.{PYTHON[1]} on Linux x86_64; this is Python "
                f"{platform.python_version()} on {sys.platform} {platform.machine()}")
    return None


def resolve(args: list[str], torch_version: str, timeout_s: int = 900) -> tuple[int, dict[str, str], str]:
    """pip's resolution of `args` (requirements) with torch held at `torch_version`, as a fresh install:
    (return code, {canonical name: version}, pip's output)."""
    with tempfile.TemporaryDirectory(prefix="kolora-lock-") as tmp:
        pin = Path(tmp) / "torch.txt"
        pin.write_text(f"torch=={torch_version}\n")
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed",
               "--quiet", "--timeout", "20", "--retries", "2", "--report", str(report), "-c", str(pin), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or not report.is_file():
            return proc.returncode or 1, {}, out
        data = json.loads(report.read_text())
    return 0, {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}, out


def read_lock(path: Path | None = None) -> dict[str, str]:
    path = path or LOCK_FILE
    pins = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep or not version.strip():
                raise ValueError(f"{path}: {raw!r} is not pinned as name==version")
            pins[canonical(name.strip().split("[", 1)[0])] = version.strip()
    return pins


def lock_problems(lock: dict[str, str], resolved: dict[str, str]) -> list[str]:
    """What makes `resolved` (pip's answer for the lock plus kolora itself) differ from the lock."""
    problems = []
    for name, version in sorted(resolved.items()):
        if name == "kolora" or BASE_PROVIDED.match(name):
            continue
        if name not in lock:
            problems.append(f"{name}=={version} is needed but not pinned in the lock")
        elif lock[name] != version:
            problems.append(f"{name}: the lock pins {lock[name]}, pip resolved {version}")
    problems += [f"{name} is in the lock but comes from the base image" for name in sorted(lock)
                 if BASE_PROVIDED.match(name)]
    return problems


def check_lock(lock_file: Path | None = None) -> tuple[int, list[str], str]:
    """Resolve what the image build installs (the lock, then kolora with its declared requirements), torch
    held at the base image's: (pip's return code, problems, pip's output)."""
    lock_file = lock_file or LOCK_FILE
    lock = read_lock(lock_file)
    rc, resolved, out = resolve(["-r", str(lock_file), str(REPO)], base_torch_version())
    return rc, ([] if rc else lock_problems(lock, resolved)), out


def generate() -> str:
    torch_version = base_torch_version()
    rc, resolved, out = resolve(["-c", str(CONSTRAINTS), str(REPO)], torch_version)
    if rc:
        raise SystemExit(f"pip could not resolve kolora's dependencies:\n{out}")
    names = {}
    for name, version in resolved.items():
        if name != "kolora" and not BASE_PROVIDED.match(name):
            names[name] = version
    header = [
        "# kolora's run-time dependencies for the Apptainer image (containers/kolora.def), pinned.",
        f"# For Python {PYTHON[0]}.{PYTHON[1]}, Linux x86_64, on top of {base_image()}:",
        f"# torch {torch_version}, its CUDA wheels and Triton come from that image and are not listed here.",
        "# Versions follow constraints.txt (the tested CPU environment). Includes Data-Juicer's undeclared",
        "# run-time needs (aiohttp, ray; torch from the image), modelscope[datasets], submitit + cloudpickle.",
        "# Generated by `make container-lock` (containers/lock.py); tests/test_container.py checks it resolves.",
    ]
    return "\n".join([*header, *(f"{n}=={v}" for n, v in sorted(names.items()))]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="resolve the lock as it is; exit 1 if anything is off")
    args = ap.parse_args(argv)
    why = check_interpreter()
    if why:
        print(f"lock.py: {why}", file=sys.stderr)
        return 2
    if args.check:
        rc, problems, out = check_lock()
        if rc:
            print(out, file=sys.stderr)
            return 1
        print("\n".join(problems) or f"{LOCK_FILE.name}: resolves as pinned, with kolora's requirements met")
        return 1 if problems else 0
    LOCK_FILE.write_text(generate(), encoding="utf-8")
    print(f"wrote {LOCK_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
