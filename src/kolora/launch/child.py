"""The stage process of a Slurm job (started by launch.supervise on the host, maybe inside a container).

    python -m kolora.launch.child SPEC_JSON TASK_INDEX RESULT_FILE

SPEC_JSON holds a StageJob's plain fields. Stop signals only set a flag (kolora.core.interrupt); a stage that
stops on it exits with EXIT_INTERRUPTED and the host requeues the job; a distributed stage that lost another rank
exits with EXIT_PEER_LOST and the host asks Slurm whether a node died (launch.supervise).
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path

from kolora.core import interrupt
from kolora.core.rundir import atomic_write_json
from kolora.launch.jobs import StageJob
from kolora.launch.supervise import EXIT_INTERRUPTED, EXIT_PEER_LOST

# What a collective raises when another rank's process or node is gone: torch's DistError family (NCCL, store
# and network errors), and gloo's TCP errors, which are plain RuntimeErrors known only by their text.
PEER_LOST_TYPES = {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}
PEER_LOST_TEXT = re.compile(r"connection (closed|reset) by peer|broken pipe|ProcessGroupGloo|NCCL (error|communicator)"
                            r"|socket timeout|timed out waiting for|gloo/transport", re.I)


def lost_peer(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a collective that lost another rank."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if {t.__name__ for t in type(exc).__mro__} & PEER_LOST_TYPES or PEER_LOST_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: list[str]) -> int:

    spec, task_index, result_file = json.loads(argv[0]), int(argv[1]), Path(argv[2])
    with interrupt.handle(interrupt.STOP_SIGNALS):
        try:
            result = StageJob(**spec).run_here(task_index)
        except interrupt.Interrupted as e:
            print(f"kolora: stage interrupted: {e}", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except Exception as e:
            if not (int(os.environ.get("SLURM_NTASKS", "1")) > 1 and lost_peer(e)):
                raise
            traceback.print_exc()
            print(f"kolora: the stage lost another rank ({type(e).__name__}); the host asks Slurm whether a node "
                  "failed", file=sys.stderr, flush=True)
            return EXIT_PEER_LOST
    atomic_write_json(result_file, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
