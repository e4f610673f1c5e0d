"""train.adapter (LoRA, LoHa, LoKr through peft) and train.block_ranks / block_alphas: each trains something
else than the plain LoRA, starts at the base model, is rendered through peft exactly as plain peft loads its
export, and is refused with a message naming the field where it cannot mean anything."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import DEMO, unet_inputs
from safetensors.torch import load_file
from test_train import fresh_train_run

from kolora.core.config import ModelConfig, load_config
from kolora.core.errors import ConfigError
from kolora.formats import interchange as ix
from kolora.formats import lora, unet_modules
from kolora.formats.lora import AdapterOptions, LoraFileError
from kolora.models import kolors as models
from kolora.pipeline.runner import preflight, run_stage

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
BLOCKS = {"down.1": 2, "mid": 6}  # the demo's rank is 4: up.0 keeps it
TRAINED = {"lora": {}, "loha": {"adapter": "loha"}, "lokr": {"adapter": "lokr"},
           "blocks": {"block_ranks": BLOCKS, "block_alphas": {"up.0": 1.0}}}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _deltas(unet, adapter_name: str) -> dict[str, torch.Tensor]:
    """Each adapted layer's ΔW as peft computes it (its scaling included)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        return {n: m.get_delta_weight(adapter_name) for n, m in unet.named_modules()
                if isinstance(m, BaseTunerLayer) and adapter_name in m.scaling}


@pytest.fixture(scope="module")
def files(tiny_diffusers):
    return models.resolve(ModelConfig(path=tiny_diffusers))


@pytest.fixture(scope="module")
def trained(demo_run, tmp_path_factory):
    """4 steps of the demo with each adapter option: name → (run, cfg)."""
    out = {}
    for name, options in TRAINED.items():
        run, cfg = fresh_train_run(demo_run, tmp_path_factory.mktemp(name), name)
        cfg.train.steps = 4
        for k, v in options.items():
            setattr(cfg.train, k, v)
        run_stage("train", cfg, run)
        out[name] = run, cfg
    return out


def _pipe(files, unet=None):
    from diffusers import KolorsPipeline

    return KolorsPipeline(vae=models.load_vae(files), text_encoder=None, tokenizer=None,
                          unet=unet if unet is not None else models.load_unet(files),
                          scheduler=models.make_scheduler(files))


def _file(trained, name: str) -> Path:
    return trained[name][0].lora / lora.WEIGHT_NAME


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_adapters_start_at_the_base_model(files, kind):
    """peft's default init: step 0 is the base model (LoHa zeroes hada_w2_b, LoKr lokr_w1), all else random."""
    unet = models.load_unet(files)
    base = unet(**unet_inputs(unet)).sample
    torch.manual_seed(0)
    lora.add_lora(unet, 4, 4.0, TARGETS, options=AdapterOptions(kind))
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert params and all(("hada_" if kind == "loha" else "lokr_") in n for n in params)
    assert any(p.abs().sum() > 0 for p in params.values())  # not all zero: training can move it
    torch.testing.assert_close(unet(**unet_inputs(unet)).sample, base, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_adapter_trains_into_kolora_file_that_differs_from_lora(trained, files, kind):
    path = _file(trained, kind)
    meta = lora.read_metadata(path)
    assert (meta["kolora.adapter"], meta["kolora.rank"], meta["kolora.alpha"]) == (kind, "4", "4.0")
    assert json.loads(meta["lora_adapter_metadata"])["unet.peft_type"] == kind.upper()
    tensors = load_file(str(path))
    assert tensors and all(k.startswith("unet.") and (".hada_" if kind == "loha" else ".lokr_") in k for k in tensors)
    assert ix.rank_alpha(path) == (4, 4.0)
    # trained: the UNet's output moved away from the base model's, and not to where the LoRA's took it
    outs = {}
    for name in ("lora", kind):
        unet = models.load_unet(files)
        base = unet(**unet_inputs(unet)).sample
        pipe = _pipe(files, unet)
        ix.load_into_pipeline(pipe, _file(trained, name))
        outs[name] = pipe.unet(**unet_inputs(pipe.unet)).sample
        assert not torch.allclose(outs[name], base, atol=1e-6)
    assert not torch.allclose(outs[kind], outs["lora"], atol=1e-6)


def test_block_ranks_give_each_block_its_rank_and_alpha(trained):
    path = _file(trained, "blocks")
    assert _sha(path) != _sha(_file(trained, "lora"))
    ranks = {k: v.shape[0] for k, v in load_file(str(path)).items() if k.endswith(".lora.down.weight")}
    by_block = {b: {r for k, r in ranks.items() if k.startswith(f"unet.{b}.")}
                for b in ("down_blocks.1", "mid_block", "up_blocks.0")}
    assert by_block == {"down_blocks.1": {2}, "mid_block": {6}, "up_blocks.0": {4}}
    config = json.loads(lora.read_metadata(path)["lora_adapter_metadata"])
    assert config["unet.rank_pattern"] == {r"down_blocks\.1\..*": 2, r"mid_block\..*": 6}
    assert config["unet.alpha_pattern"] == {r"up_blocks\.0\..*": 1.0}
    assert json.loads(lora.read_metadata(path)["kolora.block_ranks"]) == BLOCKS


@pytest.mark.parametrize("name", ["loha", "lokr", "blocks"])
def test_render_loads_what_plain_peft_loads_from_the_peft_export(trained, files, tmp_path, name):
    """render.build_pipeline (kolora's loader, render.lora_scale applied) ≡ peft on the `--format peft` export."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    from kolora.render import stage as render

    run, cfg = trained[name]
    exported = ix.export_lora(_file(trained, name), "peft", tmp_path / "peft" / lora.WEIGHT_NAME)
    plain = models.load_unet(files)
    if name == "blocks":  # a LoRA's peft export is kolora's diffusers file: its config is in its metadata
        meta = lora.read_metadata(exported)
        found = json.loads(meta["lora_adapter_metadata"])
        plain.add_adapter(PeftConfig.from_peft_type(**{k.removeprefix("unet."): v for k, v in found.items()}))
        assert not set_peft_model_state_dict(plain, lora.peft_state_dict(exported)).unexpected_keys
        want = _deltas(plain, "default")
    else:
        assert exported.name == "adapter_model.safetensors" and (exported.parent / "adapter_config.json").is_file()
        want = _deltas(PeftModel.from_pretrained(plain, str(exported.parent)).base_model.model, "default")
    assert len(want) == 32
    for scale in (1.0, 0.5):
        cfg.render.lora_scale = scale
        pipe = render.build_pipeline(cfg, _file(trained, name), "cpu", torch.float32, text_encoder=False)
        got = _deltas(pipe.unet, "kolora")
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], scale * want[n], rtol=0, atol=1e-6)
    if name != "blocks":  # render.lora may name the peft export folder too
        pipe = _pipe(files)
        ix.load_into_pipeline(pipe, exported.parent)
        assert all(torch.equal(d, want[n]) for n, d in _deltas(pipe.unet, "kolora").items())


@pytest.mark.parametrize("name", ["loha", "blocks"])
def test_one_rank_conversions_refuse_per_layer_adapters_naming_file_and_type(trained, tmp_path, name):
    path = _file(trained, name)
    what = "LoHa adapter" if name == "loha" else "own ranks/alphas"
    with pytest.raises(LoraFileError, match=f"{path}.*{what}"):
        ix.export_lora(path, "diffsynth", tmp_path / "d.ckpt")
    with pytest.raises(LoraFileError, match=f"{path}.*{what}"):
        ix.import_lora(path, tmp_path / "imported")


def test_kohya_lycoris_file_is_refused_as_render_lora_naming_the_type(trained, files, tmp_path):
    kohya = ix.export_lora(_file(trained, "lokr"), "kohya", tmp_path / "k.safetensors")
    with pytest.raises(LoraFileError, match="LoKr file in kohya's layout"):
        ix.load_into_pipeline(_pipe(files), kohya)


# ---- config ---------------------------------------------------------------------------------------------------
def _cfg(tiny_diffusers, *sets: str):
    return load_config(DEMO, [f"model.path={tiny_diffusers}", *sets])


@pytest.mark.parametrize(("sets", "names"), [
    (("train.dora=true", "train.adapter=loha"), ("train.dora", "train.adapter: loha")),
    (("train.adapter=lora", "train.lokr_factor=4"), ("train.lokr_factor", "train.adapter: lokr")),
    (('train.block_ranks={"down.x": 4}',), ("train.block_ranks", "down.x", "down.N")),
    (('train.block_alphas={"mid": 0}',), ("train.block_alphas", "> 0")),
])
def test_meaningless_adapter_options_are_refused_naming_the_fields(tiny_diffusers, sets, names):
    with pytest.raises(ConfigError) as e:
        _cfg(tiny_diffusers, *sets)
    assert all(n in str(e.value) for n in names), str(e.value)


@pytest.mark.parametrize(("blocks", "says"), [({"down.2": 4}, "this UNet has 2 down blocks"),
                                              ({"down.0": 4}, "holds none of train.target_modules")])
def test_block_keys_are_checked_against_the_unet_before_anything_runs(tiny_diffusers, blocks, says):
    cfg = _cfg(tiny_diffusers, f"train.block_alphas={json.dumps(blocks)}")
    with pytest.raises(ConfigError, match=f"train.block_alphas: .*{says}"):
        preflight(cfg)


def test_adapter_options_at_their_defaults_leave_dumps_and_digests_alone(tiny_diffusers):
    plain = _cfg(tiny_diffusers)
    assert not {"adapter", "lokr_factor", "block_ranks", "block_alphas"} & set(plain.model_dump()["train"])
    same = _cfg(tiny_diffusers, "train.adapter=lora", "train.lokr_factor=-1", "train.block_ranks={}")
    assert same.digest() == plain.digest()
    assert _cfg(tiny_diffusers, "train.adapter=lokr").digest() != plain.digest()


def test_memory_plan_counts_the_adapter_and_block_ranks(tiny_diffusers):
    from kolora.launch import memplan

    key = memplan._key(json.loads((tiny_diffusers / "unet" / "config.json").read_text()))
    targets = tuple(TARGETS)
    plain = memplan.lora_param_count(key, 4, targets)
    assert memplan.lora_param_count(key, 4, targets, adapter=AdapterOptions("loha")) == 2 * plain  # two pairs
    assert memplan.lora_param_count(key, 4, targets, adapter=AdapterOptions("lokr")) != plain
    # rank 8 instead of 4 in the mid block: 4 · (in + out) more for each of its layers
    shapes = unet_modules.structure(tiny_diffusers).shapes
    more = sum(4 * sum(shapes[m]) for m in unet_modules.lora_target_modules(tiny_diffusers, TARGETS)
               if m.startswith("mid_block."))
    mid = memplan.lora_param_count(key, 4, targets, adapter=AdapterOptions(block_ranks=(("mid", 8),)))
    assert more > 0 and mid - plain == more
