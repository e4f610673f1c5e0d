"""The captioning model of data.captions: generate | replace (kolora.filter.captions), from local weights.

A BLIP-style image-to-text model (transformers' BlipForConditionalGeneration through AutoProcessor and
AutoModelForImageTextToText) in `<scorers.dir>/<hub id>/`, like the scorer models (`kolora fetch models
--captioner --to DIR`): Salesforce/blip-image-captioning-base for English, IDEA-CCNL/Taiyi-BLIP-750M-Chinese
(the same architecture with a Chinese BERT tokenizer) for Chinese; data.caption_model names another.

Why transformers directly rather than Data-Juicer's image_captioning_mapper: the mapper samples
(`do_sample=True`, so shards would not caption like one pass), rewrites every sample's text, may add a copy
of each sample, and defaults to BLIP-2 (2.7B parameters) -- here only the samples without a caption are
captioned, greedily, one image at a time (a batch's padding and reduction order could change a token), so the
captions do not depend on how the samples were sharded.

`build_tiny_captioner` writes a tiny random BLIP in the same layout (config.json, model.safetensors, processor
and tokenizer files, the TINY_MARKER) for tests and the demo. torch/transformers are imported in functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolora.core.hashing import digest, tree
from kolora.models import scorers
from kolora.models.kolors import quiet_libraries
from kolora.models.scorers import ScorerModelError

# torch, transformers, PIL: imported in the functions that use them (a login node's CLI starts without them)

CAPTIONER_EN = "Salesforce/blip-image-captioning-base"
CAPTIONER_ZH = "IDEA-CCNL/Taiyi-BLIP-750M-Chinese"
FETCH_COMMAND = "kolora fetch models --captioner"
MAX_NEW_TOKENS = 40  # BLIP's captions are one short sentence; a cap keeps a looping model from running on
_BETWEEN_CJK = re.compile(r"(?<=[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]) "
                          r"(?=[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef])")


def model_id(d) -> str:
    """The captioner data.captions uses: data.caption_model, else the default for data.caption_language."""
    return d.caption_model or (CAPTIONER_ZH if d.caption_language == "zh" else CAPTIONER_EN)


def fetch_command(name: str, to: Path | str | None) -> str:
    """The login-node command that puts `name` where scorers.dir points."""
    return f"{FETCH_COMMAND} {name} --to {to or 'DIR'}"


def local_folder(models_dir: Path | str | None, name: str) -> Path:
    """The captioner's folder under scorers.dir (kolora.models.scorers.local_folder, naming --captioner)."""
    return scorers.local_folder(models_dir, name, what=f"data.captions: captioner {name!r}",
                                command=fetch_command(name, models_dir))


def captioning(cfg) -> bool:
    return cfg.data.captions != "keep"


def ensure_tiny(cfg) -> None:
    """scorers.tiny: build the configured captioner as a tiny random one where scorers.dir lacks it."""
    name = model_id(cfg.data)
    if captioning(cfg) and cfg.scorers.tiny and cfg.scorers.dir is not None and not Path(name).is_absolute():
        if not (Path(cfg.scorers.dir) / name / "config.json").is_file():
            build_tiny_captioner(Path(cfg.scorers.dir) / name)


def missing_for_config(cfg) -> list[str]:
    """Preflight: the captioner data.captions will load, when it is not on disk (each names the fetch command)."""
    if not captioning(cfg):
        return []
    ensure_tiny(cfg)
    try:
        local_folder(cfg.scorers.dir, model_id(cfg.data))
    except ScorerModelError as e:
        return [str(e)]
    return []


def fingerprint(cfg) -> dict[str, Any]:
    """The captioner by content, for the filter stage's key ({} when nothing is captioned: keys as before)."""
    if not captioning(cfg):
        return {}
    ensure_tiny(cfg)
    name = model_id(cfg.data)
    if Path(name).is_absolute() or cfg.scorers.dir is not None:
        folder = Path(cfg.scorers.dir or "/") / name  # an absolute id stays itself
        files = digest(tree(folder)) if folder.is_dir() else "missing"
    else:
        files = "missing"
    return {"captioner": {"model": name, "files": files}}


# loading and captioning --------------------------------------------------------------------------------------
@dataclass
class Captioner:
    model: Any
    processor: Any
    name: str


def load(folder: Path, name: str) -> Captioner:
    """The captioner on the CPU (the filter job's), in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    quiet_libraries()
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
        processor = AutoProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise ScorerModelError(f"data.captions: captioner {name!r} in {folder} does not load as an image-to-text "
                               f"model ({e.__class__.__name__}: {str(e)[:300]}); data.caption_model must name a "
                               "BLIP-style captioner") from e
    return Captioner(model, processor, name)


def tidy(text: str) -> str:
    """A decoded caption as text: BERT tokenizers put a space between Chinese characters."""
    return _BETWEEN_CJK.sub("", " ".join(text.split()))


def caption(captioner: Captioner, path: str) -> str:
    """The image's caption: greedy decoding (the same text whatever else runs, in whichever shard)."""
    import torch
    from PIL import Image

    with Image.open(path) as im:
        inputs = captioner.processor(images=[im.convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        ids = captioner.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
    return tidy(captioner.processor.batch_decode(ids, skip_special_tokens=True)[0])


# a tiny random model in the real layout ------------------------------------------------------------------------
_TINY_VOCAB = tuple("abcdefghijklmnopqrstuvwxyz") + tuple("二次元少女舞台紫色短发连衣裙歌星话筒")


def build_tiny_captioner(path: Path, seed: int = 0) -> Path:
    """Salesforce/blip-image-captioning-base's layout (BlipForConditionalGeneration + BlipProcessor with a BERT
    tokenizer), tiny and random; its special tokens are never generated, so every caption has words."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    def save(tmp: Path) -> None:
        torch.manual_seed(seed)
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = tmp / ".vocab.txt"
        vocab.write_text("\n".join([*specials, *_TINY_VOCAB]) + "\n", encoding="utf-8")
        tok = BertTokenizer(vocab=str(vocab))
        vocab.unlink()
        layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        cfg = BlipConfig(text_config={**layers, "vocab_size": len(tok), "max_position_embeddings": 64,
                                      "bos_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                                      "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id},
                         vision_config={**layers, "image_size": 32, "patch_size": 8}, projection_dim=16)
        model = BlipForConditionalGeneration(cfg)
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[:len(specials)] = -100.0
            # at the usual init scale the image barely reaches the text: louder, so captions differ per image
            model.vision_model.embeddings.patch_embedding.weight.normal_(0.0, 0.1)
            for name, p in model.text_decoder.named_parameters():
                if "crossattention" in name and name.endswith("weight") and "LayerNorm" not in name:
                    p.normal_(0.0, 1.0)
        model.save_pretrained(str(tmp))
        BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                      tokenizer=tok).save_pretrained(str(tmp))

    return scorers.write_tiny_model(path, save)
