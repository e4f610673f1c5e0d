"""The one device this process computes on: one GPU per rank.

A DDP job starts one process per GPU on each node (srun tasks). Every stage of such a job (cache, train,
validation sampling, render, evaluate) must use the rank's own GPU, and say so to CUDA before any CUDA work:
a bare "cuda" is GPU 0 in every process, so four ranks would each load ChatGLM3 (12.5 GB) and the VAE onto
GPU 0 and keep a CUDA context there for the whole job.

- Slurm `--gpus-per-node N` (kolora's train job): each task sees all N GPUs; rank r on a node takes GPU r.
- Slurm `--gpus-per-task 1` (or a site binding GPUs to tasks): each task sees one GPU, which is its own.
The local rank is torchrun/Lightning's `LOCAL_RANK`, else srun's `SLURM_LOCALID`, else 0.
"""

from __future__ import annotations

import logging
import os

from kolora.core.errors import InputError

# torch: imported in the functions that use them (a login node's CLI starts without them)

log = logging.getLogger("kolora.core.devices")


def local_rank() -> int:
    """This process's index among the job's processes on its node."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def gpu_index(visible: int, rank: int) -> int:
    """Which of the `visible` GPUs local rank `rank` uses."""
    if visible == 1:
        return 0  # a GPU per task: the one this task sees is its own
    if rank >= visible:
        raise InputError(
            f"local rank {rank} has no GPU of its own: this process sees {visible} GPUs "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); ask Slurm for as many GPUs "
            "per node as tasks per node (the profile's jobs.train.gpus), or one GPU per task")
    return rank


def pick(choice: str = "auto") -> str:
    """'cpu' or 'cuda:<i>' for `choice` ('auto', 'cpu', 'cuda' or 'gpu'); for a GPU, CUDA's current device is
    set to it, so work that names no index (a library's bare 'cuda', a new context) lands there too."""
    if choice == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if choice == "auto":
            return "cpu"
        raise InputError(f"device {choice!r} asks for a GPU and this process sees none "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use 'auto' or "
                         "'cpu', or run the stage in a GPU job")
    index = gpu_index(torch.cuda.device_count(), local_rank())
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def accelerator(choice: str) -> str:
    """'gpu' or 'cpu': the kind of device `pick(choice)` would give, for checks made before any stage runs
    (CUDA's current device is left alone)."""
    if choice == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu" if choice == "cpu" else "gpu"


def is_cuda(device) -> bool:
    """True for 'cuda', 'cuda:1' and torch.device('cuda', 1)."""
    return str(device).split(":")[0] == "cuda"
