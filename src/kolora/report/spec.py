"""The report stage as the registry sees it (kolora.core.stage.Stage); kolora.report.stage does the work. It
reads train/metrics.csv, train/samples/, eval/scores.json, train/scores.csv and lora/selection.json (when
present) as well."""

from kolora.core.stage import Stage, file_exists

STAGE = Stage(
    "report", entry="kolora.report.stage:run", runs_on="cpu", parallel="none", after=("grid", "evaluate"),
    inputs=("evaluate.select",), content=(), outputs=("report",), done=file_exists("report/report.html"), stoppable=False)
