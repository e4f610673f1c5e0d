"""LoRA interchange: peft/diffusers, kohya (ComfyUI/WebUI) and DiffSynth files, on the tiny UNet numerically and
on the full-size Kolors UNet's key names (built on the meta device, nothing allocated)."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import unet_inputs

from kolora.core.config import ModelConfig
from kolora.formats import interchange as ix
from kolora.formats import lora, lora_weights, unet_modules
from kolora.formats.lora import LoraFileError
from kolora.models import kolors as models

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, ALPHA = 4, 8.0  # alpha != rank, so a lost or doubled alpha shows in the output



def _out(unet):
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


@pytest.fixture(scope="module")
def files(tiny_diffusers):
    return models.resolve(ModelConfig(path=tiny_diffusers))


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """A kolora LoRA on the tiny UNet with non-zero B, and the UNet output with it applied (the reference)."""
    unet = models.load_unet(files)
    torch.manual_seed(3)
    lora.add_lora(unet, RANK, ALPHA, TARGETS)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    path = lora.save_lora(unet, tmp_path_factory.mktemp("trained") / lora.WEIGHT_NAME, RANK, ALPHA, TARGETS)
    return path, _out(unet)


def _pipe(files):
    from diffusers import KolorsPipeline

    return KolorsPipeline(vae=models.load_vae(files), text_encoder=models.load_text_encoder(files),
                          tokenizer=models.load_tokenizer(files), unet=models.load_unet(files),
                          scheduler=models.make_scheduler(files))


def _assert_same(out, ref):
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-5, diff


def _fake_run(tmp_path, trained, tiny_diffusers) -> Path:
    """A run directory as training leaves it: config.yaml (model: the tiny UNet) + lora/."""
    import shutil

    from kolora.core.config import dump_config, load_config

    run = tmp_path / "runs" / "exp1"
    (run / "lora").mkdir(parents=True)
    shutil.copyfile(trained[0], run / "lora" / lora.WEIGHT_NAME)
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml", [f"model.path={tiny_diffusers}"],
                      name="exp1")
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


# tiny UNet, numerically ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["peft", "kohya", "diffsynth"])
def test_export_then_load_reproduces_the_lora_output(fmt, files, trained, tiny_diffusers, tmp_path, capsys):
    """kolora export RUN --format F → loaded back → the tiny UNet's output equals the original (≤ 1e-5)."""
    from kolora.cli.main import main

    run = _fake_run(tmp_path, trained, tiny_diffusers)
    assert main(["export", str(run), "--format", fmt]) == 0
    out_file = Path(capsys.readouterr().out.strip())
    assert out_file == ix.default_export_path(run, fmt) and out_file.is_file()
    ref = trained[1]

    if fmt in ("peft", "kohya"):  # diffusers' own loader (its kohya converter for the kohya file)
        pipe = _pipe(files)
        pipe.load_lora_weights(str(out_file), adapter_name="x")
        _assert_same(_out(pipe.unet), ref)
    if fmt == "kohya":
        sd, meta = ix.read_tensors(out_file)
        assert all(k.startswith("lora_unet_down_blocks_") or k.startswith(("lora_unet_mid_block_", "lora_unet_up_"))
                   for k in sd)
        assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in sd if not k.endswith(".alpha")} == \
            {"lora_down.weight", "lora_up.weight"}
        assert all(v.item() == ALPHA for k, v in sd.items() if k.endswith(".alpha"))
    if fmt == "diffsynth":
        sd = torch.load(out_file, weights_only=True)  # what the tutorial's load_lora does
        assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in sd)
        assert all(k.startswith("blocks.") for k in sd)
        info = json.loads(ix.sidecar(out_file).read_text())
        assert (info["rank"], info["alpha"]) == (RANK, ALPHA)
        # raw convention: lora_B equals the trained B, not scaled by alpha/rank
        trained_b = {k: v for k, v in lora.peft_state_dict(trained[0]).items() if "lora_B" in k}
        assert sum(v.abs().sum() for k, v in sd.items() if "lora_B" in k) == pytest.approx(
            float(sum(v.abs().sum() for v in trained_b.values())), rel=1e-6)
    # kolora's own path (render stage): any format, converted and loaded with the right alpha; render.lora
    # may name the export folder
    pipe = _pipe(files)
    assert lora.resolve_file(out_file.parent) == out_file
    ix.load_into_pipeline(pipe, out_file.parent)
    _assert_same(_out(pipe.unet), ref)
    assert ix.rank_alpha(out_file) == (RANK, ALPHA)  # what preflight checks for render.lora


def test_render_stage_renders_with_a_kohya_lora(files, trained, tiny_diffusers, tmp_path):
    """render.lora pointing at a ComfyUI-style file: render.build_pipeline loads it with the trained alpha."""
    from kolora.core.config import load_config
    from kolora.render import stage as render
    from kolora.render.tiles import lora_file

    kohya = ix.export_lora(trained[0], "kohya", tmp_path / "someone-elses.safetensors", tiny_diffusers)
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml",
                      [f"model.path={tiny_diffusers}", f"render.lora={kohya}"])
    lf = lora_file(cfg, None)
    assert lf == kohya
    pipe = render.build_pipeline(cfg, lf, "cpu", torch.float32)
    _assert_same(_out(pipe.unet), trained[1])


def test_diffsynth_checkpoint_in_diffsynth_naming_imports_and_matches(files, trained, tiny_diffusers, tmp_path,
                                                                      capsys):
    """A checkpoint like DiffSynth's trainer writes (only LoRA tensors, no alpha, torch.save, blocks.N keys),
    built here from DiffSynth's numbering rule worked out by hand for the tiny UNet, imports with --alpha."""
    from kolora.cli.main import main

    # tiny UNet in DiffSynth's flat list: R0 P1 D2 P3 | R4 A5 P6 | mid R7 A8 R9 | P10 R11 A12 P13 R14 A15 U16 | ...
    by_hand = {"down_blocks.1.attentions.0": 5, "mid_block.attentions.0": 8,
               "up_blocks.0.attentions.0": 12, "up_blocks.0.attentions.1": 15}
    tiny_cfg = tiny_diffusers / "unet" / "config.json"
    assert {k: v for k, v in unet_modules.structure(tiny_cfg).blocks.items() if ".attentions." in k} == by_hand

    ckpt = {}
    for key, value in lora.peft_state_dict(trained[0]).items():
        module, ab = key.rsplit(".lora_", 1)  # "<module>", "A.weight"
        prefix = next(p for p in by_hand if module.startswith(p + "."))
        inner = module[len(prefix) + 1:].replace("to_out.0", "to_out")
        ckpt[f"blocks.{by_hand[prefix]}.{inner}.lora_{ab[0]}.default.weight"] = value.clone()
    src = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=500.ckpt"
    src.parent.mkdir(parents=True)
    torch.save(ckpt, src)

    # no alpha: refused everywhere with the import command in the message
    with pytest.raises(LoraFileError, match="--alpha"):
        ix.rank_alpha(src)
    pipe = _pipe(files)
    with pytest.raises(LoraFileError, match="import-lora"):
        ix.load_into_pipeline(pipe, src)
    assert main(["import-lora", str(src), "--to", str(tmp_path / "x"), "--unet-config", str(tiny_cfg)]) == 2
    assert "--alpha" in capsys.readouterr().err
    # a wrong --rank is caught
    assert main(["import-lora", str(src), "--alpha", "8", "--rank", "16", "--to", str(tmp_path / "x"),
                 "--unet-config", str(tiny_cfg)]) == 2
    capsys.readouterr()

    assert main(["import-lora", str(src), "--alpha", str(ALPHA), "--rank", str(RANK), "--to",
                 str(tmp_path / "imported"), "--unet-config", str(tiny_cfg)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == tmp_path / "imported" / lora.WEIGHT_NAME
    assert ix.rank_alpha(out) == (RANK, ALPHA)
    pipe = _pipe(files)
    ix.load_into_pipeline(pipe, out.parent)  # render.lora may name the folder
    _assert_same(_out(pipe.unet), trained[1])


class _NotATensor:
    pass


def test_checkpoints_are_read_with_weights_only(tmp_path):
    p = tmp_path / "evil.ckpt"
    torch.save({"blocks.5.x.lora_A.default.weight": torch.zeros(1), "obj": _NotATensor()}, p)
    with pytest.raises(LoraFileError, match="weights_only"):
        ix.read_tensors(p)


def test_lora_for_another_model_is_rejected_with_names(trained, tmp_path):
    """The tiny LoRA against the full-size Kolors UNet: shapes do not fit, the error says which."""
    with pytest.raises(LoraFileError, match="do not fit this UNet"):
        ix.read_lora(trained[0], None)
    bad = tmp_path / "sd15.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_foo_bar.lora_down.weight": torch.zeros(2, 3),
               "lora_unet_foo_bar.lora_up.weight": torch.zeros(3, 2)}, str(bad))
    with pytest.raises(LoraFileError, match="lora_unet_foo_bar"):
        ix.read_lora(bad, None)


# full-size Kolors UNet, key names only (meta device) ------------------------------------------------------
def _tsv() -> dict[str, str]:
    text = resources.files("kolora").joinpath("data", "kolors-unet-lora-targets.tsv").read_text()
    rows = list(csv.reader(text.splitlines(), delimiter="\t"))
    assert rows[0] == ["diffusers_module", "diffsynth_module"]
    return dict(rows[1:])


@pytest.fixture(scope="module")
def full_lora():
    """rank-16 LoRA on to_q/k/v/out of the full Kolors UNet, as peft's state dict of meta tensors."""
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    cfg = {k: v for k, v in unet_modules.unet_config(None).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        lora.add_lora(unet, 16, 4.0, TARGETS)
    sd = get_peft_model_state_dict(unet)
    return lora_weights.LoraWeights(dict(sd), 16, 4.0)


def test_derived_diffsynth_names_equal_diffsynths_converter_for_all_560_layers():
    tsv = _tsv()
    blocks = unet_modules.structure(None).blocks
    modules = unet_modules.lora_target_modules(None, TARGETS)
    assert len(modules) == 560 and set(modules) == set(tsv)
    assert {m: unet_modules.to_diffsynth_module(m, blocks) for m in modules} == tsv
    assert {d: unet_modules.from_diffsynth_module(d, blocks) for d in tsv.values()} == {d: m for m, d in tsv.items()}


def test_full_size_key_sets_map_completely_in_every_format(full_lora):
    w = full_lora
    assert len(w.modules) == 560 and len(w.tensors) == 1120
    lora_weights.check_against_unet(w, None)  # every layer is a module of the real UNet, shapes fit
    tsv = _tsv()

    ds = lora_weights.to_diffsynth(w)
    assert set(ds) == {f"{tsv[m]}.lora_{ab}.default.weight" for m in tsv for ab in "AB"}
    back = lora_weights.from_diffsynth(ds, 4.0)
    assert set(back.tensors) == set(w.tensors) and back.rank == 16
    assert all(back.tensors[k].shape == w.tensors[k].shape for k in w.tensors)

    kohya = lora_weights.to_kohya(w)
    assert len(kohya) == 560 * 3
    assert set(kohya) == {f"lora_unet_{m.replace('.', '_')}.{s}" for m in tsv
                          for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    back = lora_weights.from_kohya(kohya)
    assert set(back.tensors) == set(w.tensors) and back.alpha == 4.0

    peft = lora_weights.to_diffusers(w)
    back = lora_weights.from_diffusers({f"unet.{k}": v for k, v in peft.items()}, {"kolora.rank": "16", "kolora.alpha": "4.0"})
    assert set(back.tensors) == set(w.tensors)


def test_full_size_kohya_names_are_what_diffusers_converter_reads(full_lora):
    """diffusers' own kohya → diffusers converter maps every key of our kohya file onto the 560 modules."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    kohya = lora_weights.to_kohya(full_lora)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert len(alphas) == 560 and set(alphas.values()) == {4.0}
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert set(peft) == set(full_lora.tensors)


def test_full_size_diffsynth_export_loads_like_the_tutorials_load_lora(full_lora):
    """The tutorial's load_lora: inject peft (to_q/k/v/to_out) into DiffSynth's UNet, load_state_dict(strict=False).
    On a skeleton with DiffSynth's module names (from DiffSynth's converter, the .tsv) every key must land."""
    from peft import LoraConfig, inject_adapter_in_model

    shapes = unet_modules.structure(None).shapes
    with torch.device("meta"):
        skeleton = torch.nn.Module()
        for module, ds_name in _tsv().items():
            parent = skeleton
            *path, leaf = ds_name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            out_f, in_f = shapes[module]
            parent.add_module(leaf, torch.nn.Linear(in_f, out_f))
        skeleton = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=4, init_lora_weights="gaussian",
                                                      target_modules=["to_q", "to_k", "to_v", "to_out"]), skeleton)
    res = skeleton.load_state_dict(lora_weights.to_diffsynth(full_lora), strict=False, assign=True)
    assert res.unexpected_keys == []
    assert [k for k in res.missing_keys if "lora_" in k] == []


def test_kohya_sgm_block_names_are_read_too():
    """kohya's SGM spelling (input_blocks/middle_block/output_blocks) maps onto the same diffusers modules."""
    shapes = unet_modules.structure(None).shapes
    pairs = {"input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "middle_block_1_transformer_blocks_3_attn2_to_k": "mid_block.attentions.0.transformer_blocks.3.attn2.to_k",
             "output_blocks_2_1_transformer_blocks_9_attn1_to_out_0":
                 "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0"}
    sd = {}
    for sgm, module in pairs.items():
        out_f, in_f = shapes[module]
        sd[f"lora_unet_{sgm}.lora_down.weight"] = torch.empty(8, in_f, device="meta")
        sd[f"lora_unet_{sgm}.lora_up.weight"] = torch.empty(out_f, 8, device="meta")
        sd[f"lora_unet_{sgm}.alpha"] = torch.tensor(8.0)
    w = lora_weights.from_kohya(sd)
    assert set(w.modules) == set(pairs.values()) and (w.rank, w.alpha) == (8, 8.0)


def test_kohya_per_layer_alphas_fold_into_b_exactly():
    """A kohya file whose layers carry different alphas becomes one alpha with the same effective update."""
    mods = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"]
    g = torch.Generator().manual_seed(0)
    sd, expected = {}, {}
    for m, alpha in zip(mods, (2.0, 2.0, 8.0), strict=True):
        a, b = torch.randn(2, 640, generator=g), torch.randn(640, 2, generator=g)
        k = unet_modules.to_kohya_module(m)
        sd.update({f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": torch.tensor(alpha)})
        expected[m] = (alpha / 2) * b @ a
    w = lora_weights.from_kohya(sd)
    assert (w.rank, w.alpha) == (2, 2.0)
    for m, a, b in w.pairs():
        torch.testing.assert_close((w.alpha / w.rank) * b @ a, expected[m])


# kohya/LyCORIS export against ComfyUI's loader ------------------------------------------------------------
# ComfyUI's rules, restated from comfy/lora.py (model_lora_keys_unet, load_lora) and comfy/weight_adapter/loha.py,
# lokr.py: a diffusers-named UNet weight `<module>.weight` is patched by the keys `lora_unet_<module, '.'→'_'>.*`;
# a layer's `.alpha` scales LoRA and LoHa by alpha/rank, and LoKr by alpha/dim only when a factor is decomposed
# (dim: the rank of its w2_a·w2_b, else of w1_a·w1_b), by 1 otherwise; a key no layer takes is "not loaded".
COMFY_PARTS = ("lora_up.weight", "lora_down.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
               "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _comfy_key_map(unet) -> dict[str, str]:
    return {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k for k in unet.state_dict()
            if k.endswith(".weight")}


def _comfy_load(sd: dict, key_map: dict[str, str]) -> tuple[dict[str, tuple], set[str]]:
    """UNet weight → (alpha, its adapter tensors); and the keys ComfyUI would report as not loaded."""
    patches, loaded = {}, set()
    for x, weight in key_map.items():
        alpha = float(sd[f"{x}.alpha"]) if f"{x}.alpha" in sd else None
        loaded |= {f"{x}.alpha"} & sd.keys()
        parts = {p: sd[f"{x}.{p}"] for p in COMFY_PARTS if f"{x}.{p}" in sd}
        if parts:
            patches[weight] = (alpha, parts)
            loaded |= {f"{x}.{p}" for p in parts}
    return patches, set(sd) - loaded


def _comfy_delta(alpha: float | None, t: dict, shape) -> torch.Tensor:
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        return (up @ down * (alpha / down.shape[0] if alpha is not None else 1.0)).reshape(shape)
    if "hada_w1_a" in t:
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale).reshape(shape)
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_kohya_export_is_what_comfyui_loads_with_peft_deltas(kind, files, tiny_diffusers, tmp_path):
    """Per-block ranks/alphas (down.1 at rank 4: LoKr's full factors there; rank 2 elsewhere: decomposed) →
    `export --format kohya` → ComfyUI's key rules take every key, one UNet weight per layer, and its formulas give
    peft's ΔW of every layer within 1e-6."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    options = lora.AdapterOptions(kind, -1, (("down.1", 4),), (("up.0", 1.5),))
    unet = models.load_unet(files)
    torch.manual_seed(5)
    lora.add_lora(unet, 2, 3.0, TARGETS, options=options)
    with torch.no_grad():
        for p in (p for p in unet.parameters() if p.requires_grad):
            p.normal_(0, 0.3)
    src = lora.save_lora(unet, tmp_path / lora.WEIGHT_NAME, 2, 3.0, TARGETS, options=options)
    out = ix.export_lora(src, "kohya", tmp_path / "kohya.safetensors", tiny_diffusers)
    sd, meta = ix.read_tensors(out)
    patches, not_loaded = _comfy_load(sd, _comfy_key_map(models.load_unet(files)))
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    assert not_loaded == set()
    assert set(patches) == {f"{n}.weight" for n in layers} and len(layers) == 32
    assert len({k.split(".")[0] for k in sd}) == len(patches)  # one key prefix per layer, none shared
    if kind == "lokr":  # both of ComfyUI's scale rules are exercised
        assert any(k.endswith(".lokr_w2_a") for k in sd) and any(k.endswith(".lokr_w2") for k in sd)
    with torch.no_grad():
        for n, m in layers.items():
            alpha, parts = patches[f"{n}.weight"]
            torch.testing.assert_close(_comfy_delta(alpha, parts, m.base_layer.weight.shape),
                                       m.get_delta_weight("default"), rtol=0, atol=1e-6)
    assert meta["kolora.rank"] == "2" and meta.get("kolora.adapter", "lora") == kind


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_full_size_lycoris_kohya_keys_map_one_to_one_under_comfyuis_rules(kind):
    """On the full Kolors UNet (meta device): the 560 layers' LoHa/LoKr keys all land, one UNet weight each."""
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    from kolora.formats.peft_adapter import PeftAdapter, to_kohya

    cfg = {k: v for k, v in unet_modules.unet_config(None).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet, plain = UNet2DConditionModel.from_config(cfg), UNet2DConditionModel.from_config(cfg)
        config = lora.lora_config(16, 4.0, TARGETS, options=lora.AdapterOptions(kind))
        unet.add_adapter(config)
    kohya = to_kohya(PeftAdapter(config, get_peft_model_state_dict(unet), "full"))
    patches, not_loaded = _comfy_load(kohya, _comfy_key_map(plain))
    assert not_loaded == set() and len(patches) == 560
    assert set(patches) == {f"{m}.weight" for m in unet_modules.lora_target_modules(None, TARGETS)}
