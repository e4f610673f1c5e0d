"""Weight ports of the reward models whose own packages kolora cannot run (they need torchvision, whose wheel is
CUDA-linked, and download at load): their hub checkpoints are converted once, on the login node at fetch time, into
transformers classes that kolora.models.scorers loads offline.

HPS v2 / v2.1 (`xswu/HPSv2`, HPS_v2*_compressed.pt): an open_clip ViT-H-14 fine-tune, its state dict in OpenAI
CLIP's key layout with GELU. `convert_hps` writes a transformers CLIPModel folder whose config, tokenizer and image
processor are those of the CLIP it was fine-tuned from (laion/CLIP-ViT-H-14-laion2B-s32B-b79K): in_proj split into
q/k/v, the projections transposed. Its score is the cosine of the normalised image and text features.

ImageReward (`THUDM/ImageReward`, ImageReward.pt + med_config.json): BLIP's ViT-L/16 (timm key names) and BLIP's
BERT text encoder with cross-attention ("med", whose names transformers' BlipTextModel keeps), then an MLP head on
the [CLS] feature. `convert_imagereward` writes ImageRewardModel (BlipVisionModel + BlipTextModel + the head) with a
BlipConfig, the bert-base-uncased tokenizer with BLIP's two added tokens and a 224 px CLIP image processor.

Conversions load strictly: every checkpoint tensor is used (bar the ones ImageReward's reward never reads, IGNORED)
and every parameter is set. `build_tiny_*_checkpoint` write random tiny checkpoints in the hub layouts, which the
tiny models are converted from (tests, demo). torch/transformers are imported in functions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

HPS_FILES = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}  # hpsv2's hps_version_map
IMAGEREWARD_FILES = ("ImageReward.pt", "med_config.json")
# ImageReward's reward: (mlp(text_encoder(...)[:, 0]) - MEAN) / STD, its constants
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35  # tokens, padded to it
# BLIP_Pretrain tensors ImageReward's reward does not read (contrastive projections, momentum encoders, queues)
IGNORED = re.compile(r"^blip\.(vision_proj|text_proj|itm_head|\w+_m\.|\w*queue\w*|temp$)")
# buffers the modules recompute (position ids; open_clip's causal mask)
DERIVED = re.compile(r"(^|\.)(position_ids|attn_mask)$")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class PortError(Exception):
    """A checkpoint does not fit the architecture it is ported onto (names the tensors)."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A torch checkpoint's state dict (under "state_dict" when it has one), tensors only, with a DataParallel
    "module." prefix dropped."""
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strictly(model, state: dict[str, Any], what: str) -> None:
    """Load `state` into `model`: PortError unless every tensor fits a parameter or buffer and every parameter
    (and persistent buffer) is set; recomputed buffers (DERIVED) may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not DERIVED.search(k)]
    if missing or unexpected:
        raise PortError(f"{what}: checkpoint does not fit: {len(missing)} parameter(s) not set "
                        f"({', '.join(missing[:5])}), {len(unexpected)} tensor(s) unused ({', '.join(unexpected[:5])})")


# HPS: open_clip -> CLIPModel ----------------------------------------------------------------------------------
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                  "visual.class_embedding": "vision_model.embeddings.class_embedding",
                  "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                  "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
                  "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                  "positional_embedding": "text_model.embeddings.position_embedding.weight",
                  "ln_final": "text_model.final_layer_norm", "logit_scale": "logit_scale"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(attn\.in_proj|.+)[._](weight|bias)$")


def open_clip_to_clip(state: dict[str, Any]) -> dict[str, Any]:
    """An open_clip (OpenAI CLIP layout) state dict in transformers CLIPModel's names; PortError for a tensor it
    has no rule for."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if DERIVED.search(key):
            continue
        block = _RESBLOCK.match(key)
        if block:
            tower, n, module, kind = block.groups()
            prefix = f"{'vision_model' if tower else 'text_model'}.encoder.layers.{n}"
            if module == "attn.in_proj":  # q, k, v stacked along the output dimension
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}.self_attn.{name}.{kind}"] = part.clone()
            elif module in _OPEN_CLIP_BLOCK:
                out[f"{prefix}.{_OPEN_CLIP_BLOCK[module]}.{kind}"] = value
            else:
                raise PortError(f"open_clip tensor {key!r}: no rule for {module!r}")
        elif key in ("visual.proj", "text_projection"):  # x @ proj there; Linear's weight is proj.T
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.T.contiguous()
        elif key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
        elif key.rsplit(".", 1)[0] in _OPEN_CLIP_TOP:
            stem, kind = key.rsplit(".", 1)
            out[f"{_OPEN_CLIP_TOP[stem]}.{kind}"] = value
        else:
            raise PortError(f"open_clip tensor {key!r} has no CLIPModel counterpart (is this an open_clip "
                            f"ViT checkpoint in OpenAI CLIP's layout?)")
    return out


def convert_hps(checkpoint: Path, processor_folder: Path, out: Path) -> None:
    """HPS checkpoint -> CLIPModel + CLIPProcessor folder `out`, the architecture and processor from
    `processor_folder` (the CLIP repository HPS was fine-tuned from)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    config = CLIPConfig.from_pretrained(str(processor_folder))
    for tower in (config.text_config, config.vision_config):
        if tower.hidden_act != "gelu":  # open_clip's ViT-H-14 uses GELU, not OpenAI's quick_gelu
            raise PortError(f"{processor_folder}: hidden_act {tower.hidden_act!r}, HPS's open_clip towers use gelu")
    with torch.device("meta"):
        model = CLIPModel(config)
    model.to_empty(device="cpu")
    state = open_clip_to_clip(load_checkpoint(checkpoint))
    load_strictly(model, state, f"HPS checkpoint {checkpoint}")
    for name, buf in model.named_buffers():  # non-persistent buffers (position ids) were left empty on meta
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    model.eval().save_pretrained(str(out))
    CLIPProcessor.from_pretrained(str(processor_folder)).save_pretrained(str(out))


def build_tiny_hps_checkpoint(path: Path, config, seed: int = 0) -> Path:
    """A random open_clip state dict for the CLIPConfig `config`'s shapes, saved like the hub's HPS files
    ({"state_dict": ...}); the text tower's causal mask buffer too, as open_clip keeps it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    t, v = config.text_config, config.vision_config

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def blocks(prefix: str, width: int, mlp: int, layers: int) -> dict[str, torch.Tensor]:
        sd = {}
        for n in range(layers):
            p = f"{prefix}transformer.resblocks.{n}."
            sd.update({p + "ln_1.weight": 1 + rand(width), p + "ln_1.bias": rand(width),
                       p + "attn.in_proj_weight": rand(3 * width, width, scale=width ** -0.5),
                       p + "attn.in_proj_bias": rand(3 * width), p + "attn.out_proj.weight": rand(width, width),
                       p + "attn.out_proj.bias": rand(width), p + "ln_2.weight": 1 + rand(width),
                       p + "ln_2.bias": rand(width), p + "mlp.c_fc.weight": rand(mlp, width),
                       p + "mlp.c_fc.bias": rand(mlp), p + "mlp.c_proj.weight": rand(width, mlp),
                       p + "mlp.c_proj.bias": rand(width)})
        return sd

    grid = (v.image_size // v.patch_size) ** 2
    ctx = t.max_position_embeddings
    sd = {"visual.conv1.weight": rand(v.hidden_size, 3, v.patch_size, v.patch_size),
          "visual.class_embedding": rand(v.hidden_size), "visual.positional_embedding": rand(grid + 1, v.hidden_size),
          "visual.ln_pre.weight": 1 + rand(v.hidden_size), "visual.ln_pre.bias": rand(v.hidden_size),
          **blocks("visual.", v.hidden_size, v.intermediate_size, v.num_hidden_layers),
          "visual.ln_post.weight": 1 + rand(v.hidden_size), "visual.ln_post.bias": rand(v.hidden_size),
          "visual.proj": rand(v.hidden_size, config.projection_dim),
          "token_embedding.weight": rand(t.vocab_size, t.hidden_size), "positional_embedding": rand(ctx, t.hidden_size),
          **blocks("", t.hidden_size, t.intermediate_size, t.num_hidden_layers),
          "ln_final.weight": 1 + rand(t.hidden_size), "ln_final.bias": rand(t.hidden_size),
          "text_projection": rand(t.hidden_size, config.projection_dim), "logit_scale": torch.tensor(4.6052),
          "attn_mask": torch.full((ctx, ctx), float("-inf")).triu_(1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "state_dict": sd}, str(path))
    return path


# ImageReward: BLIP + MLP -> ImageRewardModel ------------------------------------------------------------------
_TIMM_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
               "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_TIMM_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_TIMM_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def blip_to_hf(state: dict[str, Any]) -> dict[str, Any]:
    """ImageReward's state dict (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) in ImageRewardModel's
    names: the timm ViT's to BlipVisionModel's, the med BERT's kept, the head's kept; IGNORED tensors dropped."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if IGNORED.match(key) or DERIVED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            block = _TIMM_BLOCK_KEY.match(name)
            if block and block.group(2) in _TIMM_BLOCK:
                n, module, kind = block.groups()
                out[f"vision_model.encoder.layers.{n}.{_TIMM_BLOCK[module]}.{kind}"] = value
            elif name in _TIMM_TOP:
                out[f"vision_model.{_TIMM_TOP[name]}"] = value
            else:
                raise PortError(f"ImageReward tensor {key!r}: no BlipVisionModel counterpart")
        elif key.startswith("blip.text_encoder."):
            out["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            out[key] = value
        else:
            raise PortError(f"ImageReward tensor {key!r}: not BLIP's visual/text encoder nor the MLP head")
    return out


def vision_shape(state: dict[str, Any]) -> dict[str, Any]:
    """BLIP's ViT as its checkpoint's tensors size it (ViT-L/16 at 224 px for ImageReward); heads of 64 channels,
    as both of BLIP's ViTs (base: 768/12, large: 1024/16) have."""
    patch = state["blip.visual_encoder.patch_embed.proj.weight"]
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    grid = round((state["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    blocks = {int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks.")}
    return {"hidden_size": hidden, "num_attention_heads": hidden // 64, "num_hidden_layers": len(blocks),
            "intermediate_size": state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
            "patch_size": patch_size, "image_size": grid * patch_size}


def imagereward_config(med_config: dict[str, Any], vision: dict[str, Any]):
    """The BlipConfig of ImageReward: BLIP's ViT (`vision`: vision_shape; timm LayerNorm eps 1e-6, GELU) and
    med_config.json's BERT with cross-attention to it."""
    from transformers import BlipConfig

    vision = {**vision, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
    m = med_config
    text = {"vocab_size": m["vocab_size"], "hidden_size": m["hidden_size"],
            "intermediate_size": m["intermediate_size"], "num_hidden_layers": m["num_hidden_layers"],
            "num_attention_heads": m["num_attention_heads"], "max_position_embeddings": m["max_position_embeddings"],
            "hidden_act": m.get("hidden_act", "gelu"), "layer_norm_eps": m.get("layer_norm_eps", 1e-12),
            "pad_token_id": m.get("pad_token_id", 0), "encoder_hidden_size": vision["hidden_size"],
            # BlipTextLayer builds its cross-attention only for decoder configs; forward(is_decoder=False) keeps
            # the self-attention bidirectional, as med's encoder mode
            "is_decoder": True}
    return BlipConfig(text_config=text, vision_config=vision, architectures=["ImageRewardModel"])


def imagereward_class():
    """ImageRewardModel: BlipVisionModel + BlipTextModel (no pooler) + ImageReward's MLP head (its layer indices:
    Linear at 0, 2, 4, 6, 7 with dropouts between, no activations); forward returns the normalised reward."""
    import torch
    from torch import nn
    from transformers import BlipTextModel, BlipVisionModel

    class ImageRewardModel(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.vision_model = BlipVisionModel(config.vision_config)
            self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
            d = config.text_config.hidden_size
            self.mlp = nn.Module()
            self.mlp.layers = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
            """The [CLS] feature of the text read with cross-attention to the image's ViT tokens."""
            image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                     encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                     is_decoder=False).last_hidden_state[:, 0, :]

        def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
            reward = self.mlp.layers(self.features(pixel_values, input_ids, attention_mask).float())
            return ((reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).reshape(-1)

    return ImageRewardModel


def load_imagereward_model(folder: Path):
    """ImageRewardModel from a folder convert_imagereward wrote, strictly, in eval mode."""
    from safetensors.torch import load_file
    from transformers import BlipConfig

    model = imagereward_class()(BlipConfig.from_pretrained(str(folder)))
    load_strictly(model, load_file(str(Path(folder) / "model.safetensors")), f"{folder}/model.safetensors")
    return model.eval()


def imagereward_tokenizer(folder: Path):
    """bert-base-uncased's tokenizer with BLIP's added [DEC] bos token and [ENC] special token (its 30524 ids)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def convert_imagereward(folder: Path, tokenizer_folder: Path, out: Path) -> None:
    """`folder` (ImageReward.pt, med_config.json as on the hub) -> `out`: config.json (BlipConfig),
    model.safetensors (ImageRewardModel), the tokenizer from `tokenizer_folder` with BLIP's tokens, and
    ImageReward's image preprocessing (224 px bicubic resize + centre crop, CLIP mean/std)."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    state = load_checkpoint(Path(folder) / "ImageReward.pt")
    config = imagereward_config(json.loads((Path(folder) / "med_config.json").read_text(encoding="utf-8")),
                                vision_shape(state))
    model = imagereward_class()(config)
    load_strictly(model, blip_to_hf(state), f"ImageReward checkpoint {folder}")
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    imagereward_tokenizer(tokenizer_folder).save_pretrained(str(out))
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(str(out))


def build_tiny_imagereward_checkpoint(folder: Path, vocab_size: int, vision: dict[str, Any], seed: int = 0) -> Path:
    """ImageReward's hub files, tiny and random: med_config.json (a small BERT with cross-attention) and
    ImageReward.pt in BLIP_Pretrain + MLP key layout (blip.visual_encoder timm names, blip.text_encoder, the
    contrastive projections ImageReward does not read, mlp.layers.*)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
           "encoder_width": vision["hidden_size"], "add_cross_attention": True}
    w, mlp_w, d = vision["hidden_size"], vision["intermediate_size"], med["hidden_size"]
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    p = vision["patch_size"]
    sd = {"blip.visual_encoder.cls_token": rand(1, 1, w), "blip.visual_encoder.pos_embed": rand(1, grid + 1, w),
          "blip.visual_encoder.patch_embed.proj.weight": rand(w, 3, p, p), "blip.visual_encoder.patch_embed.proj.bias":
          rand(w), "blip.visual_encoder.norm.weight": 1 + rand(w), "blip.visual_encoder.norm.bias": rand(w),
          "blip.vision_proj.weight": rand(16, w), "blip.vision_proj.bias": rand(16),
          "blip.text_proj.weight": rand(16, d), "blip.text_proj.bias": rand(16)}
    for n in range(vision["num_hidden_layers"]):
        b = f"blip.visual_encoder.blocks.{n}."
        sd.update({b + "norm1.weight": 1 + rand(w), b + "norm1.bias": rand(w), b + "attn.qkv.weight": rand(3 * w, w),
                   b + "attn.qkv.bias": rand(3 * w), b + "attn.proj.weight": rand(w, w), b + "attn.proj.bias": rand(w),
                   b + "norm2.weight": 1 + rand(w), b + "norm2.bias": rand(w), b + "mlp.fc1.weight": rand(mlp_w, w),
                   b + "mlp.fc1.bias": rand(mlp_w), b + "mlp.fc2.weight": rand(w, mlp_w), b + "mlp.fc2.bias": rand(w)})
    t = "blip.text_encoder."
    sd.update({t + "embeddings.word_embeddings.weight": rand(vocab_size, d),
               t + "embeddings.position_embeddings.weight": rand(med["max_position_embeddings"], d),
               t + "embeddings.LayerNorm.weight": 1 + rand(d), t + "embeddings.LayerNorm.bias": rand(d),
               t + "embeddings.position_ids": torch.arange(med["max_position_embeddings"]).expand(1, -1)})
    for n in range(med["num_hidden_layers"]):
        b = f"{t}encoder.layer.{n}."
        for att, width in (("attention", d), ("crossattention", w)):
            sd.update({b + f"{att}.self.query.weight": rand(d, d), b + f"{att}.self.query.bias": rand(d),
                       b + f"{att}.self.key.weight": rand(d, width), b + f"{att}.self.key.bias": rand(d),
                       b + f"{att}.self.value.weight": rand(d, width), b + f"{att}.self.value.bias": rand(d),
                       b + f"{att}.output.dense.weight": rand(d, d), b + f"{att}.output.dense.bias": rand(d),
                       b + f"{att}.output.LayerNorm.weight": 1 + rand(d), b + f"{att}.output.LayerNorm.bias": rand(d)})
        sd.update({b + "intermediate.dense.weight": rand(64, d), b + "intermediate.dense.bias": rand(64),
                   b + "output.dense.weight": rand(d, 64), b + "output.dense.bias": rand(d),
                   b + "output.LayerNorm.weight": 1 + rand(d), b + "output.LayerNorm.bias": rand(d)})
    for i, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), ((d, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)),
                                    strict=True):
        sd[f"mlp.layers.{i}.weight"] = rand(fan_out, fan_in, scale=fan_in ** -0.5)
        sd[f"mlp.layers.{i}.bias"] = rand(fan_out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "med_config.json").write_text(json.dumps(med, indent=2) + "\n", encoding="utf-8")
    torch.save(sd, str(folder / "ImageReward.pt"))
    return folder
