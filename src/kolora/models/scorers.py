"""Image scorers from local weights: CLIP image-text similarity (OpenAI CLIP for English, Chinese-CLIP for
Chinese) and the LAION aesthetic predictor, shared by the filter ops (kolora.filter.dj.score_ops) and the evaluate
stage; and the ViT classifiers of Data-Juicer's image_nsfw_filter / image_watermark_filter (CLASSIFIERS), which
Data-Juicer loads itself from the local folder (`kolora fetch models --filters nsfw,watermark --to DIR`).

Models live under one folder in Data-Juicer's external-models-home layout, `<dir>/<hub id>/`
(`kolora fetch models --clip --aesthetics --to DIR`), with their hub ids kept: Data-Juicer picks the aesthetic
predictor's head and its ÷10 scaling from substrings of that name. `build_tiny_*` write randomly initialised
models of the same architectures in the same on-disk layouts (config.json, model.safetensors, tokenizer and
processor files) for tests and the demo. Nothing here downloads; torch/transformers are imported in functions.

Scores: `clip_score` is Data-Juicer's `image_text_similarity` (logits_per_text / 100 = cosine similarity);
`aesthetic_score` is the predictor's output, ÷10 for the `shunk031/aesthetics-predictor*` models (0-1, as
Data-Juicer's `image_aesthetics_filter` compares it); REWARDS are the reward scorers of evaluate, which read English
only (`english_prompt`): `pickscore` is PickScore's logit_scale · cosine, `hps_score` HPSv2's cosine and
`imagereward_score` ImageReward's normalised reward, the last two from weight ports (kolora.models.reward_ports).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.core import devices
from kolora.models import reward_ports
from kolora.models.kolors import quiet_libraries

# torch, transformers: imported in the functions that use them (a login node's CLI starts without them)

CLIP_EN = "openai/clip-vit-base-patch32"
CLIP_ZH = "OFA-Sys/chinese-clip-vit-base-patch16"
AESTHETIC = "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
FETCH_COMMAND = "kolora fetch models --clip --aesthetics"
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's model card loads its processor from here
HPS = "xswu/HPSv2"  # HPS v2 / v2.1: open_clip ViT-H-14 fine-tunes of PICKSCORE_PROCESSOR's CLIP
HPS_VERSION = "v2.1"
IMAGEREWARD = "THUDM/ImageReward"
IMAGEREWARD_TOKENIZER = "google-bert/bert-base-uncased"  # BLIP's tokenizer (ImageReward loads it by name)
NSFW = "Falconsai/nsfw_image_detection"
WATERMARK = "amrul-hzz/watermark_detector"
TINY_MARKER = "TINY_RANDOM_MODEL.txt"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class ScorerModelError(Exception):
    """A scorer model is missing or unreadable; the message names the folder and the fetch command."""


def is_chinese(text: str) -> bool:
    """Chinese when CJK ideographs make up at least a fifth of the letters (the tutorial's captions mix in
    commas and the odd Latin word)."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(bool(_CJK.match(c)) for c in letters) * 5 >= len(letters)


def clip_for(text: str, language: str, clip_en: str = CLIP_EN, clip_zh: str = CLIP_ZH) -> str:
    """The CLIP model id for a text: `language` zh/en forces one; auto detects Chinese (is_chinese)."""
    if language == "zh" or (language == "auto" and is_chinese(text)):
        return clip_zh
    return clip_en


def local_folder(models_dir: Path | str | None, model_id: str, what: str | None = None,
                 command: str | None = None) -> Path:
    """`<models_dir>/<hub id>` (an absolute path given as the id is used as is); ScorerModelError naming the
    fetch command (`command`, else this scorer's) when it has no config.json. `what` names the model's use."""
    what = what or f"scorer model {model_id!r}"
    command = command or f"{fetch_command(model_id)} --to {models_dir or 'DIR'}"
    candidate = Path(model_id)
    if not candidate.is_absolute():
        if models_dir is None:
            raise ScorerModelError(f"{what}: no local models folder configured; set scorers.dir to the folder "
                                   f"`{command}` filled")
        candidate = Path(models_dir) / model_id
    if not (candidate / "config.json").is_file():
        raise ScorerModelError(f"{what}: {candidate} has no config.json. Download it on a login node with "
                               f"`{command}` (compute nodes are offline)")
    return candidate


# Data-Juicer filter ops that load a scorer: {op: its model argument, default model}. Data-Juicer's own
# image_aesthetics_filter needs simple-aesthetics-predictor, which requires transformers < 5: kolora runs its
# subclass image_aesthetics_local_filter instead (kolora.filter.dj.score_ops: same arguments, stats and scores).
FILTER_OP_MODELS = {"image_text_similarity_filter": ("hf_clip", None),
                    "image_aesthetics_filter": ("hf_scorer_model", AESTHETIC),
                    "image_nsfw_filter": ("hf_nsfw_model", NSFW),
                    "image_watermark_filter": ("hf_watermark_model", WATERMARK)}
LOCAL_MODEL_OPS = {"image_aesthetics_filter": "image_aesthetics_local_filter"}


def filter_op_models(ops: list[dict[str, dict[str, Any]]], scfg, captions: list[str] | None
                     ) -> list[tuple[int, str, list[str]]]:
    """(op index, model argument, model ids it may use) for every scorer op in filter.ops. Without an explicit
    hf_clip, the CLIP follows scorers.language; `auto` picks Chinese-CLIP when most captions are Chinese
    (`captions` None: not known yet, so either may be used)."""
    out = []
    for i, item in enumerate(ops):
        name, args = next(iter(item.items()))
        if name not in FILTER_OP_MODELS:
            continue
        arg, default = FILTER_OP_MODELS[name]
        given = (args or {}).get(arg) or default
        if given:
            out.append((i, arg, [scfg.aesthetic if given == AESTHETIC else given]))
        elif scfg.language != "auto":
            out.append((i, arg, [scfg.chinese_clip if scfg.language == "zh" else scfg.clip]))
        elif captions is None:
            out.append((i, arg, [scfg.clip, scfg.chinese_clip]))
        else:
            chinese = sum(is_chinese(c) for c in captions) * 2 > len(captions)
            out.append((i, arg, [scfg.chinese_clip if chinese else scfg.clip]))
    return out


def localize_ops(process: list[dict[str, dict[str, Any]]], configured: list[dict[str, dict[str, Any]]], scfg,
                 captions: list[str]) -> list[dict[str, dict[str, Any]]]:
    """Data-Juicer's `process` with every scorer op's model argument set to its local folder under
    scorers.dir (ScorerModelError naming the fetch command when it is missing)."""
    out = [{name: dict(args) for name, args in item.items()} for item in process]
    ensure_tiny_classifiers(scfg, [n for _i, _arg, ids in filter_op_models(configured, scfg, captions) for n in ids])
    for i, arg, names in filter_op_models(configured, scfg, captions):
        args = next(iter(out[i].values()))
        args[arg] = str(local_folder(scfg.dir, names[0]))
    return out


# the aesthetic predictor --------------------------------------------------------------------------------------
def aesthetic_head(name: str) -> str:
    """simple-aesthetics-predictor's class for a model name, chosen by Data-Juicer by substrings."""
    if "v1" in name:
        return "v1"
    if "v2" in name and "linear" in name:
        return "v2-linear"
    if "v2" in name and "relu" in name:
        return "v2-relu"
    raise ScorerModelError(f"aesthetic model {name!r}: the name must say v1, v2 + linear or v2 + relu (its head), "
                           f"as the hub ids of shunk031/aesthetics-predictor-* do; keep the hub id as folder name")


_HEAD_CLASSES = {"v1": "AestheticsPredictorV1", "v2-linear": "AestheticsPredictorV2Linear",
                 "v2-relu": "AestheticsPredictorV2ReLU"}


def aesthetic_scaled(name: str) -> bool:
    """Data-Juicer divides by 10 only for these models (the LAION predictors output 0-10)."""
    return "aesthetics-predictor" in name


def _predictor_class(head: str):
    """CLIPVisionModelWithProjection + the LAION MLP on the normalised image embedding, with the parameter
    names of simple-aesthetics-predictor (`layers.*`), whose hub checkpoints it loads."""
    import torch
    from torch import nn
    from transformers import CLIPVisionModelWithProjection

    class AestheticsPredictor(CLIPVisionModelWithProjection):
        def __init__(self, config):
            super().__init__(config)
            d = config.projection_dim
            if head == "v1":
                self.layers = nn.Linear(d, 1)
            else:
                act = [nn.ReLU()] if head == "v2-relu" else []
                self.layers = nn.Sequential(nn.Linear(d, 1024), *act, nn.Dropout(0.2), nn.Linear(1024, 128), *act,
                                            nn.Dropout(0.2), nn.Linear(128, 64), *act, nn.Dropout(0.1),
                                            nn.Linear(64, 16), *act, nn.Linear(16, 1))
            self.post_init()

        def forward(self, pixel_values: torch.Tensor, **_: Any):
            from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

            embeds = super().forward(pixel_values=pixel_values).image_embeds
            return ImageClassifierOutputWithNoAttention(logits=self.layers(embeds / embeds.norm(dim=-1, keepdim=True)))

    # the class name save_pretrained writes into config.json's architectures, as the hub checkpoints have it
    AestheticsPredictor.__name__ = AestheticsPredictor.__qualname__ = _HEAD_CLASSES[head]
    return AestheticsPredictor


# image classifiers for Data-Juicer's image_nsfw_filter / image_watermark_filter ------------------------------
@dataclass(frozen=True)
class Classifier:
    """A binary image classifier a Data-Juicer filter op loads with AutoModel from its config's architecture
    (ViTForImageClassification for both hub models); the op's score is softmax index 1, `labels[1]`."""

    hub_id: str
    op: str
    labels: tuple[str, str]


# `kolora fetch models --filters KEY,...`; labels as the hub models name their classes
CLASSIFIERS = {"nsfw": Classifier(NSFW, "image_nsfw_filter", ("normal", "nsfw")),
               "watermark": Classifier(WATERMARK, "image_watermark_filter", ("no_watermark", "watermark"))}


# Reward scorers (scorers.rewards, `kolora fetch models --scorers KEY,...`): key -> (the hub repository of its
# weights, the one read for its tokenizer/processor files only). hps and imagereward are converted at fetch time into
# one folder each (reward_folders), which holds their processor files too.
REWARDS = {"pickscore": (PICKSCORE, PICKSCORE_PROCESSOR), "hps": (HPS, PICKSCORE_PROCESSOR),
           "imagereward": (IMAGEREWARD, IMAGEREWARD_TOKENIZER)}
NO_ENGLISH_PROMPT = "no English prompt (the prompt is Chinese and its prompt set gives no prompt_en)"


def hps_folder(hub_id: str = HPS, version: str = HPS_VERSION) -> str:
    """The converted HPS model's folder under scorers.dir: one per checkpoint version."""
    return f"{hub_id}/{version}"


def fetch_command(model_id: str) -> str:
    """The `kolora fetch models` flags that download `model_id` (without --to)."""
    keys = [key for key, c in CLASSIFIERS.items() if c.hub_id == model_id]
    rewards = [key for key, ids in REWARDS.items() if model_id in ids]
    if model_id.startswith(HPS + "/"):  # a converted HPS version
        version = model_id.removeprefix(HPS + "/")
        return "kolora fetch models --scorers hps" + (f" --hps-version {version}" if version != HPS_VERSION else "")
    if rewards:
        return f"kolora fetch models --scorers {rewards[0]}"
    return f"kolora fetch models --filters {keys[0]}" if keys else FETCH_COMMAND


def reward_keys(text: str) -> list[str]:
    """`pickscore,hps,...` -> the REWARDS keys in it; ValueError naming the valid ones for any other."""
    keys = list(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in keys if k not in REWARDS]
    if unknown or not keys:
        raise ValueError(f"unknown reward scorer {', '.join(map(repr, unknown)) or repr(text)}: the valid ones are "
                         f"{', '.join(REWARDS)} (comma-separated, e.g. --scorers pickscore,hps)")
    return keys


def reward_models(scfg, key: str) -> tuple[str, ...]:
    """The local folders (hub ids under scorers.dir) scorers.<key> configures for a reward scorer: PickScore's model
    and processor repositories; the converted HPS version's folder; the converted ImageReward folder."""
    if key == "pickscore":
        return scfg.pickscore, scfg.pickscore_processor
    if key == "hps":
        return (hps_folder(scfg.hps, scfg.hps_version),)
    if key == "imagereward":
        return (scfg.imagereward,)
    raise ValueError(f"unknown reward scorer {key!r}")


def english_prompt(item) -> str | None:
    """The text an English-only scorer reads for a prompt item: its prompt_en, else the prompt unless it is
    Chinese (None: nothing it can read)."""
    if getattr(item, "prompt_en", None):
        return item.prompt_en
    return None if is_chinese(item.prompt) else item.prompt


def english_validation_texts(validation_prompts: list[str], items: list, count: int) -> list[str | None]:
    """What a reward scorer reads for each validation prompt: train.validation.prompts as given unless Chinese,
    else the prompt set's first `count` items through english_prompt (None: nothing it can read)."""
    if validation_prompts:
        return [None if is_chinese(p) else p for p in validation_prompts]
    return [english_prompt(item) for item in items[:count]]


NO_ENGLISH_VALIDATION = ("reads English only, and no validation prompt is English: set train.validation.prompts to "
                         "English prompts, or give the prompt set's first train.validation.count items a prompt_en")


def filter_keys(text: str) -> list[str]:
    """`nsfw,watermark` -> the CLASSIFIERS keys in it; ValueError naming the valid ones for any other."""
    keys = list(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in keys if k not in CLASSIFIERS]
    if unknown or not keys:
        raise ValueError(f"unknown filter model {', '.join(map(repr, unknown)) or repr(text)}: the valid ones are "
                         f"{', '.join(CLASSIFIERS)} (comma-separated, e.g. --filters {','.join(CLASSIFIERS)})")
    return keys


def build_tiny_classifier(path: Path, key: str, seed: int = 0) -> Path:
    """The hub classifier's layout (ViTForImageClassification, its label names, a ViT image processor), tiny and
    random; its head scaled so the scores spread over 0-1 and thresholds mean something."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = CLASSIFIERS[key].labels

    def save(tmp: Path) -> None:
        torch.manual_seed(seed)
        cfg = ViTConfig(**_TINY_VISION, num_labels=2, id2label=dict(enumerate(labels)),
                        label2id={label: i for i, label in enumerate(labels)})
        model = ViTForImageClassification(cfg)
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 3.0 / cfg.hidden_size ** 0.5)
        model.save_pretrained(str(tmp))
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(str(tmp))

    return _write_atomically(path, save)


def ensure_tiny_classifiers(scfg, names: list[str]) -> None:
    """scorers.tiny: build the classifiers among `names` (hub ids) as tiny random ones where scorers.dir lacks them."""
    if not (scfg.tiny and scfg.dir is not None):
        return
    for key, c in CLASSIFIERS.items():
        if c.hub_id in names and not (Path(scfg.dir) / c.hub_id / "config.json").is_file():
            build_tiny_classifier(Path(scfg.dir) / c.hub_id, key)


# loading and scoring -----------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: Any
    processor: Any
    name: str
    device: str


def load_clip(folder: Path, name: str, device: str = "cpu") -> Loaded:
    """CLIP or Chinese-CLIP (by its config's model_type) with its processor, in eval mode on `device`."""
    import transformers

    model_type = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    model_cls, proc_cls = {"clip": ("CLIPModel", "CLIPProcessor"),
                           "chinese_clip": ("ChineseCLIPModel", "ChineseCLIPProcessor")}.get(model_type, (None, None))
    if model_cls is None:
        raise ScorerModelError(f"{folder}: model_type {model_type!r} is not a CLIP (clip or chinese_clip)")
    device = devices.pick(device)
    model = getattr(transformers, model_cls).from_pretrained(str(folder)).eval().to(device)
    return Loaded(model, getattr(transformers, proc_cls).from_pretrained(str(folder)), name, device)


def load_aesthetic(folder: Path, name: str, device: str = "cpu") -> Loaded:
    from transformers import CLIPProcessor

    device = devices.pick(device)
    model = _predictor_class(aesthetic_head(name)).from_pretrained(str(folder)).eval().to(device)
    return Loaded(model, CLIPProcessor.from_pretrained(str(folder)), name, device)


@dataclass
class ImageScorers:
    """The CLIP each text is scored with (by its language) and the aesthetic predictor, loaded once."""
    clip_of: dict[Any, str]  # text key -> CLIP model id
    folders: dict[str, Path]  # model id -> its local folder
    clips: dict[str, Loaded]
    aesthetic: Loaded


def load_image_scorers(scfg, texts: dict[Any, str], device: str = "cpu") -> ImageScorers:
    """CLIP for each of `texts` (scorers.language) and the aesthetic predictor from scorers.dir (tiny ones built
    first with scorers.tiny); ScorerModelError naming the fetch command when one is missing."""
    ensure_tiny(scfg)
    clip_of = {k: clip_for(t, scfg.language, scfg.clip, scfg.chinese_clip) for k, t in texts.items()}
    folders = {name: local_folder(scfg.dir, name) for name in {*clip_of.values(), scfg.aesthetic}}
    clips = {name: load_clip(folders[name], name, device) for name in set(clip_of.values())}
    return ImageScorers(clip_of, folders, clips, load_aesthetic(folders[scfg.aesthetic], scfg.aesthetic, device))


def clip_score(clip: Loaded, images: list, texts: list[str]) -> list[float]:
    """Cosine similarity of each image with its own text (Data-Juicer's image_text_similarity)."""
    return [float(out.logits_per_text[0, 0]) / 100.0 for out in _pairs(clip, images, texts, "clip_score")]


def _pairs(loaded: Loaded, images: list, texts: list[str], what: str):
    """The CLIP-style model's output for each image with its own text, one pair at a time."""
    import torch

    if len(images) != len(texts):
        raise ValueError(f"{what}: {len(images)} images but {len(texts)} texts")
    max_len = loaded.model.config.text_config.max_position_embeddings
    for image, text in zip(images, texts, strict=True):
        inputs = loaded.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt", padding=True,
                                  truncation=True, max_length=max_len).to(loaded.device)
        with torch.no_grad():
            yield loaded.model(**inputs)


def load_pickscore(folder: Path, processor_folder: Path, name: str, device: str = "cpu") -> Loaded:
    """PickScore: a CLIPModel fine-tuned on Pick-a-Pic, with the processor of the CLIP it started from."""
    from transformers import CLIPModel, CLIPProcessor

    device = devices.pick(device)
    model = CLIPModel.from_pretrained(str(folder)).eval().to(device)
    return Loaded(model, CLIPProcessor.from_pretrained(str(processor_folder)), name, device)


def pickscore(model: Loaded, images: list, texts: list[str]) -> list[float]:
    """PickScore of each image with its own text: logit_scale · cosine(image, text), as its model card computes
    it (about 20-23 for the real model; not bounded)."""
    # logits_per_image = logit_scale.exp() * cosine similarity
    return [float(out.logits_per_image[0, 0]) for out in _pairs(model, images, texts, "pickscore")]


def load_hps(folder: Path, name: str, device: str = "cpu") -> Loaded:
    """HPSv2 converted to a CLIPModel folder (reward_ports.convert_hps), with the processor files it holds."""
    return load_pickscore(folder, folder, name, device)


def hps_score(model: Loaded, images: list, texts: list[str]) -> list[float]:
    """HPSv2 of each image with its own text: the cosine of the normalised image and text features, as hpsv2's
    score() returns (about 0.2-0.3 for the real model; no logit scale)."""
    # CLIPModel's outputs hold the normalised embeddings
    return [float((out.image_embeds * out.text_embeds).sum()) for out in _pairs(model, images, texts, "hps")]


def load_imagereward(folder: Path, name: str, device: str = "cpu") -> Loaded:
    """ImageReward converted by reward_ports.convert_imagereward; processor: (BERT tokenizer, image processor)."""
    from transformers import BertTokenizer, CLIPImageProcessor

    device = devices.pick(device)
    model = reward_ports.load_imagereward_model(folder).to(device)
    return Loaded(model, (BertTokenizer.from_pretrained(str(folder)), CLIPImageProcessor.from_pretrained(str(folder))),
                  name, device)


def imagereward_score(model: Loaded, images: list, texts: list[str]) -> list[float]:
    """ImageReward of each image with its own text: (MLP([CLS] of the text read across the image) - mean) / std,
    the text tokenised to 35 tokens as ImageReward does (about -2 to 2 for the real model)."""
    import torch

    if len(images) != len(texts):
        raise ValueError(f"imagereward: {len(images)} images but {len(texts)} texts")
    tokenizer, image_processor = model.processor
    out = []
    for image, text in zip(images, texts, strict=True):
        tokens = tokenizer(text, padding="max_length", truncation=True, max_length=reward_ports.IMAGEREWARD_MAX_LENGTH,
                           return_tensors="pt").to(model.device)
        pixels = image_processor(images=[image.convert("RGB")], return_tensors="pt").pixel_values.to(model.device)
        with torch.no_grad():
            out.append(float(model.model(pixels, tokens.input_ids, tokens.attention_mask)[0]))
    return out


_REWARD_LOAD = {"pickscore": lambda folders, name, device: load_pickscore(folders[0], folders[1], name, device),
                "hps": lambda folders, name, device: load_hps(folders[0], name, device),
                "imagereward": lambda folders, name, device: load_imagereward(folders[0], name, device)}
_REWARD_SCORE = {"pickscore": pickscore, "hps": hps_score, "imagereward": imagereward_score}


def load_reward(scfg, key: str, device: str = "cpu") -> tuple[Loaded, Path]:
    """Reward scorer `key` from scorers.dir (tiny ones built first with scorers.tiny) and its model's folder;
    ScorerModelError naming the fetch command when one is missing."""
    names = reward_models(scfg, key)
    ensure_tiny_rewards(scfg, names)
    folders = [local_folder(scfg.dir, n) for n in names]
    return _REWARD_LOAD[key](folders, names[0], device), folders[0]


def reward_score(key: str, model: Loaded, images: list, texts: list[str]) -> list[float]:
    """Reward scorer `key`'s score of each image with its own (English) text."""
    return _REWARD_SCORE[key](model, images, texts)


def aesthetic_score(aesthetic: Loaded, images: list) -> list[float]:
    import torch

    inputs = aesthetic.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(aesthetic.device)
    with torch.no_grad():
        logits = aesthetic.model(**inputs).logits.reshape(-1)
    scale = 10.0 if aesthetic_scaled(aesthetic.name) else 1.0
    return [float(v) / scale for v in logits]


# tiny random models in the real layouts -----------------------------------------------------------------------
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77)
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8)
_PROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
_ZH_CORPUS = ("二次元日系动漫演唱会的观众席人山人海一个紫色短发小女孩穿着粉色吊带漏肩连衣裙坐在舞台上衣着华丽歌星们唱"
              "露出憧憬神情对流许愿闭眼睛十指交叉侧面中等长度头练习室手持话筒少女黑礼服试间心忐忑丑陋变形嘈杂模糊低比度")


def _clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges: every byte is a token (257 + 256 + 2 ids)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    chars = sorted(set(_ZH_CORPUS) | set("abcdefghijklmnopqrstuvwxyz0123456789,.、，"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n",
                                      encoding="utf-8")
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


def _publish_folder(path: Path, save, tiny: bool) -> Path:
    """`save(folder)` builds a model in a temp folder beside `path`, which is then renamed into place: a tiny model
    (with the TINY_MARKER) keeps a model already at `path`; a converted one (reward_ports) replaces it."""

    quiet_libraries()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    old = tmp.with_name(tmp.name + ".old")
    try:
        save(tmp)
        if tiny:
            (tmp / TINY_MARKER).write_text("Random tiny weights made by kolora for tests and the demo. Not a real "
                                           "model.\n")
        elif path.exists():
            path.rename(old)  # out of the way in one step; deleted once the new one is in place
        try:
            tmp.rename(path)
        except OSError:  # there already: another process built the same (seeded) model, or a real one is there
            if not (tiny and (path / "config.json").is_file()):
                raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    return path


def _write_atomically(path: Path, save) -> Path:
    return _publish_folder(path, save, tiny=True)


def write_converted(path: Path, save) -> Path:
    """`save(folder)` writes a converted model (reward_ports); it replaces what is at `path` once complete."""
    return _publish_folder(path, save, tiny=False)


def write_tiny_model(path: Path, save) -> Path:
    """`save(folder)` writes a tiny model; it lands at `path` with the TINY_MARKER, atomically (other model
    kinds' tiny builders: kolora.models.captioner)."""
    return _write_atomically(path, save)


def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """openai/clip-vit-base-patch32's layout (CLIPModel + CLIPProcessor), tiny and random."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    def save(tmp: Path) -> None:
        torch.manual_seed(seed)
        tok = _clip_tokenizer()
        cfg = CLIPConfig(text_config={**_TINY_TEXT, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                      "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
                         vision_config=_TINY_VISION, projection_dim=16)
        CLIPModel(cfg).save_pretrained(str(tmp))
        CLIPProcessor(image_processor=CLIPImageProcessor(**_PROCESSOR), tokenizer=tok).save_pretrained(str(tmp))

    return _write_atomically(path, save)


def build_tiny_chinese_clip(path: Path, seed: int = 0) -> Path:
    """OFA-Sys/chinese-clip-vit-base-patch16's layout (ChineseCLIPModel: a BERT text tower, vocab.txt)."""
    import torch
    from transformers import (
        ChineseCLIPConfig,
        ChineseCLIPImageProcessor,
        ChineseCLIPModel,
        ChineseCLIPProcessor,
    )

    def save(tmp: Path) -> None:
        torch.manual_seed(seed)
        tok = _bert_tokenizer(tmp / ".vocab")
        text = {**_TINY_TEXT, "vocab_size": len(tok), "max_position_embeddings": 64}
        cfg = ChineseCLIPConfig(text_config=text, vision_config=_TINY_VISION, projection_dim=16)
        ChineseCLIPModel(cfg).save_pretrained(str(tmp))
        ChineseCLIPProcessor(image_processor=ChineseCLIPImageProcessor(**_PROCESSOR),
                             tokenizer=tok).save_pretrained(str(tmp))

        shutil.rmtree(tmp / ".vocab")

    return _write_atomically(path, save)


def build_tiny_aesthetic(path: Path, name: str = AESTHETIC, seed: int = 0) -> Path:
    """shunk031/aesthetics-predictor-*'s layout: a CLIP vision config with the predictor's architecture name,
    its weights, and a CLIPProcessor (Data-Juicer loads one from the same folder)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPVisionConfig

    head = aesthetic_head(name)

    def save(tmp: Path) -> None:
        torch.manual_seed(seed)
        cls = _predictor_class(head)
        model = cls(CLIPVisionConfig(**_TINY_VISION, projection_dim=16))
        with torch.no_grad():  # spread the random head's output around 5 (of 10) so thresholds mean something
            head_linears = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
            for m in head_linears:
                m.weight.normal_(0.0, 1.0 / m.in_features ** 0.5)
                m.bias.zero_()
            head_linears[-1].weight.mul_(10.0)
            head_linears[-1].bias.fill_(5.0)
        model.save_pretrained(str(tmp))
        CLIPProcessor(image_processor=CLIPImageProcessor(**_PROCESSOR), tokenizer=_clip_tokenizer()).save_pretrained(
            str(tmp))

    return _write_atomically(path, save)


def build_tiny_pickscore(path: Path, processor_path: Path, seed: int = 0) -> list[Path]:
    """yuvalkirstain/PickScore_v1's layout (CLIPModel, no processor files) and its processor's repository
    (config.json, tokenizer and image processor files; no weights), tiny and random."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = _clip_tokenizer()
    cfg = CLIPConfig(text_config={**_TINY_TEXT, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                  "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
                     vision_config=_TINY_VISION, projection_dim=16)

    def save_model(tmp: Path) -> None:
        torch.manual_seed(seed)
        CLIPModel(cfg).save_pretrained(str(tmp))

    def save_processor(tmp: Path) -> None:
        cfg.save_pretrained(str(tmp))
        CLIPProcessor(image_processor=CLIPImageProcessor(**_PROCESSOR), tokenizer=tok).save_pretrained(str(tmp))

    out = []
    for folder, save in ((Path(path), save_model), (Path(processor_path), save_processor)):
        if not (folder / "config.json").is_file():
            out.append(_write_atomically(folder, save))
    return out


def tiny_clip_config(hidden_act: str = "quick_gelu"):
    """The tiny CLIPConfig of build_tiny_pickscore / build_tiny_hps, with the byte-level tokenizer's ids."""
    from transformers import CLIPConfig

    tok = _clip_tokenizer()
    return CLIPConfig(text_config={**_TINY_TEXT, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                   "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                                   "hidden_act": hidden_act},
                      vision_config={**_TINY_VISION, "hidden_act": hidden_act}, projection_dim=16)


def build_tiny_hps_hub(folder: Path, processor_folder: Path, version: str = HPS_VERSION, seed: int = 0) -> Path:
    """xswu/HPSv2's file for `version` (a random open_clip checkpoint, GELU) and the processor repository it is
    converted with (config.json, tokenizer and image processor files), tiny; returns the checkpoint's path."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    cfg = tiny_clip_config("gelu")
    cfg.save_pretrained(str(processor_folder))
    CLIPProcessor(image_processor=CLIPImageProcessor(**_PROCESSOR), tokenizer=_clip_tokenizer()).save_pretrained(
        str(processor_folder))
    return reward_ports.build_tiny_hps_checkpoint(Path(folder) / reward_ports.HPS_FILES[version], cfg, seed)


def build_tiny_hps(path: Path, version: str = HPS_VERSION, seed: int = 0) -> Path:
    """A converted HPS folder (CLIPModel + processor) made from a tiny random checkpoint in the hub's layout."""
    def save(tmp: Path) -> None:
        checkpoint = build_tiny_hps_hub(tmp / ".hub", tmp / ".processor", version, seed)
        reward_ports.convert_hps(checkpoint, tmp / ".processor", tmp)
        for helper in (tmp / ".hub", tmp / ".processor"):
            shutil.rmtree(helper)

    return _write_atomically(path, save)


def build_tiny_imagereward_hub(folder: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """THUDM/ImageReward's files (ImageReward.pt, med_config.json) and a BERT tokenizer folder, tiny and random;
    the vocabulary has every letter as a word and a ## continuation, so English words are not [UNK]."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokenizer_folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), ",", "."]
    (tokenizer_folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # BLIP adds [DEC] and [ENC] to the tokenizer: two ids past the vocabulary
    return reward_ports.build_tiny_imagereward_checkpoint(folder, len(vocab) + 2, TINY_IMAGEREWARD_VISION, seed)


# heads of 64 channels, as BLIP's ViTs (reward_ports.vision_shape reads the rest from the checkpoint)
TINY_IMAGEREWARD_VISION = dict(hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8)


def build_tiny_imagereward(path: Path, seed: int = 0) -> Path:
    """A converted ImageReward folder made from tiny random hub files in ImageReward's key layout."""
    def save(tmp: Path) -> None:
        build_tiny_imagereward_hub(tmp / ".hub", tmp / ".tokenizer", seed)
        reward_ports.convert_imagereward(tmp / ".hub", tmp / ".tokenizer", tmp)
        for helper in (tmp / ".hub", tmp / ".tokenizer"):
            shutil.rmtree(helper)

    return _write_atomically(path, save)


def build_tiny_reward(models_dir: Path, key: str, names: tuple[str, ...]) -> list[Path]:
    """Reward scorer `key` as tiny random model(s) at models_dir/<names> (those not there yet)."""
    folders = [Path(models_dir) / n for n in names]
    if all((f / "config.json").is_file() for f in folders):
        return []
    if key == "pickscore":
        return build_tiny_pickscore(folders[0], folders[1])
    if key == "hps":
        return [build_tiny_hps(folders[0], version=folders[0].name if folders[0].name in reward_ports.HPS_FILES
                               else HPS_VERSION)]
    return [build_tiny_imagereward(folders[0])]


def build_tiny_set(models_dir: Path, clip_en: str = CLIP_EN, clip_zh: str = CLIP_ZH, aesthetic: str = AESTHETIC,
                   seed: int = 0) -> list[Path]:
    """The three tiny models under `models_dir/<hub id>` (those not there yet)."""
    out = []
    for name, build in ((clip_en, build_tiny_clip), (clip_zh, build_tiny_chinese_clip)):
        if not (Path(models_dir) / name / "config.json").is_file():
            out.append(build(Path(models_dir) / name, seed=seed))
    if not (Path(models_dir) / aesthetic / "config.json").is_file():
        out.append(build_tiny_aesthetic(Path(models_dir) / aesthetic, name=aesthetic, seed=seed))
    return out


def ensure_tiny(scfg) -> None:
    """scorers.tiny: build the configured models as tiny random ones where scorers.dir lacks them."""
    if scfg.tiny and scfg.dir is not None:
        build_tiny_set(Path(scfg.dir), scfg.clip, scfg.chinese_clip, scfg.aesthetic)
        for key in scfg.rewards:
            build_tiny_reward(Path(scfg.dir), key, reward_models(scfg, key))


def ensure_tiny_rewards(scfg, names) -> None:
    """scorers.tiny: build the reward scorers whose folders are among `names` (e.g. evaluate.select's) as tiny
    random ones where scorers.dir lacks them."""
    if scfg.tiny and scfg.dir is not None:
        for key in REWARDS:
            if set(reward_models(scfg, key)) & set(names):
                build_tiny_reward(Path(scfg.dir), key, reward_models(scfg, key))


def missing_models(scfg, names: list[str]) -> list[str]:
    """Problems with the local models `names` (hub ids under scorers.dir), each naming the fetch command."""
    ensure_tiny(scfg)
    ensure_tiny_rewards(scfg, names)
    ensure_tiny_classifiers(scfg, names)
    problems = []
    for name in dict.fromkeys(names):
        try:
            local_folder(scfg.dir, name)
        except ScorerModelError as e:
            problems.append(str(e))
    return problems


def missing_for_config(cfg, prompts: list) -> list[str]:
    """Preflight: problems with the local models the config's scorer filter ops (filter.ops and each source's
    filter_ops), evaluate and select will load."""
    captions = [cfg.data.caption] if cfg.data.caption else None
    ops = [*cfg.filter.ops, *(op for source in cfg.data.sources for op in source.filter_ops or [])]
    names = [n for _i, _arg, ids in filter_op_models(ops, cfg.scorers, captions) for n in ids]
    if cfg.evaluate.enabled:
        s = cfg.scorers
        names += [clip_for(p.prompt, s.language, s.clip, s.chinese_clip) for p in prompts] + [s.aesthetic]
        names += [name for key in s.rewards for name in reward_models(s, key)]
    if cfg.evaluate.select != "last":  # the select stage scores the validation samples (train.validation's prompts)
        s, v = cfg.scorers, cfg.train.validation
        texts = list(v.prompts) or [p.prompt for p in prompts[:v.count]]
        names += [clip_for(text, s.language, s.clip, s.chinese_clip) for text in texts] + [s.aesthetic]
        if cfg.evaluate.select in REWARDS:
            names += reward_models(s, cfg.evaluate.select)
            if not any(english_validation_texts(list(v.prompts), prompts, v.count)):
                return [f"evaluate.select: {cfg.evaluate.select} {NO_ENGLISH_VALIDATION}",
                        *missing_models(cfg.scorers, names)]
    return missing_models(cfg.scorers, names) if names else []
