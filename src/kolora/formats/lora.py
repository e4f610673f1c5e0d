"""The LoRA adapter: its peft config, and the file kolora writes (diffusers' format + rank/alpha metadata).

The file is diffusers' `pytorch_lora_weights.safetensors` (what `KolorsPipeline.load_lora_weights` reads),
written through diffusers' own `save_lora_weights` with the peft adapter config in its metadata, plus
kolora's `kolora.rank` / `kolora.alpha` keys. Because alpha travels inside the file, rendering always
uses the trained alpha (the tutorial's train alpha 4 / render alpha 2 mismatch cannot happen).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kolora.core.errors import InputError
from kolora.core.numerics import nonfinite_count
from kolora.core.rundir import atomic_path

# diffusers, peft, safetensors: imported in the functions that use them (a login node's CLI starts without them)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# The largest |value| a usable LoRA tensor holds. Trained factors are of order 1 (A starts at N(0, 1/rank), B at 0,
# and steps of lr <= 1e-3 keep them there; LoRAs shared for SDXL-type models stay below ~10; kohya alphas are at most
# the rank, DoRA magnitudes the norms of UNet weight rows). Past 1e4 the update B·A overflows float16 (max 65504)
# as soon as the other factor reaches ~6, and swamps the UNet's own weights (|W| < 10) in any dtype: such a file
# is a diverged training or damaged bytes, never a LoRA that renders.
MAX_WEIGHT = 1e4


class LoraFileError(InputError):
    """A LoRA file that cannot be used; the message names the file and the fix."""


def check_weights(tensors: Mapping[str, Any], path: str | Path) -> None:
    """Every tensor read from a LoRA file is finite and within MAX_WEIGHT; LoraFileError naming `path`, the tensors
    (by their keys in the file) and the fix otherwise. Every reader of LoRA files calls it (kolora.formats.interchange.
    read_tensors, peft_state_dict), so a broken LoRA never reaches a pipeline, an export or a tile."""
    bad = []
    for key, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        peak = float(t.detach().abs().max())  # nan if any value is
        if not math.isfinite(peak):
            bad.append(f"{key} holds nan/inf ({nonfinite_count(t):,} of its {t.numel():,} values)")
        elif peak > MAX_WEIGHT:
            bad.append(f"{key} holds a value of magnitude {peak:.3g} (a LoRA's stay below {MAX_WEIGHT:g})")
    if bad:
        raise LoraFileError(
            f"{path}: values no trained LoRA holds, in {len(bad)} of its {len(tensors)} tensors: "
            f"{'; '.join(bad[:3])}{f'; and {len(bad) - 3} more' if len(bad) > 3 else ''}. Its training diverged or "
            "the file is damaged, so nothing was loaded or written from it: use an earlier checkpoint of the LoRA or "
            "a fresh copy of the file; for a LoRA kolora trained, look at train/metrics.csv and train again with a "
            "lower train.lr")


def lora_config(rank: int, alpha: float, target_modules: list[str], dora: bool = False):
    from peft import LoraConfig

    # The tutorial's init (DiffSynth): gaussian A, zero B, so step 0 equals the base model. DoRA (peft's
    # use_dora) adds a per-output-channel magnitude vector, initialised to the base weight's norms.
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules),
                      use_dora=dora)


def add_lora(unet, rank: int, alpha: float, target_modules: list[str], adapter_name: str = "default",
             dora: bool = False):
    unet.add_adapter(lora_config(rank, alpha, target_modules, dora), adapter_name=adapter_name)
    return unet


def save_lora(unet, path: Path, rank: int, alpha: float, target_modules: list[str],
              extra_metadata: dict[str, str] | None = None, dora: bool = False) -> Path:
    """Write the UNet's LoRA to `path` (a .safetensors file) atomically."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return save_layers(layers, path, rank, alpha, target_modules, extra_metadata, dora)


def save_layers(layers: dict[str, Any], path: Path, rank: int, alpha: float, target_modules: list[str],
                extra_metadata: dict[str, str] | None = None, dora: bool = False) -> Path:
    """Write UNet LoRA tensors (diffusers' names, as `convert_state_dict_to_diffusers` gives them, without
    the `unet.` prefix) to `path` in kolora's file format, atomically. Used by training and by import-lora."""
    import safetensors.torch
    from diffusers import KolorsPipeline

    path = Path(path)
    layers = {k: v.detach().to("cpu").contiguous() for k, v in layers.items()}
    adapter_meta = lora_config(rank, alpha, target_modules, dora).to_dict()
    # sets → sorted lists (a set's order changes between processes: the file would not be reproducible)
    adapter_meta = json.loads(json.dumps(adapter_meta, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))

    def save_function(weights: dict[str, Any], filename: str) -> None:
        # diffusers builds `metadata`; we add ours and write atomically into the final path.
        meta = {"format": "pt",
                "lora_adapter_metadata": json.dumps(
                    {f"unet.{k}": v for k, v in adapter_meta.items()}, indent=2, sort_keys=True),
                "kolora.rank": str(rank), "kolora.alpha": repr(float(alpha)),
                "kolora.target_modules": json.dumps(list(target_modules)), **(extra_metadata or {})}
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(weights, str(tmp), metadata=meta)
            canonicalize_header(tmp)

    path.parent.mkdir(parents=True, exist_ok=True)
    KolorsPipeline.save_lora_weights(save_directory=str(path.parent), unet_lora_layers=layers,
                                     weight_name=path.name, save_function=save_function,
                                     unet_lora_adapter_metadata=adapter_meta)
    return path


def canonicalize_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys, in place.

    safetensors serialises its header from a Rust HashMap, so the same tensors and metadata give different
    bytes in every process; sorting makes a LoRA file bit-reproducible (same config → same sha256).
    The header keeps its length (padding with spaces is allowed by the format), so offsets stay valid."""

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        canon = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canon) > n:  # cannot happen for a header written compactly; keep the file as written
            return
        f.seek(8)
        f.write(canon + b" " * (n - len(canon)))


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise LoraFileError(f"{path}: not a readable safetensors file ({e})") from None


def check_rank_alpha(rank: int, alpha: float, where: str | Path) -> tuple[int, float]:
    """(rank, alpha) if they can be meant; LoraFileError naming `where` otherwise."""
    if rank < 1:
        raise LoraFileError(f"{where}: rank {rank}; a LoRA's rank is 1 or more")
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoraFileError(f"{where}: alpha {alpha:g}; a LoRA's alpha must be a number > 0 (the update is scaled by "
                            "alpha/rank): import the file again with the alpha it was trained with "
                            "(kolora import-lora FILE --alpha A)")
    return rank, alpha


def rank_alpha_from_metadata(meta: dict[str, str], where: str | Path = "LoRA file") -> tuple[int, float] | None:
    try:
        if "kolora.rank" in meta:
            found = int(meta["kolora.rank"]), float(meta["kolora.alpha"])
        elif "lora_adapter_metadata" in meta:
            m = json.loads(meta["lora_adapter_metadata"]).get
            found = (int(m("unet.r")), float(m("unet.lora_alpha"))) if m("unet.r") and m("unet.lora_alpha") else None
        else:
            found = None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LoraFileError(f"{where}: unreadable rank/alpha in its metadata ({type(e).__name__}: {e})") from None
    return check_rank_alpha(*found, where) if found else None


def peft_state_dict(path: Path) -> dict:
    """The file's UNet LoRA tensors under peft's key names (for `set_peft_model_state_dict`)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    check_weights(tensors, path)
    sd = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    return convert_unet_state_dict_to_peft(sd)


def resolve_file(path: Path) -> Path:
    """A LoRA file, or a folder: its pytorch_lora_weights.safetensors, else its only LoRA-like file (an export
    folder such as lora/kohya/ or lora/diffsynth/)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / WEIGHT_NAME).is_file():
        found = [p for ext in (".safetensors", ".ckpt", ".pt", ".pth", ".bin") for p in path.glob(f"*{ext}")]
        if len(found) == 1:
            return found[0]
    return path / WEIGHT_NAME
