"""Weight ports of HPSv2 (open_clip ViT -> CLIPModel) and ImageReward (BLIP + MLP head -> BlipVisionModel +
BlipTextModel + head): tiny random checkpoints in the hubs' key layouts, converted strictly, against reference
forwards written here from the original architectures (open_clip's nn.MultiheadAttention blocks, timm's ViT,
ImageReward's head and normalisation); then the scorers end to end offline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kolora.cli.main import main
from kolora.models import reward_ports, scorers


# open_clip's ViT / text transformer, from its architecture (OpenAI CLIP layout, GELU, pre-LN residual blocks) ----
def _open_clip_blocks(x, sd, prefix, layers, heads, mask=None):
    width = x.shape[-1]
    for n in range(layers):
        p = f"{prefix}transformer.resblocks.{n}."
        attn = torch.nn.MultiheadAttention(width, heads)
        attn.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
                              "out_proj.weight": sd[p + "attn.out_proj.weight"],
                              "out_proj.bias": sd[p + "attn.out_proj.bias"]})
        y = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        y = y.transpose(0, 1)  # (L, N, D): nn.MultiheadAttention's default layout
        x = x + attn(y, y, y, need_weights=False, attn_mask=mask)[0].transpose(0, 1)
        y = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def _open_clip_image(sd, pixels, layers, heads):
    w = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # (N, patches, width)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (x.shape[-1],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _open_clip_blocks(x, sd, "visual.", layers, heads)
    return F.layer_norm(x[:, 0], (x.shape[-1],), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]


def _open_clip_text(sd, ids, layers, heads):
    ctx = sd["positional_embedding"].shape[0]
    padded = torch.zeros(ids.shape[0], ctx, dtype=torch.long)  # open_clip's tokenizer pads with 0 to 77
    padded[:, :ids.shape[1]] = ids
    x = sd["token_embedding.weight"][padded] + sd["positional_embedding"]
    causal = torch.full((ctx, ctx), float("-inf")).triu(1)
    x = _open_clip_blocks(x, sd, "", layers, heads, mask=causal)
    x = F.layer_norm(x, (x.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(x.shape[0]), padded.argmax(dim=-1)] @ sd["text_projection"]  # at EOT, the largest id


def _features(out):
    return getattr(out, "pooler_output", out)


def test_hps_port_gives_open_clips_features_and_hpsv2s_score(tmp_path, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    checkpoint = scorers.build_tiny_hps_hub(tmp_path / "hub", tmp_path / "processor", version="v2.0")
    assert checkpoint.name == "HPS_v2_compressed.pt"
    reward_ports.convert_hps(checkpoint, tmp_path / "processor", tmp_path / "hps")
    sd = reward_ports.load_checkpoint(checkpoint)
    model = CLIPModel.from_pretrained(str(tmp_path / "hps")).eval()
    v, t = model.config.vision_config, model.config.text_config
    assert v.hidden_act == t.hidden_act == "gelu"

    pixels = torch.randn(2, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1))
    tokenizer = CLIPProcessor.from_pretrained(str(tmp_path / "hps")).tokenizer
    texts = ["a red square", "a girl singing on a stage"]
    ids = [tokenizer(text).input_ids for text in texts]
    with torch.no_grad():
        want_img = _open_clip_image(sd, pixels, v.num_hidden_layers, v.num_attention_heads)
        want_txt = torch.cat([_open_clip_text(sd, torch.tensor([i]), t.num_hidden_layers, t.num_attention_heads)
                              for i in ids])
        got_img = _features(model.get_image_features(pixel_values=pixels))
        got_txt = torch.cat([_features(model.get_text_features(input_ids=torch.tensor([i]))) for i in ids])
    assert torch.allclose(got_img, want_img, atol=1e-5) and torch.allclose(got_txt, want_txt, atol=1e-5)

    # the scorer end to end, offline: hpsv2's score = diagonal of normalised image_features @ text_features.T
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = scorers.load_hps(tmp_path / "hps", scorers.HPS)
    image = Image.new("RGB", (40, 30), "red")
    got = scorers.hps_score(loaded, [image, image], texts)
    processor = CLIPProcessor.from_pretrained(str(tmp_path / "hps"))
    with torch.no_grad():
        img = _open_clip_image(sd, processor(images=[image], return_tensors="pt").pixel_values, v.num_hidden_layers,
                               v.num_attention_heads)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = want_txt / want_txt.norm(dim=-1, keepdim=True)
    assert got == pytest.approx((txt @ img.T)[:, 0].tolist(), abs=1e-5)
    assert got[0] != pytest.approx(got[1], abs=1e-4)

    # strict: an open_clip tensor without a counterpart is refused, and a missing one is named
    sd_extra = {**sd, "visual.head.weight": torch.zeros(1)}
    with pytest.raises(reward_ports.PortError, match="visual.head.weight"):
        reward_ports.open_clip_to_clip(sd_extra)
    torch.save({"state_dict": {k: x for k, x in sd.items() if k != "ln_final.bias"}}, str(tmp_path / "cut.pt"))
    with pytest.raises(reward_ports.PortError, match="final_layer_norm.bias"):
        reward_ports.convert_hps(tmp_path / "cut.pt", tmp_path / "processor", tmp_path / "cut")


# timm's ViT (BLIP's visual encoder) and ImageReward's head, from their architectures -------------------------
def _timm_vit(sd, pixels, layers, heads, prefix="blip.visual_encoder."):
    g = lambda name: sd[prefix + name]  # noqa: E731
    w = g("patch_embed.proj.weight")
    x = F.conv2d(pixels, w, g("patch_embed.proj.bias"), stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([g("cls_token").expand(x.shape[0], -1, -1), x], dim=1) + g("pos_embed")
    b, n, c = x.shape
    for i in range(layers):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (c,), g(p + "norm1.weight"), g(p + "norm1.bias"), eps=1e-6)
        q, k, v = F.linear(y, g(p + "attn.qkv.weight"), g(p + "attn.qkv.bias")).reshape(
            b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), g(p + "attn.proj.weight"), g(p + "attn.proj.bias"))
        y = F.layer_norm(x, (c,), g(p + "norm2.weight"), g(p + "norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, g(p + "mlp.fc1.weight"), g(p + "mlp.fc1.bias"))), g(p + "mlp.fc2.weight"),
                         g(p + "mlp.fc2.bias"))
    return F.layer_norm(x, (c,), g("norm.weight"), g("norm.bias"), eps=1e-6)


def _imagereward_head(sd, features):
    x = features
    for i in (0, 2, 4, 6, 7):  # Linear layers of ImageReward's MLP (dropouts at 1, 3, 5; no activations)
        x = F.linear(x, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return ((x - 0.16717362830052426) / 1.0333394966054072).reshape(-1)


def test_imagereward_port_loads_strictly_and_matches_blips_vit_and_imagerewards_head(tmp_path, monkeypatch):
    hub = scorers.build_tiny_imagereward_hub(tmp_path / "hub", tmp_path / "tokenizer")
    vision = scorers.TINY_IMAGEREWARD_VISION
    reward_ports.convert_imagereward(hub, tmp_path / "tokenizer", tmp_path / "ir")
    sd = reward_ports.load_checkpoint(hub / "ImageReward.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = scorers.load_imagereward(tmp_path / "ir", scorers.IMAGEREWARD)
    model = loaded.model
    # every checkpoint tensor but the contrastive projections is in the model, with its value
    kept = {k for k in sd if not reward_ports.IGNORED.match(k) and not k.endswith("position_ids")}
    assert len(model.state_dict()) == len(kept)
    assert torch.equal(model.text_encoder.encoder.layer[1].crossattention.self.key.weight,
                       sd["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"])

    assert reward_ports.vision_shape(sd) == vision  # read back from the checkpoint's tensors
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _timm_vit(sd, pixels, vision["num_hidden_layers"], vision["num_attention_heads"])
        got = model.vision_model(pixel_values=pixels).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)

    tokenizer, image_processor = loaded.processor
    assert len(tokenizer) == sd["blip.text_encoder.embeddings.word_embeddings.weight"].shape[0]  # + [DEC], [ENC]
    tokens = tokenizer(["a red square"], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids.shape == (1, 35)
    image = Image.new("RGB", (40, 30), "red")
    with torch.no_grad():
        pix = image_processor(images=[image], return_tensors="pt").pixel_values
        features = model.features(pix, tokens.input_ids, tokens.attention_mask)
        want_reward = _imagereward_head(sd, features)
    got = scorers.imagereward_score(loaded, [image, image], ["a red square", "a girl singing on a stage"])
    assert got[0] == pytest.approx(float(want_reward[0]), abs=1e-5)
    assert got[0] != pytest.approx(got[1], abs=1e-4)  # the text matters

    # strict: a tensor ImageReward has and the port lacks, or a parameter left unset, is refused
    torch.save({**sd, "blip.visual_encoder.head.weight": torch.zeros(1)}, str(hub / "ImageReward.pt"))
    with pytest.raises(reward_ports.PortError, match="head.weight"):
        reward_ports.convert_imagereward(hub, tmp_path / "tokenizer", tmp_path / "bad")
    torch.save({k: x for k, x in sd.items() if k != "mlp.layers.7.bias"}, str(hub / "ImageReward.pt"))
    with pytest.raises(reward_ports.PortError, match="mlp.layers.7.bias"):
        reward_ports.convert_imagereward(hub, tmp_path / "tokenizer", tmp_path / "bad")


def test_ported_scorers_fetch_tiny_offline_and_missing_or_offline_fails_naming_the_login_node_command(
        tmp_path, monkeypatch, capsys):
    from conftest import DEMO

    assert main(["fetch", "models", "--scorers", "hps,imagereward", "--hps-version", "v2.0", "--tiny",
                 "--to", str(tmp_path / "s")]) == 0
    assert "hps_version: v2.0" in capsys.readouterr().out
    assert (tmp_path / "s" / scorers.HPS / "v2.0" / "model.safetensors").is_file()
    assert (tmp_path / "s" / scorers.IMAGEREWARD / "model.safetensors").is_file()
    assert not (tmp_path / "s" / ".raw").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["validate", str(DEMO), "--set", f"model.path={tmp_path / 'm'}", "--set", f"scorers.dir={empty}",
               "--set", "scorers.tiny=false", "--set", "scorers.rewards=[imagereward]"])
    assert rc == 2 and "kolora fetch models --scorers imagereward --to" in capsys.readouterr().err
    rc = main(["validate", str(DEMO), "--set", f"model.path={tmp_path / 'm'}", "--set", f"scorers.dir={tmp_path / 's'}",
               "--set", "scorers.tiny=false", "--set", "scorers.rewards=[hps]"])
    assert rc == 2 and "kolora fetch models --scorers hps --to" in capsys.readouterr().err  # v2.1 wanted, v2.0 there

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as compute jobs have it
    assert main(["fetch", "models", "--scorers", "imagereward", "--to", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "login node" in err and "kolora fetch models --scorers imagereward" in err
    assert not (tmp_path / "o").exists()


def test_fetch_converts_the_downloaded_checkpoints_and_deletes_them(tmp_path, monkeypatch):
    import shutil

    from kolora.models import scorer_fetch

    hub = tmp_path / "hub"  # what the hub serves, tiny: repository id -> its files
    scorers.build_tiny_hps_hub(hub / scorers.HPS, hub / scorers.PICKSCORE_PROCESSOR)
    scorers.build_tiny_imagereward_hub(hub / scorers.IMAGEREWARD, hub / scorers.IMAGEREWARD_TOKENIZER)
    asked = []

    def download(name, folder):
        asked.append(name)
        shutil.copytree(hub / name, folder, dirs_exist_ok=True)

    from kolora.core.offline import OFFLINE_VARIABLES

    for variable in OFFLINE_VARIABLES["huggingface"]:  # the hub "reachable": downloads come from `download`
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(scorer_fetch, "unreachable_reason", lambda *_: None)
    report = scorer_fetch.fetch(tmp_path / "s", False, False, download=download, rewards=["hps", "imagereward"])
    assert report.ok and sorted(asked) == sorted([scorers.HPS, scorers.PICKSCORE_PROCESSOR, scorers.IMAGEREWARD,
                                                  scorers.IMAGEREWARD_TOKENIZER])
    assert not (tmp_path / "s" / ".raw").exists()  # the raw checkpoints went once converted
    image = Image.new("RGB", (40, 30), "blue")
    for key in ("hps", "imagereward"):
        loaded, folder = scorers.load_reward(type("S", (), {"dir": tmp_path / "s", "tiny": False, "rewards": [],
                                                            "hps": scorers.HPS, "hps_version": "v2.1",
                                                            "imagereward": scorers.IMAGEREWARD})(), key)
        assert not (folder / scorers.TINY_MARKER).exists()
        assert isinstance(scorers.reward_score(key, loaded, [image], ["a blue square"])[0], float)
