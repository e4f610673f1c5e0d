"""What training reads and in which order: cached samples, and samplers whose step k is a pure function of
(seed, k), so a run resumed from any checkpoint continues exactly as if it had never stopped.

The order is one *global* sample sequence, independent of how many processes train: step k consumes its
positions [k·G, (k+1)·G), G = world size × train.batch_size × gradient accumulation (the global batch).
`RankShare` deals them: micro-batch m of rank r takes positions k·G + (m·world + r)·batch_size onwards, so
1 GPU with the doubled batch, 2 GPUs, and 1 GPU accumulating 2 batches all train on the same samples at step k.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from kolora.cache import entry as cache_entry
from kolora.cache.stage import read_text
from kolora.core.errors import RunFailure


class CachedSamples(Dataset):
    """Training samples read from cache/: (latents, prompt_embeds, pooled, time_ids), and "mask" [1, h, w] at
    the latents' grid when the cache holds loss masks (kolora.cache.masks; a sample without one gets ones, so
    batches mixing both stack). Every read is verified (kolora.cache.entry); a bad entry fails naming it and
    marks the run's cache incomplete, so the cache stage runs again, moves the entry aside and encodes it anew."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        index = json.loads((self.cache_dir / "index.json").read_text())
        self.dir = Path(index.get("store") or cache_dir)  # the entries' store (cache.dir may be shared)
        self.entries = index["entries"]
        self.empty_text_key = index.get("empty_text_key")
        self.seq = index["max_sequence_length"]
        self.masked = any("mask_key" in e for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def _verified(self, read):
        try:
            return read()
        except cache_entry.BadCacheEntry as e:
            cache_entry.mark_damaged(self.cache_dir, e)
            raise

    def text(self, key: str, of: str) -> dict[str, torch.Tensor]:
        """A text entry (pad rows restored); `of` names its caption in an error."""

        return self._verified(lambda: read_text(self.dir / "text" / f"{key}.safetensors", self.seq, of))

    def empty_caption(self) -> dict[str, torch.Tensor]:
        """The empty caption's embeddings (cached once by the cache stage), for caption dropout."""
        if not self.empty_text_key:
            raise RunFailure(f"{self.dir}: the cache index has no empty-caption entry (made by an older kolora); "
                             "rerun the cache stage with --force")
        return self.text(self.empty_text_key, "the empty caption")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.entries[i]
        text = self.text(e["text_key"], f"the caption of image {e['file_name']}: {e['text'][:60]!r}")
        lat = self._verified(lambda: cache_entry.read(self.dir / "latents" / f"{e['latent_key']}.safetensors",
                                                      f"the latents of image {e['file_name']}"))
        item = {"latents": lat["latents"], "prompt_embeds": text["prompt_embeds"], "pooled": text["pooled"],
                "time_ids": torch.tensor(e["time_ids"], dtype=torch.float32)}
        if self.masked:
            item["mask"] = self.mask(e, lat["latents"].shape[1:])
        return item

    def mask(self, e: dict, grid: torch.Size) -> torch.Tensor:
        """The entry's loss mask as float32 [1, h, w]; ones for a sample without one."""
        if "mask_key" not in e:
            return torch.ones((1, *grid), dtype=torch.float32)
        found = self._verified(lambda: cache_entry.read(self.dir / "masks" / f"{e['mask_key']}.safetensors",
                                                        f"the mask of image {e['file_name']}"))
        return found["mask"].float()


class Positioned(Dataset):
    """`data` read by (position in the sample sequence, index) pairs: each sample carries its position, which
    seeds its noise (kolora.train.objective)."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        position, index = item
        return {**self.data[index], "position": torch.tensor(position, dtype=torch.int64)}


class RankShare(Sampler[tuple[int, int]]):
    """This rank's (position, index) pairs of a global sample sequence (StepSampler or BucketSampler, which
    start at step `start_step`): of every global batch, micro-batch m (of `accumulate`) takes the slice
    (m·world + rank)·per_rank. Lightning's DistributedSampler must stay off (use_distributed_sampler=False)."""

    def __init__(self, sequence: Sampler[int], steps: int, start_step: int, per_rank: int, world: int = 1,
                 rank: int = 0, accumulate: int = 1):
        self.sequence, self.steps, self.start_step = sequence, steps, start_step
        self.per_rank, self.world, self.rank, self.accumulate = per_rank, world, rank, accumulate
        self.global_batch = per_rank * world * accumulate

    def __len__(self) -> int:
        return self.steps * self.accumulate * self.per_rank  # the whole run's, as StepSampler.__len__ explains

    def __iter__(self):
        batch: list[tuple[int, int]] = []
        for position, index in enumerate(self.sequence, start=self.start_step * self.global_batch):
            batch.append((position, index))
            if len(batch) == self.global_batch:
                for m in range(self.accumulate):
                    first = (m * self.world + self.rank) * self.per_rank
                    yield from batch[first:first + self.per_rank]
                batch = []


def sample_repeats(entries: list[dict[str, Any]], repeats: dict[str, int], index: Path) -> list[int] | None:
    """How often each cached sample appears per epoch: its source's repeats (data.sources); None without
    sources (every sample once: the order as before sources existed)."""
    if not repeats:
        return None
    unknown = sorted({str(e.get("source")) for e in entries if e.get("source") not in repeats})
    if unknown:
        raise RunFailure(f"train: {index} has samples of no source in data.sources ({', '.join(unknown)}); rerun "
                         "the ingest stage and those after it (kolora run --from ingest)")
    return [repeats[e["source"]] for e in entries]


def source_counts(entries: list[dict[str, Any]], repeats: dict[str, int]) -> dict[str, dict[str, int]]:
    """{source: {"images", "repeats", "samples_per_epoch"}}: the cached images of each source and what an epoch
    draws of them (images × repeats)."""
    out = {}
    for name, r in repeats.items():
        images = sum(e.get("source") == name for e in entries)
        out[name] = {"images": images, "repeats": r, "samples_per_epoch": images * r}
    return out


def epoch_pool(n: int, repeats: list[int] | None) -> list[int] | None:
    """An epoch's multiset with repeats: sample i `repeats[i]` times, in index order (None: every sample once)."""
    if repeats is None or all(r == 1 for r in repeats):
        return None
    if len(repeats) != n:
        raise ValueError(f"{len(repeats)} repeats for {n} samples")
    return [i for i in range(n) for _ in range(repeats[i])]


class StepSampler(Sampler[int]):
    """Sample i of the run is `pool[perm_e[i % n]]` with e = i // n and perm_e a permutation seeded by (seed, e)
    of an epoch's n positions: epochs are reshuffled, and starting at `start` (resume) yields exactly the rest of
    the sequence. The pool holds sample j `repeats[j]` times (data.sources; n = their sum), else once (pool =
    identity, n = the sample count)."""

    def __init__(self, n: int, total: int, seed: int, start: int = 0, repeats: list[int] | None = None):
        self.pool = epoch_pool(n, repeats)
        n = len(self.pool) if self.pool is not None else n
        self.n, self.total, self.seed, self.start = n, total, seed, start

    def __len__(self) -> int:
        # The whole run's length even when resuming: Lightning restores its position in the (single) epoch
        # and ends the epoch at len(dataloader) batches, so the restored count + what we yield = this length.
        return self.total

    def __iter__(self):
        perm, epoch = None, -1
        for i in range(self.start, self.total):
            if i // self.n != epoch:
                epoch = i // self.n
                # modulo 2^64: the value torch would wrap it to, for a train.seed up to 2^63 - 1 too
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
                perm = torch.randperm(self.n, generator=g).tolist()
            j = perm[i % self.n]
            yield j if self.pool is None else self.pool[j]


class BucketSampler(Sampler[int]):
    """train.buckets: every batch holds samples of one bucket (one latent size), and batch k is a pure function
    of (seed, k), so a resumed run continues exactly.

    Epoch e has `per_epoch` batches: each bucket's samples in an order seeded by (seed, e, bucket), cut into
    batches, an incomplete last batch *wrapped* (filled with that bucket's first samples of the epoch: no
    sample is skipped in an epoch, a few are seen twice, and a bucket smaller than a batch still trains),
    then all the epoch's batches in an order seeded by (seed, e). Batch k is batch k % per_epoch of epoch
    k // per_epoch. Like StepSampler it yields sample indices, `batch_size` per batch, for the DataLoader's
    own batch_size. `batch_size` is the global batch (world × per-rank batch × accumulation): RankShare deals
    each rank its slices of it, all of that same bucket. `repeats` (data.sources): sample i is `repeats[i]` times
    a member of its bucket (the wrapped last batches aside, seen that often per epoch)."""

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, steps: int, seed: int, start_step: int = 0,
                 repeats: list[int] | None = None):
        self.members: dict[tuple[int, int], list[int]] = {}
        for i in epoch_pool(len(buckets), repeats) or range(len(buckets)):
            self.members.setdefault(tuple(buckets[i]), []).append(i)
        self.size, self.steps, self.seed, self.start = batch_size, steps, seed, start_step
        self.per_epoch = sum(-(-len(m) // self.size) for m in self.members.values())

    def __len__(self) -> int:
        return self.steps * self.size  # the whole run's, as StepSampler.__len__ explains

    @staticmethod
    def _generator(*parts: Any) -> torch.Generator:

        digest = hashlib.sha256(repr(parts).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % (2**63))

    def epoch(self, e: int) -> list[list[int]]:
        batches = []
        for b in sorted(self.members):
            m = self.members[b]
            order = [m[j] for j in torch.randperm(len(m), generator=self._generator(self.seed, e, b)).tolist()]
            n = -(-len(order) // self.size) * self.size
            wrapped = [order[j % len(order)] for j in range(n)]
            batches += [wrapped[j:j + self.size] for j in range(0, n, self.size)]
        return [batches[j] for j in torch.randperm(len(batches), generator=self._generator(self.seed, e)).tolist()]

    def batch(self, k: int) -> list[int]:
        return self.epoch(k // self.per_epoch)[k % self.per_epoch]

    def __iter__(self):
        current, batches = -1, []
        for k in range(self.start, self.steps):
            if k // self.per_epoch != current:
                current = k // self.per_epoch
                batches = self.epoch(current)
            yield from batches[k % self.per_epoch]
