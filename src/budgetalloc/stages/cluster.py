"""Stage ``cluster``: k-means on the train rows' representation (pass 2), sizes from every row (pass 3).

Embeddings are computed in blocks from the network's weights and never written:
the stage persists the centroids (``models/clusters``) and ``reports/cluster.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.files import atomic_directory, write_json
from budgetalloc.fit.fit_stream import cell_parts, cluster_pass, scan_file, teacher_pass
from budgetalloc.method.clustering import save_clusters
from budgetalloc.models.representation import load_representation
from budgetalloc.params import load_params
from budgetalloc.stages import PARAMS_FILE, StageReporter, read_preprocessor, run


def main(
    data: Annotated[Path, typer.Option(help="fit part of the trial (.parquet)")],
    preprocess: Annotated[Path, typer.Option(help="preprocessor from `train`")],
    model: Annotated[Path, typer.Option(help="representation model from `train`")],
    out: Annotated[Path, typer.Option(help="cluster model directory to write")],
    report: Annotated[Path, typer.Option(help="clustering metrics to write (.json)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Fit k-means on the train rows; count every row's cluster."""
    p = load_params(params)
    reporter = StageReporter()
    trial, roles, scan = scan_file(data, p, reporter, held_roles=0)  # no samples: only the checks and facts
    pre, net = read_preprocessor(preprocess), load_representation(model)
    clusters = cluster_pass(trial, roles, pre, net, scan.facts, p, reporter)
    parts = cell_parts(roles, scan.facts, p)
    *_, sizes = teacher_pass(trial, roles, pre, net, clusters, p, soft_targets=False)
    with atomic_directory(out) as tmp:
        save_clusters(clusters, tmp)
    write_json(
        {
            "k": clusters.k,
            "k_requested": p.cluster.k,
            "cells": clusters.k * parts,  # the student's classes (cluster.roi_bins)
            "inertia": clusters.inertia,
            "smallest_cluster": int(sizes.min()),
            "largest_cluster": int(sizes.max()),
            "notes": reporter.notes,
        },
        report,
    )


if __name__ == "__main__":
    run(main)
