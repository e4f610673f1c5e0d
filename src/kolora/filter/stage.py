"""Stage `filter`: run/data/ -> a header check of every image, then Data-Juicer -> run/filter/ + run/trainset/.

1. Header pass (kolora.filter.headers; PIL, no full decode for complete JPEG/PNG files): missing, unreadable,
   non-image and truncated files are recorded with their reason. Only good samples reach Data-Juicer, which
   otherwise drops whole batches on one bad file and keeps truncated JPEGs.
2. Data-Juicer through its Python API (kolora.filter.dj.runner) with cfg.filter.ops as `process`,
   `skip_op_error: false` and a tracer that logs every dropped sample (kolora.filter.dj.trace; Data-Juicer's own
   RayTracer with the Ray executor), so each dropped sample is attributed to the op that dropped it. Its work
   dir, caches and logs live in run/filter/dj/ and the process-wide state it changes is restored afterwards
   (kolora.filter.dj.sandbox). With filter.fast_ops (the default) image_shape_filter / image_aspect_ratio_filter run
   as kolora's header-only ops (kolora.filter.dj.ops: same arguments and stats, same kept samples, no full decode);
   the report names the ops as configured, `summary.dj_ops` what ran.
   Between 1 and 2 every image that passed the header pass is fully decoded, as the cache stage decodes it,
   over the job's CPUs (kolora.filter.decode): pixel data that does not decode and decompression bombs get
   their reason too. With data.captions: generate | replace the samples are captioned next, before Data-Juicer,
   and data.caption_prefix goes before every kept caption after it (kolora.filter.captions). A stop request
   (kolora.core.interrupt) ends the stage between images or around Data-Juicer.
   With an image_deduplicator in filter.ops, Data-Juicer runs the other ops, then its image_deduplicator hashes
   the kept images; the merge (step 3) drops the later copies across all slices (kolora.filter.dedup).
3. Outputs:
     filter/result.jsonl           kept samples, tutorial format {"id", "text", "image": [path]} (+ "mask": path)
     filter/report.json            {"summary", "samples": [every sample and every ingest rejection, with reason]}
     filter/report.html            counts per step and a contact sheet of the dropped samples (thumbnails in
                                   filter/thumbs/, made once; kolora.filter.report_page)
     trainset/train/<n>.<ext>      the kept images (hard links where possible; kolora.filter.trainset)
     trainset/train/metadata.csv   file_name,text -- the tutorial's training format (+ mask, when a kept sample
                                   has a loss mask: trainset/train/<n>_mask.<ext>)

With filter.shards: N the samples are filtered as N contiguous slices (steps 1-2 per slice: a Slurm array
task each, or one after another in process) and merged into the same outputs (kolora.filter.shards).
"""


from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kolora.core import shards as core_shards
from kolora.core.config import ExperimentConfig
from kolora.core.errors import ConfigError
from kolora.core.interrupt import Interrupted, requested
from kolora.core.rundir import RunDir, atomic_write_json, atomic_write_text
from kolora.core.stage import StageContext
from kolora.filter import captions, dedup, report_page
from kolora.filter import shards as filter_shards
from kolora.filter.decode import verify_samples
from kolora.filter.dj.runner import (  # noqa: F401 - traced_op: part of this module's interface
    FilterError,
    dj_process,
    image_hashes,
    run_data_juicer,
    traced_op,
    validate_ops,
)
from kolora.filter.headers import ImageCheck, check_image  # noqa: F401 - check_image: part of this module's interface
from kolora.filter.trainset import write_trainset
from kolora.ingest.samples import read_samples

DJ_SPECIAL_TOKENS = ("<__dj__image>", "<|__dj__eoc|>")


# the stage --------------------------------------------------------------------------------------------------
def _stop_point(where: str) -> None:
    """Stop cleanly on a stop request (the job is requeued); the rerun redoes what no shard marker records."""
    if requested() is not None:
        raise Interrupted(f"filter stopped {where} on {requested()}; run it again to continue")


def _strip_tokens(text: str) -> str:
    for tok in DJ_SPECIAL_TOKENS:
        text = text.replace(tok, "")
    return text.strip()


def _first_image(rec: dict[str, Any]) -> str | None:
    img = rec.get("image")
    if isinstance(img, list):
        return img[0] if img else None
    return img


def _by_op_message(by_op: Counter, header: Counter) -> str:
    parts = [f"{op} dropped {n}" for op, n in by_op.items()] + [f"{n} {r}" for r, n in header.items()]
    return ", ".join(parts) or "nothing was dropped by an op"


def _by_source_ops(cfg: ExperimentConfig, good: list[dict[str, Any]], report: dict[str, dict[str, Any]],
                   dj_dir: Path) -> list[tuple[ExperimentConfig, list[dict[str, Any]], Path]]:
    """Data-Juicer's runs over `good`: the samples under filter.ops in dj_dir, and each source with its own
    filter_ops (data.sources) under those, in dj_dir's sibling <dj_dir>-<source>; runs with no sample left out
    (filter.ops' one always made, as without sources)."""
    own = {s.name: s.filter_ops for s in cfg.data.sources if s.filter_ops is not None}
    groups: dict[str | None, list[dict[str, Any]]] = {None: []}
    for g in good:
        name = report[g["id"]].get("source")
        groups.setdefault(name if name in own else None, []).append(g)
    runs = []
    for name, group in groups.items():
        if name is None:
            runs.append((cfg, group, dj_dir))
        else:
            ops_cfg = cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"ops": own[name]})})
            runs.append((ops_cfg, group, dj_dir.with_name(f"{dj_dir.name}-{name}")))
    return [r for r in runs if r[1] or r[2] == dj_dir]


def validate_all_ops(cfg: ExperimentConfig) -> None:
    """filter.ops and each source's filter_ops (data.sources) against Data-Juicer's registry (ConfigError)."""
    validate_ops(cfg.filter.ops)
    for s in cfg.data.sources:
        if s.filter_ops is not None:
            try:
                validate_ops(s.filter_ops)
            except ConfigError as e:
                raise ConfigError(str(e).replace("filter.ops[", f"data.sources {s.name!r} filter_ops[")) from None


def filter_slice(cfg: ExperimentConfig, samples: list[dict[str, Any]], dj_dir: Path) -> dict[str, Any]:
    """Steps 1-2 for some samples (all of them, or one shard): {"entries": a report row per sample in input
    order, "kept": the kept samples in input order, "seconds": {"header", "decode", "data_juicer"}}."""
    t0 = time.perf_counter()
    # 1. header pass
    report: dict[str, dict[str, Any]] = {}
    good: list[dict[str, Any]] = []
    masks = {s["id"]: s["mask"] for s in samples if s.get("mask")}  # beside Data-Juicer, which sees images only
    for n, s in enumerate(samples):
        _stop_point(f"in the header pass ({n} of {len(samples)} images)")
        image = _first_image(s)
        reason, size, fmt = check_image(image) if image else ImageCheck("no image", None)
        if reason is None and s["id"] in masks and (why := check_image(masks[s["id"]]).reason):
            reason = f"mask: {why}"
        report[s["id"]] = {"id": s["id"], "image": image, "text": s.get("text"), "size": list(size) if size else None,
                           "format": fmt, "kept": False, "reason": reason, "op": None,
                           "stage": "header" if reason else None,
                           **({"mask": masks[s["id"]]} if s["id"] in masks else {}),
                           **({"source": s["source"]} if "source" in s else {})}
        if reason is None:
            good.append({"id": s["id"], "text": s["text"], "image": [image]})
    t_header = time.perf_counter() - t0

    # 1b. full decode of what the header pass accepted, over the job's CPUs (kolora.filter.decode)
    t_decode = time.perf_counter()
    good = verify_samples(good, report)
    t_decode = time.perf_counter() - t_decode

    # 1c. captions from the captioner, where data.captions asks for them (kolora.filter.captions)
    t_captions = time.perf_counter()
    captions.generate(cfg, good, report, lambda n: _stop_point(f"captioning ({n} of {len(good)} images)"))
    t_captions = time.perf_counter() - t_captions
    _stop_point("before Data-Juicer")

    # 2. Data-Juicer
    kept: list[dict[str, Any]] = []
    t1 = time.perf_counter()
    if good:
        dj_kept, dropped = [], {}
        for ops_cfg, group, folder in _by_source_ops(cfg, good, report, dj_dir):
            group_kept, group_dropped = run_data_juicer(ops_cfg, group, folder)
            dj_kept += group_kept
            dropped.update(group_dropped)
        order = {g["id"]: i for i, g in enumerate(good)}
        good_ids = set(order)
        seen: set[str] = set()
        # input order (the Ray executor exports shards in no particular order)
        for rec in sorted(dj_kept, key=lambda r: order.get(str(r.get("id")), -1)):
            sid = str(rec.get("id"))
            if sid not in good_ids or sid in seen:
                raise RuntimeError(f"Data-Juicer returned a sample that was not in its input (or twice): {rec!r}")
            seen.add(sid)
            image = _first_image(rec)
            out = {"id": sid, "text": captions.with_prefix(cfg.data.caption_prefix,
                                                          _strip_tokens(str(rec.get("text", "")))), "image": [image],
                   **({"mask": masks[sid]} if sid in masks else {}),
                   **({"source": report[sid]["source"]} if "source" in report[sid] else {})}
            kept.append(out)
            report[sid].update(kept=True, reason=None, stage=None, image=image, text=out["text"],
                               stats=rec.get("__dj__stats__") or None)
        kept_ids = {k["id"] for k in kept}
        for sid in good_ids - kept_ids:
            op, stats, reason, beyond = dropped.get(sid, (None, {}, "dropped by Data-Juicer (no op traced it)", {}))
            report[sid].update(stage="data-juicer", op=op, stats=stats or None, reason=reason, **beyond)
    else:
        shutil.rmtree(dj_dir, ignore_errors=True)  # no stale Data-Juicer output from an earlier run
    _stop_point("after Data-Juicer, before writing its outputs")
    if len(report) != len(samples):
        raise RuntimeError(f"filter: {len(samples)} samples in, {len(report)} report rows (duplicate ids?)")
    seconds = {"header": round(t_header, 2), "decode": round(t_decode, 2),
               "data_juicer": round(time.perf_counter() - t1, 2),
               **({"captions": round(t_captions, 2)} if captions.active(cfg.data) else {})}
    out = {"entries": list(report.values()), "kept": kept, "seconds": seconds}

    # 2b. the image_deduplicator's key of each kept sample; the merge compares them across every slice
    if dedup.configured(cfg.filter.ops) is not None:
        t2 = time.perf_counter()
        keys = image_hashes(cfg.filter, kept, dj_dir, lambda n: _stop_point(
            f"hashing images for {dedup.OP} ({n} of {len(kept)})")) if kept else []
        out["image_hashes"] = [[k["id"], key] for k, key in zip(kept, keys, strict=True)]
        seconds["image_hash"] = round(time.perf_counter() - t2, 2)
    return out


def _run_shards(cfg: ExperimentConfig, run: RunDir, samples: list[dict[str, Any]], n: int,
                indices: list[int]) -> list[int]:
    """Filter the shards (of n) among `indices` that are not done yet; returns those it ran."""
    ran = []
    for i in indices:
        part = core_shards.part(samples, n, i)
        if filter_shards.is_done(run, i, n, part):
            continue
        filter_shards.clear(run, i, n)
        result = filter_slice(cfg, part, filter_shards.folder(run, i, n) / "dj")
        filter_shards.write(run, i, n, part, result)
        ran.append(i)
    return ran


def run(ctx: StageContext) -> dict[str, Any]:
    """Filter run.data into run.filter (result.jsonl, report.json) and run.trainset; return a summary.

    With N shards (filter.shards, or filter.shard_size: the array's size as planned at submission), a Slurm
    array task (`task_index` of `task_count` = N) filters its shard and, when it finds every shard done,
    merges; without a task index every missing shard runs here, then the merge."""
    cfg, run, task_index, task_count = ctx.cfg, ctx.run, ctx.shard, ctx.shards
    t0 = time.perf_counter()
    meta = run.data / "metadata.jsonl"
    if not meta.is_file():
        raise FilterError(f"{meta} does not exist: run the ingest stage first")
    samples = read_samples(meta)
    rejected = read_samples(run.data / "rejected.jsonl")
    run.filter.mkdir(parents=True, exist_ok=True)
    n = filter_shards.count(cfg.filter, len(samples), task_count)
    if task_count is not None and task_count != n:
        raise FilterError(f"filter: this job has {task_count} array tasks but filter.shards is {n}; resubmit "
                          "(`kolora resume`) so that the job is planned from the current config")
    t1 = time.perf_counter()
    if n == 1 or task_index is None or task_index in filter_shards.missing(run, n, samples):
        validate_all_ops(cfg)  # before Data-Juicer runs (a task whose shard is done skips its import)
    t_validate = time.perf_counter() - t1
    if n == 1:
        parts = [filter_slice(cfg, samples, run.filter / "dj")]
        return _merge(cfg, run, samples, rejected, parts, t_validate, t0)
    shutil.rmtree(run.filter / "dj", ignore_errors=True)  # an unsharded run's Data-Juicer dir: not read here
    ran = _run_shards(cfg, run, samples, n, list(range(n)) if task_index is None else [task_index])
    if task_index is not None:
        todo = filter_shards.missing(run, n, samples)
        if todo:  # another task merges when its shard is the last one
            return {"shard": task_index, "shards": n, "ran": ran, "merged": False, "waiting_for": todo}
        with filter_shards.merge_lock(run):
            if filter_shards.is_merged(run, n):
                return {"shard": task_index, "shards": n, "ran": ran, "merged": "by another task"}
            summary = _merge_shards(cfg, run, samples, n, rejected, t_validate, t0)
        return {**summary, "shard": task_index, "ran": ran, "merged": True}
    return {**_merge_shards(cfg, run, samples, n, rejected, t_validate, t0), "ran": ran}


def _merge_shards(cfg: ExperimentConfig, run: RunDir, samples: list[dict[str, Any]], n: int,
                  rejected: list[dict[str, Any]], t_validate: float, t0: float) -> dict[str, Any]:
    todo = filter_shards.missing(run, n, samples)
    if todo:
        raise RuntimeError(f"filter: cannot merge, shards {todo} of {n} are not done")
    summary = _merge(cfg, run, samples, rejected, filter_shards.read_all(run, n), t_validate, t0)
    filter_shards.prune(run, n)
    return summary


def _drop_duplicates(parts: list[dict[str, Any]], samples: list[dict[str, Any]], kept: list[dict[str, Any]],
                     max_distance: int) -> list[dict[str, Any]]:
    """The image_deduplicator over every slice's kept samples in dataset order (kolora.filter.dedup): the first
    of each group stays; each later one's report row names the sample it duplicates. Returns the survivors."""
    if any("image_hashes" not in part for part in parts):
        raise RuntimeError(f"filter: a shard was filtered without {dedup.OP}'s hashes (before it was configured); "
                           "run the filter stage again")
    position = {s["id"]: i for i, s in enumerate(samples)}
    rows = sorted(((sid, key) for part in parts for sid, key in part["image_hashes"]), key=lambda r: position[r[0]])
    if sorted(sid for sid, _ in rows) != sorted(k["id"] for k in kept):
        raise RuntimeError(f"filter: {dedup.OP}'s hashes do not cover the kept samples ({len(rows)} hashes, "
                           f"{len(kept)} kept)")
    dropped = dedup.duplicates(rows, max_distance)
    keys = dict(rows)
    for part in parts:
        for e in part["entries"]:
            if e["id"] in keys:
                e["image_hash"] = keys[e["id"]]
            if e["id"] in dropped:
                of, distance = dropped[e["id"]]
                e.update(kept=False, stage="data-juicer", op=dedup.OP, reason=dedup.REASON, duplicate_of=of,
                         distance=distance)
    return [k for k in kept if k["id"] not in dropped]


def _merge(cfg: ExperimentConfig, run: RunDir, samples: list[dict[str, Any]], rejected: list[dict[str, Any]],
           parts: list[dict[str, Any]], t_validate: float, t0: float) -> dict[str, Any]:
    """Step 3: the slices' rows and kept samples, in order, plus the ingest rejections -> the outputs."""
    kept = [k for part in parts for k in part["kept"]]
    if (dedup_args := dedup.configured(cfg.filter.ops)) is not None:
        kept = _drop_duplicates(parts, samples, kept, dedup_args.get("max_distance", 0))
    entries = [e for part in parts for e in part["entries"]] + [
        {"id": None, "source": r.get("source"), "image": r.get("image"), "text": r.get("text"), "kept": False,
         "reason": r.get("reason"), "op": None, "stage": "ingest", **({"origin": r["origin"]} if "origin" in r else {})}
        for r in rejected]
    n_kept = sum(e["kept"] for e in entries)
    if n_kept != len(kept) or len(entries) != len(samples) + len(rejected):
        raise RuntimeError(f"filter: counts do not add up ({len(samples)} samples + {len(rejected)} rejected in, "
                           f"{len(entries)} report entries, {n_kept} kept vs {len(kept)} exported)")
    by_reason = Counter(e["reason"] for e in entries if not e["kept"])
    by_op = Counter(e["op"] for e in entries if e["op"])
    header = Counter(e["reason"] for e in entries if e["stage"] in ("header", "ingest"))
    seconds = {"validate_ops": round(t_validate, 2)}
    # summed over the shards: CPU time more than wall time
    for key in ("header", "decode", "data_juicer", "image_hash", "captions"):
        if any(key in part["seconds"] for part in parts):
            seconds[key] = round(sum(part["seconds"].get(key, 0) for part in parts), 2)
    summary = {
        "input": len(samples) + len(rejected), "samples": len(samples), "rejected_at_ingest": len(rejected),
        "kept": len(kept), "dropped": len(entries) - len(kept), "by_reason": dict(by_reason), "by_op": dict(by_op),
        "ops": [next(iter(op)) for op in cfg.filter.ops], "dj_ops": [next(iter(op)) for op in dj_process(cfg.filter)],
        "executor": cfg.filter.executor, "np": cfg.filter.np, "shards": len(parts), "seconds": seconds,
        **({"captions": captions.summary(cfg.data, entries)} if captions.active(cfg.data) else {}),
    }
    if cfg.data.sources:  # images kept and dropped per source (repeats apply in training: kolora.train.samples)
        summary["sources"] = {s.name: {"kept": sum(e["kept"] for e in entries if e.get("source") == s.name),
                                       "dropped": sum(not e["kept"] for e in entries if e.get("source") == s.name)}
                              for s in cfg.data.sources}
    t_page = time.perf_counter()  # the page a person looks at (kolora.filter.report_page), thumbnails made once
    report_page.write(run, {"summary": summary, "samples": entries}, cfg.name)
    seconds["report_page"] = round(time.perf_counter() - t_page, 2)
    # the report last: with shards, its presence (and trainset/) says the merge is done
    atomic_write_text(run.filter / "result.jsonl", "".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
    if not kept:
        shutil.rmtree(run.trainset, ignore_errors=True)
        atomic_write_json(run.filter / "report.json", {"summary": summary, "samples": entries})
        raise FilterError(
            f"filter: no sample kept out of {summary['input']} ({_by_op_message(by_op, header)}); relax filter.ops "
            f"(e.g. lower min_width/min_height, widen min_ratio/max_ratio) or check the data. "
            f"Every sample and its reason: {run.filter / 'report.json'} (thumbnails: {run.filter / report_page.PAGE})")
    write_trainset(kept, {e["id"]: e["format"] for e in entries if e["id"] is not None}, run.trainset)
    atomic_write_json(run.filter / "report.json", {"summary": summary, "samples": entries})
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return summary
