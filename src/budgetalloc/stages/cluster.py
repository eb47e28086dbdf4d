"""Stage ``cluster``: k-means on the train rows' representation, then every row's cluster (METHOD stage 2).

The train rows' embeddings are recomputed inside :func:`budgetalloc.fit.pipeline.cluster_stage`
(as in :func:`~budgetalloc.fit.pipeline.fit_policy`) rather than sliced from the ``embed``
output, so the clusters are bit-identical to a one-process fit; the ``embed`` output
gives every row's teacher label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.files import atomic_directory, write_json
from budgetalloc.fit.pipeline import cluster_stage, train_honest_rows
from budgetalloc.method.clustering import assign_clusters, cluster_sizes, save_clusters
from budgetalloc.models.representation import load_representation
from budgetalloc.stages import (
    PARAMS_FILE,
    StageReporter,
    fit_trial,
    load_array,
    read_preprocessor,
    run,
    save_array,
    stage_params,
)


def main(
    data: Annotated[Path, typer.Option(help="fit part of the trial")],
    preprocess: Annotated[Path, typer.Option(help="preprocessor from `train`")],
    model: Annotated[Path, typer.Option(help="representation model from `train`")],
    embeddings: Annotated[Path, typer.Option(help="embeddings from `embed`")],
    out: Annotated[Path, typer.Option(help="cluster model directory to write")],
    labels: Annotated[Path, typer.Option(help="teacher cluster of every fit row to write (.npy)")],
    report: Annotated[Path, typer.Option(help="clustering metrics to write (.json)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Fit k-means on the train rows and label every row."""
    p = stage_params(params)
    trial = fit_trial(data, p)
    Z = read_preprocessor(preprocess).transform(trial.X)
    train_idx, honest_idx = train_honest_rows(trial.n, p)
    reporter = StageReporter()
    clusters, _, _ = cluster_stage(Z[train_idx], load_representation(model), n_honest=len(honest_idx),
                                   n_arms=trial.n_arms, params=p, reporter=reporter)
    teacher = assign_clusters(clusters, load_array(embeddings, mmap=True))
    with atomic_directory(out) as tmp:
        save_clusters(clusters, tmp)
    save_array(teacher, labels)
    sizes = cluster_sizes(teacher, clusters.k)
    write_json(
        {
            "k": clusters.k,
            "k_requested": p.cluster.k,
            "inertia": clusters.inertia,
            "smallest_cluster": int(sizes.min()),
            "largest_cluster": int(sizes.max()),
            "notes": reporter.notes,
        },
        report,
    )


if __name__ == "__main__":
    run(main)
