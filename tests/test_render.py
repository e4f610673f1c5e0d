"""render: deterministic pixels, only missing tiles rerendered, array-task split, atomic tiles."""

from __future__ import annotations

import os
import shutil

import numpy as np
from conftest import stage_context
from PIL import Image

from kolora.core.rundir import RunDir
from kolora.pipeline.runner import run_stage
from kolora.render import stage as render
from kolora.render.tiles import missing_tiles


def _copy_run(demo_run, tmp_path) -> RunDir:
    dst = tmp_path / "demo"
    shutil.copytree(demo_run, dst)
    return RunDir(dst)


def tile(run: RunDir, index: int):
    """The tile of prompt #index (its name also carries its seed and key)."""
    (found,) = run.render.glob(f"{index:03d}-*.png")
    return found


def test_same_prompt_and_seed_render_the_same_pixels(demo_run, tmp_path):
    run = _copy_run(demo_run, tmp_path)
    cfg = run.load_config()
    before = {p.name: np.asarray(Image.open(p)) for p in sorted(run.render.glob("*.png"))}
    assert len(before) == 8
    shutil.rmtree(run.render)
    run_stage("render", cfg, run, force=True)
    after = {p.name: np.asarray(Image.open(p)) for p in sorted(run.render.glob("*.png"))}
    assert before.keys() == after.keys()
    for name in before:
        assert np.array_equal(before[name], after[name]), name
    # Two prompts share seed 1 but differ in text: the prompt must reach the image.
    first, second = sorted(after)[:2]
    assert first.startswith("000-1-") and second.startswith("001-1-")
    assert not np.array_equal(after[first], after[second])


def test_rerun_after_deleting_one_tile_renders_only_that_tile(demo_run, tmp_path):
    run = _copy_run(demo_run, tmp_path)
    cfg = run.load_config()
    victim = tile(run, 3)
    keep = {p.name: p.stat().st_mtime_ns for p in run.render.glob("*.png") if p != victim}
    original = np.asarray(Image.open(victim))
    victim.unlink()
    out = render.run(stage_context("render", cfg, run))
    assert (out["rendered"], out["already_done"]) == (1, 15)  # 7 LoRA and the 8 base-model tiles are there
    assert np.array_equal(np.asarray(Image.open(victim)), original)
    assert {p.name: p.stat().st_mtime_ns for p in run.render.glob("*.png") if p != victim} == keep
    # And through the stage runner: the stage is incomplete while a tile is missing.
    victim.unlink()
    assert not run_stage("render", cfg, run).get("skipped") and victim.is_file()


def test_array_tasks_split_the_tiles(demo_run, tmp_path):
    run = _copy_run(demo_run, tmp_path)
    cfg = run.load_config()
    shutil.rmtree(run.render)
    a = render.run(stage_context("render", cfg, run, shard=0, shards=3))
    assert a["rendered"] == 6 and missing_tiles(cfg, run) != []  # prompts 0, 3, 6: LoRA and base tiles
    assert sorted(p.name[:3] for p in (run.render / "base").glob("*.png")) == ["000", "003", "006"]
    b = render.run(stage_context("render", cfg, run, shard=1, shards=3))
    c = render.run(stage_context("render", cfg, run, shard=2, shards=3))
    assert a["rendered"] + b["rendered"] + c["rendered"] == 16
    assert missing_tiles(cfg, run) == []


def test_no_partial_tile_survives_a_crash(demo_run, tmp_path, monkeypatch):
    run = _copy_run(demo_run, tmp_path)
    cfg = run.load_config()
    victim = tile(run, 5)
    victim.unlink()

    def explode(self, fp, format=None, **kw):  # the process dies halfway through writing the PNG
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", explode)
    try:
        render.run(stage_context("render", cfg, run))
    except KeyboardInterrupt:
        pass
    assert not victim.exists()
    assert [n for n in os.listdir(run.render) if not n.endswith(".png") and n != "base"] == []
    assert [n for n in os.listdir(run.render / "base") if not n.endswith(".png")] == []


def test_stop_request_ends_the_task_after_the_current_tile(demo_run, tmp_path, monkeypatch):
    """A preempted/requeued render task stops between tiles; running it again renders only the rest."""
    from kolora.core import interrupt
    run = _copy_run(demo_run, tmp_path)
    cfg = run.load_config()
    shutil.rmtree(run.render)
    original = render.render_tile

    def tile_then_signal(*args, **kw):
        image = original(*args, **kw)
        interrupt.request("SIGUSR2")  # the job was signalled while this tile rendered
        return image

    monkeypatch.setattr(render, "render_tile", tile_then_signal)
    try:
        try:
            run_stage("render", cfg, run)
            raise AssertionError("render did not stop on the request")
        except interrupt.Interrupted as e:
            assert "stopped after 1 of 16 tiles" in str(e)  # 8 LoRA tiles, then 8 base-model tiles
    finally:
        interrupt.clear()
    assert len(list(run.render.glob("*.png"))) == 1
    assert run.read_manifest()["stages"]["render"]["status"] == "interrupted"
    monkeypatch.setattr(render, "render_tile", original)
    out = run_stage("render", cfg, run)
    assert (out["rendered"], out["already_done"]) == (15, 1)


TASK = """
import sys
from kolora.pipeline.runner import run_stage
from kolora.core.rundir import RunDir
from kolora.core.config import load_config
run = RunDir(sys.argv[1])
cfg = load_config(sys.argv[2], [f"model.path={sys.argv[3]}", f"render.prompts={sys.argv[4]}"])
print(run_stage("render", cfg, run, shard=int(sys.argv[5]), shards=2))
"""


def test_two_array_tasks_after_a_prompt_change_never_undo_each_other(demo_run, tiny_diffusers, tmp_path):
    """Both tasks of a render array run at once after the prompt set changed: each renders only its own
    changed tiles, neither removes a tile the other wrote, and the stale tiles go once all are present."""
    import subprocess
    import sys

    import yaml
    from conftest import DEMO, PROMPTS

    from kolora.core.config import load_config

    run = _copy_run(demo_run, tmp_path)
    prompts = tmp_path / "prompts.yaml"
    prompt_set = yaml.safe_load(PROMPTS.read_text())
    for item in prompt_set["prompts"][2:4]:  # prompt #2 (task 0) and #3 (task 1)
        item["prompt"] += ",夜晚"
    prompts.write_text(yaml.safe_dump(prompt_set, allow_unicode=True))
    before = {p.name: p.stat().st_mtime_ns for p in run.render.glob("*.png")}
    args = [str(run.root), str(DEMO), str(tiny_diffusers), str(prompts)]
    procs = [subprocess.Popen([sys.executable, "-c", TASK, *args, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert ["'rendered': 2" in out for out, _ in outs] == [True, True], outs  # its LoRA and base tile
    cfg = load_config(DEMO, [f"model.path={tiny_diffusers}", f"render.prompts={prompts}"])
    assert missing_tiles(cfg, run) == []
    after = {p.name: p.stat().st_mtime_ns for p in run.render.glob("*.png")}
    assert len(after) == 8  # the two stale tiles are gone, every wanted one is there
    kept = set(before) & set(after)
    assert len(kept) == 6 and all(before[n] == after[n] for n in kept)
    assert sorted(n[:3] for n in set(after) - kept) == ["002", "003"]


def test_precomputed_prompt_embeddings_render_the_same_pixels(demo_run, tmp_path):
    """render encodes a task's prompts first and frees the text encoder before the UNet is loaded (ChatGLM3 and
    the UNet never share a 24 GB GPU); the tiles are what the all-in-one pipeline gives for those embeddings."""
    import torch

    from kolora.render.tiles import lora_file, tiles

    run = _copy_run(demo_run, tmp_path)
    cfg = run.load_config()
    lf = lora_file(cfg, run)
    items = [t.item for t in tiles(cfg, run)][:3]
    embeds = render.encode_prompts(cfg, items, "cpu", torch.float32)
    # the text length training saw (diffusers' __call__ would encode 256 tokens whatever it is given)
    assert {e["prompt_embeds"].shape[1] for e in embeds} == {cfg.cache.max_sequence_length}
    full = render.build_pipeline(cfg, lf, "cpu", torch.float32)
    lean = render.build_pipeline(cfg, lf, "cpu", torch.float32, text_encoder=False)
    assert lean.text_encoder is None
    lean_tiles = [np.asarray(render.render_tile(lean, cfg, item, "cpu", e)) for item, e in zip(items, embeds,
                                                                                                strict=True)]
    for item, e, pixels in zip(items, embeds, lean_tiles, strict=True):
        assert np.array_equal(np.asarray(render.render_tile(full, cfg, item, "cpu", e)), pixels)
    assert np.array_equal(np.asarray(Image.open(tile(run, 0))), lean_tiles[0])  # what the stage wrote
