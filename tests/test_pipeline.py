"""The whole embedded pipeline: `kolora run configs/demo.yaml` end to end."""

from __future__ import annotations

import csv
import json
import time

from conftest import DEMO
from PIL import Image

from kolora.cli.main import main
from kolora.pipeline.keys import progress
from kolora.pipeline.registry import NAMES


def test_demo_ends_with_a_2x4_grid(demo_run):
    grid = Image.open(demo_run / "grid.png")
    names = sorted(p.name for p in (demo_run / "render").glob("*.png"))
    tile = Image.open(demo_run / "render" / names[0])
    caption_h = max(12, tile.height // 8)  # demo.yaml has seed captions
    assert grid.size == (2 * tile.width, 4 * (tile.height + caption_h))
    # <prompt index>-<seed>-<key>.png
    assert [n.rsplit("-", 1)[0] for n in names] == ["000-1", "001-1", "002-2", "003-5", "004-0", "005-1", "006-7",
                                                   "007-0"]
    assert all(len(n.rsplit("-", 1)[1]) == len("0123456789ab.png") for n in names)
    # The bottom-right cell is the 8th prompt's tile.
    last = Image.open(demo_run / "render" / names[7]).convert("RGB")
    y = 3 * (tile.height + caption_h)
    assert grid.convert("RGB").crop((tile.width, y, 2 * tile.width, y + tile.height)).tobytes() == last.tobytes()


def test_every_stage_left_its_outputs(demo_run):
    assert (demo_run / "data" / "metadata.jsonl").is_file()
    report = json.loads((demo_run / "filter" / "report.json").read_text())
    assert report["summary"]["kept"] > 0 and report["summary"]["dropped"] > 0
    with open(demo_run / "trainset" / "train" / "metadata.csv", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"file_name", "text"}
    index = json.loads((demo_run / "cache" / "index.json").read_text())
    assert len(index["entries"]) == len(rows)
    with open(demo_run / "train" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, 31)), "one metrics row per optimizer step, each exactly once"
    ckpts = sorted(p.name for p in (demo_run / "train" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["step=000010.ckpt", "step=000020.ckpt", "step=000030.ckpt"]  # every 10, keep 3
    assert (demo_run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_manifest_records_provenance_and_timings(demo_run):
    m = json.loads((demo_run / "manifest.json").read_text())
    assert len(m["config_digest"]) == 16
    assert m["provenance"]["versions"]["diffusers"] and m["provenance"]["versions"]["torch"]
    assert "git_sha" in m["provenance"]
    assert m["seeds"]["train"] == 0
    for stage in ("ingest", "filter", "cache", "train", "render", "grid", "report"):
        assert m["stages"][stage]["status"] == "complete"
        assert m["stages"][stage]["wall_s"] >= 0


def test_second_run_skips_every_stage(demo_run, tiny_diffusers, capsys):
    grid_mtime = (demo_run / "grid.png").stat().st_mtime_ns
    t0 = time.time()
    rc = main(["run", str(DEMO), "--runs-dir", str(demo_run.parent), "--set", f"model.path={tiny_diffusers}"])
    elapsed = time.time() - t0
    err = capsys.readouterr().err
    assert rc == 0
    assert err.count("complete, skipped") == len(NAMES), err
    assert (demo_run / "grid.png").stat().st_mtime_ns == grid_mtime
    print(f"second run: {elapsed:.2f} s")


def test_changed_train_config_reruns_from_train(demo_run, tiny_diffusers, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(demo_run, runs / "demo")
    rc = main(["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}",
               "--set", "train.steps=5"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "ingest  complete, skipped" in err and "filter  complete, skipped" in err
    assert "train   done" in err and "render  done" in err
    with open(runs / "demo" / "train" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5]


def test_run_progress_sums_up_what_the_stages_wrote(demo_run, tmp_path):
    """The supervisor compares this before and after a job attempt (an attempt that changed nothing is not
    requeued): it must see every kind of durable output."""
    from kolora.core.rundir import RunDir

    done = progress(RunDir(demo_run))
    assert done["complete"] == sorted(NAMES)
    # the demo evaluates, so render also makes the 8 base-model tiles
    assert done["checkpoint_step"] == 30 and done["tiles"] == 16 and done["cache_entries"] > 0
    assert progress(RunDir(tmp_path / "empty")) == {"complete": [], "checkpoint_step": None, "tiles": 0,
                                                     "cache_entries": 0}


def test_a_crashed_training_with_new_inputs_keeps_its_checkpoints_to_resume(demo_run, tiny_diffusers, tmp_path,
                                                                            capsys, monkeypatch):
    """Its checkpoints cost GPU hours: they stay in train/ for the rerun; the superseded outputs stay in
    superseded/train-<key>/."""
    import shutil

    from kolora.train import loop as train
    runs = tmp_path / "runs"
    shutil.copytree(demo_run, runs / "demo")
    run = runs / "demo"
    old_lora = (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    args = ["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}",
            "--set", "train.lr=0.0005", "--stage", "train"]
    real_run = train.run

    def crash_after_a_checkpoint(ctx):
        (ctx.run.train / "checkpoints").mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(train.Checkpointer, "save", crash_after_save)
        return real_run(ctx)

    original_save = train.Checkpointer.save

    def crash_after_save(self, trainer):
        original_save(self, trainer)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train, "run", crash_after_a_checkpoint)
    assert main(args) != 0
    assert "illegal memory access" in capsys.readouterr().err
    kept = sorted(p.name for p in (run / "train" / "checkpoints").glob("step=*.ckpt"))
    assert kept == ["step=000010.ckpt"], kept  # the crashed attempt's checkpoint, in place
    assert not (run / ".failed" / "train").exists()
    (aside,) = (run / "superseded").glob("train-*")
    assert (aside / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == old_lora

    monkeypatch.setattr(train, "run", real_run)
    monkeypatch.setattr(train.Checkpointer, "save", original_save)
    assert main(args) == 0
    with open(run / "train" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 31))
    assert (aside / "train" / "checkpoints" / "step=000030.ckpt").is_file()  # kept: GPU hours
    summary = json.loads((run / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert summary["resumed_from_step"] == 10
