"""DVC stage entry points: ``python -m budgetalloc.stages.<name>``, one module per stage.

Each module is the command of one ``dvc.yaml`` stage: it reads ``params.yaml``,
runs one pass boundary of the fit (:mod:`budgetalloc.fit.fit_stream`) or a serving
command, and writes its outputs atomically; paths come from the command line.
Invariants: a fit stage reads the Parquet trial in batches and persists weights,
centroids, statistics and tables, never per-row arrays; the chain's policy is the
streamed fit's and the in-memory ``fit_policy``'s (``summary.fit_path`` aside). Here:
the one-line error convention (exit code 2), and :class:`StageReporter`, whose lines
a Prefect task follows (:func:`budgetalloc.progress_line.parse_progress`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from budgetalloc.data.contract import Preprocessor
from budgetalloc.errors import handle_errors
from budgetalloc.fit.pipeline import Reporter
from budgetalloc.models.nn import STOPPED_EARLY, early_stop_message
from budgetalloc.progress_line import text_bar

PARAMS_FILE = Path("params.yaml")


class StageReporter(Reporter):
    """Prints each stage, epoch and note as one flushed line (``progress: NAME i/N ...``)."""

    def stage(self, name: str) -> None:
        print(f"stage: {name}", flush=True)

    def epoch(self, stage: str, epoch: int, total: int, metrics: dict) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                         if isinstance(v, int | float) and k != STOPPED_EARLY)
        print(f"progress: {stage} {epoch}/{total} {text_bar(epoch, total)} {shown}".rstrip(), flush=True)
        stopped = early_stop_message(epoch, total, metrics)
        if stopped:
            print(f"{stage}: {stopped}", flush=True)

    def note(self, message: str) -> None:
        super().note(message)
        print(f"note: {message}", flush=True)


def read_json(path: Path) -> Any:
    """A JSON file written by an earlier stage."""
    return json.loads(Path(path).read_text())


def read_preprocessor(path: Path) -> Preprocessor:
    """The preprocessor the ``train`` stage wrote."""
    return Preprocessor.from_json(read_json(path))


def stage_app(main: Callable[..., None]):
    """A stage's ``main`` as a typer command; project errors become one line and exit code 2."""
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(handle_errors(main))
    return app


def run(main: Callable[..., None]) -> None:
    """Run a stage's ``main`` as the process's command (see :func:`stage_app`)."""
    stage_app(main)()
