"""Kolors loading in both on-disk layouts, through the same code that loads real weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PROMPTS

from kolora.core.config import ModelConfig, validate_config
from kolora.core.errors import ConfigError
from kolora.models import kolors as models


def _cfg(path, layout, **extra):
    return validate_config({"name": "t", "model": {"path": str(path), "layout": layout, **extra},
                            "render": {"prompts": str(PROMPTS), "steps": 2, "width": 32, "height": 32},
                            "cache": {"max_sequence_length": 16}})


def _render(cfg):
    from kolora.core.prompts import load_prompts
    from kolora.render.stage import build_pipeline, render_tile

    pipe = build_pipeline(cfg, None, "cpu", torch.float32)
    item = load_prompts(cfg.render.prompts, cfg.render.negative_prompt)[0]
    return np.asarray(render_tile(pipe, cfg, item, "cpu"))


def test_both_layouts_load_and_render_the_same_model(tiny_diffusers, tiny_diffsynth):
    a = _render(_cfg(tiny_diffusers, "diffusers"))
    b = _render(_cfg(tiny_diffsynth, "diffsynth", **models.tiny_diffsynth_overrides(tiny_diffsynth)))
    assert a.shape == (32, 32, 3) and a.std() > 0
    # Same seed → same random weights in both layouts → the same pixels through both loaders.
    assert np.array_equal(a, b)


def test_diffsynth_layout_is_found_from_the_models_folder_or_the_kolors_folder(tiny_diffsynth):
    extra = models.tiny_diffsynth_overrides(tiny_diffsynth)
    top = models.resolve(ModelConfig(path=tiny_diffsynth, layout="diffsynth", **extra))
    inner = models.resolve(ModelConfig(path=tiny_diffsynth / "kolors" / "Kolors", layout="diffsynth", **extra))
    assert top.unet == inner.unet
    # The fp16-fix VAE (what the tutorial trains with) is preferred over Kolors' own.
    assert top.vae.parent.name == "sdxl-vae-fp16-fix"
    te = models.load_text_encoder(top)
    assert sum(p.numel() for p in te.parameters()) > 0
    assert json.loads((tiny_diffsynth / "kolors/Kolors/text_encoder/pytorch_model.bin.index.json").read_text())


def test_layout_mistakes_name_the_field_and_fix(tiny_diffusers, tiny_diffsynth, tmp_path):
    with pytest.raises(ConfigError, match="layout: diffsynth"):
        models.resolve(ModelConfig(path=tiny_diffsynth, layout="diffusers"))
    with pytest.raises(ConfigError, match="model.tokenizer_path"):
        models.resolve(ModelConfig(path=tiny_diffsynth, layout="diffsynth"))
    # The real Kolors UNet config does not fit tiny weights: a clear message, not a shape traceback.
    files = models.resolve(ModelConfig(path=tiny_diffsynth, layout="diffsynth",
                                       tokenizer_path=tiny_diffsynth / "tiny-configs" / "tokenizer"))
    with pytest.raises(ConfigError, match="model.unet_config"):
        models.load_unet(files)
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_diffusers, broken)
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"unet.*config.json"):
        models.resolve(ModelConfig(path=broken))


def test_full_kolors_unet_config_is_shipped():
    cfg = models.packaged_config("kolors-unet-config.json")
    assert cfg["encoder_hid_dim"] == 4096 and cfg["cross_attention_dim"] == 2048
    assert models.packaged_config("sdxl-vae-config.json")["scaling_factor"] == 0.13025
