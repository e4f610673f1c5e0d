"""The render and grid stages as the registry sees them (kolora.core.stage.Stage); kolora.render.stage and
kolora.render.grid do the work."""

from kolora.core.stage import MODEL_FIELDS, Stage, file_exists
from kolora.render import tiles


def _render_done(cfg, run, complete) -> bool:
    return not tiles.missing_tiles(cfg, run)


def _tile_keys(cfg, run) -> dict:
    """Render's key holds every tile's key (None while the LoRA is missing: the key cannot be known yet)."""
    out = {"tiles": [t.key for t in tiles.tiles(cfg, run)]}
    if tiles.base_tiles_on(cfg):
        out["base_tiles"] = [t.key for t in tiles.base_tiles(cfg, run)]
    return out


RENDER = Stage(
    "render", entry="kolora.render.stage:run", runs_on="gpu", parallel="tasks", after=(),
    inputs=tiles.RENDER_FIELDS, content=("render.prompts", "render.lora", *MODEL_FIELDS),
    outputs=("render",), done=_render_done, stoppable=True, on_change="keyed", keeps_partial=True,
    extra_key=_tile_keys, extra_key_note="the run's LoRA (per tile: its prompt, negative prompt and seed)",
    prune=tiles.prune_stale_tiles)

GRID = Stage(
    "grid", entry="kolora.render.grid:run", runs_on="cpu", parallel="none", after=("render",),
    inputs=("grid.columns", "grid.rows", "grid.captions", "grid.tile_size"), content=("grid.font",),
    outputs=("grid.png",), done=file_exists("grid.png"), stoppable=False)
