"""The ingest stage as the registry sees it (kolora.core.stage.Stage); kolora.ingest.stage does the work."""

from kolora.core.stage import Stage, file_exists
from kolora.ingest.shards import count

# What each data.sources entry is read by (its path: by content; its repeats key training only)
SOURCE_INPUTS = ("name", "source", "dataset_id", "subset", "split", "text_column", "image_column", "caption",
                 "limit", "synthetic.count", "synthetic.seed", "synthetic.min_side", "synthetic.max_side",
                 "synthetic.masks", "caption_prefix")


def _slices(cfg, tasks: int) -> int:

    return count(cfg, tasks)


STAGE = Stage(
    "ingest", entry="kolora.ingest.stage:run", runs_on="cpu", parallel="shards", after=(),
    inputs=("data.source", "data.dataset_id", "data.subset", "data.split", "data.text_column",
            "data.image_column", "data.caption", "data.limit", "data.synthetic.count", "data.synthetic.seed",
            "data.synthetic.min_side", "data.synthetic.max_side", "data.synthetic.masks", "data.allow_external_paths",
            "data.max_image_bytes", "data.mask", "data.captions", *(f"data.sources.{f}" for f in SOURCE_INPUTS)),
    content=("data.path", "data.sources.path"), outputs=("data",), done=file_exists("data/metadata.jsonl"), stoppable=True,
    slices=_slices, shareable=True)
