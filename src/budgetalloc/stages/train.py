"""Stage ``train``: the preprocessor and the multi-task representation network (METHOD stage 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.files import atomic_directory, write_json
from budgetalloc.fit.pipeline import train_honest_rows, train_stage
from budgetalloc.models.representation import save_representation
from budgetalloc.stages import PARAMS_FILE, StageReporter, fit_trial, run, stage_params


def main(
    data: Annotated[Path, typer.Option(help="fit part of the trial")],
    preprocess: Annotated[Path, typer.Option(help="preprocessor to write (.json)")],
    model: Annotated[Path, typer.Option(help="representation model directory to write")],
    report: Annotated[Path, typer.Option(help="training metrics to write (.json)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Fit the preprocessor on all rows and the network on the train rows."""
    p = stage_params(params)
    trial = fit_trial(data, p)
    reporter = StageReporter()
    train_idx, honest_idx = train_honest_rows(trial.n, p)
    pre, net = train_stage(trial, train_idx, p, reporter)
    write_json(pre.to_json(), preprocess)
    with atomic_directory(model) as tmp:
        save_representation(net, tmp)
    h = net.history
    write_json(
        {
            "train_rows": len(train_idx),
            "honest_rows": len(honest_idx),
            "epochs_run": h.epochs_run,
            "best_epoch": h.best_epoch,
            "best_val_loss": h.best_val_loss,
            "stopped_early": h.stopped_early,
            "notes": reporter.notes,
        },
        report,
    )


if __name__ == "__main__":
    run(main)
