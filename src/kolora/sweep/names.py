"""Run names and sweep names are one namespace: both are folders of the runs dir (--runs-dir, $KOLORA_RUNS).

    runs/<run>/manifest.json      a run (kolora run, submit; also every variant of a sweep)
    runs/<sweep>/sweep.json       a sweep; its variants are runs inside it: runs/<sweep>/<variant>/

`folder_kind` tells what a folder is; `check_name` is the one collision check of every command that creates or
continues a run or a sweep (run, submit, resume, sweep in process and on Slurm). It runs before anything is
written, so a refused command leaves the runs dir as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from kolora.core.errors import InputError
from kolora.core.rundir import RunDir
from kolora.sweep.manifest import MANIFEST as SWEEP_MANIFEST
from kolora.sweep.manifest import read_manifest

Kind = Literal["run", "sweep", "empty", "other"]


class NameTaken(InputError):
    """The name (or the runs dir) is a folder that is not the kind the command makes."""


def folder_kind(path: Path | str) -> Kind:
    """"sweep" (sweep.json), "run" (manifest.json, or only the config.yaml a run writes first), "empty" (missing,
    or only kolora's hidden lock and temp files) or "other" (a file, or a folder of something else)."""
    p = Path(path)
    if not p.exists():
        return "empty"
    if not p.is_dir():
        return "other"
    if (p / SWEEP_MANIFEST).is_file():
        return "sweep"
    if RunDir(p).manifest_file.is_file():
        return "run"
    try:
        visible = [e for e in os.listdir(p) if not e.startswith(".")]
    except OSError:
        return "other"
    if visible == [RunDir(p).config_file.name]:
        return "run"
    return "other" if visible else "empty"


def listed_variants(sweep_dir: Path) -> list[str]:
    return [str(v.get("name")) for v in read_manifest(sweep_dir)["variants"]]


def _same(a: Any, b: Any) -> bool:
    def plain(x: Any) -> str:
        return json.dumps(x, sort_keys=True, default=str)

    return plain(a) == plain(b)


def _holds(path: Path) -> str:
    if not path.is_dir():
        return "it is a file"
    entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
    return "it holds " + ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


def check_name(runs_dir: Path, name: str, make: Literal["run", "sweep"],
               variants: dict[str, dict[str, Any]] | None = None, force: bool = False) -> None:
    """Refuse (NameTaken, naming the folder and the fix) a `make` ("run" or "sweep") named `name` under
    `runs_dir` whose folder is something else, or that would be written inside a run or a sweep that does not
    list it. A run continues a run; a sweep continues a sweep with the same `variants` ({name: overrides}); one
    with other variants replaces the earlier plan only with `force` (the earlier variants' folders stay)."""
    runs_dir = Path(runs_dir)
    target = runs_dir / name
    around = folder_kind(runs_dir)
    if around == "run":
        raise NameTaken(f"--runs-dir {runs_dir} is the folder of run {runs_dir.name} (manifest.json): a {make} "
                        f"named {name} would be written inside that run; give the folder that holds the runs "
                        f"(e.g. --runs-dir {runs_dir.parent})")
    if around == "sweep":
        listed = listed_variants(runs_dir)
        if make == "sweep" or name not in listed:
            raise NameTaken(f"--runs-dir {runs_dir} is the folder of sweep {runs_dir.name} ({SWEEP_MANIFEST}, "
                            f"variants {', '.join(listed)}): a {make} named {name} would be written inside it, "
                            f"unlisted; give the folder that holds the runs (e.g. --runs-dir {runs_dir.parent})")
    kind = folder_kind(target)
    if kind == "empty" or (kind == make == "run"):
        return
    if kind == "other":
        raise NameTaken(f"{target} exists and is not a kolora {make} folder ({_holds(target)}): kolora would "
                        f"write its {make} into it; use another --name, or move that folder away")
    if make == "run":  # the name is a sweep's
        raise NameTaken(f"{target} is the folder of sweep {name} ({SWEEP_MANIFEST}, variants "
                        f"{', '.join(listed_variants(target))}): a run named {name} would be written inside it; "
                        f"use another --name (`kolora status {name}` shows the sweep; a variant is "
                        f"{name}/VARIANT)")
    if kind == "run":
        raise NameTaken(f"{target} is the folder of run {name} (manifest.json): a sweep named {name} would put "
                        "its variants inside that run; use another --name (the default is the config's name "
                        "+ '-sweep')")
    manifest = read_manifest(target)
    earlier = {str(v.get("name")): v.get("overrides") for v in manifest["variants"]}
    if force or _same(earlier, variants or {}):
        return
    vary = "; ".join(f"{f}={','.join(map(str, v))}" for f, v in (manifest.get("vary") or {}).items())
    raise NameTaken(f"{target / SWEEP_MANIFEST}: sweep {name} already exists with other variants ({vary or '-'}: "
                    f"{', '.join(earlier)}); this --vary would replace them and leave their folders out of the "
                    "sweep. Use another --name, or --force to replace its plan (the earlier variants' folders are "
                    "kept, listed as superseded)")


def describe_sweep(path: Path) -> str | None:
    """`path is sweep NAME's folder ...: give VARIANT paths` for a command that wants a run, or None."""
    if folder_kind(path) != "sweep":
        return None
    listed = listed_variants(path)
    return (f"{path} is the folder of sweep {Path(path).name} ({SWEEP_MANIFEST}), not a run; give one of its "
            f"variants: {', '.join(f'{Path(path).name}/{v}' for v in listed)}")
