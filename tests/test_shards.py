"""kolora.core.shards: how N items are cut into shards, their folders, done markers, locks and the merge order
that sharded ingest, filter and cache share."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from kolora.core import shards

PAIRS = [(count, n) for count in (0, 1, 2, 3, 7, 10, 48, 1001) for n in (1, 2, 3, 4, 7, 11, 64)]


@pytest.mark.parametrize(("count", "n"), PAIRS)
def test_ranges_cover_every_item_once_in_order(count: int, n: int) -> None:
    spans = shards.ranges(count, n)
    assert len(spans) == n and spans == [shards.bounds(count, n, i) for i in range(n)]
    assert [i for start, end in spans for i in range(start, end)] == list(range(count))
    sizes = [end - start for start, end in spans]
    assert max(sizes) - min(sizes) <= 1  # n > count: some shards are empty, none holds two more than another
    items = [f"item{i}" for i in range(count)]
    assert [x for i in range(n) for x in shards.part(items, n, i)] == items


@pytest.mark.parametrize(("count", "n"), PAIRS)
def test_interleaved_shards_cover_every_item_once(count: int, n: int) -> None:
    taken = [i for k in range(n) for i in shards.interleaved(count, n, k)]
    assert sorted(taken) == list(range(count))
    assert list(shards.interleaved(count, n, 1)) == list(range(1, count, n))


def test_count_for_size() -> None:
    assert [shards.count_for_size(items, 5) for items in (0, 1, 5, 6, 10, 11)] == [1, 1, 1, 2, 2, 3]


def test_folder_names_are_those_runs_made_before(tmp_path: Path) -> None:
    assert shards.folder(tmp_path, 2, 4) == tmp_path / "shards" / "0002-of-0004"
    assert shards.folder(tmp_path, 11, 120).name == "0011-of-0120"


def test_done_markers_round_trip(tmp_path: Path) -> None:
    shard = shards.folder(tmp_path, 1, 3)
    identity = {"key": "abc", "rows": [4, 8]}
    assert shards.done_marker(shard) is None and not shards.is_done(shard, identity)
    shard.mkdir(parents=True)
    shards.mark_done(shard, {"identity": identity, "counts": {"linked": 4}, **shards.stamp()})
    marker = json.loads((shard / "done.json").read_text())
    assert marker == shards.done_marker(shard)
    assert list(marker) == ["identity", "counts", "finished", "host", "slurm_job", "slurm_array_task"]
    assert shards.is_done(shard, identity) and not shards.is_done(shard, {**identity, "rows": [4, 9]})
    assert not list(shard.glob(".*"))  # written atomically: no temp file left beside it
    assert shards.missing(3, lambda i: shards.is_done(shards.folder(tmp_path, i, 3), identity)) == [0, 2]
    shards.clear_done(shard)
    assert not shards.is_done(shard, identity) and shards.done_marker(shard) is None
    shards.clear_done(shard)  # nothing to clear: no error


def test_an_unreadable_marker_means_not_done(tmp_path: Path) -> None:
    for text in ("", '{"identity": ', "[1, 2]"):
        (tmp_path / "done.json").write_text(text)
        assert shards.done_marker(tmp_path) is None and not shards.is_done(tmp_path, [1, 2])
    assert shards.read_marker(tmp_path / "absent.json") is None


def test_merge_reads_the_shards_in_order(tmp_path: Path) -> None:
    n = 12
    for i in reversed(range(n)):  # written in another order than they are read
        d = shards.folder(tmp_path, i, n)
        d.mkdir(parents=True)
        (d / "part.txt").write_text(f"{i}\n")
    assert [i for i, _ in shards.in_order(tmp_path, n)] == list(range(n))
    assert shards.collect(tmp_path, n, lambda d: int((d / "part.txt").read_text())) == list(range(n))


def test_prune_keeps_this_shard_count_and_remove_clears_all(tmp_path: Path) -> None:
    for i, n in ((0, 2), (1, 2), (0, 3), (2, 3)):
        shards.folder(tmp_path, i, n).mkdir(parents=True)
    with shards.merge_lock(tmp_path):
        pass
    shards.prune(tmp_path, 3)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [".merge.lock", "0000-of-0003", "0002-of-0003"]
    shards.remove(tmp_path)
    assert not (tmp_path / "shards").exists()
    shards.remove(tmp_path)  # already gone: no error


def test_lock_names(tmp_path: Path) -> None:
    with shards.shard_lock(tmp_path, 3, 10) as taken:
        assert taken and (tmp_path / "shards" / ".3-of-10.lock").is_file()
        with shards.shard_lock(tmp_path, 3, 10, wait=False) as again:
            assert not again  # flock: another open file of the same process is another holder
    with shards.merge_lock(tmp_path) as taken:
        assert taken and (tmp_path / "shards" / ".merge.lock").is_file()


def test_take_turns_starts_at_its_own_shard_and_skips_none(tmp_path: Path) -> None:
    seen: list[int] = []
    assert shards.take_turns(tmp_path, 5, 3, lambda i: seen.append(i) or i % 2 == 0) == [4, 0, 2]
    assert seen == [3, 4, 0, 1, 2]


def test_take_turns_comes_back_to_a_held_shard(tmp_path: Path) -> None:
    """A shard another task holds is done after the free ones, once its holder lets go."""
    order: list[int] = []
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with shards.shard_lock(tmp_path, 1, 4):
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(30)

    def work(i: int) -> bool:
        order.append(i)
        if i == 3:  # the free shards are done: let the holder go
            release.set()
        return True

    try:
        assert shards.take_turns(tmp_path, 4, 0, work) == [0, 2, 3, 1]
    finally:
        release.set()
        t.join(30)
    assert order == [0, 2, 3, 1]
