"""Stage ``prepare``: validate the raw trial and split it into a fit part and a test part.

The split is seeded (``seed + 2``, so it is independent of the honest split, ``seed``,
and the student's holdout, ``seed + 1``) and keeps every column of the raw table, so
the fit part is a trial in its own right: ``budgetalloc fit --data prepared/fit.parquet``
fits the same policy as the pipeline. The test part is only read by ``evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from budgetalloc.data.contract import read_table, trial_from_frame
from budgetalloc.errors import ParamsError
from budgetalloc.files import write_parquet
from budgetalloc.fit.pipeline import split_rows
from budgetalloc.stages import PARAMS_FILE, run, stage_params

TEST_SEED_OFFSET = 2


def split_trial(df: pd.DataFrame, *, test_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded (fit, test) parts of a trial table, rows in file order within each part."""
    if test_fraction <= 0:
        raise ParamsError("data.test_fraction must be > 0: the evaluate stage needs a test split")
    fit_idx, test_idx = split_rows(len(df), honest_fraction=test_fraction, seed=seed + TEST_SEED_OFFSET)
    return df.iloc[fit_idx].reset_index(drop=True), df.iloc[test_idx].reset_index(drop=True)


def main(
    trial: Annotated[Path, typer.Option(help="raw trial (.csv or .parquet)")],
    fit: Annotated[Path, typer.Option(help="fit part to write (.parquet)")],
    test: Annotated[Path, typer.Option(help="test part to write (.parquet)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Validate the trial, split it, write both parts."""
    p = stage_params(params)
    df = read_table(trial)
    trial_from_frame(df, features=p.data.features, source=str(trial))
    parts = split_trial(df, test_fraction=p.data.test_fraction, seed=p.seed)
    for part, path in zip(parts, (fit, test), strict=True):
        trial_from_frame(part, features=p.data.features, source=str(path))  # every arm in both parts
        write_parquet(part, path)
    print(f"prepare: {len(parts[0])} fit rows -> {fit}, {len(parts[1])} test rows -> {test}")


if __name__ == "__main__":
    run(main)
