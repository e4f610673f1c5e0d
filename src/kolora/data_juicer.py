"""Data-Juicer for the filter stage: checking filter.ops against its op registry before anything runs, and
running it contained (its work dir, caches and logs in run/filter/dj/, the process-wide state it changes
restored afterwards) with a light tracer that attributes every dropped sample to its op. See kolora.filter."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kolora.config import ConfigError, ExperimentConfig, FilterConfig
from kolora.errors import RunFailure


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

        import kolora.dj_ops  # noqa: F401 - registers image_shape_header_filter, image_aspect_ratio_header_filter
        import kolora.dj_score_ops  # noqa: F401 - registers image_aesthetics_local_filter
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    return OPERATORS


def dj_process(fcfg: FilterConfig) -> list[dict[str, dict[str, Any]]]:
    """The `process:` list Data-Juicer runs: filter.ops, with the built-in shape ops swapped for kolora's
    header-only ones when filter.fast_ops is on (same arguments, same kept samples)."""
    from kolora.dj_ops import HEADER_OPS
    from kolora.scorers import LOCAL_MODEL_OPS

    swap = {**(HEADER_OPS if fcfg.fast_ops else {}), **LOCAL_MODEL_OPS}
    return [{swap.get(name, name): copy.deepcopy(args) for name, args in item.items()} for item in fcfg.ops]


def _op_params(cls: type) -> dict[str, Any]:
    """{argument name: annotation or None} an op class accepts: its own and its bases' __init__ arguments plus
    the `_BASE_PARAMS` Data-Juicer declares (the same rule as data_juicer.core.preflight, whose import costs
    another 0.6 s)."""
    import inspect

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
    from difflib import get_close_matches

    OPERATORS = _dj_operators()
    names = sorted(OPERATORS.modules)
    problems: list[str] = []
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
@contextlib.contextmanager
def _contained(dj_dir: Path, console: Path) -> Iterator[None]:
    """Run Data-Juicer in its own corner: cwd, HF caches and console output in dj_dir; global state restored."""
    import tempfile

    import multiprocess
    from PIL import ImageFile

    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_streams = sys.stdout, sys.stderr
    saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    saved_mp = multiprocess.get_start_method(allow_none=True)
    saved_tempdir = tempfile.tempdir
    os.environ.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(dj_dir / "hf"),
        "HF_DATASETS_CACHE": str(dj_dir / "hf" / "datasets"), "UV_CACHE_DIR": str(dj_dir / "uv-cache"),
        "UV_OFFLINE": "1", "PIP_NO_INDEX": "1",  # Data-Juicer pip-installs missing deps at run time; never here
        "TQDM_DISABLE": "1",
    })
    ds_config = None
    saved_ds = {}
    with contextlib.suppress(ImportError):
        from datasets import config as ds_config

        saved_ds = {k: getattr(ds_config, k) for k in ("HF_DATASETS_CACHE", "DEFAULT_DOWNLOADED_DATASETS_PATH",
                                                      "DOWNLOADED_DATASETS_PATH", "DEFAULT_EXTRACTED_DATASETS_PATH",
                                                      "EXTRACTED_DATASETS_PATH", "HF_HUB_OFFLINE",
                                                      "HF_DATASETS_OFFLINE") if hasattr(ds_config, k)}
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if k in saved_ds:
                setattr(ds_config, k, True)
    hub_constants = None
    with contextlib.suppress(ImportError):  # read from the environment once, at import
        from huggingface_hub import constants as hub_constants

        saved_hub_offline = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    saved_verbosity = None
    with contextlib.suppress(ImportError):
        from datasets.utils import logging as ds_logging

        saved_verbosity = ds_logging.get_verbosity()
        ds_logging.set_verbosity_error()  # its handlers hold the real stderr: keep its chatter off the console
    os.chdir(dj_dir)
    log = open(console, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally, after loguru let go of it
    sys.stdout = sys.stderr = log
    try:
        from data_juicer.utils import logger_utils

        logger_utils.LOGGER_SETUP = False  # else a second run in this process logs into the first run's files
        yield
    finally:
        from loguru import logger

        with contextlib.suppress(Exception):
            logger.remove()  # flushes and closes Data-Juicer's file sinks
            logger.add(saved_streams[1], level="WARNING")
        with contextlib.suppress(Exception):
            from data_juicer.utils import logger_utils

            logger_utils.LOGGER_SETUP = False
        sys.stdout, sys.stderr = saved_streams
        log.close()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated
        tempfile.tempdir = saved_tempdir
        if ds_config is not None:
            for k, v in saved_ds.items():
                setattr(ds_config, k, v)
        with contextlib.suppress(Exception):
            multiprocess.set_start_method(saved_mp, force=True)
        if saved_verbosity is not None:
            ds_logging.set_verbosity(saved_verbosity)
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_hub_offline


@contextlib.contextmanager
def _ray_session(wanted: bool) -> Iterator[None]:
    """For the Ray executor without RAY_ADDRESS: a private local Ray whose session files (in a short /tmp
    path: Ray's socket paths are length-limited) and processes are gone when the call ends."""
    if not wanted:
        yield
        return
    import tempfile

    import ray

    started_here = not ray.is_initialized()
    ray_tmp = None
    if started_here and not os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_TMPDIR"):
        ray_tmp = tempfile.mkdtemp(prefix="kolora-ray-", dir="/tmp")
        os.environ["RAY_TMPDIR"] = ray_tmp  # the caller's environment is restored by _contained
    try:
        yield
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)


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


def _drop_log(work_dir: str, filters: set[str]) -> Any:
    """A Data-Juicer Tracer (its own extension point: the executor hands it to every Filter) that records each
    sample a filter drops as one JSON line in trace/sample_trace-<op>.<pid>.jsonl.

    Written here because Data-Juicer's Tracer costs more than the header-only ops themselves: per sample it
    asks a multiprocessing Manager lock whether enough samples were collected (an IPC round trip), and per
    dropped sample it builds a one-row pandas DataFrame and reopens the trace file (~1.4 ms per drop, ~1.2 s of
    the 2.3 s the header ops took on 2,000 images). kolora traces every drop, so there is no count to share:
    each process appends to its own file (no lock, safe with np > 1 and on network file systems) through a
    handle kept open and flushed per line."""
    import threading

    from data_juicer.core.tracer import Tracer

    class DropLog(Tracer):
        def __init__(self) -> None:
            super().__init__(work_dir, op_list_to_trace=sorted(filters), show_num=sys.maxsize,
                             lock=threading.Lock())
            self._files: dict[tuple[int, str], Any] = {}

        def is_collection_complete(self, op_name: str) -> bool:
            return False

        def collect_filter_sample(self, op_name: str, sample: dict, should_keep: bool) -> bool:
            if should_keep or op_name not in self.op_list_to_trace:
                return False
            key = (os.getpid(), op_name)  # a forked worker inherits the parent's handles: key them by pid
            f = self._files.get(key)
            if f is None:
                f = self._files[key] = open(  # noqa: SIM115 - closed in close() / at process exit
                    os.path.join(self.work_dir, f"sample_trace-{op_name}.{os.getpid()}.jsonl"), "a", encoding="utf-8")
            f.write(json.dumps(dict(sample), ensure_ascii=False, default=_jsonable) + "\n")
            f.flush()
            return True

        def __getstate__(self) -> dict[str, Any]:  # sent to worker processes: without this process's files
            return {**self.__dict__, "_files": {}}

        def close(self) -> None:
            for (pid, _op), f in list(self._files.items()):
                if pid == os.getpid():
                    f.close()
            self._files.clear()

    return DropLog()


def traced_op(trace: Path) -> str:
    """The op a trace file belongs to: sample_trace-<op>.jsonl (Data-Juicer's Ray tracer) or
    sample_trace-<op>.<pid>.jsonl (_drop_log)."""
    return trace.name.removeprefix("sample_trace-").removesuffix(".jsonl").split(".")[0]


def _jsonable(obj: Any) -> Any:
    """numpy arrays/scalars, pyarrow scalars and mapping-likes as JSON (the tracer's samples carry them)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "as_py"):
        return obj.as_py()
    if hasattr(obj, "items"):  # mapping-likes that are not dicts
        return dict(obj.items())
    return str(obj)


def run_data_juicer(cfg: ExperimentConfig, samples: list[dict[str, Any]], dj_dir: Path
                    ) -> tuple[list[dict[str, Any]], dict[str, tuple[str, dict[str, Any], str]]]:
    """Run cfg.filter.ops over `samples` (tutorial format, all readable) in dj_dir.

    Returns (kept records as Data-Juicer exported them, {dropped id: (op name as configured, stats, reason)} from
    its tracer)."""
    import yaml

    from kolora import scorers

    process = dj_process(cfg.filter)
    configured = {next(iter(ran)): next(iter(item)) for ran, item in zip(process, cfg.filter.ops, strict=True)}
    try:  # scorer ops (CLIP, aesthetics) read local folders under scorers.dir, never a hub
        scorers.ensure_tiny(cfg.scorers)
        process = scorers.localize_ops(process, cfg.filter.ops, cfg.scorers, [str(s["text"]) for s in samples])
    except scorers.ScorerModelError as e:
        raise FilterError(f"filter.ops: {e}") from None
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
    with _contained(dj_dir, console), _ray_session(cfg.filter.executor == "ray"):
        try:
            from data_juicer.config import init_configs

            dj = init_configs(["--config", str(config_file)])
            if cfg.filter.executor == "ray":
                from data_juicer.core.executor.ray_executor import RayExecutor

                RayExecutor(dj).run()
            else:
                from data_juicer.core import DefaultExecutor

                executor = DefaultExecutor(dj)
                executor.tracer = _drop_log(str(executor.work_dir), filters)
                try:
                    executor.run()
                finally:
                    executor.tracer.close()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            err = e
        else:
            err = None
    if err is not None:
        raise FilterError(f"Data-Juicer failed on filter.ops: {err.__class__.__name__}: {err}\n"
                          f"(its config: {config_file}; its output: {console} and {dj_dir / 'work'})") from err
    kept = _read_json_records(export)
    dropped: dict[str, tuple[str, dict[str, Any], str]] = {}
    for trace in sorted((dj_dir / "work").rglob("sample_trace-*.jsonl")):
        op = traced_op(trace)
        if op not in filters:  # mappers trace changed texts, not dropped samples
            continue
        for rec in _read_json_records(trace):
            if "id" in rec:
                name = configured.get(op, op)
                dropped.setdefault(str(rec["id"]), (name, rec.get("__dj__stats__") or {}, f"filtered by {name}"))
    # Every filter drop is traced above; what else is missing can only be a deduplicator's. Data-Juicer traces
    # at most one duplicate pair per hash, so with a single deduplicator in the list it is named here instead.
    dedups = sorted(_filter_op_names(process, "Deduplicator"))
    if len(dedups) == 1:
        kept_ids = {str(r.get("id")) for r in kept}
        for s in samples:
            if s["id"] not in kept_ids:
                name = configured.get(dedups[0], dedups[0])
                dropped.setdefault(s["id"], (name, {}, f"duplicate removed by {name}"))
    return kept, dropped
