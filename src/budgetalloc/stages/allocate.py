"""Stage ``allocate``: one budget scenario, the allocation of a population under ``allocate.budget``.

A scenario is a DVC experiment: ``dvc exp run -S allocate.budget=20000 allocate``
(``allocate.users`` names the population file) writes the allocation and its
report, and ``dvc exp apply NAME`` brings any past scenario back. The report is a
summary (metrics), the population's own budget curve (the program re-solved for its
cluster sizes at the policy's budget levels) and the clusters with the arm each one
gets at this budget, each with its picture (the image plots of ``dvc plots``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from budgetalloc.commands import run_allocate
from budgetalloc.files import atomic_files, write_json, write_table
from budgetalloc.fit.pipeline import Reporter, program_stage
from budgetalloc.params import load_params
from budgetalloc.policy import load_policy
from budgetalloc.serve.allocate import Allocation
from budgetalloc.serve.dashboards import (
    budget_curve_png,
    cluster_frame,
    clusters_png,
    curve_frame,
    write_png,
)
from budgetalloc.stages import PARAMS_FILE, run


def allocation_summary(allocation: Allocation, users: Path) -> dict:
    """The scenario's totals: budget, expected spend and response, users per arm, solver status.

    Users per arm lists the arms given to at least one user.
    """
    n = allocation.n_users
    per_arm = {arm: int(count) for arm, count in enumerate(allocation.users_per_arm) if count > 0}
    return {
        "population": str(users),
        "users": n,
        "budget": allocation.budget,
        "expected_spend": allocation.expected_cost,
        "expected_response": allocation.expected_response,
        "expected_spend_per_user": allocation.expected_cost / n,
        "expected_response_per_user": allocation.expected_response / n,
        "unspent": allocation.unspent,
        "solver_status": allocation.solution.status,
        "users_per_arm": {f"arm_{arm}": count for arm, count in per_arm.items()},
    }


def main(
    policy: Annotated[Path, typer.Option(help="policy directory from `policy`")],
    out: Annotated[Path, typer.Option(help="allocation to write (.parquet or .csv)")],
    reports: Annotated[Path, typer.Option(help="directory for summary.json, budget_curve.csv/.png, clusters.csv/.png")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Allocate ``allocate.users`` under ``allocate.budget``; write the allocation and its report."""
    p = load_params(params)
    users = Path(p.allocate.users)
    allocation = run_allocate(policy_dir=policy, users=users, budget=p.allocate.budget, out=out)
    fitted = load_policy(policy)
    n_users = np.asarray(allocation.cluster_sizes, dtype=np.int64)
    summary = allocation_summary(allocation, users)
    with atomic_files(reports) as tmp:
        write_json(summary, tmp / "summary.json")
        table = program_stage(fitted.statistics, n_users, fitted.params, Reporter())
        counts = np.asarray(allocation.solution.counts, dtype=np.int64)
        curve = curve_frame(table, int(n_users.sum()))
        clusters = cluster_frame(fitted.statistics, counts.sum(axis=1), counts)
        write_table(curve, tmp / "budget_curve.csv")
        write_table(clusters, tmp / "clusters.csv")
        name = f"{users.name} ({summary['users']} users), budget {summary['budget']:.6g}"
        write_png(budget_curve_png(curve, title=f"Budget curve of {name}", unit="total"),
                  tmp / "budget_curve.png")
        write_png(clusters_png(clusters, title=f"Clusters of {name}"), tmp / "clusters.png")
    print(f"allocate: {summary['users']} users, expected spend {summary['expected_spend']:.6g} of budget "
          f"{summary['budget']:.6g}, expected response {summary['expected_response']:.6g} -> {out}")


if __name__ == "__main__":
    run(main)
