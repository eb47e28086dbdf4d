"""Stage ``prepare``: validate the raw trial and split it into a fit part and a test part.

The split is seeded and keeps every column of the raw table, so the fit part is a
trial in its own right: ``budgetalloc fit --data prepared/fit.parquet`` fits the same
policy as the pipeline. The test part is only read by ``evaluate``. The trial is read
in batches, never whole (:mod:`budgetalloc.data.split`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.data.split import split_trial_file
from budgetalloc.params import load_params
from budgetalloc.stages import PARAMS_FILE, run


def main(
    trial: Annotated[Path, typer.Option(help="raw trial (.csv or .parquet)")],
    fit: Annotated[Path, typer.Option(help="fit part to write (.parquet)")],
    test: Annotated[Path, typer.Option(help="test part to write (.parquet)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Validate the trial, split it, write both parts."""
    fit_rows, test_rows = split_trial_file(trial, fit, test, load_params(params))
    print(f"prepare: {fit_rows} fit rows -> {fit}, {test_rows} test rows -> {test}")


if __name__ == "__main__":
    run(main)
