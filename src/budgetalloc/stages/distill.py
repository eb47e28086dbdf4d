"""Stage ``distill``: the student that maps raw features to the teacher's cluster (METHOD stage 5).

Pass 3 labels every row with its teacher cluster (embeddings in blocks, never
written); the student learns its sample's, and its agreement is measured on the
holdout by one more pass. It runs before the statistics because they group the
trial rows by the student, the model that assigns users when serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.files import atomic_directory, write_json
from budgetalloc.fit.fit_stream import cell_parts, scan_file, student_pass, student_step
from budgetalloc.fit.trial_scan import STUDENT
from budgetalloc.method.clustering import load_clusters
from budgetalloc.models.distill import save_student
from budgetalloc.models.representation import load_representation
from budgetalloc.params import load_params
from budgetalloc.stages import PARAMS_FILE, StageReporter, read_preprocessor, run


def main(
    data: Annotated[Path, typer.Option(help="fit part of the trial (.parquet)")],
    preprocess: Annotated[Path, typer.Option(help="preprocessor from `train`")],
    model: Annotated[Path, typer.Option(help="representation model from `train`")],
    clusters: Annotated[Path, typer.Option(help="cluster model from `cluster`")],
    out: Annotated[Path, typer.Option(help="student model directory to write")],
    report: Annotated[Path, typer.Option(help="distillation metrics to write (.json)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Train the student on its sample of the non-holdout rows; measure its agreement on the holdout."""
    p = load_params(params)
    reporter = StageReporter()
    trial, roles, scan = scan_file(data, p, reporter, held_roles=STUDENT)
    pre = read_preprocessor(preprocess)
    student, teacher_holdout = student_step(trial, roles, scan, pre, load_representation(model),
                                            load_clusters(clusters), p, reporter)
    scan.held = None
    _, agreement, cluster_agreement = student_pass(trial, roles, pre, student, teacher_holdout,
                                                   cell_parts(roles, scan.facts, p))
    with atomic_directory(out) as tmp:
        save_student(student, tmp)
    h = student.history
    write_json(
        {
            "agreement": agreement,
            "cluster_agreement": cluster_agreement,
            "holdout_rows": len(teacher_holdout),
            "epochs_run": h.epochs_run,
            "best_val_loss": h.best_val_loss,
            "stopped_early": h.stopped_early,
        },
        report,
    )
    print(f"distill: student agrees with the teacher on {agreement:.4f} of {len(teacher_holdout)} held-out rows")


if __name__ == "__main__":
    run(main)
