"""The filter stage as the registry sees it (kolora.core.stage.Stage); kolora.filter.stage does the work.
filter.shards > 1 (or shard_size) makes it an array of CPU tasks, one per shard (kolora.filter.shards)."""

from kolora.core.stage import Stage, file_exists

STAGE = Stage(
    "filter", entry="kolora.filter.stage:run", runs_on="cpu", parallel="shards", after=("ingest",),
    inputs=("filter.ops", "data.sources.filter_ops"), content=(), outputs=("filter", "trainset"),
    done=file_exists("trainset/train/metadata.csv"), stoppable=True, keeps_partial=True, shareable=True)
