"""Data-Juicer's sandbox for the filter stage: its work dir, HF caches and console output in run/filter/dj/
(or a shard's dj/), no network (offline hub variables, no run-time pip installs), and the process-wide state
it changes (cwd, env, stdout/stderr, loguru, multiprocess start method, PIL's LOAD_TRUNCATED_IMAGES, the HF
datasets cache dir) restored afterwards; a private local Ray for the Ray executor. See kolora.filter.dj.runner."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kolora.core.offline import HUGGING_FACE_OFFLINE

# Imported in the functions that use them (a login node's CLI starts without them):
#   PIL, data_juicer, datasets, huggingface_hub, loguru, multiprocess, ray


@contextlib.contextmanager
def contained(dj_dir: Path, console: Path) -> Iterator[None]:
    """Run Data-Juicer in its own corner: cwd, HF caches and console output in dj_dir; global state restored."""

    import multiprocess
    from PIL import ImageFile

    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_streams = sys.stdout, sys.stderr
    saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    saved_mp = multiprocess.get_start_method(allow_none=True)
    saved_tempdir = tempfile.tempdir
    os.environ.update({
        **HUGGING_FACE_OFFLINE, "HF_HOME": str(dj_dir / "hf"),
        "HF_DATASETS_CACHE": str(dj_dir / "hf" / "datasets"), "UV_CACHE_DIR": str(dj_dir / "uv-cache"),
        "UV_OFFLINE": "1", "PIP_NO_INDEX": "1",  # Data-Juicer pip-installs missing deps at run time; never here
        "TQDM_DISABLE": "1",
    })
    ds_config = None
    saved_ds = {}
    with contextlib.suppress(ImportError):
        from datasets import config as ds_config

        saved_ds = {k: getattr(ds_config, k) for k in ("HF_DATASETS_CACHE", "DEFAULT_DOWNLOADED_DATASETS_PATH",
                                                      "DOWNLOADED_DATASETS_PATH", "DEFAULT_EXTRACTED_DATASETS_PATH",
                                                      "EXTRACTED_DATASETS_PATH", "HF_HUB_OFFLINE",
                                                      "HF_DATASETS_OFFLINE") if hasattr(ds_config, k)}
        for k in HUGGING_FACE_OFFLINE:  # datasets read them from the environment once, at import
            if k in saved_ds:
                setattr(ds_config, k, True)
    hub_constants = None
    with contextlib.suppress(ImportError):  # read from the environment once, at import
        from huggingface_hub import constants as hub_constants

        saved_hub_offline = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    saved_verbosity = None
    with contextlib.suppress(ImportError):
        from datasets.utils import logging as ds_logging

        saved_verbosity = ds_logging.get_verbosity()
        ds_logging.set_verbosity_error()  # its handlers hold the real stderr: keep its chatter off the console
    os.chdir(dj_dir)
    log = open(console, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally, after loguru let go of it
    sys.stdout = sys.stderr = log
    try:
        from data_juicer.utils import logger_utils

        logger_utils.LOGGER_SETUP = False  # else a second run in this process logs into the first run's files
        yield
    finally:
        from loguru import logger

        with contextlib.suppress(Exception):
            logger.remove()  # flushes and closes Data-Juicer's file sinks
            logger.add(saved_streams[1], level="WARNING")
        with contextlib.suppress(Exception):
            from data_juicer.utils import logger_utils

            logger_utils.LOGGER_SETUP = False
        sys.stdout, sys.stderr = saved_streams
        log.close()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated
        tempfile.tempdir = saved_tempdir
        if ds_config is not None:
            for k, v in saved_ds.items():
                setattr(ds_config, k, v)
        with contextlib.suppress(Exception):
            multiprocess.set_start_method(saved_mp, force=True)
        if saved_verbosity is not None:
            ds_logging.set_verbosity(saved_verbosity)
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_hub_offline


@contextlib.contextmanager
def ray_session(wanted: bool) -> Iterator[None]:
    """For the Ray executor without RAY_ADDRESS: a private local Ray whose session files (in a short /tmp
    path: Ray's socket paths are length-limited) and processes are gone when the call ends."""
    if not wanted:
        yield
        return

    import ray

    started_here = not ray.is_initialized()
    ray_tmp = None
    if started_here and not os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_TMPDIR"):
        ray_tmp = tempfile.mkdtemp(prefix="kolora-ray-", dir="/tmp")
        os.environ["RAY_TMPDIR"] = ray_tmp  # the caller's environment is restored by _contained
    try:
        yield
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)
