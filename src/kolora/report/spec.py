"""The report stage as the registry sees it (kolora.core.stage.Stage); kolora.report.stage does the work. It
reads train/metrics.csv, train/samples/ and eval/scores.json (when present) as well."""

from kolora.core.stage import Stage, file_exists

STAGE = Stage(
    "report", entry="kolora.report.stage:run", runs_on="cpu", parallel="none", after=("grid", "evaluate"),
    inputs=(), content=(), outputs=("report",), done=file_exists("report/report.html"), stoppable=False)
