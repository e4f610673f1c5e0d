"""Sweeps: one config, the cartesian product of `--vary FIELD=V1,V2` values, one run directory per variant.

    runs/<sweep>/sweep.json          the variants, their overrides and run folders (and the Slurm jobs)
    runs/<sweep>/<variant>/          a normal run directory (`kolora status`, `resume`, `export` work on it)
    runs/<sweep>/cache/              the content-addressed cache store the variants share (unless cache.dir)
    runs/<sweep>/sweep.html, .png    the comparison sheet (kolora.sweep.sheet)

ingest/filter/cache run once: the first variant runs them, the others *adopt* its outputs (hard links) for each
stage whose key (kolora.pipeline.keys.Keys) is identical, which it is when only fields those stages do not read vary
(train.lr, train.rank...). A variant whose key differs runs the stage itself, against the shared cache store.
In process the variants run one after another; on Slurm (kolora.launch.sweep) training is one array job.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kolora.core.config import ExperimentConfig, field_value, load_config
from kolora.core.errors import ConfigError
from kolora.core.interrupt import Interrupted
from kolora.core.rundir import RunDir, atomic_dir, atomic_write_json, atomic_write_text, now, sweep_temp
from kolora.core.runlock import Queued, acquire, unknown_queue
from kolora.pipeline import runner
from kolora.pipeline.keys import Keys, is_complete, mark_complete
from kolora.pipeline.registry import OPERATIONAL, STAGES, get
from kolora.pipeline.sequence import StageDisplay, run_all
from kolora.pipeline.state import stopped_before
from kolora.sweep import sheet
from kolora.sweep.manifest import MANIFEST, read_manifest


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # field → value, the variant's own
    cfg: ExperimentConfig

    def root(self, sweep_dir: Path) -> Path:
        return Path(sweep_dir) / self.name


@dataclass
class Sweep:
    name: str
    dir: Path
    config_file: Path
    base_overrides: list[str]
    vary: dict[str, list[Any]]
    variants: list[Variant]

    def runs(self) -> list[RunDir]:
        return [RunDir(v.root(self.dir)) for v in self.variants]


# ---- planning -----------------------------------------------------------------------------------------------
def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """`train.lr=1e-4,3e-4` → {"train.lr": [0.0001, 0.0003]}; a YAML list (`train.x=[[a,b],[c]]`) for values
    that hold commas. Values are parsed as YAML scalars, like --set."""
    out: dict[str, list[Any]] = {}
    for item in items:
        field_, sep, text = item.partition("=")
        field_ = field_.strip()
        if not sep or not field_ or not text.strip():
            raise ConfigError(f"--vary {item}: expected FIELD=V1,V2 (e.g. --vary train.lr=1e-4,3e-4)")
        if field_ in out:
            raise ConfigError(f"--vary {item}: {field_} is varied twice; give all its values in one --vary")
        if text.strip().startswith("["):
            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"--vary {item}: not a YAML list ({e})") from None
        else:
            values = [yaml.safe_load(v) if v.strip() else "" for v in text.split(",")]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--vary {item}: give at least one value")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ConfigError(f"--vary {item}: a value is repeated")
        out[field_] = values
    if not out:
        raise ConfigError("kolora sweep: give at least one --vary FIELD=V1,V2 (e.g. --vary train.lr=1e-4,3e-4)")
    return out


def _label(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "empty"


def variant_names(vary: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) of every combination, in --vary order: `lr-0.001_rank-8`. A field is named by its
    last part unless two varied fields share it (then by its whole path)."""
    short = {f: f.split(".")[-1] for f in vary}
    names = {f: (s if list(short.values()).count(s) == 1 else f.replace(".", "-")) for f, s in short.items()}
    out = []
    for combo in itertools.product(*vary.values()):
        overrides = dict(zip(vary, combo, strict=True))
        name = "_".join(f"{names[f]}-{_label(v)}" for f, v in overrides.items())
        if not name[0].isalnum():
            name = "v" + name
        out.append((name, overrides))
    if len({n for n, _ in out}) != len(out):  # values that differ only in characters a folder name cannot hold
        out = [(f"v{i:02d}-{n}", o) for i, (n, o) in enumerate(out)]
    return out


def _set_item(field_: str, value: Any) -> str:
    return f"{field_}={json.dumps(value) if not isinstance(value, str) else value}"


def plan(config_file: str | Path, vary_items: list[str], runs_dir: Path, name: str | None = None,
         overrides: list[str] | None = None) -> Sweep:
    """Every variant's config, validated (a bad field or value names its --vary); nothing is written."""

    overrides = list(overrides or [])
    base = load_config(config_file, overrides)
    vary = parse_vary(vary_items)
    for f in vary:
        try:
            field_value(base, f)
        except AttributeError:
            raise ConfigError(f"--vary {f}=...: no config field {f} (give a dotted path like train.lr)") from None
        if f == "name":
            raise ConfigError("--vary name: the variants' names come from the varied fields; use --name for the "
                              "sweep's")
        if not changes_outputs(f):
            why = OPERATIONAL[f][1] if f in OPERATIONAL else "no stage's output depends on it"
            hint = "; vary train.seed for another training run's randomness" if f == "seed" else ""
            raise ConfigError(f"--vary {f}=...: {f} changes no output ({why}), so every variant would train the "
                              f"same LoRA and render the same tiles; vary a field the stages read{hint}")
    sweep_name = name or f"{base.name}-sweep"
    sweep_dir = Path(runs_dir) / sweep_name
    shared = [] if base.cache.dir else [f"cache.dir={sweep_dir / 'cache'}"]  # one store: entries encoded once
    variants, given = [], []
    for vname, own in variant_names(vary):
        items = [*overrides, *shared, *(_set_item(f, v) for f, v in own.items())]
        try:
            cfg = load_config(config_file, items, name=vname)
        except ConfigError as e:
            raise ConfigError(f"variant {vname} ({', '.join(_set_item(f, v) for f, v in own.items())}): "
                              f"{e}") from None
        variants.append(Variant(vname, {f: field_value(cfg, f) for f in own}, cfg))
        given.append(own)
    distinct_values(vary, given, variants)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", sweep_name):
        raise ConfigError(f"--name {sweep_name}: a sweep name is letters, digits, '.', '_' and '-'")
    return Sweep(sweep_name, sweep_dir, Path(config_file).resolve(), overrides, vary, variants)


def changes_outputs(field_: str) -> bool:
    """Whether some stage's output depends on `field_` (or on a field inside it, or on the section holding it):
    it is an input, a content field or a `continues` field of a stage (kolora.pipeline.registry), not operational."""


    read = {f for s in STAGES for f in (*s.inputs, *s.content, *s.continues)}
    return any(f == field_ or f.startswith(field_ + ".") or field_.startswith(f + ".") for f in read)


def distinct_values(vary: dict[str, list[Any]], given: list[dict[str, Any]], variants: list[Variant]) -> None:
    """ConfigError when two values of a varied field are one once the config has read them (1e-3 and 0.001,
    two spellings of one path): their variants would be the same run. `given[i]`: variant i's values as typed."""
    problems = []
    for f, values in vary.items():
        spellings: dict[str, list[Any]] = {}  # the value as read → the values given for it
        for typed, v in zip(given, variants, strict=True):
            same = spellings.setdefault(json.dumps(v.overrides[f], sort_keys=True, default=str), [])
            if typed[f] not in same:
                same.append(typed[f])
        problems += [f"--vary {f}={','.join(map(str, values))}: {' and '.join(map(str, forms))} are the same {f} "
                     f"once read ({read}), so their variants would be the same run; give each value once"
                     for read, forms in spellings.items() if len(forms) > 1]
    if problems:
        raise ConfigError("\n".join(problems))


def write_manifest(sweep: Sweep, **extra: Any) -> dict[str, Any]:
    """runs/<sweep>/sweep.json: what a sweep is (kept across reruns: a `slurm` entry is replaced, not lost)."""
    path = sweep.dir / MANIFEST
    old = read_manifest(sweep.dir) if path.is_file() else {}
    names = {v.name for v in sweep.variants}
    # a plan replaced with --force (kolora.sweep.names.check_name): its variants' folders stay, listed here
    superseded = {v.get("name"): v for v in old.get("superseded", []) if v.get("name") not in names}
    superseded.update({v.get("name"): {**v, "vary": old.get("vary"), "superseded": now()}
                       for v in old.get("variants", []) if v.get("name") not in names})
    data = {**old, "name": sweep.name, "config": str(sweep.config_file), "overrides": sweep.base_overrides,
            "vary": sweep.vary, "created": old.get("created", now()), "updated": now(),
            "variants": [{"name": v.name, "overrides": v.overrides, "run_dir": v.name,
                          "config_digest": v.cfg.digest()} for v in sweep.variants],
            "superseded": list(superseded.values()), **extra}
    if not data["superseded"]:
        del data["superseded"]
    sweep.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return data


# ---- sharing ingest / filter / cache --------------------------------------------------------------------------
def _link_tree(src: Path, dst: Path) -> None:
    """dst becomes a copy of src made of hard links (a plain copy across file systems), atomically."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        with atomic_dir(dst) as tmp:
            shutil.rmtree(tmp)
            shutil.copytree(src, tmp, copy_function=link, symlinks=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.adopt.kolora-tmp")
        tmp.unlink(missing_ok=True)
        link(str(src), str(tmp))
        os.replace(tmp, dst)


def adopt_shared(cfg: ExperimentConfig, run: RunDir, source: RunDir) -> list[str]:
    """Take over `source`'s ingest/filter/cache outputs for each of them whose key equals this run's (in
    pipeline order, stopping at the first that differs or is not complete there). Returns the stages adopted;
    a stage already complete here is left alone. Safe to repeat."""
    if run.root == source.root:
        return []
    try:
        src_cfg = source.load_config()
    except (ConfigError, OSError):
        return []
    keys, src_keys = Keys(cfg, run), Keys(src_cfg, source)
    adopted = []
    for name in (s.name for s in STAGES if s.shareable):
        if is_complete(name, cfg, run, keys):
            continue
        key = keys.output(name)
        if key is None or not is_complete(name, src_cfg, source, src_keys) or src_keys.output(name) != key:
            break
        for out in get(name).outputs:
            _link_tree(source.root / out, run.root / out)
        atomic_write_text(run.root / ".inputs" / name, (keys.work(name) or "") + "\n")
        summary = dict((source.read_manifest().get("stages", {}).get(name) or {}).get("summary") or {})
        if name == "cache":  # nothing encoded for this run: every entry is the source's
            summary.update(reused=summary.get("encoded", 0) + summary.get("reused", 0), encoded=0,
                           encoded_texts=0, encoded_images=0)
        summary["adopted_from"] = source.root.name
        with run.manifest() as m:
            m.setdefault("stages", {})[name] = {"status": "complete", "summary": summary, "error": None,
                                                "wall_s": 0.0, "adopted_from": str(source.root)}
        mark_complete(name, run, key, adopted_from=source.root.name)
        adopted.append(name)
    return adopted


# ---- in process ------------------------------------------------------------------------------------------------
def run_in_process(sweep: Sweep, console, display: StageDisplay, force: bool = False,
                   queued: Queued = unknown_queue) -> dict[str, str]:
    """Every variant in turn, in this process (its stages shown on `display`; the sweep's own lines printed
    on the rich `console`), then the comparison sheet. Returns {variant: "complete" | "failed: ..."}; a
    failed variant does not stop the others (an interruption does)."""

    warnings = []
    for v in sweep.variants:
        warnings += runner.preflight(v.cfg, here=True)
        RunDir(v.root(sweep.dir)).read_manifest()
    for line in dict.fromkeys(warnings):  # every variant reads the same prompt set
        console.print(f"kolora: warning: {line}", style="yellow", markup=False, highlight=False)
    write_manifest(sweep, launcher="in-process")
    first = RunDir(sweep.variants[0].root(sweep.dir))
    outcome: dict[str, str] = {}
    for n, v in enumerate(sweep.variants, 1):
        stopped = stopped_before(v.root(sweep.dir), queued)  # read before this sweep holds the variant's lock
        with acquire(v.root(sweep.dir), "run", queued=queued):
            sweep_temp(v.root(sweep.dir))
            run = runner.open_run(v.cfg, sweep.dir)
            console.print(f"[bold]kolora sweep[/] {sweep.name}: variant {n}/{len(sweep.variants)} {v.name} "
                          f"({', '.join(_set_item(f, x) for f, x in v.overrides.items())}) → {run.root}")
            if stopped:
                print(stopped.continuing(f"{sweep.name}/{v.name}"), file=sys.stderr)
            for stage in adopt_shared(v.cfg, run, first):
                console.print(f"  {stage:<7} [green]shared[/] with {first.root.name} (same key; hard links)")
            try:
                run_all(v.cfg, run, (), force, display)
                outcome[v.name] = "complete"
            except Interrupted:
                raise
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                outcome[v.name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                console.print(f"  [red]variant {v.name} failed[/]: {e}")
    write_sheet(sweep.dir)
    return outcome


def write_sheet(sweep_dir: Path) -> tuple[Path, Path]:
    return sheet.write(Path(sweep_dir))
