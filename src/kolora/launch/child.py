"""The stage process of a Slurm job (started by launch.supervise on the host, maybe inside a container).

    python -m kolora.launch.child SPEC_JSON TASK_INDEX RESULT_FILE

SPEC_JSON holds a StageJob's plain fields. Stop signals only set a flag (kolora.core.interrupt); a stage that
stops on it exits with EXIT_INTERRUPTED and the host requeues the job.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kolora.core import interrupt
from kolora.core.rundir import atomic_write_json
from kolora.launch.jobs import StageJob
from kolora.launch.supervise import EXIT_INTERRUPTED


def main(argv: list[str]) -> int:

    spec, task_index, result_file = json.loads(argv[0]), int(argv[1]), Path(argv[2])
    with interrupt.handle(interrupt.STOP_SIGNALS):
        try:
            result = StageJob(**spec).run_here(task_index)
        except interrupt.Interrupted as e:
            print(f"kolora: stage interrupted: {e}", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
    atomic_write_json(result_file, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
