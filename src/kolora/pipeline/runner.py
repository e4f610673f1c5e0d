"""The in-process runner: `run_stage` runs one stage of the registry (kolora.pipeline.registry) with what every
launcher needs around it: skip when complete, deal with outputs made for other inputs (Stage.on_change),
time it, record it in the manifest, mark it complete. `preflight` checks everything that can be checked
before any stage runs. A stage's entry point takes a StageContext and returns a summary; the Slurm launcher
calls the same `run_stage` inside each job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from kolora.cache import buckets
from kolora.core.config import ExperimentConfig
from kolora.core.devices import accelerator
from kolora.core.errors import ConfigError, disk_full, disk_full_errno
from kolora.core.interrupt import Interrupted, StopNow
from kolora.core.offline import offline_env
from kolora.core.prompts import load_prompts, repeated
from kolora.core.rundir import RunDir, atomic_write_json, atomic_write_text, unwritable
from kolora.core.stage import Stage, StageContext
from kolora.filter.stage import validate_all_ops
from kolora.formats import interchange, lora, unet_modules
from kolora.ingest.sources import DatasetError, probe
from kolora.models import captioner, scorers
from kolora.models import kolors as models
from kolora.models.kolors import ensure_model, quiet_libraries
from kolora.pipeline import registry
from kolora.pipeline.keys import Keys, is_complete, mark_complete, marker_file
from kolora.render.grid import caption_problems

# Imported in the functions that use them (a login node's CLI starts without them):
#   kolora.train.loop (torch, lightning), torch

log = logging.getLogger("kolora.pipeline.runner")


def preflight(cfg: ExperimentConfig, here: bool = False) -> list[str]:
    """Fail before queueing or running anything, on everything a stage would fail on that can be known now:
    the prompt set (it fits the grid; captions it can draw), model files (each weights file's header, as
    `kolora check models` reads them), cache.dir (a folder this user can write), the dataset (as far as ingest
    would look, without opening an image), render.lora, filter ops, the bucket list (train.buckets), training
    options this machine (`here`: kolora run) or the configured accelerator cannot run. Returns warnings: what
    runs but is likely not meant (the same tile twice in the prompt set)."""

    optimizer = cfg.train.optimizer
    if optimizer == "prodigy" or (optimizer == "adamw8bit" and (here or cfg.train.accelerator == "cpu")):
        from kolora.train.loop import check_options

        check_options(cfg.train, accelerator(cfg.train.accelerator))

    prompts = load_prompts(cfg.render.prompts, cfg.render.negative_prompt)
    cells = cfg.grid.columns * cfg.grid.rows
    if len(prompts) > cells:
        raise ConfigError(f"grid: {len(prompts)} prompts in {cfg.render.prompts} do not fit grid.columns × "
                          f"grid.rows = {cells}; raise grid.rows or grid.columns")
    if unfit := caption_problems(cfg, prompts):
        raise ConfigError(f"grid.captions: prompt draws each prompt of render.prompts {cfg.render.prompts} as a "
                          "one-line caption, which these cannot be:\n  " + "\n  ".join(unfit)
                          + "\nWrite each prompt on one line (in YAML, a folded `>-` block joins lines), or set "
                          "grid.captions: seed (or none)")
    if not (cfg.model.tiny and not Path(cfg.model.path).exists()):  # a tiny model is built by the first stage
        models.check_files(cfg.model)
    if cfg.cache.dir is not None and (why := unwritable(cfg.cache.dir)):
        raise ConfigError(f"cache.dir: {why}. The cache stage writes its entries there: give a folder you can "
                          "write, or leave cache.dir out (the run's own cache/)")

    for src, one in cfg.data.per_source():
        try:
            probe(one)
        except DatasetError as e:
            if src is None:
                raise
            raise DatasetError(f"data.sources {src.name!r}: {e}".replace(" data.path", " path")) from None
    if cfg.render.lora is not None:
        try:
            path = lora.resolve_file(cfg.render.lora)
            interchange.read_tensors(path)  # its weights, checked (lora.check_weights)
            interchange.rank_alpha(path)
        except lora.LoraFileError as e:
            raise lora.LoraFileError(f"render.lora: {e}") from None

    if (cfg.train.block_ranks or cfg.train.block_alphas) and Path(cfg.model.path).exists():
        # each block key names a block of this UNet that holds target modules (before the UNet loads for training)
        unet_modules.check_block_keys(cfg.model.unet_config or cfg.model.path, cfg.train.target_modules,
                                      lora.AdapterOptions.of(cfg.train))
    validate_all_ops(cfg)
    problems = scorers.missing_for_config(cfg, prompts)
    if problems:
        raise ConfigError("scorer models missing (filter.ops / evaluate / evaluate.select):\n  " + "\n  ".join(problems))
    if problems := captioner.missing_for_config(cfg):
        raise ConfigError("captioner missing (data.captions):\n  " + "\n  ".join(problems))
    if cfg.train.buckets:
        buckets.for_config(cfg)  # the aspect-ratio range leaves at least one bucket
    return [f"render.prompts: {cfg.render.prompts}: prompts #{a} and #{b} are the same prompt and seed (and "
            "negative prompt): the same tile is rendered twice; change one's seed or drop it"
            for a, b in repeated(prompts)]


def _superseded(run: RunDir, stage: str) -> Path:
    return run.root / ".superseded" / stage


def prepare(stage: str, cfg: ExperimentConfig, run: RunDir, keys: Keys, force: bool = False) -> list[str]:
    """Before a stage runs: deal with outputs made for other inputs (see Stage.on_change); returns one-line
    notes for the person running it."""
    s = registry.get(stage)
    work = keys.work(stage)
    if work is None:
        return []
    stamp = run.root / ".inputs" / stage
    old = stamp.read_text().strip() if stamp.is_file() else None
    notes: list[str] = []
    if s.on_change == "keep":
        notes = _keep_aside(s, run, old, work, force)
    elif s.on_change == "replace" and old is not None and old != work:
        _set_aside(s, run, old, work)
    atomic_write_text(stamp, work + "\n")
    return notes


def _keep_aside(s: Stage, run: RunDir, old: str | None, work: str, force: bool) -> list[str]:
    """Training outputs are GPU hours: never deleted implicitly. Made for other inputs, they move to
    superseded/<stage>-<key>/ (and come back if those inputs return); --force discards them."""
    present = [run.root / name for name in s.outputs if (run.root / name).exists()]
    if force:
        for p in present:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return [f"{s.name}: --force: discarded {', '.join(p.name + '/' for p in present)}"] if present else []
    notes = []
    if old is not None and old != work and present:
        dest = run.root / "superseded" / f"{s.name}-{old}"
        if dest.exists():
            dest = dest.with_name(f"{dest.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        dest.mkdir(parents=True)
        for p in present:
            os.replace(p, dest / p.name)
        notes.append(f"{s.name}: its inputs changed; the previous {', '.join(p.name + '/' for p in present)} moved "
                     f"to {dest.relative_to(run.root)}/ (kept: delete it to free space, or use --force to discard)")
    back = run.root / "superseded" / f"{s.name}-{work}"
    if old != work and back.is_dir() and not any((run.root / name).exists() for name in s.outputs):
        for child in back.iterdir():
            os.replace(child, run.root / child.name)
        back.rmdir()
        notes.append(f"{s.name}: continuing the outputs made earlier for these same inputs "
                     f"(from {back.relative_to(run.root)}/)")
    return notes


def _set_aside(s: Stage, run: RunDir, old: str, work: str) -> None:
    """Outputs made for other inputs are set aside, not deleted: `_settle` drops them once the stage succeeds
    for the new inputs, or puts them back (with their completion markers) when it fails."""
    aside = _superseded(run, s.name)
    present = [run.root / name for name in s.outputs if (run.root / name).exists()]
    if aside.exists():  # earlier outputs are set aside already; these are an unfinished attempt's
        for p in present:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if json.loads((aside / ".state.json").read_text())["inputs"] == work:
            _settle(s.name, run, succeeded=False)  # back to the inputs they were made for
    elif present:
        aside.mkdir(parents=True)
        for p in present:
            os.replace(p, aside / p.name)
        marker = marker_file(run, s.name)
        atomic_write_json(aside / ".state.json", {
            "inputs": old, "outputs": [p.name for p in present],
            "markers": {s.name: marker.read_text()} if marker.is_file() else {}})


def _settle(stage: str, run: RunDir, succeeded: bool) -> str | None:
    """After a stage: drop the outputs it superseded, or (it failed) put them back; returns a note for the
    error when it did."""
    aside = _superseded(run, stage)
    if not aside.is_dir():
        return None
    if succeeded:
        shutil.rmtree(aside, ignore_errors=True)  # array tasks completing together: either may remove it
        return None
    state = json.loads((aside / ".state.json").read_text())
    failed = run.root / ".failed" / stage
    outputs = {name: run.root / name for name in registry.get(stage).outputs}
    written = [name for name, p in outputs.items() if p.exists()]
    if written:
        shutil.rmtree(failed, ignore_errors=True)
        failed.mkdir(parents=True)
    for name, p in outputs.items():
        if name in written:
            os.replace(p, failed / p.name)
        if (aside / p.name).exists():
            os.replace(aside / p.name, p)
    for s, text in state["markers"].items():
        atomic_write_text(marker_file(run, s), text)
    atomic_write_text(run.root / ".inputs" / stage, state["inputs"] + "\n")
    shutil.rmtree(aside)
    return f"the previous {stage} outputs are back in place" + (
        f"; what this attempt wrote is in {failed}" if written else "")


def run_stage(stage: str, cfg: ExperimentConfig, run: RunDir, force: bool = False,
              progress: Callable[[int, int], None] | None = None, follower: bool = False,
              **placement: Any) -> dict[str, Any]:
    """Run one stage unless complete; returns its summary (with `skipped: True` when it was). `placement`:
    where this process stands in a launcher's array or ranks (StageContext's shard, shards, rank, world,
    devices, nodes, extra). A `follower` (a DDP rank > 0) only computes: rank 0 decided, prepared and records
    the stage."""
    s = registry.get(stage)
    keys = Keys(cfg, run)
    if follower:
        return _call(s, StageContext(cfg, run, keys.work(stage), progress=progress, **placement))

    if not force and is_complete(stage, cfg, run, keys):
        return {"skipped": True}
    notes = prepare(stage, cfg, run, keys, force)
    for note in notes:
        log.warning("%s", note)
    started = time.time()
    run.record_stage(stage, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), notes=notes)
    try:  # from here on the manifest says "running" until one of the branches below records what became of it
        summary = _call(s, StageContext(cfg, run, keys.work(stage), progress=progress, force=force, **placement))
        wall = round(time.time() - started, 2)
        _record_finished(s, cfg, run, summary, wall, placement.get("shard") is not None)
    except (Interrupted, StopNow) as e:  # resumable: keep what it made (and, aside, what it supersedes)
        e.stage = stage
        why = str(e) if isinstance(e, Interrupted) else f"stopped at once ({e})"
        _record_end(run, stage, e, status="interrupted", error=why, wall_s=round(time.time() - started, 2))
        raise
    except BaseException as e:  # any other: an error of the stage or of its bookkeeping, SystemExit, Ctrl-C
        full = disk_full(e, stage)  # a full disk: one message naming the stage and the file, with what to do
        failure = full or e
        _record_end(run, stage, failure, status="failed",
                    error=str(full) if full else f"{type(e).__name__}: {e}"[:2000],
                    wall_s=round(time.time() - started, 2))
        # Not on a BaseException (a KeyboardInterrupt outside `kolora run`), nor for stages whose partial work
        # (checkpoints, tiles) is what a rerun of the same config resumes from; what they supersede stays aside.
        if isinstance(e, Exception) and not s.keeps_partial:
            with _unless_the_disk_is_full(failure, f"the previous {stage} outputs are still aside in "
                                          f"{_superseded(run, stage)}: the next run puts them back"):
                note = _settle(stage, run, succeeded=False)
                if note:
                    failure.add_note(note)
        if full is not None:
            raise full from e
        raise
    return {**summary, "wall_s": wall, **({"notes": notes} if notes else {})}


def _record_finished(s: Stage, cfg: ExperimentConfig, run: RunDir, summary: dict[str, Any], wall: float,
                     shard: bool) -> None:
    """After the stage's work: record it complete (its marker too) or, for an array task whose siblings are
    not done yet, partial."""
    keys = Keys(cfg, run)

    def complete(other: str) -> bool:
        return is_complete(other, cfg, run, keys)

    done = s.done(cfg, run, complete)
    if done and s.prune is not None:
        summary["stale_removed"] = s.prune(cfg, run)
    with run.manifest() as m:
        entry = m.setdefault("stages", {}).setdefault(s.name, {})
        done = done or s.done(cfg, run, complete)  # array tasks: another task may have completed it meanwhile
        if not (done and "merged" in summary and entry.get("status") == "complete"):  # a shard's own summary
            entry["summary"] = summary
        entry.update(status="complete" if done else "partial", error=None)
        entry["wall_s"] = round(entry.get("wall_s", 0) + wall, 2) if shard else wall
    if done:
        _settle(s.name, run, succeeded=True)
        mark_complete(s.name, run, keys.output(s.name), wall_s=wall)


def _record_end(run: RunDir, stage: str, e: BaseException, **fields: Any) -> None:
    """Record how the stage ended. When even that cannot be written (the disk that failed the stage is full),
    the error that ended the stage is the one to report; `kolora status` then finds the stage "running" with
    its process gone, and says it stopped."""
    try:
        run.record_stage(stage, **fields)
    except OSError as write_error:
        e.add_note(f"{run.manifest_file} still says {stage} is running: it could not be written either "
                   f"({write_error})")


@contextlib.contextmanager
def _unless_the_disk_is_full(failure: BaseException, note: str) -> Iterator[None]:
    """Bookkeeping after a failure: when it cannot be written for a full disk, the failure says so (`note`)
    instead of being replaced by a second full-disk error."""
    try:
        yield
    except Exception as e:
        if disk_full_errno(e) is None:
            raise
        failure.add_note(note)


def _call(s: Stage, ctx: StageContext) -> dict[str, Any]:
    if s.runs_on == "gpu":

        ensure_model(ctx.cfg.model)
    entry = s.load()
    if s.runs_on == "gpu":
        torch_setup(ctx.cfg)
    with offline_env(ctx.run.root):  # no downloads from stage code; library caches in the run directory
        return entry(ctx)


def torch_setup(cfg: ExperimentConfig) -> None:
    """Before a torch stage: quiet library chatter; on a CPU, the config's thread count (see cpu_threads);
    for deterministic training, cuBLAS's fixed workspace, which it reads when its first handle is created
    (the cache stage before training in the same job would otherwise fix it)."""
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch


    quiet_libraries()
    if not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)


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
