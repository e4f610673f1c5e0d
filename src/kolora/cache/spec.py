"""The cache stage as the registry sees it (kolora.core.stage.Stage); kolora.cache.stage does the work."""

from kolora.cache.entry import DAMAGED
from kolora.cache.validation import cache_ready
from kolora.core.stage import MODEL_FIELDS, Stage


def _done(cfg, run, complete) -> bool:
    """The index, no entry found damaged since (training reads verify them), and the validation prompts'
    embeddings while training still needs them."""
    return ((run.root / "cache/index.json").is_file() and not (run.root / "cache" / DAMAGED).is_file()
            and cache_ready(cfg, run, complete))


STAGE = Stage(
    "cache", entry="kolora.cache.stage:run", runs_on="gpu", parallel="ranks", after=("filter",),
    inputs=("cache.max_sequence_length", "cache.vae_dtype", "train.resolution", "train.center_crop",
            "train.precision", "train.buckets", "data.mask"), content=MODEL_FIELDS,
    outputs=("cache/index.json", "cache/report.json"), done=_done, stoppable=True, shareable=True)
