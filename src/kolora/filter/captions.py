"""data.captions and data.caption_prefix in the filter stage (kolora.filter.stage).

With data.captions: generate (the samples ingest kept without a caption) or replace (every sample), each slice
captions its samples after the decode check and before Data-Juicer, so that text-based ops (CLIP similarity,
text length) judge the captions that will be trained on. The captioner (kolora.models.captioner) decodes
greedily, one image at a time, so shards caption like one pass. data.caption_prefix goes before every kept
sample's caption after Data-Juicer (a trigger word is not something to filter on).

Report rows say where each caption came from: `caption_source` given | generated, and `generated_caption`
(the model's text, before the prefix); the summary counts them under `captions`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from kolora.core.config import DataConfig, ExperimentConfig
from kolora.filter.dj.runner import FilterError
from kolora.models import captioner
from kolora.models.scorers import ScorerModelError, is_chinese

# torch: imported in the functions that use it


def active(d: DataConfig) -> bool:
    """Captions are generated or prefixed (the report then says where each came from)."""
    return d.captions != "keep" or d.caption_prefix is not None


def with_prefix(prefix: str | None, text: str) -> str:
    """`<prefix>, <caption>` (a Chinese caption gets the full-width comma); the prefix alone for no caption."""
    if not prefix:
        return text
    if not text:
        return prefix
    return prefix + ("，" if is_chinese(text) else ", ") + text


def generate(cfg: ExperimentConfig, samples: list[dict[str, Any]], report: dict[str, dict[str, Any]],
             before_each: Callable[[int], None]) -> None:
    """Caption `samples` (tutorial format, all decodable) in place as data.captions says, and mark their report
    rows; `before_each(n)` before the n-th caption (a stop point)."""
    d = cfg.data
    if not active(d):
        return
    todo = [s for s in samples if d.captions == "replace" or (d.captions == "generate" and not s["text"])]
    for s in samples:
        report[s["id"]]["caption_source"] = "given"
    if not todo:
        return
    import torch

    name = captioner.model_id(d)
    try:
        captioner.ensure_tiny(cfg)
        model = captioner.load(captioner.local_folder(cfg.scorers.dir, name), name)
    except ScorerModelError as e:
        raise FilterError(str(e)) from None  # names the fetch command
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cpu_threads)  # CPU results depend on the thread count: the config fixes it
    try:
        for n, s in enumerate(todo):
            before_each(n)
            text = captioner.caption(model, s["image"][0])
            s["text"] = text
            report[s["id"]].update(text=text, caption_source="generated", generated_caption=text)
    finally:
        torch.set_num_threads(threads)


def summary(d: DataConfig, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The report summary's `captions`: the mode, the model and how many kept captions came from where."""
    sources = Counter(e["caption_source"] for e in entries if e.get("kept") and e.get("caption_source"))
    return {"mode": d.captions, **({"model": captioner.model_id(d)} if d.captions != "keep" else {}),
            "prefix": d.caption_prefix, "generated": sources.get("generated", 0), "given": sources.get("given", 0)}
