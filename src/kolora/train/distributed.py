"""What makes DDP training survive preemption and a change of GPU count.

- `GlobalBatch`: the global batch (world × train.batch_size × accumulation) is fixed when a run starts and
  recorded in its checkpoints; a run resumed on another number of GPUs keeps it with gradient accumulation,
  or is refused when it cannot (kolora.train.samples deals the same samples at every step either way).
- `StepDecision`: whether to checkpoint and/or stop after an optimizer step is decided on rank 0 (its stop
  flag, the step, its wall clock) and broadcast, so every rank saves and stops at the same step.
- `gather_objects`: a value of every rank (their RNG states, into the checkpoint).
- `keep_signals_out`: Lightning's signal connector must not touch SIGTERM (kolora.core.interrupt owns it).
- `placement`: Lightning's accelerator, devices and strategy for this process's own GPU (kolora.core.devices).
- `free_port`: rank 0 picks the process group's port on its node (launch.jobs hands it to the other ranks),
  so two jobs sharing a node never collide as Lightning's default (15000 + job id digits) can.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.core import interrupt
from kolora.core.devices import is_cuda
from kolora.core.errors import InputError

# lightning, torch: imported in the functions that use them (a login node's CLI starts without them)


def accumulation_steps(global_batch: int, per_rank: int, world: int) -> int | None:
    """Micro-batches per optimizer step that make `global_batch` from `world` processes of `per_rank` samples;
    None when no whole number does (the run's result would then differ from the uninterrupted one)."""
    accumulate, rest = divmod(global_batch, per_rank * world)
    return accumulate if not rest and accumulate >= 1 else None


@dataclass(frozen=True)
class GlobalBatch:
    per_rank: int    # train.batch_size
    world: int       # processes (GPUs) training together
    accumulate: int  # micro-batches per optimizer step

    @property
    def size(self) -> int:
        return self.per_rank * self.world * self.accumulate

    def record(self) -> dict[str, int]:
        return {"per_rank_batch": self.per_rank, "world_size": self.world, "accumulate": self.accumulate,
                "global_batch": self.size}

    @classmethod
    def resumed(cls, recorded: dict[str, Any] | None, per_rank: int, world: int, where: str) -> GlobalBatch:
        """The batch a run resumed on `world` processes trains with: the checkpoint's global batch, kept by
        gradient accumulation. A checkpoint without the record (older kolora) was made with accumulation 1
        on an unknown world: the current one is assumed."""
        if not recorded or "global_batch" not in recorded:
            return cls(per_rank, world, 1)
        size = int(recorded["global_batch"])
        accumulate = accumulation_steps(size, per_rank, world)
        if accumulate is None:
            raise InputError(
                f"{where} was trained with a global batch of {size} ({recorded['world_size']} processes × "
                f"train.batch_size {recorded['per_rank_batch']} × accumulation {recorded['accumulate']}); "
                f"{world} processes × train.batch_size {per_rank} cannot make {size} with whole accumulation "
                f"steps, so the result would differ from the uninterrupted run. Resume on GPUs × nodes that "
                f"divide {size // per_rank} (kolora resume RUN --gpus M --nodes N), or start over with --force.")
        return cls(per_rank, world, accumulate)


BATCH_FILE = "batch.json"  # in train/: the run's GlobalBatch.record(), for `kolora resume` to check early


def check_resume(train_dir: Path, per_rank: int, worlds: list[int]) -> GlobalBatch | None:
    """The batch a resumed training would use on the largest of `worlds` (the process counts the train job can
    start with: ResolvedResources.worlds()); InputError when one of them cannot keep the recorded global batch.
    None: nothing recorded (no training started)."""
    path = Path(train_dir) / BATCH_FILE
    if not path.is_file() or not any((Path(train_dir) / "checkpoints").glob("step=*.ckpt")):
        return None
    recorded = json.loads(path.read_text())
    batches = [GlobalBatch.resumed(recorded, per_rank, world, str(Path(train_dir) / "checkpoints"))
               for world in worlds]
    return batches[-1]


class StepDecision:
    """After each optimizer step: (checkpoint now?, stop now?), decided on rank 0 and broadcast."""

    def __init__(self, every_steps: int, every_minutes: float | None, last_step: int):
        self.every_steps, self.every_minutes, self.last_step = every_steps, every_minutes, last_step
        self.saved_at = time.monotonic()

    def local(self, step: int) -> tuple[bool, bool]:
        stop = interrupt.requested() is not None
        clock = self.every_minutes is not None and time.monotonic() - self.saved_at >= 60 * self.every_minutes
        return (stop or clock or step % self.every_steps == 0 or step == self.last_step), stop

    def __call__(self, trainer) -> tuple[bool, bool]:
        mine = self.local(trainer.global_step) if trainer.is_global_zero else (False, False)
        if trainer.world_size == 1:
            return mine
        save, stop = trainer.strategy.broadcast(mine, src=0)  # one collective per step, on every rank
        return bool(save), bool(stop)

    def saved(self) -> None:
        self.saved_at = time.monotonic()


def keep_signals_out(trainer) -> None:
    """Lightning 2.6 installs its own SIGTERM handler whatever the cluster environment says (it broadcasts
    inside the handler and makes the loop raise SIGTERMException, a bare SystemExit: no checkpoint, exit 0).
    Its connector is replaced by one that installs nothing, so SIGTERM stays with kolora.core.interrupt."""
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    class _KoloraOwnsSignals(_SignalConnector):
        def register_signal_handlers(self) -> None:
            self.received_sigterm = False
            self._original_handlers = {}

        def teardown(self) -> None:
            self._original_handlers = {}

    trainer._signal_connector = _KoloraOwnsSignals(trainer)


def rescale_loop_progress(checkpoint: dict[str, Any], accumulate: int) -> None:
    """Lightning counts batches, not optimizer steps, and steps the optimizer when the count is a multiple of
    the accumulation: a checkpoint made with another accumulation gets counts consistent with this one."""
    step = int(checkpoint["global_step"])
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = loop.get("epoch_loop.batch_progress")
    if not progress:
        return
    for part in ("total", "current"):
        for key in ("ready", "started", "processed", "completed"):
            if key in progress.get(part, {}):
                progress[part][key] = step * accumulate
    state = loop.get("epoch_loop.state_dict")
    if isinstance(state, dict) and "_batches_that_stepped" in state:
        state["_batches_that_stepped"] = step


def gather_objects(trainer, obj: Any) -> list[Any]:
    """`obj` of every rank, by global rank (a collective: every rank must call it at the same point)."""
    if trainer is None or trainer.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(out, obj)
    return out


def placement(device: str, tasks_per_node: int = 1, num_nodes: int = 1) -> dict[str, Any]:
    """`L.Trainer` arguments that train on `device` (kolora.core.devices.pick: this process's own GPU, or the CPU)
    with `tasks_per_node` × `num_nodes` processes. Lightning's own choice, GPU <local rank> of `devices`
    visible ones, fails where Slurm gives each task its own GPU (--gpus-per-task: one visible, always index 0):
    each process names its own device instead, once per process of its node."""
    world = tasks_per_node * num_nodes
    if not is_cuda(device):
        return {"accelerator": "cpu", "devices": tasks_per_node, "num_nodes": num_nodes,
                "strategy": "ddp" if world > 1 else "auto"}
    import torch

    own = torch.device(device)
    own = torch.device("cuda", own.index if own.index is not None else torch.cuda.current_device())
    if world == 1:
        return {"accelerator": "gpu", "devices": [own.index], "num_nodes": 1, "strategy": "auto"}
    from lightning.pytorch.strategies import DDPStrategy

    return {"accelerator": "gpu", "devices": [own.index], "num_nodes": num_nodes,
            "strategy": DDPStrategy(parallel_devices=[own] * tasks_per_node)}


def rendezvous_host(environ) -> str | None:
    """The job's first node as Slurm lists it (SLURM_JOB_NODELIST: 'gpu[07-08]' → gpu07, 'a,b' → a), read the
    way Lightning's SLURMEnvironment reads it: every rank's MASTER_ADDR. None outside an allocation."""
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.resolve_root_node_address(nodes)


def cluster_plugins(environ) -> list[Any]:
    """The cluster environment `L.Trainer` gets: Slurm's (rank, world size, MASTER_ADDR/PORT) in a Slurm job,
    with Lightning's own auto-requeue off (kolora's launcher owns signals and requeue); none elsewhere."""
    if "SLURM_JOB_ID" not in environ:
        return []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def free_port() -> int:
    """A TCP port free on this node now (the kernel's choice), for the process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
