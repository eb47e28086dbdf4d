"""Rich progress for long commands: one line per stage, a bar per training loop."""

from __future__ import annotations

from typing import Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from budgetalloc.fit.pipeline import Reporter
from budgetalloc.models.nn import STOPPED_EARLY, early_stop_message


class RichReporter(Reporter):
    """Shows each stage as it starts and each training epoch on a progress bar."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def stage(self, name: str) -> None:
        self.progress.console.print(f"[bold]stage[/bold] {name}")

    def epoch(self, stage: str, epoch: int, total: int, metrics: dict) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(f"  {stage} epochs", total=total, metrics="")
        shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                          if isinstance(v, int | float) and k != STOPPED_EARLY)
        self.progress.update(self.tasks[stage], completed=epoch, metrics=shown)
        stopped = early_stop_message(epoch, total, metrics)
        if stopped:
            self.progress.update(self.tasks[stage], total=epoch)
            self.progress.console.print(f"  {stage}: {stopped}")

    def note(self, message: str) -> None:
        super().note(message)
        self.progress.console.print(f"[yellow]note[/yellow] {message}")
