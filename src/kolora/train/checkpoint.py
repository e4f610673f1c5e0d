"""Full-state training checkpoints: written atomically, the last K kept, verified on load.

A checkpoint is Lightning's (LoRA tensors only — not the frozen UNet —, optimizer, loop state incl. the
global step) plus kolora's block: config digest, rank/alpha, and the RNG states (python, numpy, torch, and the
CUDA generator of the rank's own GPU) of every rank, by global rank. Kolora's training draws its noise and
sample order from (seed, step), so RNG states are not needed for an exact resume; they are saved so that
anything else random (user callbacks, dropout) resumes exactly too: training seeds python, numpy and torch from
train.seed, and the DataLoader draws its workers' seed from a generator of its own, so the global streams after a
resume continue those of a run that never stopped (tests/test_train.py). A run resumed on fewer ranks drops the
states of the ranks it no longer has; one resumed on more seeds its new ranks (each says so).
"""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from kolora.core.errors import RunFailure
from kolora.core.rundir import atomic_path

log = logging.getLogger("kolora.train.checkpoint")
_NAME = re.compile(r"^step=(\d+)\.ckpt$")


class CheckpointError(RunFailure):
    pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but a checkpoint appears under its name only once complete, and
    loading never unpickles arbitrary objects (weights_only=True)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        # into a Python file: a full disk or quota arrives as its OSError (torch's own writer says only "file
        # write failed")
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def rng_state() -> dict[str, Any]:

    np_state = np.random.get_state()
    state = {"python": _plain(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype("int64")),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        # this process's own GPU only (kolora.core.devices made it the current one): a state per *visible* GPU
        # cannot be restored where fewer are visible (set_rng_state_all raises IndexError)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:

    random.setstate(_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, list | tuple):  # kolora ≤ 0.1 saved every visible GPU's state: take this one's, if any
        current = torch.cuda.current_device()
        cuda = cuda[current] if current < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def seed_rng(seed: int) -> None:
    """python, numpy, torch and CUDA generators from one seed (a rank the checkpoint has no state for)."""

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rank_rng(kolora_block: dict[str, Any], rank: int, world: int, seed: int) -> str | None:
    """This rank's RNG states from a checkpoint's kolora block; a line saying what changed when the
    checkpoint was written by another number of ranks (None when nothing did)."""
    states = kolora_block.get("rng_ranks") or [kolora_block["rng"]]  # older checkpoints: rank 0's only
    if rank < len(states):
        set_rng_state(states[rank])
        if rank == 0 and len(states) > world:
            return (f"the checkpoint holds the RNG states of {len(states)} ranks and {world} resume: the states of "
                    f"ranks {world}–{len(states) - 1} are dropped")
        return None
    seed_rng(seed + rank)
    return (f"rank {rank}: the checkpoint holds RNG states for {len(states)} rank(s); this rank's generators are "
            f"seeded from train.seed + rank ({seed + rank})")


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, tuple | list) else x


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the folder, newest first."""
    found = []
    for p in Path(ckpt_dir).glob("step=*.ckpt"):
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def newest_valid(ckpt_dir: Path, config_digest: str, max_step: int | None = None
                 ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint (at most `max_step`) that loads and carries kolora's block; a corrupt or truncated
    one is skipped with a warning; one made by a different config is refused."""
    for step, path in checkpoints(ckpt_dir):
        if max_step is not None and step > max_step:
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            meta = ckpt["kolora"]
            if int(ckpt["global_step"]) != step:
                raise ValueError(f"global_step {ckpt['global_step']} does not match its name")
        except Exception as e:  # torch raises many types for truncated/corrupt zip archives
            log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                        path, type(e).__name__, str(e)[:200])
            continue
        if meta.get("config_digest") != config_digest:
            raise CheckpointError(
                f"{path} was written by a different training config ({meta.get('config_digest')} ≠ "
                f"{config_digest}); resuming it would mix two experiments. Use another run --name, or rerun with "
                f"--force (or delete {Path(ckpt_dir)}) to start this config from scratch.")
        return path, ckpt
    return None


def step_path(ckpt_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is (the name train.Checkpointer saves it under)."""
    return Path(ckpt_dir) / f"step={step:06d}.ckpt"


# How long a rank waits for rank 0's chosen checkpoint to appear on its node: NFS caches a directory's
# entries, misses included, for up to acdirmax (60 s by default).
VISIBLE_WITHIN_S = 90.0


def load_step(ckpt_dir: Path, step: int, config_digest: str,
              visible_within_s: float | None = None) -> tuple[Path, dict[str, Any]]:
    """Exactly the checkpoint of `step`, the one rank 0 chose for every rank of a DDP job. Unlike newest_valid
    it never falls back to another one (the ranks would resume from different states): a file still missing
    after `visible_within_s`, unreadable or foreign is a CheckpointError naming it."""

    path = step_path(ckpt_dir, step)
    chosen = f"rank 0 chose {path} (step {step}) for every rank to resume from"
    visible_within_s = VISIBLE_WITHIN_S if visible_within_s is None else visible_within_s
    deadline = time.monotonic() + visible_within_s
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(1.0)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        meta = ckpt["kolora"]
        if int(ckpt["global_step"]) != step:
            raise ValueError(f"global_step {ckpt['global_step']} does not match its name")
    except FileNotFoundError:
        raise CheckpointError(f"{chosen}, but it did not appear here within {visible_within_s:g} s: the run "
                              "directory must be on a file system that every node of the job sees the same "
                              "way") from None
    except Exception as e:  # torch raises many types for truncated/corrupt zip archives
        raise CheckpointError(f"{chosen}, but it cannot be read here ({type(e).__name__}: {str(e)[:200]}); "
                              "no other checkpoint is taken in its place, since the ranks would diverge") from None
    if meta.get("config_digest") != config_digest:
        raise CheckpointError(f"{chosen}, but it was written by a different training config "
                              f"({meta.get('config_digest')} ≠ {config_digest})")
    return path, ckpt
