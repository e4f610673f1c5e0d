"""kolora adapters that only peft reads: LoHa / LoKr files (train.adapter), which diffusers' LoRA loader cannot load,
and the per-layer view of any kolora file (rank and alpha of each layer, train.block_ranks / block_alphas).

Loading is peft's own: the config from the file's metadata (kolora.formats.lora.adapter_config), injected with
`unet.add_adapter`, the tensors set with `set_peft_model_state_dict`. Exports:

``kohya``  LyCORIS' layout as ComfyUI (comfy/lora.py, comfy/weight_adapter/loha.py, lokr.py) and A1111 load it:
    ``lora_unet_<diffusers module, '.'→'_'>`` (kolora.formats.unet_modules.to_kohya_module, as for a LoRA) +
    ``.hada_w1_a``/``.hada_w1_b``/``.hada_w2_a``/``.hada_w2_b`` (LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r) or
    ``.lokr_w1``/``.lokr_w2`` and their ``_a``/``_b`` factors where peft decomposed them (LoKr: ΔW = w1 ⊗ w2 ·
    scale), and each layer's own ``.alpha``. Those loaders apply alpha/r to a LoKr layer only when one of its
    factors is decomposed (scale 1 otherwise, LyCORIS' convention: such a layer's alpha is its rank), while peft
    always scales by alpha/r: for a layer with full factors, alpha/r is folded into lokr_w1 and alpha = r is written.

``peft``  peft's own adapter folder, as ``PeftModel.save_pretrained`` writes it: ``adapter_config.json`` +
    ``adapter_model.safetensors`` (keys ``base_model.model.<module>.hada_w1_a`` ...), which
    ``PeftModel.from_pretrained(unet, FOLDER)`` loads (for ``inject_adapter_in_model`` + ``set_peft_model_state_dict``
    drop the ``base_model.model.`` prefix); kolora's render.lora reads the folder too.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.core.rundir import atomic_path, atomic_write_json
from kolora.formats.lora import (
    ADAPTER_NAMES,
    LoraFileError,
    adapter_config,
    adapter_kind,
    canonicalize_header,
    check_weights,
    config_metadata,
    peft_state_dict,
    read_metadata,
)
from kolora.formats.unet_modules import to_kohya_module

# peft, safetensors, torch: imported in the functions that use them (a login node's CLI starts without them)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix in adapter_model.safetensors
KINDS = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}
# the tensors of one layer, by adapter (peft's names, which LyCORIS and ComfyUI share for LoHa/LoKr)
PARTS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
         "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
         "lora": ("lora_A.weight", "lora_B.weight")}


@dataclass
class PeftAdapter:
    """An adapter as peft holds it: its config and its tensors under peft's names (no adapter name, no prefix)."""

    config: Any  # LoraConfig, LoHaConfig or LoKrConfig
    tensors: dict[str, Any]
    where: str

    @property
    def kind(self) -> str:
        return KINDS.get(str(getattr(self.config.peft_type, "value", self.config.peft_type)), "lora")

    @property
    def name(self) -> str:
        return ADAPTER_NAMES.get(self.kind, self.kind)

    @property
    def modules(self) -> list[str]:
        parts = PARTS.get(self.kind, ())
        return sorted({k.rsplit("." + p, 1)[0] for k in self.tensors for p in parts if k.endswith("." + p)})

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """The layer's own rank and alpha: peft's rank_pattern / alpha_pattern over the config's r and alpha."""
        from peft.utils.other import get_pattern_key

        c = self.config
        alpha = c.lora_alpha if self.kind == "lora" else c.alpha
        r_key = get_pattern_key(list(c.rank_pattern or {}), module)
        a_key = get_pattern_key(list(c.alpha_pattern or {}), module)
        return int((c.rank_pattern or {}).get(r_key, c.r)), float((c.alpha_pattern or {}).get(a_key, alpha))


def is_peft_folder_file(path: Path) -> bool:
    path = Path(path)
    return path.name == PEFT_WEIGHTS_NAME and (path.parent / PEFT_CONFIG_NAME).is_file()


def per_layer(meta: dict[str, str]) -> bool:
    """Whether a kolora/diffusers file's layers differ from one rank and one alpha, or are not LoRA (read from
    its metadata, without peft)."""
    if adapter_kind(meta) != "lora":
        return True
    try:
        found = json.loads(meta.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return False
    return bool(found.get("unet.rank_pattern") or found.get("unet.alpha_pattern"))


def needs_peft(path: Path) -> bool:
    """A file only peft loads: a kolora LoHa/LoKr file (its peft config in its metadata), or a peft adapter
    folder's weights."""
    path = Path(path)
    if is_peft_folder_file(path):
        return True
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    meta = read_metadata(path)
    return "lora_adapter_metadata" in meta and adapter_kind(meta) != "lora"


def read_adapter(path: Path) -> PeftAdapter:
    """A kolora file (any adapter) or a peft adapter folder's weights, with its peft config; tensors checked."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    path = Path(path)
    if is_peft_folder_file(path):
        try:
            config = PeftConfig.from_pretrained(str(path.parent))
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise LoraFileError(f"{path.parent / PEFT_CONFIG_NAME}: not a peft adapter config ({e})") from None
        tensors = load_file(str(path))
        check_weights(tensors, path)
        return PeftAdapter(config, {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}, str(path))
    config = adapter_config(read_metadata(path), path)
    if config is None:
        raise LoraFileError(f"{path}: carries no adapter config in its metadata (lora_adapter_metadata); kolora "
                            "writes one into every file it trains or imports")
    return PeftAdapter(config, peft_state_dict(path), str(path))


def inject(unet, adapter: PeftAdapter, adapter_name: str = "default") -> None:
    """Put the adapter on the UNet through peft (the config's own ranks, alphas and layers), its tensors loaded."""
    from peft import set_peft_model_state_dict

    unet.add_adapter(copy.deepcopy(adapter.config), adapter_name=adapter_name)
    try:
        res = set_peft_model_state_dict(unet, adapter.tensors, adapter_name=adapter_name)
    except RuntimeError as e:  # torch's size mismatch
        raise LoraFileError(f"{adapter.where}: its {adapter.name} tensors do not fit this UNet "
                            f"({str(e).strip().splitlines()[-1][:300]}); is it an adapter for another model?") from None
    parts = PARTS.get(adapter.kind, ())
    missing = [k for k in res.missing_keys if any(f".{p}" in k for p in parts) and adapter_name in k]
    if res.unexpected_keys or missing:
        raise LoraFileError(f"{adapter.where}: its {adapter.name} tensors do not match the layers its config names "
                            f"(unexpected {res.unexpected_keys[:3]}, missing {missing[:3]}); the file is damaged")


# exports ------------------------------------------------------------------------------------------------------
def to_kohya(adapter: PeftAdapter) -> dict[str, Any]:
    """kohya/LyCORIS keys (see the module's doc), each layer with its own alpha; effective ΔW unchanged."""
    import torch

    out: dict[str, Any] = {}
    for m in adapter.modules:
        r, alpha = adapter.rank_alpha(m)
        k = to_kohya_module(m)
        have = {p: adapter.tensors[f"{m}.{p}"] for p in PARTS[adapter.kind] if f"{m}.{p}" in adapter.tensors}
        if adapter.kind == "lora":
            out[f"{k}.lora_down.weight"], out[f"{k}.lora_up.weight"] = have["lora_A.weight"], have["lora_B.weight"]
        elif adapter.kind == "lokr" and not any(p.endswith(("_a", "_b")) for p in have):
            have["lokr_w1"] = have["lokr_w1"] * (alpha / r)  # the loaders' scale 1 for full factors
            alpha = float(r)
            out.update({f"{k}.{p}": v for p, v in have.items()})
        else:
            out.update({f"{k}.{p}": v for p, v in have.items()})
        out[f"{k}.alpha"] = torch.tensor(alpha)
    return out


def write_kohya(adapter: PeftAdapter, path: Path, extra_metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    c = adapter.config
    alpha = c.lora_alpha if adapter.kind == "lora" else c.alpha
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_kohya(adapter).items()}
    algo = {"algo": adapter.kind, **({"factor": c.decompose_factor} if adapter.kind == "lokr" else {})}
    # sd-scripts' ss_* keys (LyCORIS' network module for LoHa/LoKr): what WebUI/ComfyUI front ends show
    meta = {"ss_network_module": "networks.lora" if adapter.kind == "lora" else "lycoris.kohya",
            "ss_network_dim": str(c.r), "ss_network_alpha": repr(float(alpha)),
            **({} if adapter.kind == "lora" else {"ss_network_args": json.dumps(algo)}),
            "kolora.format": "kohya", "kolora.rank": str(c.r), "kolora.alpha": repr(float(alpha)),
            "kolora.base_model": "Kwai-Kolors/Kolors",
            **({} if adapter.kind == "lora" else {"kolora.adapter": adapter.kind}), **(extra_metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def write_peft_folder(adapter: PeftAdapter, folder: Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """peft's adapter folder (PeftModel.save_pretrained's layout) in `folder`; the weights file's path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    c = adapter.config
    alpha = c.lora_alpha if adapter.kind == "lora" else c.alpha
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors.items()}
    # kolora's keys beside peft's "format": rank/alpha for preflight and `kolora export`'s hint
    meta = {"format": "pt", "kolora.format": "peft", "kolora.adapter": adapter.kind, "kolora.rank": str(c.r),
            "kolora.alpha": repr(float(alpha)), **(extra_metadata or {})}
    out = folder / PEFT_WEIGHTS_NAME
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        canonicalize_header(tmp)
    atomic_write_json(folder / PEFT_CONFIG_NAME, config_metadata(c))
    return out
