"""The filter stage's drop tracer: which Data-Juicer op dropped which sample, one JSON line per drop, cheap
enough to trace every drop (see drop_log). See kolora.filter.dj.runner."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

# data_juicer: imported in the functions that use them (a login node's CLI starts without them)


def drop_log(work_dir: str, filters: set[str]) -> Any:
    """A Data-Juicer Tracer (its own extension point: the executor hands it to every Filter) that records each
    sample a filter drops as one JSON line in trace/sample_trace-<op>.<pid>.jsonl.

    Written here because Data-Juicer's Tracer costs more than the header-only ops themselves: per sample it
    asks a multiprocessing Manager lock whether enough samples were collected (an IPC round trip), and per
    dropped sample it builds a one-row pandas DataFrame and reopens the trace file (~1.4 ms per drop, ~1.2 s of
    the 2.3 s the header ops took on 2,000 images). kolora traces every drop, so there is no count to share:
    each process appends to its own file (no lock, safe with np > 1 and on network file systems) through a
    handle kept open and flushed per line."""

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


# Filter ops Data-Juicer implements per sample. Its tracer sees a filter's drops only when the op runs batched
# (a per-sample op's wrapped process returns a one-element list, which the tracer reads as "kept"); these decide
# from their stats alone, so Data-Juicer's default batched loop (batch_mode) keeps the same samples.
BATCHED_FOR_TRACE = ("image_nsfw_filter", "image_watermark_filter")


def batched_for_trace(process: list[dict[str, dict[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
    """Data-Juicer's `process` with batch_mode on for the BATCHED_FOR_TRACE ops, so every drop is traced."""
    return [{name: {**(args or {}), "batch_mode": True} if name in BATCHED_FOR_TRACE else args
             for name, args in item.items()} for item in process]


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
