"""The report stage as the registry sees it (kolora.core.stage.Stage); kolora.report.stage does the work. It
reads train/metrics.csv, train/samples/, eval/scores.json, train/scores.csv and lora/selection.json (when
present) as well, and writes the model card beside the LoRA (kolora.report.card: lora/README.md, lora/images/)."""

from kolora.core.stage import Stage
from kolora.report import card


def _done(cfg, run, complete) -> bool:
    return (run.root / "report" / "report.html").is_file() and (
        not card.applies(cfg, run) or (run.lora / card.CARD).is_file())


STAGE = Stage(
    "report", entry="kolora.report.stage:run", runs_on="cpu", parallel="none", after=("grid", "evaluate"),
    inputs=("evaluate.select", "card.license", "card.trigger", "card.tags"), content=(),
    outputs=("report", f"lora/{card.CARD}", f"lora/{card.IMAGES}"), done=_done, stoppable=False)
