"""DVC stage entry points: ``python -m budgetalloc.stages.<name>``, one module per stage.

Each module is the command of one stage of ``dvc.yaml`` and is thin: it reads
``params.yaml``, loads its inputs (the outputs of earlier stages), calls the
library (mostly :mod:`budgetalloc.fit.pipeline`: the same functions that
:func:`~budgetalloc.fit.pipeline.fit_policy` runs in one process) and writes its
outputs atomically. Input and output paths come from the command line, so
``dvc.yaml`` is the one place that names them.

The stage graph (``dvc dag``)::

    data.dvc --> prepare --> train --> embed --> cluster --> distill --> policy --> evaluate
                                                                            \\
                                   data/population.csv (allocate.users) --> allocate

The cluster statistics are estimated after distillation because the honest rows
are grouped by the student, which is what assigns users when serving (see
:mod:`budgetalloc.fit.pipeline`). :mod:`budgetalloc.stages.simulate` is not a
``dvc.yaml`` stage: it materialises the input ``data/`` that ``data.dvc`` records.

What this module holds: params loading, the one-line error convention of the
CLI (exit code 2), and :class:`StageReporter`, which prints progress as plain
lines with a text bar that a Prefect task can follow (:func:`budgetalloc.progress_line.parse_progress`), and
says when training stops early.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from budgetalloc.data.contract import Preprocessor, Trial, load_trial
from budgetalloc.errors import handle_errors
from budgetalloc.files import atomic_path
from budgetalloc.fit.pipeline import Reporter
from budgetalloc.models.nn import STOPPED_EARLY, early_stop_message
from budgetalloc.params import Params, load_params
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


def stage_params(path: Path = PARAMS_FILE) -> Params:
    """The validated ``params.yaml`` (a stage reads only the keys ``dvc.yaml`` lists for it)."""
    return load_params(path)


def fit_trial(path: Path, params: Params) -> Trial:
    """The fit part of the trial, with the features ``data.features`` names."""
    return load_trial(path, features=params.data.features)


def read_json(path: Path) -> Any:
    """A JSON file written by an earlier stage."""
    return json.loads(Path(path).read_text())


def read_preprocessor(path: Path) -> Preprocessor:
    """The preprocessor the ``train`` stage wrote."""
    return Preprocessor.from_json(read_json(path))


def save_array(array: np.ndarray, path: Path) -> None:
    """Write one array as ``.npy`` atomically (no pickle)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def load_array(path: Path, *, mmap: bool = False) -> np.ndarray:
    """Read an array written by :func:`save_array` (memory-mapped when ``mmap``)."""
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def stage_app(main: Callable[..., None]):
    """A stage's ``main`` as a typer command; project errors become one line and exit code 2."""
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(handle_errors(main))
    return app


def run(main: Callable[..., None]) -> None:
    """Run a stage's ``main`` as the process's command (see :func:`stage_app`)."""
    stage_app(main)()
