"""Aspect-ratio buckets (train.buckets): the bucket list, the cache at each image's bucket with SDXL's
micro-conditioning, one bucket per batch, exact resume, and nothing changed with buckets off."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import DEMO, REPO
from PIL import Image
from test_train import stop_at

from kolora.cache import buckets
from kolora.cli.main import main
from kolora.core import interrupt
from kolora.core.config import load_config
from kolora.core.errors import ConfigError
from kolora.core.rundir import RunDir
from kolora.ingest.synthetic import _draw
from kolora.pipeline.keys import Keys
from kolora.pipeline.registry import NAMES
from kolora.pipeline.runner import preflight, run_stage
from kolora.train import loop as train_mod
from kolora.train.checkpoint import checkpoints
from kolora.train.loop import BucketSampler

LORA = Path("lora") / "pytorch_lora_weights.safetensors"
STEPS = 12

# SDXL's published 1024 buckets (w, h) with aspect ratios in 0.5-2.0, the tutorial's filter range.
SDXL_IN_RANGE = [(704, 1408), (768, 1344), (768, 1280), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
                 (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704)]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- the bucket list ---------------------------------------------------------------------------------------
def test_the_1024_buckets_are_sdxls_in_the_filters_range():
    sizes = buckets.bucket_sizes(1024, 0.5, 2.0)
    assert buckets.bucket_step(1024) == 64
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 ** 2 for w, h in sizes)
    # closest below 1024²: one more grid step on the short side would pass it
    assert all(max(w, h) * (min(w, h) + 64) > 1024 ** 2 for w, h in sizes)
    assert sizes == SDXL_IN_RANGE  # 1472×704 (2.09), 1536×640 (2.4) ... of SDXL's list are out of range
    assert all((h, w) in sizes for w, h in sizes)
    assert all(0.5 <= w / h <= 2.0 for w, h in sizes)
    # SDXL's wider ones come back with a wider filter range
    assert {(1536, 640), (640, 1536), (1728, 576)} <= set(buckets.bucket_sizes(1024, 1 / 3, 3.0))


def test_the_ratio_range_comes_from_the_filter_ops():
    anime = load_config(REPO / "configs" / "kolors-anime.yaml")
    assert buckets.ratio_range(anime.filter.ops) == (0.5, 2.0)
    assert buckets.ratio_range([{"image_shape_filter": {"min_width": 8}}]) == (0.5, 2.0)  # no aspect op
    assert buckets.ratio_range([{"image_aspect_ratio_filter": {}}]) == (0.333, 3.0)  # Data-Juicer's defaults
    assert buckets.ratio_range([{"image_aspect_ratio_filter": {"min_ratio": 0.75, "max_ratio": 1.5}}]) == (0.75, 1.5)


def test_tiny_resolutions_get_a_finer_grid():
    assert buckets.bucket_step(64) == 8 and buckets.bucket_step(512) == 32
    assert buckets.bucket_sizes(64, 0.5, 2.0) == [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]


def test_an_image_covers_its_closest_bucket_and_is_cropped_to_it():
    sizes = buckets.bucket_sizes(1024, 0.5, 2.0)
    p = buckets.plan(2000, 1000, sizes, center=True, key="0" * 64)
    assert (p.bucket, p.resized, p.top, p.left) == ((1408, 704), (1408, 704), 0, 0)
    assert p.time_ids == [1000, 2000, 0, 0, 704, 1408]  # original (h, w), crop (top, left), target (h, w)
    p = buckets.plan(1500, 1000, sizes, center=True, key="0" * 64)  # 1.5: closest is 1216×832 (1.46)
    assert (p.bucket, p.resized, p.top, p.left) == ((1216, 832), (1248, 832), 0, 16)
    assert p.time_ids == [1000, 1500, 0, 16, 832, 1216]
    q = buckets.plan(1000, 1500, sizes, center=False, key="f" * 64)  # the content-hash offset
    assert q.bucket == (832, 1216) and q.left == 0 and 0 <= q.top <= q.resized[1] - 1216
    assert p.kept_fraction == pytest.approx(1216 * 832 / (1248 * 832))
    assert buckets.square_kept_fraction(1500, 1000, 1024) == pytest.approx(1024 * 1024 / (1536 * 1024))


def test_no_bucket_in_the_range_is_a_config_error(tmp_path):
    cfg = load_config(DEMO, [f"model.path={tmp_path / 'm'}", "train.buckets=true",
                             "filter.ops=[{image_aspect_ratio_filter: {min_ratio: 1.01, max_ratio: 1.05}}]"])
    with pytest.raises(ConfigError, match=r"train\.buckets.*image_aspect_ratio_filter.*widen"):
        preflight(cfg)


# ---- the sampler -------------------------------------------------------------------------------------------
def test_the_sampler_gives_one_bucket_per_batch_as_a_function_of_seed_and_step():
    sizes = [(8, 8)] * 7 + [(16, 8)] * 4 + [(8, 16)]  # 7, 4 and 1 samples: two incomplete batches to wrap
    s = BucketSampler(sizes, batch_size=3, steps=20, seed=5)
    assert s.per_epoch == 3 + 2 + 1 and len(s) == 60
    flat = list(s)
    batches = [flat[i:i + 3] for i in range(0, len(flat), 3)]
    assert len(batches) == 20
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    for e in range(3):  # every sample at least once per epoch; wrapped batches repeat their bucket's first ones
        epoch = [i for b in batches[e * 6:(e + 1) * 6] for i in b]
        assert set(epoch) == set(range(12))
    assert [11, 11, 11] in batches[:6] and batches[:6] != batches[6:12]  # the lone sample fills its batch
    assert batches == [s.batch(k) for k in range(20)]
    for start in (1, 7, 13):  # a resumed run yields exactly the rest
        assert list(BucketSampler(sizes, 3, 20, 5, start_step=start)) == flat[start * 3:]
    assert list(BucketSampler(sizes, 3, 20, 6)) != flat  # another seed, another order
    # DDP: one bucket per global batch; each rank's slice of it (RankShare) is of that bucket
    from kolora.train.samples import RankShare

    global_batches = BucketSampler(sizes, 4, 10, 5)
    for rank in (0, 1):
        mine = [i for _, i in RankShare(global_batches, 10, 0, 2, world=2, rank=rank)]
        assert all(len({sizes[i] for i in mine[k:k + 2]}) == 1 for k in range(0, len(mine), 2))
        assert all(mine[k:k + 2] == global_batches.batch(k // 2)[2 * rank:2 * rank + 2] for k in range(0, 20, 2))


# ---- cache and training on a dataset of wide, tall and square images ----------------------------------------
# (w, h) → at resolution 64 (grid 8, buckets 48×80 ... 80×48): 2:1 and 5:3 wide go to 80×48, 4:3 to 72×56 ...
SIZES = [(160, 80), (150, 90), (128, 96), (130, 100), (96, 96), (128, 128), (110, 108), (96, 128), (100, 130),
         (90, 150), (80, 160), (140, 84), (84, 140), (120, 92)]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    rows = []
    for i, size in enumerate(SIZES):
        name = f"{i:03d}.png"
        _draw(size, ("circle", "square", "triangle", "diamond")[i % 4], (220, 40 + 10 * i, 40),
              (40, 80, 220 - 10 * i)).save(folder / name)
        rows.append({"file_name": name, "text": f"二次元, shape {i} of {size[0]}x{size[1]}"})
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["file_name", "text"])
        w.writeheader()
        w.writerows(rows)
    return folder


def _sets(model: Path, folder: Path, *extra: str) -> list[str]:
    out = []
    for s in (f"model.path={model}", "data.source=folder", f"data.path={folder}", f"train.steps={STEPS}",
              "train.checkpoint_every=4", *extra):
        out += ["--set", s]
    return out


def _run(runs: Path, model: Path, folder: Path, *extra: str, stages=("ingest", "filter", "cache", "train")) -> None:
    args = ["run", str(DEMO), "--runs-dir", str(runs), *_sets(model, folder, *extra)]
    for s in stages:
        args += ["--stage", s]
    assert main(args) == 0


@pytest.fixture(scope="module")
def bucket_run(tmp_path_factory, tiny_diffusers, mixed_folder):
    """The demo on the mixed folder with buckets on, through training; records every training batch."""
    seen: list[tuple[int, tuple[int, ...], list[list[float]]]] = []
    original = train_mod.LoRATrainer.training_step

    def recording(self, batch, batch_idx):
        seen.append((self.global_step, tuple(batch["latents"].shape), batch["time_ids"].tolist()))
        return original(self, batch, batch_idx)

    runs = tmp_path_factory.mktemp("bucket-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod.LoRATrainer, "training_step", recording)
        _run(runs, tiny_diffusers, mixed_folder, "train.buckets=true")
    return runs / "demo", seen


def _index(run: Path) -> dict:
    return json.loads((run / "cache" / "index.json").read_text())


def test_the_cache_holds_each_image_at_its_bucket_with_its_micro_conditioning(bucket_run):
    from safetensors.torch import load_file

    run, _ = bucket_run
    entries = _index(run)["entries"]
    assert len(entries) == len(SIZES)  # the filter (64 px, 0.5-2.0) keeps them all
    assert len({tuple(e["bucket"]) for e in entries}) >= 4
    store = run / "cache" / "latents"
    for e in entries:
        assert set(e) == {"file_name", "text", "text_key", "latent_key", "time_ids", "bucket"}
        w, h = Image.open(run / "trainset" / "train" / e["file_name"]).size
        bw, bh = e["bucket"]
        oh, ow, top, left, th, tw = e["time_ids"]
        assert (oh, ow, th, tw) == (h, w, bh, bw)  # original (h, w) ... target (h, w)
        assert min(top, left) == 0  # one side fits the bucket, the other is centre-cropped
        assert e["time_ids"] == buckets.plan(w, h, buckets.bucket_sizes(64, 0.5, 2.0), True, "").time_ids
        latent = load_file(str(store / f"{e['latent_key']}.safetensors"))["latents"]
        assert tuple(latent.shape) == (4, bh // 8, bw // 8)  # the bucket's size, not the 64² square
        if not 0.85 < w / h < 1.15:
            assert bw != bh and (bw > bh) == (w > h)
    by_size = {tuple(int(x) for x in e["text"].rsplit(" ", 1)[1].split("x")): e for e in entries}  # the caption
    # 160×80 → 80×48: scale max(80/160, 48/80) = 0.6 → 96×48, centre crop 8 px from the left
    assert by_size[(160, 80)]["time_ids"] == [80, 160, 0, 8, 48, 80]
    # 90×150 → 48×80: scale max(48/90, 80/150) = 0.5333 → 48×80 exactly
    assert by_size[(90, 150)]["time_ids"] == [150, 90, 0, 0, 80, 48]
    # 128×96 (4:3) → 72×56: scale max(72/128, 56/96) = 0.5833 → 75×56, crop 1 px from the left
    assert by_size[(128, 96)]["time_ids"] == [96, 128, 0, 1, 56, 72]
    assert by_size[(96, 96)]["time_ids"] == [96, 96, 0, 0, 64, 64]


def test_the_cache_summary_has_the_bucket_histogram_and_kept_pixels(bucket_run):
    run, _ = bucket_run
    summary = json.loads((run / "manifest.json").read_text())["stages"]["cache"]["summary"]
    entries = _index(run)["entries"]
    hist = {}
    for e in entries:
        hist[buckets.name(e["bucket"])] = hist.get(buckets.name(e["bucket"]), 0) + 1
    assert summary["buckets"] == hist and sum(hist.values()) == summary["samples"]
    assert 0 < summary["center_crop_kept_fraction"] < summary["kept_fraction"] <= 1
    assert summary["kept_fraction"] > 0.9  # the buckets lose slivers; the square crop loses the ends


def test_every_training_batch_comes_from_one_bucket_in_the_samplers_order(bucket_run):
    run, seen = bucket_run
    entries = _index(run)["entries"]
    assert [step for step, _, _ in seen] == list(range(STEPS))
    shapes = set()
    sampler = BucketSampler([e["bucket"] for e in entries], 2, STEPS, 0)
    for step, shape, time_ids in seen:
        assert len({tuple(t[4:]) for t in time_ids}) == 1  # one target size in the batch
        th, tw = time_ids[0][4:]
        assert shape == (2, 4, th // 8, tw // 8)
        assert time_ids == [entries[i]["time_ids"] for i in sampler.batch(step)]
        shapes.add(shape)
    assert len(shapes) >= 3


def test_buckets_on_resumed_twice_ends_bit_identical(bucket_run, tmp_path, monkeypatch):
    reference, _ = bucket_run
    run_dir = tmp_path / "demo"
    shutil.copytree(reference, run_dir)
    for d in ("train", "lora"):
        shutil.rmtree(run_dir / d)
    run = RunDir(run_dir)
    cfg = run.load_config()
    assert cfg.train.buckets and cfg.train.steps == STEPS
    stop_at(monkeypatch, {3, 7})
    for step in (3, 7):
        with pytest.raises(interrupt.Interrupted, match=f"step {step}/{STEPS}"):
            run_stage("train", cfg, run)
        interrupt.clear()
        assert checkpoints(run.train / "checkpoints")[0][0] == step
    assert run_stage("train", cfg, run)["resumed_from_step"] == 7
    assert _sha(run_dir / LORA) == _sha(reference / LORA)


# ---- buckets off: nothing changes ---------------------------------------------------------------------------
def test_buckets_off_keeps_todays_entries(demo_run, tiny_diffusers):
    from kolora.cache import stage as cache
    from kolora.models import fingerprint
    cfg = load_config(DEMO, [f"model.path={tiny_diffusers}"])
    assert cfg.train.buckets is False
    entries = _index(demo_run)["entries"]
    assert all(set(e) == {"file_name", "text", "text_key", "latent_key", "time_ids"} for e in entries)
    assert all(e["time_ids"] == [64, 64, 0, 0, 64, 64] for e in entries)
    ident = fingerprint.model(cfg.model)
    for e in entries:  # the key formula of the square crop, as before buckets existed
        img = (demo_run / "trainset" / "train" / e["file_name"]).read_bytes()
        assert e["latent_key"] == cache._sha("latent", ident, "64", "True", "float32", cache._sha(img))
    rows = cache.read_trainset(RunDir(demo_run))
    on = cache._entries(load_config(DEMO, [f"model.path={tiny_diffusers}", "train.buckets=true"]), rows, ident)
    assert not {e["latent_key"] for e in on} & {e["latent_key"] for e in entries}  # never a shared entry


def test_buckets_rerun_the_cache_and_training(demo_run, tiny_diffusers):
    run = RunDir(demo_run)
    off = load_config(DEMO, [f"model.path={tiny_diffusers}"])
    on = load_config(DEMO, [f"model.path={tiny_diffusers}", "train.buckets=true"])
    differs = [s for s in NAMES if Keys(off, run).output(s) != Keys(on, run).output(s)]
    assert differs[:2] == ["cache", "train"] and "filter" not in differs
    assert "train.buckets" in Keys(on, run).inputs("train")["fields"]
    # off is as before the field existed: out of the keys and the config digest (runs made before stay complete)
    assert "train.buckets" not in Keys(off, run).inputs("cache")["fields"]
    assert "buckets" not in off.model_dump()["train"] and on.model_dump()["train"]["buckets"] is True
    assert off.digest() != on.digest()


def test_the_buckets_recipe_is_the_anime_one_with_buckets_and_min_snr():
    anime = load_config(REPO / "configs" / "kolors-anime.yaml").model_dump()
    recipe = load_config(REPO / "configs" / "kolors-anime-buckets.yaml").model_dump()
    assert recipe.pop("name") == "kolors-anime-buckets" and recipe["train"].pop("buckets") is True
    assert recipe["train"]["min_snr_gamma"] == 5 and anime["train"]["min_snr_gamma"] is None
    recipe["train"]["min_snr_gamma"] = None
    anime.pop("name")
    assert recipe == anime
