"""One rank of a DDP training started by the tests without Slurm (gloo on the CPU, Lightning's environment
variables: LOCAL_RANK, NODE_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    python tests/ddp_worker.py RUN_DIR WORLD OVERRIDES_JSON

OVERRIDES_JSON: {"steps": 12, ...} set on the run's train config; "stop_rank0_at": K asks rank 0 alone to stop
after step K (as a signal would). Rank 0 (LOCAL_RANK=0, or no LOCAL_RANK for a
one-process run) records the stage; the others are followers, as under `kolora submit`. Exit 75 when stopped
by a stop request (as the Slurm job's child does).
"""

from __future__ import annotations

import json
import os
import sys


def main(run_dir: str, world: int, overrides: str) -> int:
    from kolora.core import interrupt
    from kolora.core.rundir import RunDir
    from kolora.pipeline.runner import run_stage

    run = RunDir(run_dir)
    cfg = run.load_config()
    settings = json.loads(overrides)
    stop_at = settings.pop("stop_rank0_at", None)
    for key, value in settings.items():
        setattr(cfg.train, key, value)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if stop_at is not None and rank == 0:
        from kolora.train import loop as train
        original = train.Checkpointer.on_train_batch_end

        def stop_then_decide(self, trainer, *args):
            if trainer.global_step == stop_at:
                interrupt.request("SIGUSR2")
            return original(self, trainer, *args)

        train.Checkpointer.on_train_batch_end = stop_then_decide
    try:
        summary = run_stage("train", cfg, run, follower=rank > 0, devices=world)
    except interrupt.Interrupted as e:
        print(f"rank {rank} interrupted: {e}", file=sys.stderr, flush=True)
        return 75
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict | list)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
