"""No downloads where the stages run: the hub-offline variables kolora sets for compute jobs and around every
stage it runs, and the test of whether this process is offline (the fetch commands and ingest's hub dataset
fail at once with the login-node advice instead of hanging in retries)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

# the Hugging Face hub and datasets: also what the Data-Juicer sandbox sets (kolora.filter.dj.sandbox)
HUGGING_FACE_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# every job's environment (kolora.launch.jobs, the container's %environment) and every stage's (offline_env)
OFFLINE_ENV = {**HUGGING_FACE_OFFLINE, "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1",
               "MODELSCOPE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

Hub = Literal["huggingface", "modelscope", "any"]
# the variables that say a hub is off limits here; KOLORA_OFFLINE is the user's own switch for all of them
OFFLINE_VARIABLES: dict[Hub, tuple[str, ...]] = {
    "huggingface": ("HF_HUB_OFFLINE",),
    "modelscope": ("MODELSCOPE_OFFLINE",),
    "any": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MODELSCOPE_OFFLINE", "KOLORA_OFFLINE"),
}
_TRUE = ("1", "true", "yes", "on")


def offline_variable(hub: Hub = "any") -> str | None:
    """The variable that makes this process offline for `hub`: the first of OFFLINE_VARIABLES[hub] set to a
    true value (1, true, yes, on), or None when none is set."""
    return next((v for v in OFFLINE_VARIABLES[hub] if os.environ.get(v, "").strip().lower() in _TRUE), None)


@contextlib.contextmanager
def offline_env(root: Path) -> Iterator[None]:
    """OFFLINE_ENV set, and the library caches inside `root` (a run directory) unless set already; the
    environment restored afterwards."""
    homes = {"HF_HOME": str(Path(root) / ".hf_home"), "MODELSCOPE_CACHE": str(Path(root) / ".modelscope")}
    saved = {k: os.environ.get(k) for k in (*OFFLINE_ENV, *homes)}
    os.environ.update(OFFLINE_ENV)
    for k, v in homes.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
