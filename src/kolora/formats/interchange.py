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

LoHa / LoKr adapters (train.adapter) and LoRAs with per-block ranks or alphas (train.block_ranks / block_alphas)
export through kolora.formats.peft_adapter: ``kohya`` in LyCORIS' layout with each layer's own alpha, ``peft`` as
peft's own adapter folder for LoHa/LoKr (diffusers' LoRA loader cannot read them; a LoRA's file is copied);
``diffsynth`` refuses them (DiffSynth's ``load_lora`` takes one LoRA rank and alpha).

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

Whatever names a LoRA (render.lora, preflight, the CLI) reads it here, in any of these formats: `rank_alpha`,
`read_tensors`, `load_into_pipeline`. kolora's own file (writing it, its metadata) is kolora.formats.lora.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kolora.core.errors import read_text
from kolora.core.rundir import atomic_path, atomic_write_json
from kolora.formats.lora import (
    ADAPTER_NAMES,
    WEIGHT_NAME,
    LoraFileError,
    adapter_kind,
    check_rank_alpha,
    check_weights,
    rank_alpha_from_metadata,
    read_metadata,
    resolve_file,
    save_layers,
)
from kolora.formats.lora_weights import (
    LoraWeights,
    check_against_unet,
    detect_format,
    from_diffsynth,
    from_diffusers,
    from_kohya,
    lycoris_refusal,
    scalar_alpha,
    to_diffsynth,
    to_diffusers,
    to_kohya,
)
from kolora.formats.peft_adapter import (
    PEFT_CONFIG_NAME,
    inject,
    is_peft_folder_file,
    needs_peft,
    per_layer,
    read_adapter,
    write_peft_folder,
)
from kolora.formats.peft_adapter import write_kohya as write_adapter_kohya
from kolora.formats.unet_modules import structure

# safetensors, torch: imported in the functions that use them (a login node's CLI starts without them)

FORMATS = ("peft", "kohya", "diffsynth")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SIDECAR_SUFFIX = ".kolora.json"


# files -----------------------------------------------------------------------------------------------------
def read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata), the tensors checked (lora.check_weights: finite, of a LoRA's magnitude). safetensors,
    or a torch file read with weights_only=True (never unpickling code); a Lightning checkpoint's 'state_dict' is
    used when present."""
    path = Path(path)
    tensors, meta = _read_tensors(path)
    check_weights(tensors, path)
    return tensors, meta


def _read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    import torch

    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta = read_metadata(path)
        return load_file(str(path)), meta
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # a torch checkpoint is a zip (or an old pickle)
        raise LoraFileError(f"{path}: not a LoRA file (neither safetensors nor a torch checkpoint); kolora reads "
                            "diffusers/peft and kohya .safetensors files and DiffSynth .ckpt/.pt/.bin checkpoints")
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
    fmt = "peft folder" if is_peft_folder_file(path) else detect_format(sd.keys(), meta)
    if fmt == "peft folder" or (fmt == "peft" and per_layer(meta)):
        raise _per_layer(path, meta)
    where = f"{path} ({fmt})"
    if fmt == "kohya":
        w = from_kohya(sd, config, where, rank=rank)
        if alpha is not None and abs(alpha - w.alpha) > 1e-9:
            raise LoraFileError(f"{where}: the file says alpha {w.alpha:g}; drop --alpha {alpha:g}")
    elif fmt == "diffsynth":
        if sidecar(path).is_file():  # kolora's note beside its own export: the trained alpha
            noted = _sidecar_rank_alpha(path)[1]
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


def _per_layer(path: Path, meta: dict[str, str]) -> LoraFileError:
    kind = adapter_kind(meta)
    what = (f"a {ADAPTER_NAMES.get(kind, kind)} adapter (train.adapter: {kind})" if kind != "lora" else
            "a peft adapter folder's weights" if is_peft_folder_file(path) else
            "a LoRA whose layers have their own ranks/alphas (train.block_ranks / block_alphas)")
    return LoraFileError(f"{path}: {what}; kolora's one-rank LoRA conversions (import-lora, export --format "
                         "diffsynth) cannot carry it. Use the file as it is (render.lora), or `kolora export RUN "
                         "--format kohya` (LyCORIS layout: ComfyUI, A1111) or `--format peft`")


def rank_alpha(path: Path) -> tuple[int, float]:
    """(rank, alpha) of a LoRA file in any format kolora reads, without needing the UNet: a kolora/diffusers file's
    from its metadata (the header only), any other's from its tensors (read and checked). LoraFileError naming
    `kolora import-lora ... --alpha` for files that carry no alpha (DiffSynth)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        found = rank_alpha_from_metadata(read_metadata(path), path)
        if found is not None:
            return found
    if is_peft_folder_file(path):  # another tool's peft adapter folder: its adapter_config.json
        note = path.parent / PEFT_CONFIG_NAME
        try:
            c = json.loads(read_text(note))
            return check_rank_alpha(int(c["r"]), float(c.get("lora_alpha", c.get("alpha"))), note)
        except (ValueError, KeyError, TypeError) as e:
            raise LoraFileError(f"{note}: not a peft adapter config with r and alpha ({e})") from None
    sd, meta = read_tensors(path)
    fmt = detect_format(sd.keys(), meta) if sd else "peft"
    if fmt == "kohya":
        downs = [v for k, v in sd.items() if k.endswith(".lora_down.weight")]
        if not downs:
            lycoris_refusal(sd, str(path))
            raise LoraFileError(f"{path}: no lora_down tensors")
        r = int(downs[0].shape[0])
        alphas = [scalar_alpha(v, k, str(path)) for k, v in sd.items() if k.endswith(".alpha")]
        if any(not a > 0 for a in alphas):
            raise LoraFileError(f"{path}: has layers with alpha <= 0 ({min(alphas):g}); a LoRA's alpha must be > 0")
        return check_rank_alpha(r, Counter(alphas).most_common(1)[0][0] if alphas else float(r), path)
    found = rank_alpha_from_metadata(meta, path)
    if found is None and fmt == "diffsynth" and sidecar(path).is_file():
        found = _sidecar_rank_alpha(path)
    if found is None:
        raise _no_alpha(path)
    return found


def _sidecar_rank_alpha(path: Path) -> tuple[int, float]:
    note = sidecar(path)
    try:
        info = json.loads(read_text(note))
        found = int(info["rank"]), float(info["alpha"])
    except (ValueError, KeyError, TypeError) as e:  # InputError (not UTF-8) is a ValueError too
        raise LoraFileError(f"{note}: not a kolora note with rank and alpha ({e})") from None
    return check_rank_alpha(*found, note)


def write_kolora(w: LoraWeights, path: Path, extra_metadata: dict[str, str] | None = None) -> Path:
    if w.alpha is None:
        raise LoraFileError("cannot write a kolora LoRA without alpha")
    return save_layers(to_diffusers(w), path, w.rank, w.alpha, w.target_modules(), extra_metadata)


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
            with open(tmp, "wb") as f:  # a full disk as its OSError (see checkpoint.AtomicCheckpointIO)
                torch.save(tensors, f)
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

    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        tensors, meta = read_tensors(path)  # read whole, not only its header: its weights are checked too
        if tensors and detect_format(tensors.keys(), meta) == "peft" and rank_alpha_from_metadata(meta, path):
            yield path
            return
    w = read_lora(path, config)
    with tempfile.TemporaryDirectory(prefix="kolora-lora-") as tmp:
        yield write_kolora(w, Path(tmp) / WEIGHT_NAME, {"kolora.imported_from": path.name,
                                                         "kolora.source_format": w.source_format})


def check_modules(modules: list[str], config: Any, where: str) -> None:
    """Every adapter layer is a module of the UNet of `config`; LoraFileError naming a few that are not."""
    shapes = structure(config).shapes
    bad = [m for m in modules if m not in shapes]
    if bad:
        raise LoraFileError(f"{where}: {len(bad)} of its {len(modules)} layers are no module of this UNet (e.g. "
                            f"{bad[:3]}); is it an adapter for another model?")


def load_into_pipeline(pipe, path: Path, scale: float = 1.0, adapter_name: str = "kolora") -> None:
    """Load a LoRA (a file, or a folder: lora.resolve_file) into a KolorsPipeline; alpha/rank comes from the file.
    Files in another format (kohya/ComfyUI, DiffSynth with kolora's sidecar) are converted to kolora's diffusers
    file first. LoHa/LoKr files (and peft adapter folders) load through peft with the config they carry."""
    path = resolve_file(path)
    if needs_peft(path):  # LoHa/LoKr: diffusers' LoRA loader cannot read them; peft can, with the file's config
        adapter = read_adapter(path)
        check_modules(adapter.modules, dict(pipe.unet.config), adapter.where)
        inject(pipe.unet, adapter, adapter_name)
        pipe.set_adapters([adapter_name], adapter_weights=[scale])  # peft's scaling: scale · alpha / r per layer
        return
    with loadable(path, config=dict(pipe.unet.config)) as converted:
        rank_alpha(converted)  # fail early with a clear message if the file has no alpha
        pipe.load_lora_weights(str(converted), adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], adapter_weights=[scale])


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


def is_dora(path: Path) -> bool:
    """A LoRA file with DoRA's magnitude vectors (read from the safetensors header only)."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        return False
    with safe_open(str(path), framework="pt") as f:
        return any("lora_magnitude_vector" in k for k in f.keys())


def export_lora(source: Path, fmt: str, to: Path, config: Any = None) -> Path:
    """Convert a kolora LoRA file to `fmt` at `to` (a file path)."""

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    to = Path(to)
    if is_dora(source):
        if fmt != "peft":
            raise LoraFileError(
                f"{source}: a DoRA LoRA (train.dora): its per-channel magnitude vectors have no place in the {fmt} "
                "format, so it cannot be exported as one; export it as peft (diffusers' load_lora_weights and "
                "kolora's render.lora load it), or train without train.dora for kohya/ComfyUI or DiffSynth")
        read_tensors(source)  # its weights checked before a copy is made
        with atomic_path(to) as tmp:  # kolora's file is the diffusers/peft file
            shutil.copyfile(source, tmp)
        return to
    if Path(source).suffix == ".safetensors" and (needs_peft(source) or per_layer(read_metadata(source))):
        return export_adapter(source, fmt, to, config)
    w = read_lora(source, config)
    if fmt == "peft" and w.source_format == "peft" and rank_alpha_from_metadata(w.metadata, source) is not None:
        with atomic_path(to) as tmp:  # kolora's file is the diffusers file: copy it bit for bit
            shutil.copyfile(source, tmp)
        return to
    return write_lora(w, to, fmt, config, {"kolora.exported_from": Path(source).name})


def export_adapter(source: Path, fmt: str, to: Path, config: Any = None) -> Path:
    """A LoHa/LoKr file, or a LoRA with per-layer ranks/alphas, in `fmt` (kolora.formats.peft_adapter); `to` is
    the weights file, or for a LoHa/LoKr peft export the folder's (PeftModel's fixed file names)."""
    adapter = read_adapter(source)
    check_modules(adapter.modules, config, adapter.where)
    note = {"kolora.exported_from": Path(source).name}
    if fmt == "kohya":
        return write_adapter_kohya(adapter, to, note)
    if fmt == "peft" and adapter.kind == "lora":  # diffusers reads the per-layer ranks from the file's config
        with atomic_path(to) as tmp:
            shutil.copyfile(source, tmp)
        return to
    if fmt == "peft":
        return write_peft_folder(adapter, to.parent if to.suffix else to, note)
    raise _per_layer(Path(source), read_metadata(source))


def import_lora(source: Path, to: Path, alpha: float | None = None, rank: int | None = None,
                config: Any = None) -> Path:
    """Any supported LoRA file → a kolora file (diffusers format, rank/alpha in metadata) usable as render.lora."""
    w = read_lora(source, config, alpha=alpha, rank=rank)
    to = output_path(to, Path(WEIGHT_NAME), "peft")
    return write_kolora(w, to, {"kolora.imported_from": Path(source).name, "kolora.source_format": w.source_format})
