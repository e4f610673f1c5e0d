"""filter.ops' `image_deduplicator`, across shards.

A deduplicator compares samples with each other, so it cannot run inside one shard's Data-Juicer pass. Each
slice (a shard, or the whole set unsharded) runs the per-sample ops first; then Data-Juicer's image_deduplicator
computes the hash of each sample the slice kept (kolora.filter.dj.image_hash: its compute_hash) and the slice
stores them with its result. The merge, which runs once after every shard, walks all kept samples in dataset
order and keeps the first of each group of duplicates; every later one is dropped naming the kept sample it
duplicates. An unsharded run goes through the same merge, so both keep the same set.

    image_deduplicator: {method: phash, max_distance: 0}

`method` (phash, dhash, ahash, whash) and `consider_text` are Data-Juicer's arguments. `max_distance` is
kolora's: a sample is a duplicate when its 64-bit hash differs from a kept sample's in at most that many bits
(Hamming distance; with consider_text the texts must also be equal). Data-Juicer's op only matches equal
hashes: that is max_distance 0, the default. Resized and re-encoded copies usually hash equal with phash;
slightly cropped ones differ in a few bits. Each sample is compared with the kept ones only, in order: a
sample near a dropped duplicate but far from every kept sample is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

OP = "image_deduplicator"
ARGS = {"max_distance"}  # kolora's own arguments of the op (the others are Data-Juicer's)
HASH_BITS = 64
REASON = f"duplicate removed by {OP}"


def configured(ops: list[dict[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The image_deduplicator's arguments in filter.ops, or None when there is none."""
    return next((dict(item[OP] or {}) for item in ops if OP in item), None)


def per_sample_ops(ops: list[dict[str, dict[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
    """filter.ops without the image_deduplicator: what each slice's Data-Juicer pass runs."""
    return [item for item in ops if OP not in item]


def dj_args(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments Data-Juicer's op takes (kolora's left out)."""
    return {k: v for k, v in args.items() if k not in ARGS}


def problems(ops: list[dict[str, dict[str, Any]]]) -> list[str]:
    """What is wrong with the image_deduplicator's place and kolora's arguments in filter.ops (its Data-Juicer
    arguments are checked against the op itself)."""
    at = [i for i, item in enumerate(ops) if isinstance(item, dict) and OP in item]
    out = []
    if len(at) > 1:
        out.append(f"filter.ops: {OP} appears {len(at)} times (items {', '.join(map(str, at))}); keep one")
    if at and at[-1] != len(ops) - 1:
        out.append(f"filter.ops[{at[-1]}] ({OP}): must be the last op (it runs after every per-sample op, over "
                   "the samples of all shards); move it to the end of the list")
    for i in at:
        value = (ops[i][OP] or {}).get("max_distance", 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= HASH_BITS:
            out.append(f"filter.ops[{i}] ({OP}): max_distance must be a whole number of differing hash bits from "
                       f"0 (equal hashes, Data-Juicer's behaviour) to {HASH_BITS}, got {value!r}")
    return out


_BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _bit_counts(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy < 2 has no bitwise_count: a byte table then)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    return _BYTE_BITS[words.view(np.uint8)].reshape(len(words), 8).sum(axis=1)


def duplicates(rows: list[tuple[str, str]], max_distance: int = 0) -> dict[str, tuple[str, int]]:
    """{dropped id: (id of the kept sample it duplicates, Hamming distance)} for rows (id, key) in dataset
    order (keys from kolora.filter.dj.image_hash.image_hashes): the first sample of each group is kept. A key
    is a hex image hash, with consider_text followed by ':' and a text hash that must match exactly; an empty
    key is never a duplicate. With max_distance > 0 each 64-bit image hash is compared with every kept one
    (vectorised: O(samples x kept) bit counts)."""
    dropped: dict[str, tuple[str, int]] = {}
    if max_distance == 0:  # Data-Juicer's rule: equal keys
        first: dict[str, str] = {}
        for sid, key in rows:
            if not key:
                continue
            if key in first:
                dropped[sid] = (first[key], 0)
            else:
                first[key] = sid
        return dropped
    # per text key (one, without consider_text): the kept samples' hashes so far and their ids
    kept: dict[str, tuple[list[np.ndarray], list[str]]] = {}
    for sid, key in rows:
        if not key:
            continue
        image_hash, _, text = key.partition(":")
        if len(image_hash) != HASH_BITS // 4:
            raise ValueError(f"{OP}: max_distance compares one {HASH_BITS}-bit hash per sample; sample {sid!r} "
                             f"has {image_hash!r}")
        value = np.uint64(int(image_hash, 16))
        store, ids = kept.setdefault(text, ([np.empty(16, dtype=np.uint64)], []))
        hashes = store[0][:len(ids)]
        if ids:
            distance = _bit_counts(hashes ^ value)
            near = np.flatnonzero(distance <= max_distance)
            if near.size:
                dropped[sid] = (ids[near[0]], int(distance[near[0]]))
                continue
        if len(ids) == len(store[0]):  # grow by doubling: amortised O(1) appends
            store[0] = np.concatenate([store[0], np.empty_like(store[0])])
        store[0][len(ids)] = value
        ids.append(sid)
    return dropped
