"""What the commands check before a run starts or is queued: preflight's warnings printed, and the checks of
a run against a cluster profile that `submit`, `resume`, `sweep --cluster` and `validate --cluster` share.
The launch modules are imported by the commands that use them: every other command starts without them."""

from __future__ import annotations

import sys

from kolora.core.errors import KoloraError
from kolora.launch.memplan import GPUMemoryError
from kolora.launch.plan import attempt_window_warnings, gpu_memory_check, has_gpu_mem_limits


def print_warnings(lines: list[str]) -> None:
    """What runs but is likely not meant (preflight's, the cluster checks'): printed, not refused."""
    for line in lines:
        print(f"kolora: warning: {line}", file=sys.stderr)


def warn_attempt_window(cfg, profile) -> None:

    print_warnings(attempt_window_warnings(cfg, profile))


def check_gpu_memory(cfg, profile, profile_file, show: bool) -> list[str]:
    """One line per GPU stage: its estimated peak GPU memory (kolora.launch.memplan) against the profile's
    jobs.<job>.gpu_mem_gb. A stage that does not fit stops the command (exit 2) before anything is queued.
    Without `show`, nothing is estimated unless the profile gives a gpu_mem_gb."""

    if not (show or has_gpu_mem_limits(profile)):
        return []
    try:
        lines, refusals = gpu_memory_check(cfg, profile, str(profile_file))
    except KoloraError:
        raise
    except Exception as e:  # noqa: BLE001 - an estimate that cannot be made must not block a submission
        print(f"kolora: warning: GPU memory not estimated ({type(e).__name__}: {e})", file=sys.stderr)
        return []
    if refusals:
        for line in lines if show else []:
            print(line)
        raise GPUMemoryError("\n".join(refusals))
    return lines
