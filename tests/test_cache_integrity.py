"""Cache entries are verified when read: each carries a SHA-256 of its tensors. In a shared cache.dir, an entry
damaged on disk (nan written over it, truncated, bits flipped) is found by the next cache run, named with its
image, moved aside and encoded again, and the LoRA trained then equals one trained from a clean cache; training
that reads a damaged entry fails naming it and the fix, and that fix works; `--stage cache --force` encodes this
run's entries again in a shared store and leaves other runs' entries alone; entries written before checksums
still read."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO, untrained_copy
from safetensors.torch import load_file, save_file

from kolora.cache import entry as cache_entry
from kolora.cli.main import main
from kolora.pipeline.runner import run_stage
from kolora.train.samples import StepSampler

LORA = "lora/pytorch_lora_weights.safetensors"


def _data_offset(data: bytes) -> int:
    """Where a safetensors file's tensor bytes start: after the 8-byte header length and the header."""
    return 8 + int.from_bytes(data[:8], "little")


def _nan_written_over(data: bytes) -> bytes:
    at = _data_offset(data)
    return data[:at] + torch.full((4,), float("nan")).numpy().tobytes() + data[at + 16:]


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bits_flipped(data: bytes) -> bytes:
    """The lowest bit of three bytes inside the tensor data: the values stay finite and plausible."""
    out = bytearray(data)
    at = _data_offset(data)
    for i in (at + 8, at + 101, at + 402):
        out[i] ^= 0x01
    return bytes(out)


CORRUPTIONS = {"nan": (_nan_written_over, "nonfinite", "holds non-finite values"),
               "truncated": (_truncated, "unreadable", "cannot be read"),
               "bits-flipped": (_bits_flipped, "checksum", "no longer matches the checksum")}


def _lora(run_root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_root / LORA))


def _first_read(entries: list[dict], cfg) -> dict:
    """The index entry of the first sample training reads."""
    return entries[next(iter(StepSampler(len(entries), cfg.train.steps * cfg.train.batch_size, cfg.train.seed)))]


def _shared_store_config(cfg, store: Path):
    # One image per VAE batch: an entry encoded again alone is then bit-identical to the one encoded first (in a
    # batch of 8 the CPU's convolutions round differently), so the LoRAs can be compared exactly.
    cfg.cache.dir, cfg.cache.batch_size, cfg.train.steps = store, 1, 4
    return cfg


@pytest.fixture(scope="module")
def clean(demo_run, tmp_path_factory):
    """The demo's samples cached into a shared store, and the 4-step LoRA trained from it."""
    base = tmp_path_factory.mktemp("clean")
    run, cfg = untrained_copy(demo_run, base / "clean")
    _shared_store_config(cfg, base / "store")
    run_stage("cache", cfg, run, force=True)  # cache.dir is operational: --force encodes into the new store
    run_stage("train", cfg, run)
    return cfg.cache.dir, _lora(run.root)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_shared_entry_is_named_moved_aside_and_encoded_again(demo_run, clean, tmp_path, corruption, caplog):
    clean_store, clean_lora = clean
    store = tmp_path / "store"
    shutil.copytree(clean_store, store)
    run, cfg = untrained_copy(demo_run, tmp_path / "next")  # another run of the lab, sharing the store
    _shared_store_config(cfg, store)
    victim = _first_read(json.loads((run.cache / "index.json").read_text())["entries"], cfg)
    (run.cache / "index.json").unlink()  # its cache has not run yet
    image = victim["file_name"]
    entry = store / "latents" / f"{victim['latent_key']}.safetensors"
    good = entry.read_bytes()
    damage, reason, problem = CORRUPTIONS[corruption]
    entry.write_bytes(damage(good))
    damaged = entry.read_bytes()

    with caplog.at_level(logging.WARNING, logger="kolora.cache.stage"):
        summary = run_stage("cache", cfg, run)
    aside = store / "quarantine" / "latents" / f"{entry.name}.{reason}"
    (repaired,) = summary["repaired"]
    assert repaired["repaired"] == str(entry) and repaired["of"] == f"the latents of image {image}"
    assert repaired["problem"].startswith(problem) and repaired["aside"] == str(aside)
    assert json.loads((run.cache / "report.json").read_text())["repaired"] == [repaired]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(entry) in warning and image in warning and str(aside) in warning
    assert aside.read_bytes() == damaged  # moved aside, never deleted
    assert (summary["encoded"], summary["encoded_images"]) == (1, 1)  # that entry alone, the rest reused
    assert entry.read_bytes() == good  # encoded again: the same bytes as before the damage

    run_stage("train", cfg, run)
    lora = _lora(run.root)
    assert lora.keys() == clean_lora.keys() and all(torch.equal(lora[k], clean_lora[k]) for k in lora)


def test_training_that_reads_a_damaged_entry_names_it_and_the_cache_stage_repairs_it(demo_run, tiny_diffusers,
                                                                                     tmp_path, capsys):
    runs = tmp_path / "runs"
    run, cfg = untrained_copy(demo_run, runs / "demo")
    entries = json.loads((run.cache / "index.json").read_text())["entries"]
    cfg.train.steps = 4
    first = _first_read(entries, cfg)
    entry = run.cache / "text" / f"{first['text_key']}.safetensors"
    entry.write_bytes(_bits_flipped(entry.read_bytes()))
    args = ["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}",
            "--set", "train.steps=4"]

    assert main([*args, "--stage", "train"]) == 1
    err = capsys.readouterr().err
    assert "internal error" not in err
    assert f"kolora: error: cache entry {entry} (the caption of image {first['file_name']}" in err
    assert "no longer matches the checksum" in err and "--stage cache" in err
    assert not (run.root / LORA).exists()

    assert main([*args, "--stage", "cache"]) == 0  # the advised fix: the cache stage runs again
    summary = json.loads((run.root / "manifest.json").read_text())["stages"]["cache"]["summary"]
    assert [r["repaired"] for r in summary["repaired"]] == [str(entry)]
    assert (summary["encoded"], summary["encoded_texts"]) == (1, 1)
    assert (run.cache / "quarantine" / "text" / f"{entry.name}.checksum").is_file()
    assert main([*args, "--stage", "train"]) == 0
    assert (run.root / LORA).is_file()


def test_force_encodes_this_runs_entries_again_in_a_shared_store_and_no_others(demo_run, tiny_diffusers, tmp_path,
                                                                               capsys):
    runs, lab = tmp_path / "runs", tmp_path / "lab"
    run, _ = untrained_copy(demo_run, runs / "demo")
    for kind in ("text", "latents"):  # an earlier run of the lab cached these samples in the shared store
        shutil.copytree(run.cache / kind, lab / kind)
    others = [lab / "text" / f"{'a' * 64}.safetensors", lab / "latents" / f"{'b' * 64}.safetensors"]
    for path in others:  # another run's entries, untouched for a while
        cache_entry.write(path, {"latents": torch.randn(4, 8, 8)})
        os.utime(path, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in others}
    index = json.loads((run.cache / "index.json").read_text())
    texts = {e["text_key"] for e in index["entries"]} | {index["empty_text_key"]}
    latents = {e["latent_key"] for e in index["entries"]}
    inodes = {k: (lab / "latents" / f"{k}.safetensors").stat().st_ino for k in latents}

    assert main(["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}",
                 "--set", f"cache.dir={lab}", "--stage", "cache", "--force"]) == 0
    capsys.readouterr()
    summary = json.loads((run.root / "manifest.json").read_text())["stages"]["cache"]["summary"]
    assert (summary["encoded_texts"], summary["encoded_images"]) == (len(texts), len(latents))
    assert summary["reused"] == 0 and "repaired" not in summary
    assert all((lab / "latents" / f"{k}.safetensors").stat().st_ino != inodes[k] for k in latents)  # rewritten
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in others} == before
    assert not (lab / "quarantine").exists()


def test_entries_written_before_checksums_still_read(demo_run, tmp_path):
    """An older store: no checksum in the metadata. Finite entries read and are reused as they are (no store is
    encoded again on an upgrade); a non-finite one is still caught."""
    run, cfg = untrained_copy(demo_run, tmp_path / "demo")
    for path in [*(run.cache / "text").glob("*.safetensors"), *(run.cache / "latents").glob("*.safetensors")]:
        save_file(load_file(str(path)), str(path))  # as kolora wrote entries before checksums
    old = {p: p.read_bytes() for p in (run.cache / "latents").glob("*.safetensors")}
    some = next(iter(old))
    assert torch.equal(cache_entry.read(some, "an old entry")["latents"], load_file(str(some))["latents"])
    (run.cache / "index.json").unlink()
    summary = run_stage("cache", cfg, run)
    assert summary["encoded"] == 0 and "repaired" not in summary
    assert {p: p.read_bytes() for p in old} == old

    nan = tmp_path / "old-nan.safetensors"
    save_file({"latents": torch.tensor([1.0, float("nan")])}, str(nan))
    with pytest.raises(cache_entry.BadCacheEntry, match=r"old-nan.safetensors \(an old entry\) holds non-finite "
                                                        r"values \(nan/inf: 1 in latents\)") as e:
        cache_entry.read(nan, "an old entry")
    assert e.value.reason == "nonfinite"
