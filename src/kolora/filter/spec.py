"""The filter stage as the registry sees it (kolora.core.stage.Stage); kolora.filter.stage does the work.
filter.shards > 1 (or shard_size) makes it an array of CPU tasks, one per shard (kolora.filter.shards)."""

from kolora.core.stage import Stage, file_exists
from kolora.models import captioner


def _captioner_key(cfg, run) -> dict:
    """The captioner's files when data.captions generates captions (nothing otherwise: keys as before)."""
    return captioner.fingerprint(cfg)


STAGE = Stage(
    "filter", entry="kolora.filter.stage:run", runs_on="cpu", parallel="shards", after=("ingest",),
    inputs=("filter.ops", "data.captions", "data.caption_model", "data.caption_language", "data.caption_prefix",
            "data.sources.filter_ops"),
    content=(), outputs=("filter", "trainset"),
    done=file_exists("trainset/train/metadata.csv"), stoppable=True, keeps_partial=True, shareable=True,
    extra_key=_captioner_key, extra_key_note="the captioner's files (when data.captions generates captions)")
