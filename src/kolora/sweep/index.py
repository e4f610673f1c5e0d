"""The lab's index: `RUNS_DIR/index.html`, one self-contained page (kolora.core.webpage: thumbnails as data:
URIs, inline style and script, nothing from the network) listing every run and sweep of a runs dir: name, date,
state, steps, the settings that differ between the runs, the selected checkpoint, the main scores with their
intervals, a grid thumbnail and a link to each run's report (a sweep's sheet). Every column sorts on a click
of its header; `index.html#sort=KEY` (or `#sort=-KEY`, descending) opens the page sorted.

Everything is read from the run folders (no Slurm: see `state`). `kolora index`, the end of `kolora run`, the job
that finishes a run on Slurm, and a sweep's sheet write it (`refresh`, which never fails its caller: a damaged
neighbour run is one row that says so, and any other error is only logged). Concurrent writers replace the
page atomically: the last one wins, and both wrote a whole page.

Here, in the sweep layer, because the page reads sweeps (sweep.json, the ranking of their variants) as well as
runs; the launcher and the CLI above call it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from kolora.core.errors import InputError, KoloraError
from kolora.core.rundir import RunDir, atomic_write_text, now
from kolora.core.runlock import LOCK, read_lock, unknown_queue
from kolora.core.stats import Interval, mean_interval
from kolora.core.webpage import data_uri, esc, fmt, page
from kolora.pipeline.state import RunState, run_state
from kolora.sweep.manifest import read_manifest
from kolora.sweep.names import folder_kind
from kolora.sweep.ranking import loss_curve, rank, read_scores, score_run

# PIL: imported in the function that uses it (a login node's CLI starts without it)

log = logging.getLogger("kolora.index")

INDEX = "index.html"
THUMB_PX = 200  # the longer side of a grid thumbnail
MAX_SETTINGS = 8  # differing settings shown as columns; the others are named under the table
METRICS = {"aesthetic": "aesthetic (LoRA)", "clip": "CLIP (LoRA)"}  # eval/scores.json's, as the ranking reads them
SELECTION = Path("lora") / "selection.json"  # the selected checkpoint, where a selection stage wrote one
NOT_SETTINGS = {"name"}  # differs between any two runs by definition
HEARTBEAT_S = 300  # a lock heartbeat younger than this is a live job (run_state's stale_after_s)


@dataclass
class Row:
    """One line of the page: a run, a sweep, or a sweep's variant (name SWEEP/VARIANT)."""

    name: str
    kind: str  # run, sweep, variant
    folder: Path
    state: str = "unknown"
    detail: str = ""
    created: str | None = None
    steps: int | None = None  # the trained step of the kept LoRA
    planned: int | None = None  # train.steps
    settings: dict[str, Any] = field(default_factory=dict)  # the config, flattened to dotted keys
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    scores: dict[str, Interval] = field(default_factory=dict)  # metric -> the LoRA's mean and interval
    thumb: bytes | None = None  # JPEG
    link: Path | None = None
    note: str = ""  # a sweep's variants and best variant


# ---- reading a run ------------------------------------------------------------------------------------------
def state(run: RunDir, manifest: dict[str, Any]) -> RunState:
    """run_state from the run folder alone. Where that needs Slurm's word (a submission's jobs hold the run lock),
    the manifest decides a failed stage, then the lock's heartbeat (fresh: a running job), and otherwise the
    state is "unknown" (queued, or ended without a word: `kolora status` asks Slurm)."""
    st = run_state(run, manifest, stale_after_s=HEARTBEAT_S, queued=unknown_queue)
    if st.state != "unknown":
        return st
    ended = run_state(run, manifest, stale_after_s=HEARTBEAT_S, queued=lambda ids: set())
    if ended.state == "failed":  # its downstream jobs were cancelled: a fresh heartbeat is the job that failed
        return ended
    found = read_lock(run.root / LOCK)
    heartbeat = found[1].get("heartbeat") if found else None
    if isinstance(heartbeat, int | float) and time.time() - heartbeat < HEARTBEAT_S:
        return RunState("running", st.stage, "running, by its Slurm jobs (fresh heartbeat)", st.complete)
    return RunState("unknown", st.stage, "its Slurm jobs hold the run: queued, or ended without a word "
                    "(`kolora status` asks Slurm)", st.complete)


def flatten(node: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as {dotted key: JSON-able value}: every field of the model (those its dump leaves out at their
    default too; a dict-valued field is one value), or, for a config.yaml this kolora cannot read, its YAML."""
    model = isinstance(node, BaseModel)
    items = [(k, getattr(node, k)) for k in type(node).model_fields] if model else list(node.items())
    out: dict[str, Any] = {}
    for key, value in items:
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, BaseModel) or (not model and isinstance(value, dict)):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = to_jsonable_python(value, fallback=str)
    return out


def settings(run: RunDir) -> dict[str, Any]:
    if not run.config_file.is_file():
        return {}
    try:
        return flatten(run.load_config())
    except KoloraError:  # another kolora version's fields, a prompt file gone: the file as written
        try:
            raw = yaml.safe_load(run.config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return flatten(raw) if isinstance(raw, dict) else {}


def _interval(value: Any) -> Interval | None:
    if isinstance(value, dict) and all(isinstance(value.get(k), int | float) for k in ("mean", "low", "high")):
        return Interval(float(value["mean"]), float(value["low"]), float(value["high"]), int(value.get("n") or 0))
    return None


def score_intervals(scores: dict[str, Any] | None) -> dict[str, Interval]:
    """The LoRA's mean score per metric with its interval: as eval/scores.json gives it ({mean, low, high, n}
    in place of the summary's mean, or beside it as lora_interval), else bootstrapped over its tiles
    (kolora.core.stats), else the summary's mean alone."""
    out: dict[str, Interval] = {}
    if not scores:
        return out
    summary = scores.get("summary") if isinstance(scores.get("summary"), dict) else {}
    tiles = scores.get("tiles") if isinstance(scores.get("tiles"), list) else []
    for metric in METRICS:
        part = summary.get(metric) if isinstance(summary.get(metric), dict) else {}
        given = _interval(part.get("lora")) or _interval(part.get("lora_interval"))
        if given:
            out[metric] = given
            continue
        values = [t[metric]["lora"] for t in tiles if isinstance(t, dict) and isinstance(t.get(metric), dict)
                  and isinstance(t[metric].get("lora"), int | float)]
        try:
            out[metric] = mean_interval(values)
        except ValueError:  # no tiles, or a non-finite score
            if isinstance(part.get("lora"), int | float):
                mean = float(part["lora"])
                out[metric] = Interval(mean, mean, mean, 0)
    return out


def selection(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / SELECTION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # evaluate.select: last records the final step: no choice was made
    chosen = isinstance(data, dict) and isinstance(data.get("step"), int) and data.get("metric") != "last"
    return data if chosen else None


def thumbnail(grid: Path) -> bytes | None:
    """The grid, at most THUMB_PX on its longer side, as JPEG; None without a readable grid."""
    from PIL import Image

    if not grid.is_file():
        return None
    try:
        with Image.open(grid) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
            return buf.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def run_row(folder: Path, name: str, kind: str = "run") -> Row:
    run = RunDir(folder)
    manifest = run.read_manifest()
    st = state(run, manifest)
    row = Row(name, kind, run.root, state=st.state, detail=st.detail, created=manifest.get("created"))
    row.settings = settings(run)
    planned = row.settings.get("train.steps")
    row.planned = planned if isinstance(planned, int) else None
    curve = loss_curve(run.root)
    row.steps = curve[-1][0] if curve else None
    chosen = selection(run.root)
    if chosen:
        row.checkpoint_step = chosen["step"]
        value = _interval(chosen.get("value"))
        row.checkpoint = f"step {chosen['step']}" + (f" ({chosen.get('metric', 'score')} {value})" if value else "")
    elif (run.lora).is_dir() and any(run.lora.iterdir()):
        row.checkpoint, row.checkpoint_step = "last", row.steps
    row.scores = score_intervals(read_scores(run.root))
    row.thumb = thumbnail(run.grid_file)
    report = run.report / "report.html"
    row.link = report if report.is_file() else None
    return row


def unreadable_row(folder: Path, name: str, kind: str, error: BaseException) -> Row:
    """A folder that could not be read: listed, with why, so that it neither hides nor breaks the others."""
    text = str(error).strip().splitlines()
    return Row(name, kind, folder, state="unreadable", detail=text[0] if text else type(error).__name__)


def _guarded(folder: Path, name: str, kind: str) -> Row:
    try:
        return run_row(folder, name, kind)
    except Exception as e:  # noqa: BLE001 - a damaged neighbour run is one row that says so, not a failed page
        log.debug("index: %s", folder, exc_info=True)
        return unreadable_row(folder, name, kind, e)


# ---- reading a sweep ----------------------------------------------------------------------------------------
def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())


def sweep_rows(folder: Path) -> list[Row]:
    """The sweep's own row, then its variants' (those sweep.json lists, in its order, then any other run folder
    in it: superseded variants)."""
    manifest = read_manifest(folder)
    listed = [str(v.get("run_dir") or v.get("name")) for v in manifest["variants"] if isinstance(v, dict)]
    others = [p.name for p in _visible_dirs(folder) if p.name not in listed and folder_kind(p) == "run"]
    variants = [_guarded(folder / d, f"{folder.name}/{d}", "variant")
                for d in listed + others if (folder / d).is_dir()]
    row = Row(folder.name, "sweep", folder.resolve(), created=manifest.get("created"))
    states = [v.state for v in variants]
    if not states:
        row.state = "not started"
    elif all(s == "complete" for s in states):
        row.state = "complete"
    else:
        row.state = next((s for s in ("running", "failed", "unreadable", "stopped", "unknown") if s in states),
                         next(s for s in states if s != "complete"))
    counts = {s: states.count(s) for s in dict.fromkeys(states)}
    row.detail = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no variant has started"
    vary = manifest.get("vary") if isinstance(manifest.get("vary"), dict) else {}
    row.note = f"{len(listed)} variants" + (f", varies {', '.join(map(str, vary))}" if vary else "")
    ranked = [s for s in rank([score_run(v.name, v.folder) for v in variants if v.state != "unreadable"])
              if s.scored or s.final_loss is not None]
    if ranked:
        best = next(v for v in variants if v.name == ranked[0].name)
        row.checkpoint = f"best: {best.name.split('/', 1)[1]}"
        row.scores, row.thumb, row.steps = best.scores, best.thumb, best.steps
    sheet = folder / "sweep.html"
    row.link = sheet.resolve() if sheet.is_file() else None
    return [row, *variants]


def collect(runs_dir: Path) -> list[Row]:
    """Every run and sweep of `runs_dir` (its folders; a sweep's variants after it), by name."""
    rows: list[Row] = []
    for folder in _visible_dirs(Path(runs_dir)):
        kind = folder_kind(folder)
        if kind == "run":
            rows.append(_guarded(folder, folder.name, "run"))
        elif kind == "sweep":
            try:
                rows += sweep_rows(folder)
            except Exception as e:  # noqa: BLE001 - as for a run: one row that says so
                rows.append(unreadable_row(folder, folder.name, "sweep", e))
    return rows


def differing(rows: list[Row]) -> list[str]:
    """The config keys whose values are not the same in every run listed (a key a run lacks counts as a
    value), in config order."""
    runs = [r for r in rows if r.kind != "sweep" and r.settings]
    if len(runs) < 2:
        return []
    keys = dict.fromkeys(k for r in runs for k in r.settings if k not in NOT_SETTINGS)
    return [k for k in keys
            if len({json.dumps(r.settings.get(k, "<missing>"), sort_keys=True, default=str) for r in runs}) > 1]


# ---- the page -----------------------------------------------------------------------------------------------
STYLE = f"""
body {{ max-width: none; margin: 24px; }}
#runs th {{ cursor: pointer; user-select: none; white-space: nowrap; }}
#runs th[aria-sort=ascending]::after {{ content: " ▲"; }} #runs th[aria-sort=descending]::after {{ content: " ▼"; }}
#runs td {{ vertical-align: top; }} #runs img {{ max-width: {THUMB_PX}px; max-height: {THUMB_PX}px; display: block; }}
tr.sweep td {{ background: #f7f7fb; }} #runs td:nth-child(4) {{ white-space: nowrap; }} td small {{ color: #666; }}
td.complete {{ color: #176d2c; }} td.running {{ color: #1456a8; }}
td.failed, td.unreadable {{ color: #b3261e; font-weight: bold; }}
"""

# Sorting: a click on a header sorts by that column (again: the other way); cells sort by data-sort where they
# have one (numbers numerically), else by their text; empty cells stay last. #sort=KEY / #sort=-KEY on load.
SORT = """
function koloraSort(key, desc) {
  var table = document.getElementById('runs'), body = table.tBodies[0];
  var ths = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var col = ths.findIndex(function (th) { return th.dataset.key === key; });
  if (col < 0) { return; }
  function value(row) { var c = row.cells[col], v = c.getAttribute('data-sort');
    return v === null ? c.textContent.trim() : v; }
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = value(a), y = value(b);
    if (x === '' || y === '') { return (x === '') - (y === ''); }
    var nx = Number(x), ny = Number(y);
    var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return desc ? -c : c;
  });
  rows.forEach(function (r) { body.appendChild(r); });
  ths.forEach(function (th) { th.removeAttribute('aria-sort'); });
  ths[col].setAttribute('aria-sort', desc ? 'descending' : 'ascending');
  document.body.setAttribute('data-sorted', (desc ? '-' : '') + key);
}
document.addEventListener('DOMContentLoaded', function () {
  Array.prototype.forEach.call(document.querySelectorAll('#runs thead th'), function (th) {
    th.addEventListener('click', function () {
      koloraSort(th.dataset.key, th.getAttribute('aria-sort') === 'ascending'); });
  });
  var m = /[#&]sort=(-?)([\\w.-]+)/.exec(location.hash);
  if (m) { koloraSort(m[2], m[1] === '-'); }
});
"""


def _cell(text: str, sort: Any = None, cls: str = "") -> str:
    attrs = (f' class="{esc(cls)}"' if cls else "") + ("" if sort is None else f' data-sort="{esc(sort)}"')
    return f"<td{attrs}>{text}</td>"


def _setting(value: Any) -> str:
    if isinstance(value, list | dict):
        return esc(json.dumps(value, ensure_ascii=False))
    return "–" if value is None else fmt(value)


def _setting_sort(value: Any) -> str:
    """A setting's sort key: numbers as numbers (the script compares them so), a missing one empty (last)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _score(iv: Interval | None) -> str:
    if iv is None:
        return _cell("–")
    spread = "" if iv.n == 0 else f"<br><small>[{iv.low:.4g}, {iv.high:.4g}] n={iv.n}</small>"
    return _cell(f"{iv.mean:.4g}{spread}", f"{iv.mean:.6g}", "num")


def _href(target: Path, runs_dir: Path) -> str:
    rel = os.path.relpath(target, runs_dir)
    return esc(urllib.parse.quote(Path(rel).as_posix()))


def render(runs_dir: Path, rows: list[Row]) -> str:
    runs_dir = Path(runs_dir).resolve()
    shown = differing(rows)
    extra, shown = shown[MAX_SETTINGS:], shown[:MAX_SETTINGS]
    head = [("grid", "grid"), ("name", "name"), ("kind", "kind"), ("created", "created"), ("state", "state"),
            ("steps", "steps"), *((k, k) for k in shown), ("checkpoint", "checkpoint"),
            *((m, label) for m, label in METRICS.items()), ("report", "report")]
    th = "".join(f'<th data-key="{esc(key)}" title="sort by {esc(label)}">{esc(label)}</th>' for key, label in head)
    body = []
    for r in rows:
        thumb = (f'<img src="{data_uri(r.thumb, "image/jpeg")}" alt="grid of {esc(r.name)}">' if r.thumb
                 else "<small>no grid</small>")
        kind = esc(r.kind) + (f"<br><small>{esc(r.note)}</small>" if r.note else "")
        steps = "–" if r.steps is None and r.planned is None else \
            f"{fmt(r.steps)}" + (f" / {r.planned}" if r.planned is not None else "")
        cells = [_cell(thumb, 1 if r.thumb else 0),
                 _cell(esc(r.name), r.name),
                 _cell(kind, r.kind),
                 _cell(esc((r.created or "–").replace("T", " ")[:16]), r.created or ""),
                 _cell(f'{esc(r.state)}<br><small>{esc(r.detail)}</small>', r.state, r.state.replace(" ", "-")),
                 _cell(steps, "" if r.steps is None else r.steps, "num"),
                 *(_cell(_setting(r.settings.get(k)), _setting_sort(r.settings.get(k))) for k in shown),
                 _cell(esc(r.checkpoint or "–"), "" if r.checkpoint_step is None else r.checkpoint_step),
                 *(_score(r.scores.get(m)) for m in METRICS),
                 _cell(f'<a href="{_href(r.link, runs_dir)}">{"sweep.html" if r.kind == "sweep" else "report"}</a>'
                       if r.link else "–", 1 if r.link else "")]
        body.append(f'<tr class="{esc(r.kind)}" data-name="{esc(r.name)}">{"".join(cells)}</tr>')
    runs = sum(r.kind != "sweep" for r in rows)
    sweeps = len(rows) - runs
    more = (f'<p class="note">{len(extra)} more settings differ: {esc(", ".join(extra))}.</p>' if extra else "")
    intro = (f"<h1>kolora runs in {esc(runs_dir)}</h1>"
             f'<p class="note">{runs} runs, {sweeps} sweeps; written {esc(now())} (refreshed by <code>kolora run'
             "</code>, <code>kolora sweep</code>, a run's last Slurm job and <code>kolora index</code>). State from each run folder; steps: the "
             "kept LoRA's step / train.steps; scores: the LoRA's mean over its tiles with a 95 % bootstrap "
             "interval; checkpoint: the selected step (lora/selection.json), else the last; settings: those that "
             "differ between the runs. Click a header to sort.</p>")
    table = f'<table id="runs"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return page(f"kolora runs: {runs_dir.name}", intro + more + table + f"<script>{SORT}</script>", STYLE)


def write_index(runs_dir: Path) -> tuple[Path, list[Row]]:
    """RUNS_DIR/index.html from what the folder holds now (atomically replaced), and its rows."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise InputError(f"{runs_dir} is not a folder; give the folder that holds the runs (--runs-dir, "
                         "$KOLORA_RUNS)")
    path, rows = runs_dir / INDEX, collect(runs_dir)
    atomic_write_text(path, render(runs_dir, rows))
    return path, rows


def runs_dir_of(run_root: Path) -> Path:
    """The runs dir a run belongs to: its parent, or a sweep variant's sweep's parent."""
    parent = Path(run_root).resolve().parent
    return parent.parent if folder_kind(parent) == "sweep" else parent


def refresh(runs_dir: Path) -> Path | None:
    """write_index for a command or job whose own work is done: an error is logged, never raised."""
    try:
        path = write_index(runs_dir)[0]
        log.info("wrote %s", path)
        return path
    except Exception as e:  # noqa: BLE001 - the index is a convenience; it must not fail the run that wrote it
        log.warning("could not refresh %s: %s", Path(runs_dir) / INDEX, e, exc_info=log.isEnabledFor(logging.DEBUG))
        return None


@contextlib.contextmanager
def refreshed_after(runs_dir: Path, armed: bool = True) -> Iterator[Callable[[], None]]:
    """The block, then `refresh(runs_dir)` however it ends (a failed or stopped run is listed as such), once
    armed: at once, or with armed=False when the block calls what this yields (`kolora run` once it holds the
    run lock: a command refused before then writes nothing)."""
    due = [armed]
    try:
        yield lambda: due.__setitem__(0, True)
    finally:
        if due[0]:
            refresh(runs_dir)


def refresh_for_run(run_root: Path) -> Path | None:
    try:
        runs_dir = runs_dir_of(run_root)
    except Exception as e:  # noqa: BLE001 - as refresh
        log.warning("could not find the runs dir of %s for its index: %s", run_root, e)
        return None
    return refresh(runs_dir)
