"""LoRA interchange: kolora's LoRA ⇄ the formats other Kolors tools load.

Formats (``kolora export RUN --format ...``; every one of them is accepted as ``render.lora`` and by
``kolora import-lora``):

``peft``  diffusers' ``pytorch_lora_weights.safetensors``, i.e. kolora's own file: keys
    ``unet.<module>.lora.down.weight`` / ``.lora.up.weight`` (what ``convert_state_dict_to_diffusers`` gives),
    rank and alpha in the metadata (``kolora.rank``/``kolora.alpha`` and diffusers' ``lora_adapter_metadata``).
    ``KolorsPipeline.load_lora_weights`` reads it and applies the trained alpha.

``kohya``  the single-file LoRA that ComfyUI and A1111/Forge load: ``lora_unet_<module with '.'→'_'>`` +
    ``.lora_down.weight`` (A), ``.lora_up.weight`` (B) and a scalar ``.alpha`` per layer; scale = alpha/rank.
    *Naming choice*: the diffusers module path (``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_
    attn1_to_q``), not kohya's SGM names (``lora_unet_input_blocks_4_1_...``). ComfyUI's
    ``model_lora_keys_unet`` maps both spellings for SDXL-type UNets (it registers
    ``lora_unet_<diffusers key>`` for every UNet weight), and this is the only spelling that
    ``KolorsPipeline.load_lora_weights`` maps correctly: Kolors uses diffusers' SD-1.x LoRA loader, which does
    not pass the UNet config that SGM block renumbering needs. Reading accepts both spellings.

``diffsynth``  what DiffSynth-Studio 1.x's Kolors pipeline loads: the tutorial's ``load_lora`` injects peft
    adapters (``target_modules=["to_q","to_k","to_v","to_out"]``) into DiffSynth's ``SDXLUNet`` and calls
    ``load_state_dict(torch.load(path), strict=False)``. Keys are ``<DiffSynth module>.lora_A.default.weight`` /
    ``.lora_B.default.weight`` (e.g. ``blocks.7.transformer_blocks.0.attn1.to_q``), written with ``torch.save``
    (a plain dict of tensors, readable with ``weights_only=True``), or safetensors when the target ends in
    ``.safetensors``. DiffSynth's module names come from its ``SDXLUNetStateDictConverter``: its UNet is one flat
    ``blocks`` list (ResnetBlock, AttentionBlock, Push/PopBlock, Down/UpSampler) numbered in order; see
    ``diffsynth_blocks`` for the rule (checked against all 560 names DiffSynth's converter gives for Kolors).

    *Alpha convention (DiffSynth files carry no alpha)*: tensors are **raw** (lora_B is NOT pre-scaled), exactly
    like the checkpoints DiffSynth's trainer writes, so exporting and importing are the same operation in both
    directions. Load an exported file with the *trained* alpha:
    ``load_lora(pipe.unet, lora_rank=R, lora_alpha=A, lora_path=FILE)`` (tutorial), or
    ``model_manager.load_lora(FILE, lora_alpha=A / R)`` (DiffSynth's ModelManager multiplies B·A by its
    lora_alpha as is). kolora writes R and A beside the file (``<stem>.kolora.json``) and prints the call.
    Importing a DiffSynth checkpoint needs the alpha it was trained with: ``kolora import-lora FILE --alpha 4``
    (the tutorial trains with 4; its own render step wrongly loads with 2). The effective update is
    ``W + (alpha / rank) · B · A`` everywhere.

Everything goes through one canonical form, ``LoraWeights``: peft names ``<diffusers module>.lora_A.weight`` /
``.lora_B.weight`` plus rank and alpha. Module names are checked against the UNet (built from its config on the
meta device, no weights allocated), so a LoRA for another architecture fails with the names that do not fit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolora.lora import WEIGHT_NAME, LoraFileError, rank_alpha_from_metadata, read_metadata
from kolora.rundir import atomic_path, atomic_write_json

FORMATS = ("peft", "kohya", "diffsynth")
KOHYA_PREFIX = "lora_unet_"
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SIDECAR_SUFFIX = ".kolora.json"


@dataclass
class LoraWeights:
    """A UNet LoRA in canonical form: peft key names on diffusers module paths, one rank, one alpha."""

    tensors: dict[str, Any]  # "<module>.lora_A.weight" (rank × in) / "<module>.lora_B.weight" (out × rank)
    rank: int
    alpha: float | None
    source_format: str = "peft"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(k.removesuffix(".lora_A.weight") for k in self.tensors if k.endswith(".lora_A.weight"))

    def pairs(self) -> Iterator[tuple[str, Any, Any]]:
        for m in self.modules:
            yield m, self.tensors[f"{m}.lora_A.weight"], self.tensors[f"{m}.lora_B.weight"]

    def target_modules(self) -> list[str]:
        """peft target names (suffixes) covering the modules: 'to_q', 'to_out.0', ..."""
        out = set()
        for m in self.modules:
            parts = m.split(".")
            out.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
        return sorted(out)


def _canonical(tensors: dict[str, Any], alpha: float | None, source: str, where: str,
               alphas: dict[str, float] | None = None, rank: int | None = None) -> LoraWeights:
    """Check pairs and ranks; fold per-layer alphas that differ from the common one into lora_B."""
    a_mods = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    b_mods = {k.removesuffix(".lora_B.weight") for k in tensors if k.endswith(".lora_B.weight")}
    odd = sorted((a_mods ^ b_mods) | {k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))})
    if odd:
        raise LoraFileError(f"{where}: {len(odd)} LoRA tensors without their A/B partner or of an unknown kind "
                            f"(e.g. {odd[:3]})")
    if not a_mods:
        raise LoraFileError(f"{where}: no UNet LoRA tensors found")
    ranks = Counter(int(tensors[f"{m}.lora_A.weight"].shape[0]) for m in a_mods)
    if len(ranks) > 1:
        raise LoraFileError(f"{where}: layers have different ranks {dict(ranks)}; kolora handles one rank per LoRA")
    (found_rank,) = ranks
    if rank is not None and rank != found_rank:
        raise LoraFileError(f"{where}: --rank {rank} given, but the tensors have rank {found_rank}")
    if alphas:
        common = Counter(alphas.values()).most_common(1)[0][0]
        alpha = common if alpha is None else alpha
        for m, a in alphas.items():
            if a != alpha:  # keep W + (a/r)·B·A exact under one alpha
                key = f"{m}.lora_B.weight"
                tensors[key] = tensors[key] * (a / alpha)
    return LoraWeights(tensors, found_rank, alpha, source)


# UNet structure ----------------------------------------------------------------------------------------------
def unet_config(source: Any = None) -> dict[str, Any]:
    """A UNet config: None → the packaged Kolors config; a dict; a config.json; a model folder (diffusers
    layout: unet/config.json; kolora's tiny DiffSynth layout: tiny-configs/unet_config.json)."""
    from kolora.models import packaged_config

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


# format conversions (pure: tensors are only renamed, so they work on meta tensors too) ------------------------
def to_kohya(w: LoraWeights) -> dict[str, Any]:
    import torch

    if w.alpha is None:
        raise LoraFileError("cannot write a kohya file without alpha")
    out: dict[str, Any] = {}
    for m, a, b in w.pairs():
        k = to_kohya_module(m)
        out[f"{k}.lora_down.weight"] = a
        out[f"{k}.lora_up.weight"] = b
        out[f"{k}.alpha"] = torch.tensor(float(w.alpha))
    return out


def from_kohya(sd: dict[str, Any], config: Any = None, where: str = "kohya LoRA",
               rank: int | None = None) -> LoraWeights:
    st = structure(config)
    te = [k for k in sd if k.startswith(("lora_te", "lora_prior_te"))]
    if te:
        raise LoraFileError(f"{where}: has text-encoder LoRA layers (e.g. {te[0]}); Kolors' ChatGLM text encoder "
                            "is not a CLIP, so kolora imports UNet LoRAs only")
    unsupported = [k for k in sd if k.endswith((".dora_scale", ".lora_mid.weight")) or ".hada_" in k or ".lokr_" in k]
    if unsupported:
        raise LoraFileError(f"{where}: {unsupported[0]} is a LyCORIS/DoRA tensor; only plain LoRA is supported")
    if any(p in k for k in sd for p in ("input_blocks", "middle_block", "output_blocks")):
        from types import SimpleNamespace

        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        # kohya's SGM block numbering → diffusers blocks (diffusers' own remapper, given the UNet's layers)
        try:
            sd = _maybe_map_sgm_blocks_to_diffusers(dict(sd), SimpleNamespace(layers_per_block=st.layers_per_block))
        except ValueError as e:
            raise LoraFileError(f"{where}: its SGM block names (input_blocks/...) do not map: {e}") from None
        sgm = {"lora_unet_input_blocks_": "lora_unet_down_blocks_", "lora_unet_middle_block_": "lora_unet_mid_block_",
               "lora_unet_output_blocks_": "lora_unet_up_blocks_"}
        for old, new in sgm.items():
            sd = {new + k.removeprefix(old) if k.startswith(old) else k: v for k, v in sd.items()}
    lookup = {to_kohya_module(n): n for n in st.shapes}
    tensors: dict[str, Any] = {}
    alphas: dict[str, float] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        stem, _, kind = key.partition(".")
        module = lookup.get(stem)
        if module is None:
            unknown.append(key)
            continue
        if kind == "lora_down.weight":
            tensors[f"{module}.lora_A.weight"] = value
        elif kind == "lora_up.weight":
            tensors[f"{module}.lora_B.weight"] = value
        elif kind == "alpha":
            alphas[module] = float(value.item())
        else:
            unknown.append(key)
    if unknown:
        raise LoraFileError(f"{where}: {len(unknown)} keys match no module of this UNet (e.g. {unknown[:3]}); "
                            "is it a LoRA for another model?")
    w = _canonical(tensors, None, "kohya", where, rank=rank)
    # kohya convention: a layer without .alpha has alpha = rank (scale 1), as in diffusers and ComfyUI
    alphas = {m: alphas.get(m, float(w.rank)) for m in w.modules}
    return _canonical(tensors, None, "kohya", where, alphas=alphas)


def to_diffsynth(w: LoraWeights, config: Any = None) -> dict[str, Any]:
    blocks = structure(config).blocks
    out: dict[str, Any] = {}
    for m, a, b in w.pairs():
        d = to_diffsynth_module(m, blocks)
        out[f"{d}.lora_A.default.weight"] = a
        out[f"{d}.lora_B.default.weight"] = b
    return out


def from_diffsynth(sd: dict[str, Any], alpha: float | None, config: Any = None, where: str = "DiffSynth LoRA",
                   rank: int | None = None) -> LoraWeights:
    blocks = structure(config).blocks
    tensors: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        m = re.match(r"^(.*)\.lora_([AB])(?:\.default)?\.weight$", key)
        if not m:
            unknown.append(key)
            continue
        try:
            module = from_diffsynth_module(m.group(1), blocks)
        except LoraFileError:
            unknown.append(key)
            continue
        tensors[f"{module}.lora_{m.group(2)}.weight"] = value
    if unknown:
        raise LoraFileError(f"{where}: {len(unknown)} keys are not DiffSynth Kolors UNet LoRA keys "
                            f"(e.g. {unknown[:3]})")
    return _canonical(tensors, alpha, "diffsynth", where, rank=rank)


def to_diffusers(w: LoraWeights) -> dict[str, Any]:
    """Keys as kolora/diffusers write them (without the 'unet.' prefix save_lora_weights adds)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(dict(w.tensors))


def from_diffusers(sd: dict[str, Any], meta: dict[str, str], where: str = "diffusers LoRA",
                   alpha: float | None = None, rank: int | None = None) -> LoraWeights:
    from diffusers.utils import convert_unet_state_dict_to_peft

    other = [k for k in sd if not k.startswith("unet.")]
    if other and len(other) < len(sd):
        raise LoraFileError(f"{where}: has non-UNet LoRA tensors (e.g. {other[0]}); kolora handles UNet LoRAs only")
    sd = {k.removeprefix("unet."): v for k, v in sd.items()}
    found = rank_alpha_from_metadata(meta)
    if found is not None and alpha is not None and abs(found[1] - alpha) > 1e-9:
        raise LoraFileError(f"{where}: the file says alpha {found[1]:g}; drop --alpha {alpha:g}")
    tensors = convert_unet_state_dict_to_peft(sd)
    tensors = {re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", k): v for k, v in tensors.items()}
    w = _canonical(tensors, found[1] if found else alpha, "peft", where, rank=rank)
    if found is not None and found[0] != w.rank:
        raise LoraFileError(f"{where}: metadata says rank {found[0]}, tensors have rank {w.rank}")
    return w


def check_against_unet(w: LoraWeights, config: Any = None, where: str = "LoRA") -> None:
    """Every layer must be a module of the UNet with fitting shapes (A: r×in, B: out×r)."""
    shapes = structure(config).shapes
    bad: list[str] = []
    for m, a, b in w.pairs():
        s = shapes.get(m)
        if s is None:
            bad.append(f"{m} (no such module)")
        elif len(s) == 2 and (tuple(a.shape) != (w.rank, s[1]) or tuple(b.shape) != (s[0], w.rank)):
            bad.append(f"{m} (A {tuple(a.shape)}, B {tuple(b.shape)} do not fit weight {s})")
    if bad:
        raise LoraFileError(f"{where}: {len(bad)} of {len(w.modules)} layers do not fit this UNet, e.g. "
                            f"{bad[:3]}; is it a LoRA for another model (or a tiny one for the full model)?")


# files -----------------------------------------------------------------------------------------------------
def read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata). safetensors, or a torch file read with weights_only=True (never unpickling code);
    a Lightning checkpoint's 'state_dict' is used when present."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta = read_metadata(path)
        return load_file(str(path)), meta
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors come in many types
        raise LoraFileError(f"{path}: cannot be read as a tensor checkpoint with weights_only=True "
                            f"({e.__class__.__name__}: {str(e)[:200]}); kolora does not unpickle arbitrary "
                            "objects") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraFileError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


def detect_format(keys: list[str] | set[str], meta: dict[str, str] | None = None) -> str:
    """'peft' (diffusers/kolora file or a bare peft state dict), 'kohya' or 'diffsynth'."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith("unet.") for k in keys):
        return "peft"
    if any(".lora_A.default." in k or k.startswith("blocks.") for k in keys):
        return "diffsynth"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora.down.weight")) for k in keys):
        return "peft"
    raise LoraFileError(f"unrecognised LoRA key names (e.g. {keys[:3]}); kolora reads diffusers/peft, kohya "
                        "(lora_unet_...) and DiffSynth (blocks.N....lora_A.default.weight) files")


def sidecar(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def _no_alpha(path: Path) -> LoraFileError:
    return LoraFileError(
        f"{path}: the file carries no alpha (DiffSynth checkpoints and bare peft state dicts do not store it), so "
        f"the LoRA's strength is unknown. Import it with the alpha it was trained with, e.g. `kolora import-lora "
        f"{path} --alpha 4 --to lora/` (the tutorial trains with --lora_alpha 4), then use the folder it writes")


def read_lora(path: Path, config: Any = None, alpha: float | None = None, rank: int | None = None,
              check: bool = True) -> LoraWeights:
    """Any supported file → LoraWeights (checked against the UNet of `config` unless check=False)."""
    path = Path(path)
    sd, meta = read_tensors(path)
    if not sd:
        raise LoraFileError(f"{path}: holds no tensors")
    fmt = detect_format(sd.keys(), meta)
    where = f"{path} ({fmt})"
    if fmt == "kohya":
        w = from_kohya(sd, config, where, rank=rank)
        if alpha is not None and abs(alpha - w.alpha) > 1e-9:
            raise LoraFileError(f"{where}: the file says alpha {w.alpha:g}; drop --alpha {alpha:g}")
    elif fmt == "diffsynth":
        if sidecar(path).is_file():  # kolora's note beside its own export: the trained alpha
            noted = float(json.loads(sidecar(path).read_text())["alpha"])
            if alpha is not None and abs(alpha - noted) > 1e-9:
                raise LoraFileError(f"{where}: {sidecar(path).name} says it was trained with alpha {noted:g}; drop "
                                    f"--alpha {alpha:g} (use render.lora_scale to weaken a LoRA)")
            alpha = noted
        w = from_diffsynth(sd, alpha, config, where, rank=rank)
    else:
        w = from_diffusers(sd, meta, where, alpha=alpha, rank=rank)
    if w.alpha is None:
        raise _no_alpha(path)
    w.metadata = meta
    if check:
        check_against_unet(w, config, where)
    return w


def rank_alpha(path: Path) -> tuple[int, float]:
    """(rank, alpha) for any supported file, without needing the UNet."""
    path = Path(path)
    sd, meta = read_tensors(path)
    fmt = detect_format(sd.keys(), meta) if sd else "peft"
    if fmt == "kohya":
        downs = [v for k, v in sd.items() if k.endswith(".lora_down.weight")]
        if not downs:
            raise LoraFileError(f"{path}: no lora_down tensors")
        r = int(downs[0].shape[0])
        alphas = [float(v.item()) for k, v in sd.items() if k.endswith(".alpha")]
        return r, Counter(alphas).most_common(1)[0][0] if alphas else float(r)
    found = rank_alpha_from_metadata(meta)
    if found is None and fmt == "diffsynth" and sidecar(path).is_file():
        info = json.loads(sidecar(path).read_text())
        found = int(info["rank"]), float(info["alpha"])
    if found is None:
        raise _no_alpha(path)
    return found


def write_kolora(w: LoraWeights, path: Path, extra_metadata: dict[str, str] | None = None) -> Path:
    from kolora import lora

    if w.alpha is None:
        raise LoraFileError("cannot write a kolora LoRA without alpha")
    return lora.save_layers(to_diffusers(w), path, w.rank, w.alpha, w.target_modules(), extra_metadata)


def write_kohya(w: LoraWeights, path: Path, extra_metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_kohya(w).items()}
    # sd-scripts' ss_* keys: what WebUI/ComfyUI front ends show; kolora.* for kolora itself
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(w.rank), "ss_network_alpha": repr(float(w.alpha)),
            "kolora.format": "kohya", "kolora.rank": str(w.rank), "kolora.alpha": repr(float(w.alpha)),
            "kolora.base_model": "Kwai-Kolors/Kolors", **(extra_metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def diffsynth_usage(path: Path, rank: int, alpha: float) -> str:
    return (f"load_lora(pipe.unet, lora_rank={rank}, lora_alpha={alpha:g}, lora_path={str(path)!r})  "
            f"# DiffSynth tutorial; or model_manager.load_lora({str(path)!r}, lora_alpha={alpha / rank:g})")


def write_diffsynth(w: LoraWeights, path: Path, config: Any = None) -> Path:
    import torch

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_diffsynth(w, config).items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"kolora.format": "diffsynth", "kolora.rank": str(w.rank),
                                                   "kolora.alpha": repr(float(w.alpha))})
        else:
            torch.save(tensors, str(tmp))
    atomic_write_json(sidecar(path), {
        "format": "diffsynth", "rank": w.rank, "alpha": w.alpha, "layers": len(w.modules),
        "convention": "raw lora_A/lora_B (B not scaled); effective update W + (alpha/rank)·B·A",
        "load": diffsynth_usage(path, w.rank, w.alpha)})
    return path


def write_lora(w: LoraWeights, path: Path, fmt: str, config: Any = None,
               extra_metadata: dict[str, str] | None = None) -> Path:
    if fmt == "peft":
        return write_kolora(w, path, extra_metadata)
    if fmt == "kohya":
        return write_kohya(w, path, extra_metadata)
    if fmt == "diffsynth":
        return write_diffsynth(w, path, config)
    raise ValueError(f"unknown LoRA format {fmt!r} (choose from {', '.join(FORMATS)})")


@contextlib.contextmanager
def loadable(path: Path, config: Any = None) -> Iterator[Path]:
    """Yield a file KolorsPipeline.load_lora_weights reads with the right alpha: `path` itself when it is a
    diffusers/kolora file with alpha metadata, else a converted kolora file in a temp folder."""
    import tempfile

    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys, meta = list(f.keys()), dict(f.metadata() or {})
        if keys and detect_format(keys, meta) == "peft" and rank_alpha_from_metadata(meta) is not None:
            yield path
            return
    w = read_lora(path, config)
    with tempfile.TemporaryDirectory(prefix="kolora-lora-") as tmp:
        yield write_kolora(w, Path(tmp) / WEIGHT_NAME, {"kolora.imported_from": path.name,
                                                         "kolora.source_format": w.source_format})


# commands ---------------------------------------------------------------------------------------------------
def default_export_path(run_root: Path, fmt: str) -> Path:
    name = Path(run_root).name
    return {"peft": Path(run_root) / "lora" / "peft" / WEIGHT_NAME,
            "kohya": Path(run_root) / "lora" / "kohya" / f"{name}.safetensors",
            "diffsynth": Path(run_root) / "lora" / "diffsynth" / f"{name}.ckpt"}[fmt]


def output_path(to: Path | None, default: Path, fmt: str) -> Path:
    if to is None:
        return default
    to = Path(to)
    if to.is_dir() or str(to).endswith("/") or not to.suffix:
        return to / default.name
    ok = (".safetensors",) if fmt in ("peft", "kohya") else (".safetensors", *TORCH_SUFFIXES)
    if to.suffix not in ok:
        raise LoraFileError(f"--to {to}: a {fmt} LoRA file ends in {' or '.join(ok)}")
    return to


def export_lora(source: Path, fmt: str, to: Path, config: Any = None) -> Path:
    """Convert a kolora LoRA file to `fmt` at `to` (a file path)."""
    import shutil

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    w = read_lora(source, config)
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "peft" and w.source_format == "peft" and rank_alpha_from_metadata(w.metadata) is not None:
        with atomic_path(to) as tmp:  # kolora's file is the diffusers file: copy it bit for bit
            shutil.copyfile(source, tmp)
        return to
    return write_lora(w, to, fmt, config, {"kolora.exported_from": Path(source).name})


def import_lora(source: Path, to: Path, alpha: float | None = None, rank: int | None = None,
                config: Any = None) -> Path:
    """Any supported LoRA file → a kolora file (diffusers format, rank/alpha in metadata) usable as render.lora."""
    w = read_lora(source, config, alpha=alpha, rank=rank)
    to = output_path(to, Path(WEIGHT_NAME), "peft")
    return write_kolora(w, to, {"kolora.imported_from": Path(source).name, "kolora.source_format": w.source_format})
