"""filter/report.html: the filter's report as a page a person looks at, to see in a minute whether a threshold
is wrong. Self-contained (kolora.core.webpage: thumbnails inline as data: URIs, inline style, nothing from the
network), so the one file can be copied off the cluster.

  - counts per step: records in, dropped and passed on by ingest, the header pass, the full decode and each op
    of filter.ops in order (the image_deduplicator last); per source too, when the samples carry a `source`
  - a contact sheet of the dropped samples grouped by what dropped them (the op, or the check), each with its
    thumbnail (kolora.filter.thumbs), file name, size, caption, reason and any scores, thresholds and op stats
    its report row carries; a near-duplicate beside the kept image it duplicates, with their Hamming distance

At most PER_GROUP samples are shown per group (the first ones in dataset order, then "and N more"): a
10⁶-image dataset makes a page of a few MB, not 10⁵ thumbnails. Every sample and its reason stays in
filter/report.json. The filter stage writes the page when it merges; the report stage writes it when it is
missing (a run filtered before the page existed)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from kolora.core.rundir import RunDir, atomic_write_text
from kolora.core.webpage import data_uri, esc, fmt, page, table
from kolora.filter import thumbs

PAGE = "report.html"
THUMBS = "thumbs"
PER_GROUP = 48
CAPTION_CHARS = 90

# Checks before Data-Juicer, in the order they run: a dropped row's `stage` -> its group's label
CHECKS = {"ingest": "rejected at ingest", "header": "header pass", "decode": "full decode"}
UNTRACED = "Data-Juicer (no op traced it)"
# Row fields shown in their own place; any other scalar field (a score, a threshold...) joins the caption
_SHOWN = {"id", "image", "text", "size", "format", "kept", "reason", "op", "stage", "mask", "stats", "duplicate_of",
          "distance", "image_hash", "source"}
_DECODED = (None, "data-juicer")  # stages of rows whose image passed the full decode: safe to open here

STYLE = """
.sheet { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 150px; font-size: 11px; overflow-wrap: anywhere; }
figure.pair { width: 300px; } figure.pair .imgs { display: flex; gap: 6px; }
figure img, figure .none { width: 140px; height: 140px; object-fit: contain; image-rendering: pixelated;
  border: 1px solid #ccc; background: #f6f6f6; }
figure .none { display: flex; align-items: center; justify-content: center; color: #888; text-align: center; }
figcaption { color: #444; } figcaption .why { color: #a33; } figcaption q { color: #222; }
.label { font-size: 10px; color: #666; }
"""


def group_of(row: dict[str, Any]) -> str:
    """What dropped a sample: its op, or the check before Data-Juicer."""
    if row.get("op"):
        return str(row["op"])
    return CHECKS.get(row.get("stage") or "", UNTRACED)


def steps(report: dict[str, Any]) -> list[str]:
    """The groups in the order they run: the checks, the configured ops, then any other group found."""
    ops = [str(op) for op in report.get("summary", {}).get("ops", [])]
    order = [*CHECKS.values(), *ops]
    found = [group_of(r) for r in report["samples"] if not r.get("kept")]
    return order + [g for g in dict.fromkeys(found) if g not in order]


def _sources(rows: list[dict[str, Any]]) -> list[str]:
    """The datasets' names when the samples carry one (an ingest rejection's `source` is where it was read)."""
    return [str(s) for s in dict.fromkeys(r.get("source") for r in rows if r.get("stage") != "ingest")
            if s is not None]


def counts_html(report: dict[str, Any]) -> str:
    """The count tables: per step (in, dropped, passed on), and per source when the samples carry one."""
    rows = report["samples"]
    dropped = Counter(group_of(r) for r in rows if not r.get("kept"))
    left = len(rows)
    table_rows = []
    for step in steps(report):
        table_rows.append([step, left, dropped[step], left - dropped[step]])
        left -= dropped[step]
    out = [table(["step", "in", "dropped", "passed"], table_rows, "steps")]
    sources = _sources(rows)
    if sources:
        cols = [s for s in steps(report) if dropped[s] and s != CHECKS["ingest"]]
        seen, kept, lost = Counter(), Counter(), Counter()
        for r in rows:
            if r.get("stage") != "ingest" and r.get("source") is not None:
                src = str(r["source"])
                seen[src] += 1
                kept[src] += bool(r.get("kept"))
                lost[src, group_of(r)] += not r.get("kept")
        out.append(table(["source", "samples", "kept", *(f"dropped by {c}" for c in cols)],
                         [[s, seen[s], kept[s], *(lost[s, c] for c in cols)] for s in sources], "sources"))
        if dropped[CHECKS["ingest"]]:
            out.append(f"<p class='note'>{dropped[CHECKS['ingest']]} record(s) rejected at ingest are not counted "
                       "per source.</p>")
    return "\n".join(out)


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(_value(x) for x in v[:4]) + (", …" if len(v) > 4 else "")
    if isinstance(v, str) and len(v) > 40:
        return esc(v[:40]) + "…"
    return fmt(v)


def _details(row: dict[str, Any]) -> list[str]:
    """The row's other fields (scores, thresholds, where its caption came from...), a level of dicts unfolded,
    then its op's stats, as escaped `key=value` strings."""
    out = []
    for k, v in row.items():
        if k in _SHOWN:
            continue
        for key, value in ({f"{k}.{sub}": x for sub, x in v.items()} if isinstance(v, dict) else {k: v}).items():
            if value is None or isinstance(value, str | int | float | bool | list):
                out.append(f"{esc(key)}={_value(value)}")
    stats = row.get("stats") if isinstance(row.get("stats"), dict) else {}
    return out + [f"{esc(k)}={_value(v)}" for k, v in stats.items() if not str(k).startswith("__")]


class _Thumbs:
    """The thumbnails the page shows, made (or found) once each, as data: URIs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.used: dict[str, Path | None] = {}

    def img(self, row: dict[str, Any], label: str = "") -> str:
        sid = row.get("id")
        path = None
        if sid is not None and row.get("stage") in _DECODED:
            if sid not in self.used:
                self.used[sid] = thumbs.ensure(self.folder, str(sid), row.get("image"))
            path = self.used[sid]
        name = Path(str(row.get("image") or "no image")).name
        tag = (f'<img alt="{esc(name)}" src="{data_uri(path.read_bytes(), "image/jpeg")}">' if path is not None else
               f"<div class='none'>{'no image' if not row.get('image') else 'not opened'}</div>")
        return f"<div>{tag}{f'<div class=label>{esc(label)}</div>' if label else ''}</div>"


def _caption(row: dict[str, Any], with_reason: bool = True) -> str:
    size = row.get("size")
    parts = [f"<b>{esc(row.get('id') or '–')}</b> {esc(Path(str(row.get('image') or '')).name)}"
             + (f" {int(size[0])}×{int(size[1])}" if isinstance(size, list) and len(size) == 2 else "")]
    if row.get("source") is not None:
        parts.append(f"{'at' if row.get('stage') == 'ingest' else 'source'} {esc(row['source'])}")
    if with_reason and row.get("reason"):
        parts.append(f"<span class='why'>{esc(row['reason'])}</span>")
    parts += _details(row)
    text = str(row.get("text") or "")
    if text:
        short = text if len(text) <= CAPTION_CHARS else text[:CAPTION_CHARS] + "…"
        parts.append(f"<q title=\"{esc(text)}\">{esc(short)}</q>")
    return "<figcaption>" + "<br>".join(parts) + "</figcaption>"


def _figure(row: dict[str, Any], by_id: dict[str, dict[str, Any]], shots: _Thumbs) -> str:
    original = by_id.get(str(row.get("duplicate_of"))) if row.get("duplicate_of") is not None else None
    if original is None:
        return f"<figure>{shots.img(row)}{_caption(row)}</figure>"
    pair = shots.img(original, f"kept {original.get('id')}") + shots.img(row, f"dropped {row.get('id')}")
    distance = row.get("distance")
    return (f"<figure class='pair'><div class='imgs'>{pair}</div><figcaption>duplicate of <b>{esc(original['id'])}"
            f"</b>{f', Hamming distance {fmt(distance)} bits' if distance is not None else ''}</figcaption>"
            f"{_caption(row, with_reason=False)}</figure>")


def build(report: dict[str, Any], thumbs_dir: Path, title: str) -> tuple[str, list[Path]]:
    """The page and the thumbnails it shows (made in `thumbs_dir` when missing)."""
    rows = report["samples"]
    summary = report.get("summary", {})
    by_id = {str(r["id"]): r for r in rows if r.get("id") is not None}
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if not r.get("kept"):
            groups.setdefault(group_of(r), []).append(r)
    order = [g for g in steps(report) if g in groups]
    kept = sum(bool(r.get("kept")) for r in rows)
    shards = summary.get("shards") or 1
    parts = [f"<h1>{esc(title)}</h1>",
             f"<p>{len(rows)} records in: <b>{kept} kept</b>, <b>{len(rows) - kept} dropped</b>"
             f"{f' (filtered in {fmt(shards)} shards)' if shards != 1 else ''}. Every sample and its reason: "
             "filter/report.json.</p>",
             "<h2>Counts per step</h2>", counts_html(report),
             "<h2>Dropped samples</h2>",
             f"<p class='note'>Grouped by what dropped them, in the order the checks and ops run; at most {PER_GROUP} "
             "per group (the first in dataset order). Images the header pass or the full decode rejected are not "
             "opened again.</p>"]
    if not order:
        parts.append("<p class='note'>Nothing was dropped.</p>")
    else:
        parts.append("<p>" + " · ".join(f"<a href='#g{i}'>{esc(g)} ({len(groups[g])})</a>"
                                        for i, g in enumerate(order)) + "</p>")
    shots = _Thumbs(thumbs_dir)
    for i, g in enumerate(order):
        members = groups[g]
        parts.append(f"<h2 id='g{i}'>{esc(g)}: {len(members)} dropped</h2><div class='sheet'>")
        parts += [_figure(r, by_id, shots) for r in members[:PER_GROUP]]
        parts.append("</div>")
        if len(members) > PER_GROUP:
            parts.append(f"<p class='note'>and {len(members) - PER_GROUP} more (in filter/report.json)</p>")
    html = page(title, "\n".join(parts), STYLE)
    return html, [p for p in shots.used.values() if p is not None]


def write(run: RunDir, report: dict[str, Any], name: str) -> Path:
    """filter/report.html for this report (thumbnails made when missing, those no longer shown removed)."""
    html, used = build(report, run.filter / THUMBS, f"kolora filter report: {name}")
    out = run.filter / PAGE
    atomic_write_text(out, html)
    thumbs.prune(run.filter / THUMBS, used)
    return out


def read_report(run: RunDir) -> dict[str, Any] | None:
    """filter/report.json, or None when there is none (or it is not a filter report)."""
    try:
        report = json.loads((run.filter / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("samples"), list) else None


def write_if_missing(run: RunDir, report: dict[str, Any], name: str) -> Path:
    """filter/report.html for a run filtered before the page existed (the filter stage writes it otherwise)."""
    out = run.filter / PAGE
    return out if out.is_file() else write(run, report, name)
