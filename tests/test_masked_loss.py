"""Masked loss (data.mask): a dataset's masks travel through ingest and the filter to the cache, at the latent
grid and aligned with the image's own resize and crop, and weigh the loss per latent pixel; a dataset without
masks trains exactly as before."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_train import stop_at

from kolora.cache import buckets, masks
from kolora.cache import stage as cache_stage
from kolora.cli.main import main
from kolora.core import interrupt
from kolora.core.config import DataConfig, load_config
from kolora.core.rundir import RunDir
from kolora.ingest.samples import COUNTS, take
from kolora.ingest.sources import NoAlpha, records
from kolora.ingest.synthetic import _draw
from kolora.pipeline.keys import Keys
from kolora.pipeline.runner import run_stage
from kolora.train import objective
from kolora.train.checkpoint import checkpoints
from kolora.train.samples import CachedSamples

LORA = Path("lora") / "pytorch_lora_weights.safetensors"
STEPS = 6
# (w, h): wide, square, tall and in between; all kept by the demo's filter (>= 64 px, ratio 0.5-2.0)
SIZES = [(128, 64), (96, 96), (64, 128), (100, 80), (80, 100), (120, 90)]
UNMASKED = 1  # the one image without a mask file


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _left_half(size: tuple[int, int]) -> Image.Image:
    """A mask that trains the left half of an image of `size` and ignores the right half."""
    w, h = size
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).rectangle([0, 0, w // 2 - 1, h], fill=255)
    return m


@pytest.fixture(scope="module")
def masked_folder(tmp_path_factory) -> Path:
    """images + metadata.csv, and <stem>_mask.png beside every image but one: at the image's size, or at half
    of it (stretched over the image by the cache)."""
    folder = tmp_path_factory.mktemp("masked")
    rows = []
    for i, (w, h) in enumerate(SIZES):
        name = f"{i:03d}.png"
        _draw((w, h), "circle", (220, 40 + 20 * i, 40), (40, 80, 220)).save(folder / name)
        rows.append({"file_name": name, "text": f"二次元, shape {i}"})
        if i != UNMASKED:
            _left_half((w, h) if i % 2 == 0 else (w // 2, h // 2)).save(folder / f"{i:03d}_mask.png")
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _run(runs: Path, model: Path, folder: Path, *extra: str,
         stages: tuple[str, ...] = ("ingest", "filter", "cache", "train")) -> int:
    args = ["run", str(DEMO), "--runs-dir", str(runs)]
    for s in (f"model.path={model}", "data.source=folder", f"data.path={folder}", f"train.steps={STEPS}",
              "train.checkpoint_every=2", *extra):
        args += ["--set", s]
    for s in stages:
        args += ["--stage", s]
    return main(args)


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory, tiny_diffusers, masked_folder) -> Path:
    runs = tmp_path_factory.mktemp("masked-runs")
    assert _run(runs, tiny_diffusers, masked_folder) == 0
    return runs / "demo"


def _copy(run_dir: Path, dst: Path) -> tuple[RunDir, object]:
    """The run's cache in a copy, without its training."""
    shutil.copytree(run_dir, dst)
    for d in ("train", "lora"):
        shutil.rmtree(dst / d, ignore_errors=True)
    run = RunDir(dst)
    return run, run.load_config()


# ---- the dataset to the cache ------------------------------------------------------------------------------
def test_masks_travel_to_the_cache_at_the_latent_grid_and_stay_where_the_crop_puts_them(masked_run):
    samples = [json.loads(line) for line in (masked_run / "data" / "metadata.jsonl").read_text().splitlines()]
    assert [("mask" in s) for s in samples] == [i != UNMASKED for i in range(len(SIZES))]
    with open(masked_run / "trainset" / "train" / "metadata.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [bool(r["mask"]) for r in rows] == [i != UNMASKED for i in range(len(SIZES))]
    entries = json.loads((masked_run / "cache" / "index.json").read_text())["entries"]
    assert ["mask_key" in e for e in entries] == [i != UNMASKED for i in range(len(SIZES))]
    for i, e in enumerate(entries):
        if i == UNMASKED:
            continue
        mask = load_file(str(masked_run / "cache" / "masks" / f"{e['mask_key']}.safetensors"))["mask"]
        assert mask.dtype == torch.float16 and tuple(mask.shape) == (1, 8, 8)  # 64² / 8: the latents' grid
        assert bool((mask[..., :3] == 1).all()) and bool((mask[..., 5:] == 0).all())  # still the left half
    # 128×64 (2:1): resized as is, centre-cropped to columns 32-95: the mask's edge (column 64) is the crop's middle
    wide = load_file(str(masked_run / "cache" / "masks" / f"{entries[0]['mask_key']}.safetensors"))["mask"]
    assert wide[0].tolist() == [[1.0] * 4 + [0.0] * 4] * 8
    summary = json.loads((masked_run / "manifest.json").read_text())["stages"]["cache"]["summary"]
    assert summary["masked_samples"] == len(SIZES) - 1


def _pattern(size: tuple[int, int]) -> Image.Image:
    """An asymmetric pattern off the 8-pixel grid, so a shifted or mirrored crop shows."""
    w, h = size
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).rectangle([w // 5, h // 7, (3 * w) // 5, (4 * h) // 7], fill=255)
    ImageDraw.Draw(m).ellipse([(2 * w) // 3, (2 * h) // 3, w - 3, h - 5], fill=128)
    return m


@pytest.mark.parametrize("geometry", ["square-centre", "square-random-crop", "bucket"])
def test_the_mask_goes_through_the_images_own_resize_and_crop(tmp_path, geometry):
    """The image *is* the mask (its grey levels), so the cached mask must equal the cached image's pixels
    area-averaged to the latent grid: any other offset, scale or flip differs."""
    size, key = (140, 90), "9f3a1c2e" + "0" * 56
    pattern = _pattern(size)
    pattern.convert("RGB").save(tmp_path / "image.png")
    pattern.save(tmp_path / "mask.png")
    rgba = Image.new("RGB", size, (40, 80, 220))
    rgba.putalpha(pattern)
    rgba.save(tmp_path / "alpha.png")
    if geometry == "bucket":
        plan = buckets.plan(*size, buckets.bucket_sizes(64, 0.5, 2.0), False, key)
        pixels = buckets.load_tensor(str(tmp_path / "image.png"), plan)
        assert plan.bucket != (64, 64)
    else:
        center = geometry == "square-centre"
        plan = masks.square_plan(*size, 64, center, key)
        pixels = cache_stage.load_image_tensor(str(tmp_path / "image.png"), 64, center, key)
        assert (plan.left == (plan.resized[0] - 64) // 2) == center
    expected = torch.nn.functional.avg_pool2d((pixels[:1] + 1) / 2, 8)
    for path, alpha in ((tmp_path / "mask.png", False), (tmp_path / "alpha.png", True)):
        got = masks.load(str(path), alpha, plan).float()
        assert got.shape == expected.shape == (1, plan.bucket[1] // 8, plan.bucket[0] // 8)
        assert torch.allclose(got, expected, atol=3e-3), (got - expected).abs().max()
        assert 0 < float(got.mean()) < 1


def test_the_cache_reads_the_alpha_channel_with_data_mask_alpha_and_refuses_an_image_without(tmp_path,
                                                                                             tiny_diffusers):
    cfg = load_config(DEMO, [f"model.path={tiny_diffusers}", "data.mask=alpha"])
    rgba = Image.new("RGB", (64, 64), (40, 80, 220))
    rgba.putalpha(_left_half((64, 64)))
    rgba.save(tmp_path / "0.png")
    Image.new("RGB", (64, 64), (40, 80, 220)).save(tmp_path / "1.png")
    rows = [{"file_name": f"{i}.png", "text": "t", "path": str(tmp_path / f"{i}.png")} for i in (0, 1)]
    pending = {i: cache_stage._entry(cfg, r, "ident", None) for i, r in enumerate(rows)}
    assert cache_stage._write_masks({0: pending[0]}, tmp_path / "masks", lambda path, of: False, 0) == {}
    mask = load_file(str(tmp_path / "masks" / f"{pending[0]['mask_key']}.safetensors"))["mask"]
    assert mask[0].tolist() == [[1.0] * 4 + [0.0] * 4] * 8
    with pytest.raises(NoAlpha, match=r"1\.png: data\.mask is 'alpha' but this image has no alpha channel \(mode RGB\)"):
        cache_stage._write_masks({1: pending[1]}, tmp_path / "masks", lambda path, of: False, 0)
    # with buckets: 128×64 → the 80×48 bucket (resized to 96×48, 8 columns cropped on the left)
    wide = Image.new("RGB", (128, 64), (40, 80, 220))
    wide.putalpha(_left_half((128, 64)))
    wide.save(tmp_path / "2.png")
    row = {"file_name": "2.png", "text": "t", "path": str(tmp_path / "2.png")}
    entry = cache_stage._entry(cfg, row, "ident", buckets.for_config(cfg))
    assert entry["bucket"] == [80, 48]
    cache_stage._write_masks({2: entry}, tmp_path / "masks", lambda path, of: False, 0)
    mask = load_file(str(tmp_path / "masks" / f"{entry['mask_key']}.safetensors"))["mask"]
    assert tuple(mask.shape) == (1, 6, 10)
    assert bool((mask[..., :4] == 1).all()) and bool((mask[..., 6:] == 0).all())  # the edge: column 40 of 80


def test_data_mask_alpha_on_an_rgb_image_is_refused_naming_the_file_and_the_setting(tmp_path, tiny_diffusers,
                                                                                    capsys):
    folder = tmp_path / "rgb"
    folder.mkdir()
    _draw((96, 96), "square", (220, 40, 40), (40, 80, 220)).save(folder / "only.png")
    (folder / "metadata.csv").write_text("file_name,text\nonly.png,a square\n", encoding="utf-8")
    assert _run(tmp_path / "runs", tiny_diffusers, folder, "data.mask=alpha", stages=("ingest",)) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'only.png'} ({folder / 'metadata.csv'}:2): data.mask is 'alpha' but this image has no alpha " \
           "channel (mode RGB)" in err
    assert not (tmp_path / "runs" / "demo" / "data" / "metadata.jsonl").exists()


def test_ingest_takes_masks_from_a_column_or_beside_the_image(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png", "a_mask.png", "other.png"):  # with alpha, for data.mask: alpha
        Image.new("LA", (64, 64), (255, 200)).save(folder / name)
    # listed without metadata.csv: a_mask.png is a.png's mask, not an image of its own (unless masks are off)
    listed = DataConfig(source="folder", path=folder, caption="c")
    assert [r.path.name for r in records(listed)] == ["a.png", "b.png", "c.png", "other.png"]
    off = DataConfig(source="folder", path=folder, caption="c", mask="none")
    assert "a_mask.png" in [r.path.name for r in records(off)]
    # a jsonl's mask key, relative to its folder as the image is; beside the image otherwise
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in [
        {"text": "a", "image": ["a.png"]}, {"text": "b", "image": ["b.png"], "mask": "other.png"},
        {"text": "c", "image": ["c.png"]}]))
    for mode, expected in (("auto", ["a_mask.png", "other.png", None]), ("none", [None] * 3),
                           ("alpha", [None] * 3)):
        d = DataConfig(source="jsonl", path=folder / "metadata.jsonl", mask=mode)
        work = tmp_path / f"work-{mode}"
        (work / "images").mkdir(parents=True)
        counts = dict.fromkeys(COUNTS, 0)
        samples, rejected = take(records(d), work, d, None, counts, None)
        assert not rejected
        assert [s["mask"].name if "mask" in s else None for s in samples] == [
            f"{s['id']}.png" if e else None for s, e in zip(samples, expected, strict=True)]
        taken = [s["mask"] for s in samples if "mask" in s]
        assert [_sha(p) for p in taken] == [_sha(folder / e) for e in expected if e]
        assert counts.get("masks", 0) == len(taken)


# ---- the loss ----------------------------------------------------------------------------------------------
def test_the_masked_loss_is_kohyas_formula_and_ones_are_exactly_the_unmasked_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    mask = torch.rand(3, 1, 5, 6, generator=g)
    a = torch.tensor([0.9, 0.5, 0.1])
    per_element = (pred - target) ** 2 * mask  # the mask's value at each latent pixel, on every channel
    assert torch.allclose(objective.loss(pred, target, a, None, mask), per_element.sum() / pred.numel())
    snr = a / (1 - a)
    weights = torch.clamp(snr, max=5.0) / snr  # min-SNR-γ weighs each sample after the masked reduction
    assert torch.allclose(objective.loss(pred, target, a, 5.0, mask),
                          (per_element.sum(dim=(1, 2, 3)) / pred[0].numel() * weights).mean())
    ones = torch.ones(3, 1, 5, 6)
    for gamma in (None, 5.0):
        assert torch.equal(objective.loss(pred, target, a, gamma, ones), objective.loss(pred, target, a, gamma))
        assert not torch.allclose(objective.loss(pred, target, a, gamma, mask), objective.loss(pred, target, a, gamma))


def test_a_dataset_with_masks_gives_every_sample_a_mask_and_trains_another_lora(masked_run, tmp_path):
    data = CachedSamples(masked_run / "cache")
    items = [data[i] for i in range(len(data))]
    assert all(tuple(item["mask"].shape) == (1, 8, 8) for item in items)  # stackable in one batch
    assert torch.equal(items[UNMASKED]["mask"], torch.ones(1, 8, 8))  # no mask: weight 1 everywhere
    assert float(items[0]["mask"].mean()) == 0.5
    # the same cache without its masks (as data.mask: none caches it) trains another LoRA
    run, cfg = _copy(masked_run, tmp_path / "unmasked")
    index = json.loads((run.cache / "index.json").read_text())
    for e in index["entries"]:
        e.pop("mask_key", None)
    (run.cache / "index.json").write_text(json.dumps(index))
    assert "mask" not in CachedSamples(run.cache)[0]
    run_stage("train", cfg, run)
    assert _sha(run.root / LORA) != _sha(masked_run / LORA)


def test_a_masked_run_interrupted_and_resumed_ends_bit_identical(masked_run, tmp_path, monkeypatch):
    run, cfg = _copy(masked_run, tmp_path / "demo")
    assert cfg.train.steps == STEPS
    stop_at(monkeypatch, {3})
    with pytest.raises(interrupt.Interrupted, match=f"step 3/{STEPS}"):
        run_stage("train", cfg, run)
    interrupt.clear()
    assert checkpoints(run.train / "checkpoints")[0][0] == 3
    assert run_stage("train", cfg, run)["resumed_from_step"] == 3
    assert _sha(run.root / LORA) == _sha(masked_run / LORA)


# ---- without masks: nothing changes ------------------------------------------------------------------------
def test_data_mask_auto_is_left_out_of_keys_and_digests_and_the_others_rerun_from_ingest(tiny_diffusers):
    run = RunDir(Path("/nonexistent/run"))
    auto = load_config(DEMO, [f"model.path={tiny_diffusers}"])
    explicit = load_config(DEMO, [f"model.path={tiny_diffusers}", "data.mask=auto"])
    assert auto.data.mask == "auto" and "mask" not in auto.model_dump()["data"]
    assert auto.digest() == explicit.digest()
    assert all("data.mask" not in Keys(auto, run).inputs(s)["fields"] for s in ("ingest", "cache"))
    for mode in ("alpha", "none"):
        other = load_config(DEMO, [f"model.path={tiny_diffusers}", f"data.mask={mode}"])
        assert other.model_dump()["data"]["mask"] == mode and other.digest() != auto.digest()
        assert all(Keys(other, run).inputs(s)["fields"]["data.mask"] == mode for s in ("ingest", "cache"))
        assert Keys(other, run).work("ingest") != Keys(auto, run).work("ingest")
