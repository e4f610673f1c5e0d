"""Why a scoring filter op dropped a sample, in numbers: the score Data-Juicer computed and the op's threshold
it fell beyond, for the sample's row in filter/report.json. See kolora.filter.dj.runner."""

from __future__ import annotations

import inspect
from typing import Any

# {Data-Juicer filter op: (its stats key, the argument holding its lower bound, its upper bound)}. Each keeps a
# sample whose score lies within [lower, upper].
SCORED_OPS: dict[str, tuple[str, str | None, str | None]] = {
    "image_nsfw_filter": ("image_nsfw_score", "min_score", "max_score"),
    "image_watermark_filter": ("image_watermark_prob", None, "prob_threshold"),
    "image_aesthetics_filter": ("image_aesthetics_scores", "min_score", "max_score"),
    "image_aesthetics_local_filter": ("image_aesthetics_scores", "min_score", "max_score"),
    "image_text_similarity_filter": ("image_text_similarity", "min_score", "max_score"),
}


def beyond(op: str, op_cls: type, args: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """{"score", "threshold": {argument: value}} for a sample op `op` (class `op_cls`, run with `args`) dropped,
    given its stats; {} for ops without a single score. The threshold is the bound the score fell beyond (both
    bounds when neither was crossed: a reversed_range op drops what lies inside)."""
    if op not in SCORED_OPS:
        return {}
    key, low, high = SCORED_OPS[op]
    scores = stats.get(key)
    if not isinstance(scores, list | tuple) or not scores:
        return {}
    params = inspect.signature(op_cls.__init__).parameters
    bounds = {arg: args.get(arg, params[arg].default) for arg in (low, high) if arg and arg in params}
    score = scores[0] if len(scores) == 1 else list(scores)  # kolora's samples carry one image each
    lowest, highest = min(scores), max(scores)
    if low in bounds and bounds[low] is not None and lowest < bounds[low]:
        crossed = {low: bounds[low]}
    elif high in bounds and bounds[high] is not None and highest > bounds[high]:
        crossed = {high: bounds[high]}
    else:
        crossed = bounds
    return {"score": score, "threshold": crossed}
