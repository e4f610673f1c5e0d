"""The stage graph and the in-process runner.

A stage is `kolora.<stage>.run(cfg, run_dir, **kw) -> summary`. `run_stage` adds what every launcher
needs around it: skip when complete, set aside outputs made for a different config (put back if the stage
fails, dropped when it succeeds), time it, record it in the manifest, mark it complete. `preflight` checks everything that can be checked before any stage runs.
The Slurm launcher calls the same `run_stage` inside each job.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from kolora.config import ConfigError, ExperimentConfig, load_prompts
from kolora.interrupt import Interrupted
from kolora.rundir import STAGE_INPUTS, STAGES, RunDir, atomic_write_json, atomic_write_text

# What each stage owns in the run directory (set aside when the stage reruns for a different config).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "ingest": ("data",), "filter": ("filter", "trainset"), "cache": (), "train": ("train", "lora"),
    "render": ("render",), "grid": ("grid.png",),
}

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DIFFUSERS_OFFLINE": "1", "MODELSCOPE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def preflight(cfg: ExperimentConfig) -> None:
    """Fail before queueing or running anything: prompt set, model files, the dataset (as far as ingest would
    look, without opening an image), render.lora, filter ops."""
    from kolora import models

    prompts = load_prompts(cfg.render.prompts, cfg.render.negative_prompt)
    cells = cfg.grid.columns * cfg.grid.rows
    if len(prompts) > cells:
        raise ConfigError(f"grid: {len(prompts)} prompts in {cfg.render.prompts} do not fit grid.columns × "
                          f"grid.rows = {cells}; raise grid.rows or grid.columns")
    if not (cfg.model.tiny and not Path(cfg.model.path).exists()):
        models.resolve(cfg.model)
    from kolora.dataset import probe

    probe(cfg.data)
    if cfg.render.lora is not None:
        from kolora import lora

        try:
            lora.rank_alpha(lora.resolve_file(cfg.render.lora))
        except lora.LoraFileError as e:
            raise lora.LoraFileError(f"render.lora: {e}") from None
    from kolora.data_juicer import validate_ops

    validate_ops(cfg.filter.ops)


@contextlib.contextmanager
def offline_env(run: RunDir) -> Iterator[None]:
    """No downloads from stage code; library caches inside the run directory."""
    saved = {k: os.environ.get(k) for k in (*OFFLINE_ENV, "HF_HOME", "MODELSCOPE_CACHE")}
    os.environ.update(OFFLINE_ENV)
    os.environ.setdefault("HF_HOME", str(run.root / ".hf_home"))
    os.environ.setdefault("MODELSCOPE_CACHE", str(run.root / ".modelscope"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _superseded(run: RunDir, stage: str) -> Path:
    return run.root / ".superseded" / stage


def _clear_stale(stage: str, cfg: ExperimentConfig, run: RunDir) -> None:
    """Outputs made for other inputs are set aside, not deleted: `_settle` drops them once the stage succeeds
    for the new inputs, or puts them back (with their completion markers) when it fails."""
    stamp = run.root / ".inputs" / stage
    digest = cfg.section_digest(*STAGE_INPUTS[stage])
    old = stamp.read_text().strip() if stamp.is_file() else None
    if old is not None and old != digest:
        aside = _superseded(run, stage)
        present = [run.root / name for name in STAGE_OUTPUTS[stage] if (run.root / name).exists()]
        if aside.exists():  # earlier outputs are set aside already; these are an unfinished attempt's
            for p in present:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if json.loads((aside / ".state.json").read_text())["inputs"] == digest:
                _settle(stage, run, succeeded=False)  # back to the inputs they were made for
        elif present:
            aside.mkdir(parents=True)
            for p in present:
                os.replace(p, aside / p.name)
            markers = {s: run.marker_file(s) for s in STAGES[STAGES.index(stage):] if run.marker_file(s).is_file()}
            atomic_write_json(aside / ".state.json", {
                "inputs": old, "markers": {s: m.read_text() for s, m in markers.items()}})
    atomic_write_text(stamp, digest + "\n")


def _settle(stage: str, run: RunDir, succeeded: bool) -> str | None:
    """After a stage: drop the outputs it superseded, or (it failed) put them back; returns a note for the
    error when it did."""
    aside = _superseded(run, stage)
    if not aside.is_dir():
        return None
    if succeeded:
        shutil.rmtree(aside)
        return None
    state = json.loads((aside / ".state.json").read_text())
    failed = run.root / ".failed" / stage
    written = [name for name in STAGE_OUTPUTS[stage] if (run.root / name).exists()]
    if written:
        shutil.rmtree(failed, ignore_errors=True)
        failed.mkdir(parents=True)
    for name in STAGE_OUTPUTS[stage]:
        if name in written:
            os.replace(run.root / name, failed / name)
        if (aside / name).exists():
            os.replace(aside / name, run.root / name)
    for s, text in state["markers"].items():
        atomic_write_text(run.marker_file(s), text)
    atomic_write_text(run.root / ".inputs" / stage, state["inputs"] + "\n")
    shutil.rmtree(aside)
    return f"the previous {stage} outputs are back in place" + (
        f"; what this attempt wrote is in {failed}" if written else "")


def run_stage(stage: str, cfg: ExperimentConfig, run: RunDir, force: bool = False,
              progress: Callable[[int, int], None] | None = None, **kw: Any) -> dict[str, Any]:
    """Run one stage unless complete; returns its summary (with `skipped: True` when it was)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if not force and is_complete(stage, cfg, run):
        return {"skipped": True}
    _clear_stale(stage, cfg, run)
    # Whatever this stage writes makes the later stages' outputs stale.
    run.invalidate_from(stage)
    if stage in ("cache", "train", "render"):
        from kolora.models import ensure_model

        ensure_model(cfg.model)
    module = importlib.import_module(f"kolora.{stage}")
    if stage in ("cache", "train", "render"):
        torch_setup(cfg)
    started = time.time()
    run.record_stage(stage, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        with offline_env(run):
            if progress is not None and "progress" in inspect.signature(module.run).parameters:
                kw["progress"] = progress
            summary = module.run(cfg, run, **kw)
    except Interrupted as e:  # resumable: keep what it made (and, aside, what it supersedes)
        run.record_stage(stage, status="interrupted", error=str(e), wall_s=round(time.time() - started, 2))
        raise
    except BaseException as e:
        run.record_stage(stage, status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                         wall_s=round(time.time() - started, 2))
        # Not on Ctrl-C (like a stop request), nor for train and render: their partial work (checkpoints, tiles)
        # is what a rerun of the same config resumes from, and costs GPU hours; what they supersede stays aside.
        if isinstance(e, Exception) and stage not in ("train", "render"):
            note = _settle(stage, run, succeeded=False)
            if note:
                e.add_note(note)
        raise
    wall = round(time.time() - started, 2)
    done = stage != "render" or not _missing_tiles(cfg, run)
    with run.manifest() as m:
        entry = m.setdefault("stages", {}).setdefault(stage, {})
        entry.update(status="complete" if done else "partial", summary=summary, error=None)
        entry["wall_s"] = round(entry.get("wall_s", 0) + wall, 2) if stage == "render" and "task_index" in kw else wall
    if done:
        _settle(stage, run, succeeded=True)
        run.mark_complete(stage, cfg, **{"wall_s": wall})
    return {**summary, "wall_s": wall}


def torch_setup(cfg: ExperimentConfig) -> None:
    """Before a torch stage: quiet library chatter; on a CPU, the config's thread count (see cpu_threads)."""
    import torch

    from kolora.models import quiet_libraries

    quiet_libraries()
    if not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)


def is_complete(stage: str, cfg: ExperimentConfig, run: RunDir) -> bool:
    """The stage's marker matches this config *and* its outputs are still on disk (a deleted tile or
    LoRA makes the stage run again, and only for what is missing)."""
    if not run.is_complete(stage, cfg):
        return False
    if stage == "render":
        return not _missing_tiles(cfg, run)
    if stage == "grid":
        tiles = list(run.render.glob("*.png"))
        return run.grid_file.is_file() and all(
            t.stat().st_mtime_ns <= run.grid_file.stat().st_mtime_ns for t in tiles)
    required = {"ingest": run.data / "metadata.jsonl", "filter": run.trainset / "train" / "metadata.csv",
                "cache": run.cache / "index.json", "train": run.lora / "pytorch_lora_weights.safetensors"}
    return required[stage].is_file()


def _missing_tiles(cfg: ExperimentConfig, run: RunDir) -> list[str]:
    from kolora.render import missing_tiles

    return missing_tiles(cfg, run)


def provenance() -> dict[str, Any]:
    pkgs = ["kolora", "torch", "diffusers", "transformers", "peft", "lightning", "py-data-juicer", "modelscope",
            "submitit", "pydantic"]
    versions = {}
    for p in pkgs:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[p] = metadata.version(p)
    src = Path(__file__).resolve().parent
    sha = None
    if shutil.which("git"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=5)
            sha = out.stdout.strip() or None
    return {"git_sha": sha, "versions": versions, "python": platform.python_version(), "host": platform.node(),
            "image": os.environ.get("KOLORA_IMAGE"), "image_digest": os.environ.get("KOLORA_IMAGE_DIGEST")}


def open_run(cfg: ExperimentConfig, runs_dir: Path) -> RunDir:
    run = RunDir(Path(runs_dir) / cfg.name)
    run.bind(cfg)
    with run.manifest() as m:
        m["provenance"] = provenance()
    return run
