"""The evaluate stage as the registry sees it (kolora.core.stage.Stage); kolora.evaluate.stage does the work."""

from kolora.core.stage import Stage


def _done(cfg, run, complete) -> bool:
    return not cfg.evaluate.enabled or (run.root / "eval" / "scores.json").is_file()


STAGE = Stage(
    "evaluate", entry="kolora.evaluate.stage:run", runs_on="cpu", parallel="none", after=("render",),
    inputs=("evaluate.enabled", "scorers.clip", "scorers.chinese_clip", "scorers.aesthetic", "scorers.language"),
    content=("scorers.dir",), outputs=("eval",), done=_done, stoppable=False)
