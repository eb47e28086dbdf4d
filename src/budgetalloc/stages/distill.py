"""Stage ``distill``: the student that maps raw features to the teacher's cluster (METHOD stage 5).

It runs before the cluster statistics because the statistics group the honest rows
by the student, the model that assigns users when serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.files import atomic_directory, write_json
from budgetalloc.fit.pipeline import STUDENT_BATCH, distill_stage, student_agreement, student_rows
from budgetalloc.method.clustering import load_clusters
from budgetalloc.models.distill import predict_clusters, save_student
from budgetalloc.stages import (
    PARAMS_FILE,
    StageReporter,
    fit_trial,
    load_array,
    read_preprocessor,
    run,
    stage_params,
)


def main(
    data: Annotated[Path, typer.Option(help="fit part of the trial")],
    preprocess: Annotated[Path, typer.Option(help="preprocessor from `train`")],
    embeddings: Annotated[Path, typer.Option(help="embeddings from `embed` (read for soft targets)")],
    clusters: Annotated[Path, typer.Option(help="cluster model from `cluster`")],
    labels: Annotated[Path, typer.Option(help="teacher labels from `cluster`")],
    out: Annotated[Path, typer.Option(help="student model directory to write")],
    report: Annotated[Path, typer.Option(help="distillation metrics to write (.json)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Train the student on all rows but the holdout; measure its agreement on the holdout."""
    p = stage_params(params)
    trial = fit_trial(data, p)
    Z = read_preprocessor(preprocess).transform(trial.X)
    teacher = load_array(labels)
    cluster_model = load_clusters(clusters)
    student_idx, holdout_idx = student_rows(trial.n, p)
    # the embeddings only matter for soft targets: do not read them otherwise
    emb = load_array(embeddings, mmap=True)[student_idx] if p.distill.soft_temperature > 0 else None
    student = distill_stage(Z[student_idx], emb, teacher[student_idx], cluster_model, p, StageReporter())
    agreement = student_agreement(predict_clusters(student, Z, batch_size=STUDENT_BATCH), teacher, holdout_idx)
    with atomic_directory(out) as tmp:
        save_student(student, tmp)
    h = student.history
    write_json(
        {
            "agreement": agreement,
            "holdout_rows": len(holdout_idx),
            "epochs_run": h.epochs_run,
            "best_val_loss": h.best_val_loss,
            "stopped_early": h.stopped_early,
        },
        report,
    )
    print(f"distill: student agrees with the teacher on {agreement:.4f} of {len(holdout_idx)} held-out rows")


if __name__ == "__main__":
    run(main)
