"""Data-Juicer for the filter stage: checking filter.ops against its op registry before anything runs, and
running it contained (kolora.filter.dj.sandbox: its work dir, caches and logs in the given dj/ folder, the
process-wide state it changes restored afterwards) with a light tracer that attributes every dropped sample
to its op (kolora.filter.dj.trace). See kolora.filter.stage."""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
from collections.abc import Callable
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from kolora.core.config import ExperimentConfig, FilterConfig
from kolora.core.errors import ConfigError, RunFailure
from kolora.core.interrupt import Interrupted, StopNow
from kolora.filter import dedup
from kolora.filter.dj.sandbox import contained, ray_session
from kolora.filter.dj.thresholds import beyond
from kolora.filter.dj.trace import batched_for_trace, drop_log, traced_op
from kolora.models import scorers
from kolora.models.scorers import LOCAL_MODEL_OPS

# Imported in the functions that use them (a login node's CLI starts without them):
#   PIL, data_juicer, kolora.filter.dj.ops (data_juicer, datasets), kolora.filter.dj.score_ops (data_juicer, datasets), yaml,
#   kolora.filter.dj.image_hash (data_juicer, imagehash)


class FilterError(RunFailure):
    """Nothing survived the filter (or Data-Juicer failed); the message says which op dropped how many."""


# op validation ----------------------------------------------------------------------------------------------
def _dj_operators() -> Any:
    """Data-Juicer's op registry, with kolora's header-only ops registered in it. Importing data_juicer sets
    PIL's LOAD_TRUNCATED_IMAGES=True for the whole process (later stages would then read truncated files
    silently); that is undone here."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        from data_juicer.ops import OPERATORS

        import kolora.filter.dj.ops  # noqa: F401 - registers image_shape_header_filter, image_aspect_ratio_header_filter
        import kolora.filter.dj.score_ops  # noqa: F401 - registers image_aesthetics_local_filter
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    return OPERATORS


def dj_process(fcfg: FilterConfig) -> list[dict[str, dict[str, Any]]]:
    """The `process:` list Data-Juicer runs: filter.ops, with the built-in shape ops swapped for kolora's
    header-only ones when filter.fast_ops is on (same arguments, same kept samples), and without the
    image_deduplicator (it runs across shards at the merge: kolora.filter.dedup)."""
    from kolora.filter.dj.ops import HEADER_OPS

    swap = {**(HEADER_OPS if fcfg.fast_ops else {}), **LOCAL_MODEL_OPS}
    return [{swap.get(name, name): copy.deepcopy(args) for name, args in item.items()}
            for item in dedup.per_sample_ops(fcfg.ops)]


def _op_params(cls: type) -> dict[str, Any]:
    """{argument name: annotation or None} an op class accepts: its own and its bases' __init__ arguments plus
    the `_BASE_PARAMS` Data-Juicer declares (the same rule as data_juicer.core.preflight, whose import costs
    another 0.6 s)."""

    params: dict[str, Any] = {}
    for klass in inspect.getmro(cls):
        if klass is object:
            continue
        for name, (annotation, _default) in getattr(klass, "__dict__", {}).get("_BASE_PARAMS", {}).items():
            params.setdefault(name, annotation)
        if "__init__" in klass.__dict__:
            try:
                sig = inspect.signature(klass.__init__)
            except (TypeError, ValueError):
                continue
            for name, p in sig.parameters.items():
                if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    params.setdefault(name, None if p.annotation is p.empty else p.annotation)
    return params


def _base_params(cls: type) -> set[str]:
    """The arguments every op accepts (left out of the "takes ..." hint so an op's own ones stand out)."""
    return {name for klass in cls.__mro__ for name in getattr(klass, "__dict__", {}).get("_BASE_PARAMS", {})}


def _type_ok(value: Any, annotation: Any) -> bool:
    if value is None:
        return True
    if annotation is int:
        return (isinstance(value, int) or isinstance(value, float) and value.is_integer()) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    return True  # Optional/Union/List/... and other annotations: not checked here


def validate_ops(ops: list[dict[str, dict[str, Any]]]) -> None:
    """Check filter.ops against Data-Juicer's operator registry (op names, argument names, simple argument
    types) without running anything; costs the registry import (~1.5 s). Raises ConfigError naming
    `filter.ops[i]`, so the CLI can call it before any stage runs."""

    OPERATORS = _dj_operators()
    names = sorted(OPERATORS.modules)
    problems: list[str] = dedup.problems(ops)
    for i, item in enumerate(ops):
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(f"filter.ops[{i}]: expected one mapping {{op_name: {{arguments}}}}, got {item!r}")
            continue
        name, args = next(iter(item.items()))
        if name not in OPERATORS.modules:
            close = get_close_matches(str(name), names, n=3, cutoff=0.7)
            examples = close or [n for n in names if n.startswith("image_") and n.endswith("_filter")][:6]
            problems.append(f"filter.ops[{i}]: unknown Data-Juicer op {name!r}; "
                            f"{'did you mean' if close else 'valid ops include'}: {', '.join(examples)}")
            continue
        valid = _op_params(OPERATORS.modules[name])
        if name == dedup.OP:  # plus kolora's own arguments (their values: dedup.problems)
            valid = {**valid, **dict.fromkeys(dedup.ARGS)}
        for arg, value in (args or {}).items():
            if arg not in valid:
                own = [p for p in valid if p not in _base_params(OPERATORS.modules[name])]
                close = get_close_matches(arg, list(valid), n=2, cutoff=0.6)
                problems.append(f"filter.ops[{i}] ({name}): unknown argument {arg!r}"
                                + (f"; did you mean {', '.join(close)}?" if close else "")
                                + f" ({name} takes {', '.join(own) or 'no arguments of its own'})")
            elif not _type_ok(value, valid[arg]):
                problems.append(f"filter.ops[{i}] ({name}): argument {arg!r} expects "
                                f"{getattr(valid[arg], '__name__', valid[arg])}, got {value!r}")
    if problems:
        raise ConfigError("invalid filter.ops:\n  " + "\n  ".join(problems))


# Data-Juicer ------------------------------------------------------------------------------------------------
def _read_json_records(path: Path) -> list[dict[str, Any]]:
    """Data-Juicer's export: one jsonl file (default executor) or a folder of json shards (Ray executor)."""
    if not path.exists():
        return []
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and ".json" in p.name)
    out: list[dict[str, Any]] = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


def _filter_op_names(ops: list[dict[str, Any]], kind: str = "Filter") -> set[str]:
    """The names in `ops` of Data-Juicer's `kind` ops (Filter, Deduplicator)."""
    OPERATORS = _dj_operators()
    from data_juicer.ops import base_op

    base = getattr(base_op, kind)
    return {name for item in ops for name in item
            if name in OPERATORS.modules and issubclass(OPERATORS.modules[name], base)}


def run_data_juicer(cfg: ExperimentConfig, samples: list[dict[str, Any]], dj_dir: Path
                    ) -> tuple[list[dict[str, Any]], dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]]]:
    """Run cfg.filter.ops over `samples` (tutorial format, all readable) in dj_dir.

    Returns (kept records as Data-Juicer exported them, {dropped id: (op name as configured, stats, reason,
    {"score", "threshold"} for a scoring op (kolora.filter.dj.thresholds) else {})} from its tracer)."""
    import yaml

    process = dj_process(cfg.filter)
    ops = dedup.per_sample_ops(cfg.filter.ops)
    configured = {next(iter(ran)): next(iter(item)) for ran, item in zip(process, ops, strict=True)}
    try:  # scorer ops (CLIP, aesthetics) read local folders under scorers.dir, never a hub
        scorers.ensure_tiny(cfg.scorers)
        process = scorers.localize_ops(process, ops, cfg.scorers, [str(s["text"]) for s in samples])
    except scorers.ScorerModelError as e:
        raise FilterError(f"filter.ops: {e}") from None
    process = batched_for_trace(process)
    if any("image_text_similarity_filter" in item for item in process):
        # the op scores only text chunks that hold the image token (filter strips it again)
        samples = [{**s, "text": f"<__dj__image>{s['text']} <|__dj__eoc|>"} for s in samples]
    filters = _filter_op_names(process)  # also registers kolora's ops before Data-Juicer parses the config

    if dj_dir.exists():
        shutil.rmtree(dj_dir)
    dj_dir.mkdir(parents=True)
    input_file = dj_dir / "input.jsonl"
    input_file.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    export = dj_dir / "export" / "result.jsonl"
    dj_cfg = {
        "project_name": f"kolora-{cfg.name}",
        "dataset_path": str(input_file),
        "export_path": str(export),
        "work_dir": str(dj_dir / "work"),
        "ds_cache_dir": str(dj_dir / "hf" / "datasets"),
        "executor_type": cfg.filter.executor,
        # Ray: join the cluster RAY_ADDRESS names, else start a private local one for this call
        "ray_address": "auto" if os.environ.get("RAY_ADDRESS") else "local",
        "np": cfg.filter.np,
        "text_keys": "text",
        "image_key": "image",
        "skip_op_error": False,
        "open_tracer": True,
        "trace_num": max(1, len(samples)),
        "keep_stats_in_res_ds": True,
        "process": process,
    }
    config_file = dj_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(dj_cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    console = dj_dir / "console.log"
    with contained(dj_dir, console), ray_session(cfg.filter.executor == "ray"):
        try:
            from data_juicer.config import init_configs

            dj = init_configs(["--config", str(config_file)])
            if cfg.filter.executor == "ray":
                from data_juicer.core.executor.ray_executor import RayExecutor

                RayExecutor(dj).run()
            else:
                from data_juicer.core import DefaultExecutor

                executor = DefaultExecutor(dj)
                executor.tracer = drop_log(str(executor.work_dir), filters)
                try:
                    executor.run()
                finally:
                    executor.tracer.close()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt | StopNow):  # the person at the terminal, not Data-Juicer
                raise
            err = e
        else:
            err = None
    if err is not None:
        raise FilterError(f"Data-Juicer failed on filter.ops: {err.__class__.__name__}: {err}\n"
                          f"(its config: {config_file}; its output: {console} and {dj_dir / 'work'})") from err
    kept = _read_json_records(export)
    dropped: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {}
    ran_args = {name: args or {} for item in process for name, args in item.items()}
    op_classes = _dj_operators().modules
    for trace in sorted((dj_dir / "work").rglob("sample_trace-*.jsonl")):
        op = traced_op(trace)
        if op not in filters:  # mappers trace changed texts, not dropped samples
            continue
        for rec in _read_json_records(trace):
            if "id" in rec:
                name = configured.get(op, op)
                stats = rec.get("__dj__stats__") or {}
                dropped.setdefault(str(rec["id"]), (name, stats, f"filtered by {name}",
                                                    beyond(op, op_classes[op], ran_args[op], stats)))
    # Every filter drop is traced above; what else is missing can only be a deduplicator's. Data-Juicer traces
    # at most one duplicate pair per hash, so with a single deduplicator in the list it is named here instead.
    dedups = sorted(_filter_op_names(process, "Deduplicator"))
    if len(dedups) == 1:
        kept_ids = {str(r.get("id")) for r in kept}
        for s in samples:
            if s["id"] not in kept_ids:
                name = configured.get(dedups[0], dedups[0])
                dropped.setdefault(s["id"], (name, {}, f"duplicate removed by {name}", {}))
    return kept, dropped


def image_hashes(fcfg: FilterConfig, samples: list[dict[str, Any]], dj_dir: Path,
                 before_each: Callable[[int], None] | None = None) -> list[str]:
    """The image_deduplicator's key of each sample (tutorial format, all readable), computed by Data-Juicer's op
    (kolora.filter.dj.image_hash), contained like a Data-Juicer run (its console output in dj_dir);
    `before_each(n)` before the n-th sample (a stop point)."""
    _dj_operators()  # Data-Juicer's import, PIL's LOAD_TRUNCATED_IMAGES restored
    from kolora.filter.dj.image_hash import image_hashes as compute

    args = dedup.dj_args(dedup.configured(fcfg.ops) or {})
    dj_dir.mkdir(parents=True, exist_ok=True)
    with contained(dj_dir, dj_dir / "console.log"):
        try:
            return compute(args, samples, before_each)
        except (KeyboardInterrupt, StopNow, Interrupted):
            raise
        except Exception as e:
            raise FilterError(f"{dedup.OP} failed: {e.__class__.__name__}: {e}") from e
