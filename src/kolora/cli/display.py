"""The stages of a run on the console (kolora.pipeline.sequence.StageDisplay): a transient progress bar while
a stage runs, then one line per stage (`[2/7] filter  done in 3.1 s  kept=...`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from kolora.pipeline.sequence import Progress

# rich: imported in the functions that use them (a login node's CLI starts without them)


def _label(n: int, count: int, stage: str) -> str:
    return f"[{n}/{count}] {stage:<7}"


class RichStageDisplay:
    def __init__(self, console: Console):
        self.console = console

    @contextlib.contextmanager
    def running(self, n: int, count: int, stage: str) -> Iterator[Progress]:
        # rich's progress bars take a tenth of a second to import: only the commands that run stages pay it
        from rich import progress as rich_progress

        columns = (rich_progress.TextColumn(_label(n, count, stage)), rich_progress.BarColumn(),
                   rich_progress.MofNCompleteColumn(), rich_progress.TimeElapsedColumn())
        with rich_progress.Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(stage, total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield progress

    def finished(self, n: int, count: int, stage: str, summary: dict[str, Any]) -> None:
        label = _label(n, count, stage)
        for note in summary.get("notes", []):
            self.console.print(f"{label} [yellow]{note}[/]")
        if summary.get("skipped"):
            self.console.print(f"{label} [dim]complete, skipped[/]")
        else:
            shown = ", ".join(f"{k}={v}" for k, v in summary.items() if k not in ("wall_s",) and
                              not isinstance(v, dict | list))
            self.console.print(f"{label} [green]done[/] in {summary['wall_s']:.1f} s  [dim]{shown}[/]")

    def unstopped(self, why: str, stage: str) -> None:
        self.console.print(f"[yellow]{why} came during {stage}, which finished: nothing was left to stop[/]")
