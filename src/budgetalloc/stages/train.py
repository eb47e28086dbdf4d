"""Stage ``train``: pass 1 over the fit trial, then the preprocessor and the representation network.

Reads the Parquet trial in batches (:func:`budgetalloc.fit.fit_stream.scan_file`):
every batch is checked, only the samples are kept. Writes the preprocessor
(``models/preprocess.json``), the network and ``reports/train.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.files import atomic_directory, write_json
from budgetalloc.fit.fit_stream import representation_step, scan_file, train_rows
from budgetalloc.fit.trial_scan import NETWORK, PREPROCESS
from budgetalloc.models.representation import save_representation
from budgetalloc.params import load_params
from budgetalloc.stages import PARAMS_FILE, StageReporter, run


def main(
    data: Annotated[Path, typer.Option(help="fit part of the trial (.parquet)")],
    preprocess: Annotated[Path, typer.Option(help="preprocessor to write (.json)")],
    model: Annotated[Path, typer.Option(help="representation model directory to write")],
    report: Annotated[Path, typer.Option(help="training metrics to write (.json)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Fit the preprocessor on its sample and the network on the train rows."""
    p = load_params(params)
    reporter = StageReporter()
    trial, roles, scan = scan_file(data, p, reporter, held_roles=PREPROCESS | NETWORK)
    pre, net = representation_step(roles, scan, p, reporter)
    write_json(pre.to_json(), preprocess)
    with atomic_directory(model) as tmp:
        save_representation(net, tmp)
    h, n_train = net.history, train_rows(roles)
    write_json(
        {
            "train_rows": n_train,
            "honest_rows": trial.n - n_train,
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
