"""The adapter: its peft config, and the file kolora writes (diffusers' format + rank/alpha metadata).

The file is diffusers' `pytorch_lora_weights.safetensors` (what `KolorsPipeline.load_lora_weights` reads),
written through diffusers' own `save_lora_weights` with the peft adapter config in its metadata, plus
kolora's `kolora.rank` / `kolora.alpha` keys. Because alpha travels inside the file, rendering always
uses the trained alpha (the tutorial's train alpha 4 / render alpha 2 mismatch cannot happen).

LyCORIS adapters (train.adapter: loha / lokr, peft's LoHaConfig / LoKrConfig) keep the file name, the metadata
keys and the peft config in the metadata (with `kolora.adapter`), their tensors under peft's own names
(`unet.<module>.hada_w1_a`, `.lokr_w1`, ...): diffusers' LoRA loader cannot read them, so kolora loads them through
peft (kolora.formats.peft_adapter). Per-block ranks and alphas (train.block_ranks / block_alphas) are the peft
config's rank_pattern / alpha_pattern, so every layer's own rank and alpha travel in the file too.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.core.errors import ConfigError, InputError
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


ADAPTERS = ("lora", "loha", "lokr")
ADAPTER_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
# train.block_ranks / block_alphas keys: a UNet block by its index, as kohya's block_dims counts them
BLOCK_KEY = re.compile(r"^(?:(down|up)\.(\d+)|mid)$")
BLOCK_KEY_HELP = '"down.N" (down_blocks.N), "mid" (mid_block) or "up.N" (up_blocks.N)'


@dataclass(frozen=True)
class AdapterOptions:
    """What train.adapter, train.lokr_factor, train.block_ranks and train.block_alphas ask of the peft config
    (hashable: the memory plan caches on it). The default is the tutorial's LoRA: one rank, one alpha."""

    kind: str = "lora"
    lokr_factor: int = -1  # LoKr's decompose_factor (peft's name and default)
    block_ranks: tuple[tuple[str, int], ...] = ()
    block_alphas: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, tcfg: Any) -> AdapterOptions:
        """From a TrainConfig."""
        return cls(tcfg.adapter, tcfg.lokr_factor, tuple(sorted(tcfg.block_ranks.items())),
                   tuple(sorted(tcfg.block_alphas.items())))


def block_pattern(key: str) -> str:
    """A train.block_ranks key → the peft rank_pattern/alpha_pattern key (a regex peft matches against the full
    module name) that selects every module of that block."""
    m = BLOCK_KEY.match(key)
    if m is None:
        raise ValueError(f"block key {key!r}: use {BLOCK_KEY_HELP}")
    return r"mid_block\..*" if m.group(1) is None else rf"{m.group(1)}_blocks\.{m.group(2)}\..*"


def check_blocks(module_names: list[str], counts: dict[str, int], target_modules: list[str],
                 options: AdapterOptions) -> None:
    """Every block key of train.block_ranks / block_alphas names a block of the UNet (`counts`: its number of
    "down" and "up" blocks; `module_names`: its modules) that holds target modules; ConfigError naming the field
    otherwise (a key that selects nothing would be an option silently ignored)."""
    names = [n for n in module_names if any(n == t or n.endswith("." + t) for t in target_modules)]
    for field, pairs in (("train.block_ranks", options.block_ranks), ("train.block_alphas", options.block_alphas)):
        for key, _ in pairs:
            m = BLOCK_KEY.match(key)
            if m is None:
                raise ConfigError(f"{field}: block key {key!r}; use {BLOCK_KEY_HELP}")
            if m.group(1) is not None and int(m.group(2)) >= counts[m.group(1)]:
                raise ConfigError(f"{field}: {key!r} names {m.group(1)}_blocks.{m.group(2)}, but this UNet has "
                                  f"{counts[m.group(1)]} {m.group(1)} blocks ({m.group(1)}.0 to "
                                  f"{m.group(1)}.{counts[m.group(1)] - 1}); fix or drop the key")
            if not any(re.match(rf"(.*\.)?({block_pattern(key)})$", n) for n in names):
                raise ConfigError(f"{field}: block {key!r} holds none of train.target_modules "
                                  f"({', '.join(target_modules)}), so its rank/alpha would change nothing; drop the "
                                  "key or name a block with attention layers")


def lora_config(rank: int, alpha: float, target_modules: list[str], dora: bool = False,
                options: AdapterOptions | None = None):
    """The peft config of kolora's adapter: LoraConfig (the default), LoHaConfig or LoKrConfig."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    opts = options or AdapterOptions()
    patterns = {"rank_pattern": {block_pattern(k): v for k, v in opts.block_ranks},
                "alpha_pattern": {block_pattern(k): v for k, v in opts.block_alphas}}
    if opts.kind != "lora" and dora:
        raise ConfigError(f"train.dora is DoRA, a LoRA variant; train.adapter: {opts.kind} has no DoRA: set "
                          "train.dora: false or train.adapter: lora")
    # peft's default inits start every adapter at the base model (step 0 = base): LoHa zeroes hada_w2_b,
    # LoKr zeroes lokr_w1 (kolora.formats.peft_adapter's tests check it)
    if opts.kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=list(target_modules), **patterns)
    if opts.kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=list(target_modules),
                          decompose_factor=opts.lokr_factor, **patterns)
    if opts.kind != "lora":
        raise ConfigError(f"train.adapter: {opts.kind!r}; choose from {', '.join(ADAPTERS)}")
    # The tutorial's init (DiffSynth): gaussian A, zero B, so step 0 equals the base model. DoRA (peft's
    # use_dora) adds a per-output-channel magnitude vector, initialised to the base weight's norms.
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules),
                      use_dora=dora, **patterns)


def add_lora(unet, rank: int, alpha: float, target_modules: list[str], adapter_name: str = "default",
             dora: bool = False, options: AdapterOptions | None = None):
    if options is not None:
        check_blocks([n for n, _ in unet.named_modules()], {"down": len(unet.down_blocks), "up": len(unet.up_blocks)},
                     target_modules, options)
    unet.add_adapter(lora_config(rank, alpha, target_modules, dora, options), adapter_name=adapter_name)
    return unet


def save_lora(unet, path: Path, rank: int, alpha: float, target_modules: list[str],
              extra_metadata: dict[str, str] | None = None, dora: bool = False,
              options: AdapterOptions | None = None) -> Path:
    """Write the UNet's adapter to `path` (a .safetensors file) atomically."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if options is not None and options.kind != "lora":
        return save_peft_layers(get_peft_model_state_dict(unet), path, rank, alpha, target_modules,
                                extra_metadata, options)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return save_layers(layers, path, rank, alpha, target_modules, extra_metadata, dora, options)


def config_metadata(config) -> dict[str, Any]:
    """A peft config as plain JSON data: sets → sorted lists (a set's order changes between processes: the file
    would not be reproducible)."""
    return json.loads(json.dumps(config.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def _file_metadata(adapter_meta: dict[str, Any], rank: int, alpha: float, target_modules: list[str],
                   extra_metadata: dict[str, str] | None) -> dict[str, str]:
    return {"format": "pt",
            "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in adapter_meta.items()}, indent=2,
                                                sort_keys=True),
            "kolora.rank": str(rank), "kolora.alpha": repr(float(alpha)),
            "kolora.target_modules": json.dumps(list(target_modules)), **(extra_metadata or {})}


def save_peft_layers(layers: dict[str, Any], path: Path, rank: int, alpha: float, target_modules: list[str],
                     extra_metadata: dict[str, str] | None, options: AdapterOptions) -> Path:
    """Write a LoHa/LoKr adapter's tensors (peft's names, as `get_peft_model_state_dict` gives them) to `path` in
    kolora's file format, atomically: `unet.`-prefixed keys, the same metadata as a LoRA plus `kolora.adapter`."""
    import safetensors.torch

    path = Path(path)
    tensors = {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in layers.items()}
    meta = _file_metadata(config_metadata(lora_config(rank, alpha, target_modules, options=options)), rank, alpha,
                          target_modules, {"kolora.adapter": options.kind, **(extra_metadata or {})})
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
        canonicalize_header(tmp)
    return path


def save_layers(layers: dict[str, Any], path: Path, rank: int, alpha: float, target_modules: list[str],
                extra_metadata: dict[str, str] | None = None, dora: bool = False,
                options: AdapterOptions | None = None) -> Path:
    """Write UNet LoRA tensors (diffusers' names, as `convert_state_dict_to_diffusers` gives them, without
    the `unet.` prefix) to `path` in kolora's file format, atomically. Used by training and by import-lora."""
    import safetensors.torch
    from diffusers import KolorsPipeline

    path = Path(path)
    layers = {k: v.detach().to("cpu").contiguous() for k, v in layers.items()}
    adapter_meta = config_metadata(lora_config(rank, alpha, target_modules, dora, options))

    def save_function(weights: dict[str, Any], filename: str) -> None:
        # diffusers builds `metadata`; we add ours and write atomically into the final path.
        meta = _file_metadata(adapter_meta, rank, alpha, target_modules, extra_metadata)
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


def adapter_kind(meta: dict[str, str]) -> str:
    """'lora', 'loha' or 'lokr': the adapter a kolora/diffusers file holds (by `kolora.adapter`, else by the
    peft type of its adapter config; a file with neither is a LoRA)."""
    if "kolora.adapter" in meta:
        return meta["kolora.adapter"]
    try:
        peft_type = json.loads(meta.get("lora_adapter_metadata") or "{}").get("unet.peft_type") or "LORA"
    except (ValueError, AttributeError):
        return "lora"
    return str(peft_type).lower()


def adapter_config(meta: dict[str, str], where: str | Path = "LoRA file"):
    """The peft config (LoraConfig, LoHaConfig, LoKrConfig) the file's metadata holds; None without one."""
    from peft import PeftConfig

    text = meta.get("lora_adapter_metadata")
    if not text:
        return None
    try:
        found = json.loads(text)
        return PeftConfig.from_peft_type(**{k.removeprefix("unet."): v for k, v in found.items()
                                            if k.startswith("unet.")})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LoraFileError(f"{where}: unreadable adapter config in its metadata ({type(e).__name__}: {e})") from None


def peft_state_dict(path: Path) -> dict:
    """The file's UNet adapter tensors under peft's key names (for `set_peft_model_state_dict`)."""
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
