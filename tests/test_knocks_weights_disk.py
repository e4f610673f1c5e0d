"""Broken LoRA weights and a full disk (issue #24, items 3 and 7).

A LoRA whose tensors hold nan/inf or magnitudes no trained LoRA has is refused by every command that reads one
(import-lora, export, validate and run with render.lora, the render stage itself), naming the file and the tensor
key, with exit 2 and nothing written. A write that finds the disk or the quota full, in any stage, is one message
naming the stage and the file, exit 1, the stage "failed" in the manifest, finished work kept, and the same command
completes once there is space again."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from conftest import DEMO, PROMPTS, run_cli, tree_state

from kolora.formats import interchange
from kolora.formats.lora import WEIGHT_NAME


def _break(src: Path, dst: Path, ending: str, value: float) -> str:
    """A copy of the LoRA file `src` at `dst` (same format and metadata) with `value` in the first tensor whose
    key ends in `ending`; returns that key."""
    import torch

    if src.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(src), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    else:
        tensors, meta = torch.load(src, weights_only=True), None
    key = sorted(k for k in tensors if k.endswith(ending))[0]
    tensors[key].view(-1)[0] = value
    if dst.suffix == ".safetensors":
        save_file(tensors, str(dst), metadata=meta)
    else:
        torch.save(tensors, dst)
        shutil.copyfile(interchange.sidecar(src), interchange.sidecar(dst))  # the trained alpha, as exported
    return key


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_run, tiny_diffusers) -> tuple[Path, dict[str, str]]:
    """Broken LoRA files in each format, made from the demo run's LoRA (the tiny UNet's: import-lora is given it
    with --unet-config {M}), and runs whose trained LoRA is broken; plus the key each file's bad tensor has."""
    w = tmp_path_factory.mktemp("broken-weights")
    good = demo_run / "lora" / WEIGHT_NAME
    made = tmp_path_factory.mktemp("exports")
    kohya = interchange.export_lora(good, "kohya", made / "kohya.safetensors", str(tiny_diffusers))
    diffsynth = interchange.export_lora(good, "diffsynth", made / "diffsynth.ckpt", str(tiny_diffusers))
    lora = w / "lora"
    lora.mkdir()
    keys = {"nan-up": _break(good, lora / "nan-up.safetensors", ".lora.up.weight", float("nan")),
            "huge-down": _break(good, lora / "huge-down.safetensors", ".lora.down.weight", 3e6),
            "inf-down-kohya": _break(kohya, lora / "inf-down-kohya.safetensors", ".lora_down.weight", float("inf")),
            "nan-alpha-kohya": _break(kohya, lora / "nan-alpha-kohya.safetensors", ".alpha", float("nan")),
            "huge-up-diffsynth": _break(diffsynth, lora / "huge-up-diffsynth.ckpt", ".lora_B.default.weight", -2e5)}
    for name, broken in (("nan-lora", "nan-up.safetensors"), ("huge-lora", "huge-down.safetensors")):
        run = w / "runs" / name
        (run / "lora").mkdir(parents=True)
        shutil.copyfile(demo_run / "config.yaml", run / "config.yaml")
        shutil.copyfile(lora / broken, run / "lora" / WEIGHT_NAME)
    raw = yaml.safe_load(DEMO.read_text())
    raw["model"]["path"] = str(w / "model-not-built")  # tiny: built on first run, so validate skips it
    raw["render"]["prompts"] = str(PROMPTS)
    (w / "good.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    return w, keys


# (id, argv, the broken file whose key the message names, what else it names); {W} is the world folder, {M} the
# tiny model the LoRAs were trained on
IMPORT = ["import-lora", "--to", "{W}/out", "--unet-config", "{M}"]
WEIGHT_CASES = [
    ("import-peft-nan-up", [*IMPORT, "{W}/lora/nan-up.safetensors"], "nan-up",
     ["{W}/lora/nan-up.safetensors", "nan/inf (1 of its"]),
    ("import-peft-huge-down", [*IMPORT, "{W}/lora/huge-down.safetensors"], "huge-down",
     ["{W}/lora/huge-down.safetensors", "magnitude 3e+06"]),
    ("import-kohya-inf-down", [*IMPORT, "{W}/lora/inf-down-kohya.safetensors"], "inf-down-kohya",
     ["{W}/lora/inf-down-kohya.safetensors", "nan/inf"]),
    ("import-kohya-nan-alpha", [*IMPORT, "{W}/lora/nan-alpha-kohya.safetensors"], "nan-alpha-kohya",
     ["{W}/lora/nan-alpha-kohya.safetensors", "nan/inf (1 of its 1 values)"]),
    ("import-diffsynth-huge-up", [*IMPORT, "{W}/lora/huge-up-diffsynth.ckpt"], "huge-up-diffsynth",
     ["{W}/lora/huge-up-diffsynth.ckpt", "magnitude 2e+05"]),
    ("export-nan-up-as-kohya", ["export", "{W}/runs/nan-lora", "--format", "kohya"], "nan-up",
     ["{W}/runs/nan-lora/lora/pytorch_lora_weights.safetensors", "train/metrics.csv", "lower train.lr"]),
    ("export-nan-up-as-diffsynth", ["export", "{W}/runs/nan-lora", "--format", "diffsynth", "--to", "{W}/out/a.ckpt"],
     "nan-up", ["{W}/runs/nan-lora/lora/pytorch_lora_weights.safetensors"]),
    ("export-huge-down-as-peft", ["export", "huge-lora", "--runs-dir", "{W}/runs", "--format", "peft"], "huge-down",
     ["{W}/runs/huge-lora/lora/pytorch_lora_weights.safetensors", "magnitude 3e+06"]),
    ("validate-render-lora-peft-nan-up", ["validate", "{W}/good.yaml", "--set",
                                          "render.lora={W}/lora/nan-up.safetensors"], "nan-up",
     ["render.lora:", "{W}/lora/nan-up.safetensors"]),
    ("validate-render-lora-peft-huge-down", ["validate", "{W}/good.yaml", "--set",
                                             "render.lora={W}/lora/huge-down.safetensors"], "huge-down",
     ["render.lora:", "{W}/lora/huge-down.safetensors", "magnitude"]),
    ("validate-render-lora-kohya-inf-down", ["validate", "{W}/good.yaml", "--set",
                                             "render.lora={W}/lora/inf-down-kohya.safetensors"], "inf-down-kohya",
     ["render.lora:", "{W}/lora/inf-down-kohya.safetensors"]),
    ("validate-render-lora-kohya-nan-alpha", ["validate", "{W}/good.yaml", "--set",
                                              "render.lora={W}/lora/nan-alpha-kohya.safetensors"], "nan-alpha-kohya",
     ["render.lora:", "{W}/lora/nan-alpha-kohya.safetensors"]),
    ("validate-render-lora-diffsynth-huge-up", ["validate", "{W}/good.yaml", "--set",
                                                "render.lora={W}/lora/huge-up-diffsynth.ckpt"], "huge-up-diffsynth",
     ["render.lora:", "{W}/lora/huge-up-diffsynth.ckpt"]),
    ("run-render-lora-peft-nan-up", ["run", "{W}/good.yaml", "--stage", "render", "--runs-dir", "{W}/runs", "--set",
                                     "render.lora={W}/lora/nan-up.safetensors"], "nan-up",
     ["render.lora:", "{W}/lora/nan-up.safetensors"]),
]


@pytest.mark.parametrize("argv, broken, names", [c[1:] for c in WEIGHT_CASES], ids=[c[0] for c in WEIGHT_CASES])
def test_broken_lora_weights_are_refused_naming_the_file_and_tensor(world, tiny_diffusers, argv, broken, names,
                                                                     capsys, monkeypatch):
    w, keys = world
    monkeypatch.chdir(w)
    before = tree_state(w)
    rc = run_cli([a.replace("{W}", str(w)).replace("{M}", str(tiny_diffusers)) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc == 2, out + err
    for name in [*names, keys[broken], "values no trained LoRA holds", "earlier checkpoint"]:
        assert name.replace("{W}", str(w)) in err, err
    assert tree_state(w) == before, "a broken LoRA wrote or deleted something"


@pytest.mark.parametrize("broken, render_lora", [("nan-up", True), ("inf-down-kohya", True), ("nan-up", False)],
                         ids=["render.lora-peft-nan-up", "render.lora-kohya-inf-down", "own-lora-nan-up"])
def test_the_render_stage_refuses_a_lora_broken_after_preflight(world, demo_run, tmp_path, broken, render_lora,
                                                                capsys, monkeypatch):
    """The file broke after `kolora submit` checked it (or training wrote a broken LoRA): the render stage itself
    refuses it before loading the text encoder, and no tile is written."""
    import kolora.pipeline.runner

    w, keys = world
    lora = w / "lora" / f"{broken}.safetensors"
    shutil.copytree(demo_run, tmp_path / "demo")
    run = tmp_path / "demo"
    shutil.rmtree(run / "render")
    if not render_lora:
        shutil.copyfile(lora, run / "lora" / WEIGHT_NAME)
    monkeypatch.setattr(kolora.pipeline.runner, "preflight", lambda cfg, here=False: [])
    rc = run_cli(["run", str(run / "config.yaml"), "--runs-dir", str(tmp_path), "--stage", "render",
               *(["--set", f"render.lora={lora}"] if render_lora else [])])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc == 2, err
    named = f"render.lora: {lora}" if render_lora else str(run / "lora" / WEIGHT_NAME)
    assert named in err and keys[broken] in err and "values no trained LoRA holds" in err, err
    assert not (run / "render").is_dir() or not list((run / "render").rglob("*.png"))
    assert json.loads((run / "manifest.json").read_text())["stages"]["render"]["status"] == "failed"


def test_the_check_counts_and_bounds_every_float_tensor():
    import torch

    from kolora.formats.lora import check_weights

    ok = {"a": torch.full((2, 2), 9999.0), "steps": torch.tensor([10**6]), "empty": torch.zeros(0)}
    check_weights(ok, "ok.safetensors")
    with pytest.raises(ValueError, match=r"x.safetensors: .* in 2 of its 3 tensors: b holds nan/inf \(2 of its 4 "
                                         r"values\); c holds a value of magnitude 1e\+05"):
        check_weights({"a": torch.ones(2), "b": torch.tensor([1, float("nan"), float("-inf"), 0]),
                       "c": torch.tensor([-1e5])}, "x.safetensors")


# ---- a full disk -------------------------------------------------------------------------------------------
_TEMP = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.(?:kolora-tmp.*|dirtmp)$")  # the atomic writers' temp names


def _destination(path, root: Path) -> str | None:
    """Where a file being written under `root` ends up, relative to root: the atomic writers' temp names undone
    (.grid.png.x1y2z3w4.kolora-tmp.png → grid.png; .data.x1y2z3w4.dirtmp/metadata.jsonl → data/metadata.jsonl)."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(root)
    except (ValueError, TypeError):
        return None
    return "/".join(m.group(1) if (m := _TEMP.match(part)) else part for part in rel.parts)


def fill_the_disk(monkeypatch, root: Path, how: str, pattern: str, code: int) -> None:
    """Writes of files under `root` whose destination matches `pattern` fail as on a full disk (code ENOSPC) or
    quota (EDQUOT), the way the writer meets it: "fsync" (kolora's atomic writers; where a network file system
    reports it), "pil" (PIL's save: its OSError mid-write), "safetensors" (its Rust error quoting the OSError)."""
    def full(target) -> bool:
        dest = _destination(target, root)
        return dest is not None and fnmatch(dest, pattern)

    if how == "fsync":
        real = os.fsync

        def fsync(fd):
            if stat.S_ISREG(os.fstat(fd).st_mode) and full(os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(code, os.strerror(code))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    elif how == "pil":
        from PIL import Image

        real_save = Image.Image.save

        def save(self, fp, format=None, **params):
            real_save(self, fp, format, **params)
            if isinstance(fp, str | os.PathLike) and full(fp):
                raise OSError(code, os.strerror(code))

        monkeypatch.setattr(Image.Image, "save", save)
    else:
        import safetensors.torch
        from safetensors import SafetensorError

        real_file = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            real_file(tensors, filename, metadata=metadata)
            if full(filename):
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)


# (id, stage, outputs removed so that it runs (glob[:first n]), how the write fails, the destination that
# fails, errno, what the message names (relative to the run))
DISK_CASES = [
    ("ingest-image", "ingest", ["data"], "pil", "data/images/000005.*", errno.ENOSPC, "data"),
    ("ingest-metadata-quota", "ingest", ["data"], "fsync", "data/metadata.jsonl", errno.EDQUOT, "data/metadata.jsonl"),
    ("cache-latent", "cache", ["cache/index.json", "cache/latents/*:3"], "safetensors", "cache/latents/*",
     errno.ENOSPC, "cache/latents/"),
    ("train-checkpoint-quota", "train", ["lora", "train/checkpoints/step=000030.ckpt"], "fsync",
     "train/checkpoints/step=000030.ckpt", errno.EDQUOT, "train/checkpoints/step=000030.ckpt"),
    ("render-tile", "render", ["render/003-*.png", "render/005-*.png"], "pil", "render/005-*.png", errno.ENOSPC,
     "render/005-"),
    ("grid", "grid", ["grid.png"], "fsync", "grid.png", errno.ENOSPC, "grid.png"),
    ("grid-completion-marker", "grid", ["grid.png", ".complete/grid.json"], "fsync", ".complete/grid.json",
     errno.ENOSPC, ".complete/grid.json"),
    ("report-page", "report", ["report"], "fsync", "report/report.html", errno.ENOSPC, "report/report.html"),
]


def _remove(run: Path, spec: str) -> None:
    pattern, _, first = spec.partition(":")
    for p in sorted(run.glob(pattern))[:int(first) if first else None]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _work(run: Path) -> dict[str, tuple[int, int, int]]:
    """The run's output files (not its bookkeeping: manifest, frozen config, locks, input stamps)."""
    return {k: v for k, v in tree_state(run).items() if stat.S_ISREG(v[2])
            and not k.startswith((".inputs", ".manifest.lock", ".run", "manifest.json", "config.yaml"))}


def _leftovers(run: Path) -> list[str]:
    return [str(p) for p in run.rglob("*") if ".kolora-tmp" in p.name or p.name.endswith(".dirtmp")]


@pytest.mark.parametrize("stage, remove, how, pattern, code, named", [c[1:] for c in DISK_CASES],
                         ids=[c[0] for c in DISK_CASES])
def test_a_full_disk_names_the_stage_and_file_and_the_rerun_completes(demo_run, tmp_path, stage, remove, how,
                                                                      pattern, code, named, capsys, monkeypatch):
    shutil.copytree(demo_run, tmp_path / "demo")
    run = tmp_path / "demo"
    for spec in remove:
        _remove(run, spec)
    before = _work(run)
    argv = ["run", str(run / "config.yaml"), "--runs-dir", str(tmp_path), "--stage", stage]
    with monkeypatch.context() as m:
        fill_the_disk(m, run, how, pattern, code)
        rc = run_cli(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc == 1, err
    what = "the disk quota is exceeded" if code == errno.EDQUOT else "the disk is full (no space left on device)"
    assert f"kolora: error: {stage} stage: {what} writing {run / named}" in err, err
    assert "Finished work is intact" in err and "run the same command again: it continues" in err, err
    entry = json.loads((run / "manifest.json").read_text())["stages"][stage]
    assert entry["status"] == "failed" and what in entry["error"], entry
    assert not _leftovers(run), _leftovers(run)
    after = _work(run)
    assert set(before) <= set(after), f"finished work deleted: {sorted(set(before) - set(after))}"
    records = (".csv", ".json", ".jsonl")  # rewritten as a stage goes on (metrics.csv on a resume)
    assert {k: after[k] for k, v in before.items() if not k.endswith(records)} == \
        {k: v for k, v in before.items() if not k.endswith(records)}, "finished work changed"

    assert run_cli(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert json.loads((run / "manifest.json").read_text())["stages"][stage]["status"] == "complete"
    assert any(fnmatch(_destination(p, run), pattern) for p in run.rglob("*")), f"{pattern} was not written"


def test_a_full_disk_while_exporting_names_the_file(demo_run, tmp_path, capsys, monkeypatch):
    """A command outside the stages: the same message (no stage), exit 1, no file, and the rerun writes it."""
    shutil.copytree(demo_run, tmp_path / "demo")
    run = tmp_path / "demo"
    with monkeypatch.context() as m:
        fill_the_disk(m, run, "fsync", "lora/kohya/*", errno.ENOSPC)
        rc = run_cli(["export", str(run), "--format", "kohya"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert f"kolora: error: the disk is full (no space left on device) writing {run}/lora/kohya/demo.safetensors" \
        in err and "Finished work is intact" in err, err
    assert not (run / "lora" / "kohya").exists() or not list((run / "lora" / "kohya").iterdir())
    assert run_cli(["export", str(run), "--format", "kohya"]) == 0
    assert (run / "lora" / "kohya" / "demo.safetensors").is_file()


def test_a_manifest_that_cannot_be_written_either_is_said(demo_run, tmp_path, capsys, monkeypatch):
    """Everything full, the manifest too: still one message about the stage's file, which says the manifest could
    not record the failure."""
    shutil.copytree(demo_run, tmp_path / "demo")
    run = tmp_path / "demo"
    (run / "grid.png").unlink()
    argv = ["run", str(run / "config.yaml"), "--runs-dir", str(tmp_path), "--stage", "grid"]
    import kolora.core.rundir

    real_record = kolora.core.rundir.RunDir.record_stage

    def record_then_fill(self, stage, **fields):  # "running" is recorded; then the disk is full for everything
        real_record(self, stage, **fields)
        if fields.get("status") == "running":
            fill_the_disk(monkeypatch, run, "fsync", "*", errno.ENOSPC)

    with monkeypatch.context() as m:
        m.setattr(kolora.core.rundir.RunDir, "record_stage", record_then_fill)
        rc = run_cli(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert f"grid stage: the disk is full (no space left on device) writing {run}/grid.png" in err, err
    assert f"{run}/manifest.json still says grid is running: it could not be written either" in err, err
    assert not _leftovers(run)
    assert run_cli(argv) == 0
