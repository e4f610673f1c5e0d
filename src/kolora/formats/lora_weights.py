"""LoRA formats in memory: the canonical form (`LoraWeights`: peft names on diffusers module paths, one rank, one
alpha) and the pure conversions to and from kohya, DiffSynth and diffusers key names (tensors are only renamed,
so they work on meta tensors too). See kolora.formats.interchange for the formats and the files."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from kolora.formats.lora import LoraFileError, check_rank_alpha, rank_alpha_from_metadata
from kolora.formats.unet_modules import from_diffsynth_module, structure, to_diffsynth_module, to_kohya_module

# diffusers, torch: imported in the functions that use them (a login node's CLI starts without them)


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
    bad = sorted(m for m, a in (alphas or {}).items() if not a > 0)
    if bad:
        raise LoraFileError(f"{where}: {len(bad)} layers have alpha <= 0 (e.g. {bad[0]}: {alphas[bad[0]]:g}); a "
                            "LoRA's alpha must be > 0")
    if alphas:
        common = Counter(alphas.values()).most_common(1)[0][0]
        alpha = common if alpha is None else alpha
        for m, a in alphas.items():
            if a != alpha:  # keep W + (a/r)·B·A exact under one alpha
                key = f"{m}.lora_B.weight"
                tensors[key] = tensors[key] * (a / alpha)
    if alpha is not None:
        check_rank_alpha(found_rank, alpha, where)
    return LoraWeights(tensors, found_rank, alpha, source)


def scalar_alpha(value: Any, key: str, where: str) -> float:
    """A kohya `.alpha` tensor as a number; LoraFileError when it is not one value."""
    if value.numel() != 1:
        raise LoraFileError(f"{where}: {key} holds {value.numel()} values; a kohya alpha is one number")
    return float(value.item())


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


def lycoris_refusal(sd: dict[str, Any], where: str) -> None:
    """LoraFileError naming the adapter type when a kohya file holds LyCORIS LoHa/LoKr layers (kolora reads those
    only from its own file or a peft adapter folder, where their config travels)."""
    kind = next((name for part, name in ((".hada_", "LoHa"), (".lokr_", "LoKr")) if any(part in k for k in sd)), None)
    if kind is not None:
        raise LoraFileError(f"{where}: a LyCORIS {kind} file in kohya's layout; kolora reads LoHa/LoKr adapters from "
                            "its own file (lora/pytorch_lora_weights.safetensors of a run trained with train.adapter) "
                            "or from a peft adapter folder (`kolora export RUN --format peft`), not from kohya files")


def from_kohya(sd: dict[str, Any], config: Any = None, where: str = "kohya LoRA",
               rank: int | None = None) -> LoraWeights:
    st = structure(config)
    te = [k for k in sd if k.startswith(("lora_te", "lora_prior_te"))]
    if te:
        raise LoraFileError(f"{where}: has text-encoder LoRA layers (e.g. {te[0]}); Kolors' ChatGLM text encoder "
                            "is not a CLIP, so kolora imports UNet LoRAs only")
    lycoris_refusal(sd, where)
    unsupported = [k for k in sd if k.endswith((".dora_scale", ".lora_mid.weight"))]
    if unsupported:
        raise LoraFileError(f"{where}: {unsupported[0]} is a LyCORIS/DoRA tensor; only plain LoRA is supported")
    if any(p in k for k in sd for p in ("input_blocks", "middle_block", "output_blocks")):

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
            alphas[module] = scalar_alpha(value, key, where)
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
    found = rank_alpha_from_metadata(meta, where)
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
