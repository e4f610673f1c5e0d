"""containers/requirements.lock: what the Apptainer image installs, pinned at the versions CI tests.

    python containers/lock.py            # regenerate the lock (make container-lock)
    python containers/lock.py --check    # resolve the lock as the image build would; report what is off

The lock is kolora's run-time dependency closure, torch included, resolved with pip for the image's Python (3.11,
Linux x86_64: run this with such an interpreter) against the public package index only (`pip --isolated`), at
exactly the versions of constraints.txt: the environment CI tests (there with torch's CPU wheel). Nothing is
installed: pip runs with --dry-run --report.

What only torch's CUDA build needs (PyPI's Linux wheel of torch is that build) stays out of the lock: the CUDA
libraries as wheels (nvidia-*, cuda-toolkit, cuda-bindings, cuda-pathfinder) and Triton. CI's CPU wheel needs none
of them, so constraints.txt cannot say which versions were tested; torch's CUDA wheel pins most of them exactly
(cuda-toolkit, cuDNN, NCCL, Triton), pip resolves them when the image is built, and the image records what it got
(/opt/kolora/cuda-wheels.txt, labels). Everything else in the lock must be pinned in constraints.txt at the same
version, and kolora.def must install torch at constraints.txt's version (drift_problems; tests/test_container.py).
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
# needed by torch's CUDA build only (PyPI's Linux wheel), never in the lock: resolved by pip at build time
CUDA_ONLY = re.compile(r"^(triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """`name==version` lines (comments and blank lines skipped) → {canonical name: version}."""
    pins = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep or not version.strip():
                raise ValueError(f"{path}: {raw!r} is not pinned as name==version")
            pins[canonical(name.strip().split("[", 1)[0])] = version.strip()
    return pins


def read_lock(path: Path | None = None) -> dict[str, str]:
    return read_pins(path or LOCK_FILE)


def tested_torch_version(constraints: Path = CONSTRAINTS) -> str:
    """The torch version CI tests: constraints.txt's pin."""
    version = read_pins(constraints).get("torch")
    if not version:
        raise ValueError(f"{constraints}: no torch==VERSION line (the version CI tests and the image installs)")
    return version


def def_section(name: str, def_file: Path = DEF_FILE) -> str:
    """The body of kolora.def's %name section."""
    body: list[str] | None = None
    for line in def_file.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^%(\w+)", line)
        if m:
            if body is not None:
                break
            body = [] if m.group(1).lower() == name else None
        elif body is not None:
            body.append(line)
    if body is None:
        raise ValueError(f"{def_file}: no %{name} section")
    return "\n".join(body)


def base_image(def_file: Path = DEF_FILE) -> str:
    for line in def_file.read_text(encoding="utf-8").splitlines():
        if line.lower().startswith("from:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"{def_file}: no From: line")


def def_torch_version(def_file: Path = DEF_FILE) -> str:
    """The version of torch kolora.def's %post installs: its one `pip install ... torch==VERSION` line."""
    found = [m.group(1) for line in def_section("post", def_file).splitlines()
             if not line.lstrip().startswith("#") and re.search(r"\bpip install\b", line)
             for m in re.finditer(r"(?<![\w.-])torch==([^\s'\"]+)", line)]
    if len(found) != 1:
        raise ValueError(f"{def_file}: %post must install torch exactly once as torch==VERSION; found {found}")
    return found[0]


def drift_problems(lock_file: Path | None = None, constraints: Path = CONSTRAINTS,
                   def_file: Path = DEF_FILE) -> list[str]:
    """Where the image would not run what CI tested, read from the files alone (no resolution): a lock pin
    that constraints.txt does not pin at the same version, CUDA-build-only wheels in the lock or in
    constraints.txt, torch missing from the lock, or kolora.def installing another torch."""
    lock = read_lock(lock_file)
    tested = read_pins(constraints)
    problems = []
    for name, version in sorted(lock.items()):
        if name not in tested:
            problems.append(f"{name}=={version} is in the lock but not in constraints.txt (CI did not test it)")
        elif tested[name] != version:
            problems.append(f"{name}: the lock pins {version}, constraints.txt {tested[name]}")
    problems += [f"{name} is in the lock but only torch's CUDA build needs it (pip resolves it at build time)"
                 for name in sorted(lock) if CUDA_ONLY.match(name)]
    problems += [f"{name} is in constraints.txt but matches the CUDA-build-only names the lock leaves out"
                 for name in sorted(tested) if CUDA_ONLY.match(name)]
    if "torch" not in lock:
        problems.append("torch is not in the lock")
    try:
        def_torch, tested_torch = def_torch_version(def_file), tested_torch_version(constraints)
    except ValueError as exc:
        problems.append(str(exc))
    else:
        if def_torch != tested_torch:
            problems.append(f"kolora.def installs torch=={def_torch}, constraints.txt pins torch=={tested_torch}")
    return problems


def check_interpreter() -> str | None:
    """Why this interpreter cannot resolve for the image (None when it can)."""
    if sys.version_info[:2] != PYTHON or sys.platform != "linux" or platform.machine() != "x86_64":
        return (f"the lock is for Python {PYTHON[0]}.{PYTHON[1]} on Linux x86_64; this is Python "
                f"{platform.python_version()} on {sys.platform} {platform.machine()}")
    return None


def resolve(args: list[str], timeout_s: int = 900) -> tuple[int, dict[str, str], str]:
    """pip's resolution of `args` (requirements, constraints) as a fresh install from the public index:
    (return code, {canonical name: version}, pip's output)."""
    with tempfile.TemporaryDirectory(prefix="kolora-lock-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed",
               "--quiet", "--timeout", "20", "--retries", "2", "--report", str(report), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or not report.is_file():
            return proc.returncode or 1, {}, out
        data = json.loads(report.read_text())
    return 0, {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}, out


def lock_problems(lock: dict[str, str], resolved: dict[str, str]) -> list[str]:
    """What makes `resolved` (pip's answer for the lock plus kolora itself) differ from the lock."""
    problems = []
    for name, version in sorted(resolved.items()):
        if name == "kolora" or CUDA_ONLY.match(name):
            continue
        if name not in lock:
            problems.append(f"{name}=={version} is needed but not pinned in the lock")
        elif lock[name] != version:
            problems.append(f"{name}: the lock pins {lock[name]}, pip resolved {version}")
    if "torch" in resolved and not any(CUDA_ONLY.match(name) for name in resolved):
        problems.append(f"pip resolved torch {resolved['torch']} without CUDA wheels: not PyPI's CUDA build")
    return problems


def check_lock(lock_file: Path | None = None) -> tuple[int, list[str], str]:
    """The lock against constraints.txt and kolora.def (drift_problems), then resolved as the image build installs
    it (the lock, then kolora with its declared requirements): (pip's return code, problems, pip's output)."""
    lock_file = lock_file or LOCK_FILE
    lock = read_lock(lock_file)
    rc, resolved, out = resolve(["-r", str(lock_file), str(REPO)])
    return rc, drift_problems(lock_file) + ([] if rc else lock_problems(lock, resolved)), out


def generate() -> str:
    torch_version = tested_torch_version()
    rc, resolved, out = resolve(["-c", str(CONSTRAINTS), str(REPO)])
    if rc:
        raise SystemExit(f"pip could not resolve kolora's dependencies:\n{out}")
    names = {name: version for name, version in resolved.items() if name != "kolora" and not CUDA_ONLY.match(name)}
    tested = read_pins(CONSTRAINTS)
    untested = sorted(f"{name}=={version}" for name, version in names.items() if tested.get(name) != version)
    if untested:
        raise SystemExit("constraints.txt does not pin these run-time dependencies, so CI did not test the versions "
                         "the image would get; add the versions CI runs to constraints.txt:\n  "
                         + "\n  ".join(untested))
    header = [
        "# kolora's run-time dependencies for the Apptainer image (containers/kolora.def), pinned: exactly the",
        f"# versions of constraints.txt (the environment CI tests), torch {torch_version} included. For Python "
        f"{PYTHON[0]}.{PYTHON[1]}, Linux x86_64,",
        f"# on {base_image()}. Not listed: what only torch's CUDA build (PyPI's Linux wheel) needs, the",
        "# nvidia-*/cuda-* wheels and Triton: CI's CPU wheel has none of them; pip resolves them at build time from",
        f"# torch {torch_version}'s own requirements and the image records them in /opt/kolora/cuda-wheels.txt.",
        "# Includes Data-Juicer's undeclared run-time needs (aiohttp, ray, torch), modelscope[datasets], submitit",
        "# + cloudpickle. Generated by `make container-lock` (containers/lock.py); tests/test_container.py checks",
        "# that it equals constraints.txt and that it resolves.",
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
        print("\n".join(problems) or f"{LOCK_FILE.name}: equals constraints.txt and resolves as pinned, with kolora's "
              "requirements met")
        return 1 if problems else 0
    LOCK_FILE.write_text(generate(), encoding="utf-8")
    print(f"wrote {LOCK_FILE}")
    problems = drift_problems()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
