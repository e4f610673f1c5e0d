"""Data-Juicer's aesthetics filter on local weights, without simple-aesthetics-predictor.

Data-Juicer's `image_aesthetics_filter` loads its model through the `simple-aesthetics-predictor` package,
which requires transformers < 5 (kolora runs transformers 5), and would pip-install it at run time. The op here
is that built-in's subclass -- same arguments, stats key `image_aesthetics_scores`, ÷10 scaling for
`*aesthetics-predictor*` names, any/all -- whose model is kolora.models.scorers' predictor (same architecture and
parameter names, so the hub checkpoints load). kolora's filter stage runs it for `image_aesthetics_filter`
(scorers.LOCAL_MODEL_OPS) with hf_scorer_model set to the local folder under scorers.dir.
"""

from __future__ import annotations

import functools
from typing import Any

from data_juicer.ops.base_op import OPERATORS
from data_juicer.ops.filter.image_aesthetics_filter import ImageAestheticsFilter

from kolora.models import scorers


def _load(name: str, device: str = "cpu", **_: Any) -> tuple[Any, Any]:
    """(model, processor) as Data-Juicer's model zoo expects them (model(**inputs).logits)."""
    loaded = scorers.load_aesthetic(scorers.local_folder(None, name), name, device)
    return loaded.model, loaded.processor


class ImageAestheticsLocalFilter(ImageAestheticsFilter):
    """`image_aesthetics_filter` with kolora's loader for the predictor (a local folder; never a download).
    Run batched (Filter's per-sample loop): Data-Juicer's tracer only sees a single-sample filter's drops
    when the op is batched, and kolora attributes every dropped sample through it."""

    _batched_op = True

    def __init__(self, hf_scorer_model: str = "", trust_remote_code: bool = False, min_score: float = 0.5,
                 max_score: float = 1.0, any_or_all: str = "any", *args, **kwargs):
        super().__init__(hf_scorer_model, trust_remote_code, min_score, max_score, any_or_all, *args, **kwargs)
        name = hf_scorer_model or scorers.AESTHETIC
        scorers.aesthetic_head(name)  # a name that selects no head fails here, not in every worker
        self.model_key = functools.partial(_load, name)
        self.need_normalized_by_ten = scorers.aesthetic_scaled(name)


_NAME = scorers.LOCAL_MODEL_OPS["image_aesthetics_filter"]
_existing = OPERATORS.modules.get(_NAME)
if _existing is not None and _existing.__module__.split(".")[-1] != "dj_score_ops":
    raise KeyError(f"Data-Juicer already has an op named {_NAME!r} ({_existing.__module__})")
OPERATORS.register_module(_NAME, ImageAestheticsLocalFilter, force=True)
