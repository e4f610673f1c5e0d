"""Shards: N items cut into N parts, each done on its own (a Slurm array task, a rank, or one after another
in process) and merged in order into what one pass would write. What the sharded stages share:

    <root>/shards/<i>-of-<N>/             shard i's folder (i and N zero-padded to 4 digits)
    <root>/shards/<i>-of-<N>/done.json    its marker, written last and atomically: {"identity": what the shard
                                          was made from, ...}; the shard is done when the identity is current
    <root>/shards/.<i>-of-<N>.lock        held by the task working on shard i (take_turns)
    <root>/shards/.merge.lock             held while merging: two tasks finishing together merge once

A marker also says when, where and in which Slurm task the shard was done (stamp). Markers are read leniently:
a missing or unreadable one means "not done", and the shard is simply done again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from kolora.core.rundir import atomic_write_json, file_lock, now

T = TypeVar("T")

FOLDER = "shards"
DONE = "done.json"


# cutting ----------------------------------------------------------------------------------------------------
def bounds(count: int, shards: int, index: int) -> tuple[int, int]:
    """[start, end) of shard `index` of `count` items: contiguous, sizes differ by at most one, in input order
    (shards beyond the item count are empty)."""
    return index * count // shards, (index + 1) * count // shards


def ranges(count: int, shards: int) -> list[tuple[int, int]]:
    """Every shard's bounds, in order: together they cover each of the `count` items once."""
    return [bounds(count, shards, i) for i in range(shards)]


def part(items: Sequence[T], shards: int, index: int) -> Sequence[T]:
    """The items of shard `index` (a slice of `items`)."""
    return items[slice(*bounds(len(items), shards, index))]


def interleaved(count: int, shards: int, index: int) -> range:
    """Shard `index`'s items when the shards take turns item by item (index, index + shards, ...): the cache's
    ranks, each of which then gets a share of any prefix of the training set."""
    return range(index, count, shards)


def count_for_size(items: int, size: int) -> int:
    """Shards of at most `size` items each (at least one)."""
    return max(1, math.ceil(items / size))


# folders and markers ----------------------------------------------------------------------------------------
def folder(root: Path, index: int, shards: int) -> Path:
    return Path(root) / FOLDER / f"{index:04d}-of-{shards:04d}"


def stamp() -> dict[str, Any]:
    """When, where and in which Slurm job (array task) a shard was done, for its marker."""
    return {"finished": now(), "host": socket.gethostname(),
            "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
            "slurm_array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}


def write_marker(path: Path, record: dict[str, Any]) -> None:
    atomic_write_json(path, record)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker at `path`, or None when it is missing or unreadable."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def mark_done(shard: Path, record: dict[str, Any]) -> None:
    """Shard folder `shard`'s marker: its last file, written when everything else in it is complete."""
    write_marker(Path(shard) / DONE, record)


def done_marker(shard: Path) -> dict[str, Any] | None:
    return read_marker(Path(shard) / DONE)


def is_done(shard: Path, identity: Any) -> bool:
    """The shard has a marker made from `identity` (the same inputs)."""
    record = done_marker(shard)
    return record is not None and record.get("identity") == identity


def clear_done(shard: Path) -> None:
    """Before a shard is done again: no marker of an earlier attempt stays valid while it runs."""
    (Path(shard) / DONE).unlink(missing_ok=True)


def missing(shards: int, done: Callable[[int], bool]) -> list[int]:
    """The shards (indices, in order) that `done` says are not done."""
    return [i for i in range(shards) if not done(i)]


# locks ------------------------------------------------------------------------------------------------------
def shard_lock(root: Path, index: int, shards: int, wait: bool = True) -> AbstractContextManager[bool]:
    """Held while a task works on shard `index`; yields whether it was taken (always when `wait`)."""
    return file_lock(Path(root) / FOLDER / f".{index}-of-{shards}.lock", wait)


def merge_lock(root: Path) -> AbstractContextManager[bool]:
    """Held while merging: two tasks finishing together merge once (the second finds it merged)."""
    return file_lock(Path(root) / FOLDER / ".merge.lock")


def take_turns(root: Path, shards: int, first: int, work: Callable[[int], bool]) -> list[int]:
    """`work(i)` for every shard, starting at `first` and going round, each under its shard lock: first the
    shards no other task holds, then, waiting for their holders, the ones that were held. Array tasks need
    not run at once (a throttled array, a busy partition), so a task never waits for one that may not have
    started. `work` does shard i if it is still to do and says whether it did; returns the shards it did."""
    pending = [(first + k) % shards for k in range(shards)]
    did: list[int] = []
    for wait in (False, True):
        held = []
        for i in pending:
            with shard_lock(root, i, shards, wait) as taken:
                if not taken:
                    held.append(i)
                elif work(i):
                    did.append(i)
        pending = held
    return did


# merging ----------------------------------------------------------------------------------------------------
def in_order(root: Path, shards: int) -> Iterator[tuple[int, Path]]:
    """(index, folder) of every shard, in shard order: the order a merge reads them in, so the merged output
    is in input order."""
    for i in range(shards):
        yield i, folder(root, i, shards)


def collect(root: Path, shards: int, read: Callable[[Path], T]) -> list[T]:
    """`read(folder)` of every shard, in shard order."""
    return [read(path) for _, path in in_order(root, shards)]


def prune(root: Path, shards: int) -> None:
    """Remove the folders of other shard counts (a merge of `shards` shards does not read them)."""
    for d in (Path(root) / FOLDER).glob("*-of-*"):
        if not d.name.endswith(f"-of-{shards:04d}"):
            shutil.rmtree(d, ignore_errors=True)


def remove(root: Path) -> None:
    """Remove every shard folder and lock file under `root`, once the merged outputs are in place."""
    shutil.rmtree(Path(root) / FOLDER, ignore_errors=True)
