"""`kolora check models DIR`: a Kolors model folder verified offline, in either layout (also the folder
`kolora fetch models --to` fills): every file the layout needs is present and intact as far as its header tells
(kolora.core.files), and the report ends with the `model:` config lines that load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kolora.core.errors import InputError
from kolora.core.files import FileChecker, Report


def _variant(unet: Path) -> str | None:
    """'fp16' when a diffusers folder has only *.fp16.* weights (Kolors-diffusers ships those)."""
    plain = list(unet.glob("diffusion_pytorch_model.safetensors")) + list(unet.glob("diffusion_pytorch_model.bin"))
    fp16 = list(unet.glob("diffusion_pytorch_model.fp16.*"))
    return "fp16" if fp16 and not plain else None


def _check_diffusers(c: FileChecker, root: Path) -> dict[str, Any]:
    if c.file(root / "model_index.json", "diffusers pipeline index"):
        index = json.loads((root / "model_index.json").read_text())
        for name, spec in index.items():
            if not name.startswith("_") and isinstance(spec, list) and spec and spec[0] is not None \
                    and not (root / name).is_dir():
                c.r.problems.append(f"missing: {c.rel(root / name)}/ (listed in model_index.json)")
    for comp in ("unet", "vae"):
        c.file(root / comp / "config.json")
        c.weights(root / comp, ("diffusion_pytorch_model",))
    c.file(root / "text_encoder" / "config.json")
    c.weights(root / "text_encoder", ("model", "pytorch_model"))
    c.file(root / "tokenizer" / "tokenizer.model", "ChatGLM sentencepiece model")
    c.file(root / "scheduler" / "scheduler_config.json")
    model: dict[str, Any] = {"layout": "diffusers", "path": str(root)}
    if _variant(root / "unet"):
        model["variant"] = "fp16"
    return model


def _check_vae(c: FileChecker, folder: Path, model: dict[str, Any]) -> None:
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not folder.is_dir():
        c.r.warnings.append(f"{c.rel(folder)}/ not found: the fp16-fix SDXL VAE is needed for fp16 training "
                            f"(`kolora fetch models` downloads it), or set model.vae_path")
        return
    if c.file(weights, "fp16-fix SDXL VAE"):
        model["vae_path"] = str(folder if (folder / "config.json").is_file() else weights)
    if (folder / "config.json").exists():
        c.file(folder / "config.json")


def _check_diffsynth(c: FileChecker, models_dir: Path, kolors: Path) -> dict[str, Any]:
    c.file(kolors / "unet" / "diffusion_pytorch_model.safetensors", "Kolors UNet")
    c.file(kolors / "vae" / "diffusion_pytorch_model.safetensors", "Kolors VAE")
    c.file(kolors / "text_encoder" / "config.json", "ChatGLM3 config")
    c.weights(kolors / "text_encoder", ("pytorch_model", "model"))
    model: dict[str, Any] = {"layout": "diffsynth", "path": str(models_dir)}
    tiny = models_dir / "tiny-configs"
    toks = [kolors / "tokenizer" / "tokenizer.model", kolors / "text_encoder" / "tokenizer.model"]
    if any(t.is_file() for t in toks):
        c.file(next(t for t in toks if t.is_file()), "ChatGLM tokenizer")
    elif (tiny / "tokenizer" / "tokenizer.model").is_file():
        c.file(tiny / "tokenizer" / "tokenizer.model", "tiny tokenizer")
    else:
        c.r.warnings.append(f"no tokenizer.model in {c.rel(kolors)}/text_encoder or /tokenizer: set "
                            "model.tokenizer_path (Kolors-diffusers' tokenizer/ or DiffSynth's "
                            "diffsynth/tokenizer_configs/kolors/tokenizer)")
    if tiny.is_dir():  # kolora's tiny DiffSynth layout keeps the configs DiffSynth's folders lack
        for name, key in (("unet_config.json", "unet_config"), ("vae_config.json", "vae_config")):
            if c.file(tiny / name):
                model[key] = str(tiny / name)
        if (tiny / "tokenizer" / "tokenizer.model").is_file():
            model["tokenizer_path"] = str(tiny / "tokenizer")
    _check_vae(c, models_dir / "sdxl-vae-fp16-fix", model)
    return model


def detect_layout(path: Path) -> tuple[str, Path, Path | None]:
    """(layout, model root, diffsynth kolors folder or None) for a folder `check models` is pointed at."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return "diffusers", path, None
    if (path / "Kolors-diffusers").is_dir():
        return "diffusers", path / "Kolors-diffusers", None
    for models_dir in (path, path / "models"):
        if (models_dir / "kolors" / "Kolors").is_dir():
            return "diffsynth", models_dir, models_dir / "kolors" / "Kolors"
    if (path / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not (path / "unet" / "config.json").is_file():
        return "diffsynth", path, path
    if (path / "unet" / "config.json").is_file():
        return "diffusers", path, None
    raise InputError(f"{path}: no Kolors model found: expected model_index.json or Kolors-diffusers/ (diffusers "
                     "layout, Kwai-Kolors/Kolors-diffusers) or kolors/Kolors/ (DiffSynth's models/ folder)")


def check_models(path: Path, layout: str | None = None) -> Report:
    """Verify a Kolors model folder offline (both layouts; also the folder `kolora fetch models --to` fills)."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise InputError(f"{path} does not exist or is not a folder")
    found, root, kolors = detect_layout(path)
    if layout and layout != found:
        raise InputError(f"{path} looks like the {found} layout, not {layout}")
    report = Report(root=path, kind=f"Kolors, {found} layout")
    c = FileChecker(report)
    if found == "diffusers":
        model = _check_diffusers(c, root)
        vae = path / "sdxl-vae-fp16-fix" if root != path else None
        if vae is not None:
            _check_vae(c, vae, model)
    else:
        model = _check_diffsynth(c, root, kolors)
    report.config["model"] = model
    return report
