"""A Kolors (SDXL-type) UNet's module names: its structure from a config (meta device, nothing allocated), and
the renaming between diffusers module paths and the names DiffSynth 1.x and kohya files use.
See kolora.formats.interchange for the formats."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.formats.lora import AdapterOptions, LoraFileError, check_blocks
from kolora.models.kolors import packaged_config

# diffusers, torch: imported in the functions that use them (a login node's CLI starts without them)

KOHYA_PREFIX = "lora_unet_"


def unet_config(source: Any = None) -> dict[str, Any]:
    """A UNet config: None → the packaged Kolors config; a dict; a config.json; a model folder (diffusers
    layout: unet/config.json; kolora's tiny DiffSynth layout: tiny-configs/unet_config.json)."""

    if source is None:
        return packaged_config("kolors-unet-config.json")
    if isinstance(source, dict):
        return dict(source)
    p = Path(source)
    if p.is_dir():
        for cand in (p / "unet" / "config.json", p / "config.json", p / "tiny-configs" / "unet_config.json"):
            if cand.is_file():
                p = cand
                break
        else:
            return packaged_config("kolors-unet-config.json")
    if not p.is_file():
        raise LoraFileError(f"UNet config {p} does not exist")
    return json.loads(p.read_text())


@dataclass(frozen=True)
class UnetStructure:
    shapes: dict[str, tuple[int, ...]]  # module path → weight shape, for every Linear/Conv module
    blocks: dict[str, int]  # diffusers block prefix → DiffSynth block index
    layers_per_block: int


@functools.lru_cache(maxsize=8)
def _structure(config_json: str) -> UnetStructure:
    import torch
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):  # shapes and names only: nothing is allocated
        unet = UNet2DConditionModel.from_config(cfg)
    shapes = {name: tuple(m.weight.shape) for name, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    lpb = cfg.get("layers_per_block", 2)
    return UnetStructure(shapes, diffsynth_blocks(unet), lpb if isinstance(lpb, int) else lpb[0])


def structure(config: Any = None) -> UnetStructure:
    return _structure(json.dumps(unet_config(config), sort_keys=True, default=list))


def lora_target_modules(config: Any, targets: list[str]) -> list[str]:
    """The Linear modules peft would wrap for `targets` (exact name or '.'-suffix match), sorted."""
    return sorted(n for n, s in structure(config).shapes.items() if len(s) == 2 and
                  any(n == t or n.endswith("." + t) for t in targets))


def check_block_keys(config: Any, target_modules: list[str], options: AdapterOptions) -> None:
    """train.block_ranks / block_alphas against the UNet of `config` (kolora.formats.lora.check_blocks), without
    loading it: before any stage runs."""
    cfg = unet_config(config)
    check_blocks(list(structure(cfg).shapes), {"down": len(cfg.get("down_block_types") or []),
                                               "up": len(cfg.get("up_block_types") or [])}, target_modules, options)


def diffsynth_blocks(unet) -> dict[str, int]:
    """diffusers block prefix ('down_blocks.1.attentions.0') → index in DiffSynth's flat `blocks` list.

    DiffSynth's SDXLUNet lists, in forward order: per down block and layer ResnetBlock, [AttentionBlock],
    PushBlock, then DownSampler + PushBlock (not after the last down block); mid block ResnetBlock,
    AttentionBlock, ResnetBlock; per up block and layer PopBlock, ResnetBlock, [AttentionBlock], then UpSampler
    (not after the last up block). For Kolors: attentions 7, 10, 15, 18, 21 (mid), 25, 28, 31, 35, 38, 41."""
    out: dict[str, int] = {}
    i = 0
    for b, blk in enumerate(unet.down_blocks):
        attn = getattr(blk, "attentions", None)
        for j in range(len(blk.resnets)):
            out[f"down_blocks.{b}.resnets.{j}"] = i
            i += 1
            if attn is not None:
                out[f"down_blocks.{b}.attentions.{j}"] = i
                i += 1
            i += 1  # PushBlock
        if getattr(blk, "downsamplers", None) is not None:
            out[f"down_blocks.{b}.downsamplers.0"] = i
            i += 2  # DownSampler, PushBlock
    mid = unet.mid_block
    if mid is not None:
        attn = getattr(mid, "attentions", None) or []
        for j in range(len(mid.resnets)):
            out[f"mid_block.resnets.{j}"] = i
            i += 1
            if j < len(attn):
                out[f"mid_block.attentions.{j}"] = i
                i += 1
    for b, blk in enumerate(unet.up_blocks):
        attn = getattr(blk, "attentions", None)
        for j in range(len(blk.resnets)):
            i += 1  # PopBlock
            out[f"up_blocks.{b}.resnets.{j}"] = i
            i += 1
            if attn is not None:
                out[f"up_blocks.{b}.attentions.{j}"] = i
                i += 1
        if getattr(blk, "upsamplers", None) is not None:
            out[f"up_blocks.{b}.upsamplers.0"] = i
            i += 1
    return out


_BLOCK_RE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+|"
                       r"mid_block\.(?:resnets|attentions)\.\d+)(?:\.(.*))?$")
_TOP_TO_DIFFSYNTH = {"encoder_hid_proj": "text_intermediate_proj", "time_embedding.linear_1": "time_embedding.0",
                     "time_embedding.linear_2": "time_embedding.2", "add_embedding.linear_1": "add_time_embedding.0",
                     "add_embedding.linear_2": "add_time_embedding.2"}
_TOP_FROM_DIFFSYNTH = {v: k for k, v in _TOP_TO_DIFFSYNTH.items()}


def to_diffsynth_module(name: str, blocks: dict[str, int]) -> str:
    """diffusers module path → DiffSynth 1.x SDXLUNet module path (its from_diffusers renamer, for modules)."""
    m = _BLOCK_RE.match(name)
    if not m:
        if name in _TOP_TO_DIFFSYNTH or name in ("conv_in", "conv_out", "conv_norm_out"):
            return _TOP_TO_DIFFSYNTH.get(name, name)
        raise LoraFileError(f"module {name} has no DiffSynth counterpart")
    if m.group(1) not in blocks:
        raise LoraFileError(f"module {name}: block {m.group(1)} is not in this UNet")
    rest = (m.group(2) or "").split(".") if m.group(2) else []
    out: list[str] = []
    k = 0
    while k < len(rest):
        if rest[k] == "ff" and rest[k + 1:k + 3] in (["net", "0"], ["net", "2"]):
            out.append("act_fn" if rest[k + 2] == "0" else "ff")
            k += 3
        elif rest[k] == "to_out" and k + 1 < len(rest) and rest[k + 1] == "0":
            out.append("to_out")
            k += 2
        else:
            out.append(rest[k])
            k += 1
    return ".".join(["blocks", str(blocks[m.group(1)]), *out])


def from_diffsynth_module(name: str, blocks: dict[str, int]) -> str:
    """DiffSynth module path → diffusers module path (inverse of to_diffsynth_module)."""
    parts = name.split(".")
    if parts[0] != "blocks":
        if name in _TOP_FROM_DIFFSYNTH or name in ("conv_in", "conv_out", "conv_norm_out"):
            return _TOP_FROM_DIFFSYNTH.get(name, name)
        raise LoraFileError(f"{name} is not a DiffSynth SDXL/Kolors UNet module")
    by_index = {v: k for k, v in blocks.items()}
    if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) not in by_index:
        raise LoraFileError(f"{name}: DiffSynth block {parts[1] if len(parts) > 1 else '?'} has no weights in "
                            "this UNet (Push/Pop block or out of range)")
    out = [by_index[int(parts[1])]]
    for k, p in enumerate(parts[2:], 2):
        last = k == len(parts) - 1
        if p == "act_fn":
            out.append("ff.net.0")
        elif p == "ff" and (last or parts[k + 1] in ("weight", "bias")):
            out.append("ff.net.2")
        elif p == "to_out":
            out.append("to_out.0")
        else:
            out.append(p)
    return ".".join(out)


def to_kohya_module(name: str) -> str:
    return KOHYA_PREFIX + name.replace(".", "_")
