"""Allocation flow: one budget scenario as a DVC experiment, then its dashboards.

The scenario is ``dvc exp run -n NAME -S allocate.budget=... -S allocate.users=... allocate``
(upstream stages run first when they are not up to date), so every run is listed by
``dvc exp show`` and brought back exactly by ``dvc exp apply NAME``. The artifacts:
the population's budget curve, its clusters with the arm each gets at this budget,
and a markdown report with the totals, the policy's evaluation metrics and the
experiment's name.

    python flows/allocation.py [BUDGET [POPULATION]]
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import NonNegativeFloat

from budgetalloc import orchestration as orch

ROOT = Path(__file__).resolve().parents[1]


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=orch.retry_if_transient,
      task_run_name="dvc exp run {name}")
def run_scenario(root: Path, name: str, budget: float | None, population: Path | None) -> orch.Revision:
    """Run the allocate stage as the DVC experiment `name`."""
    logger = get_run_logger()
    return orch.run_scenario(root, name=name, budget=budget, users=population, on_line=logger.info)


@task
def publish(root: Path, revision: orch.Revision) -> dict:
    """Publish the scenario's budget curve, clusters and report as Prefect artifacts."""
    summary = orch.read_json(root, orch.ALLOCATION_SUMMARY)
    create_table_artifact(
        orch.read_csv_table(root, orch.ALLOCATION_CURVE), key="allocation-budget-curve",
        description=f"Budget curve of {summary['population']} ({summary['users']} users), expected totals",
    )
    create_table_artifact(
        orch.read_csv_table(root, orch.ALLOCATION_CLUSTERS), key="allocation-clusters",
        description=(f"Clusters of {summary['population']}: size, estimated response and cost per arm, "
                     f"users per arm and chosen arm at budget {summary['budget']:.6g}"),
    )
    create_markdown_artifact(orch.allocation_markdown(root, revision), key="allocation-report",
                             description=f"Scenario {revision.experiment}: budget {summary['budget']:.6g}")
    return {"experiment": revision.experiment, "commit": revision.commit, **{
        k: summary[k] for k in ("budget", "users", "expected_spend", "expected_response")},
        "allocation": str(Path(root) / orch.ALLOCATION)}


@flow(name="allocation", log_prints=True)
def allocation_flow(budget: NonNegativeFloat | None = None, population: Path | None = None,
                    root: Path = ROOT) -> dict:
    """Allocate a population under a total budget as a reproducible DVC scenario.

    Args:
        budget: total budget for the population, in cost units (default: params.yaml's allocate.budget).
        population: population file, relative to the repository (default: allocate.users).
        root: the repository.
    """
    name = orch.experiment_name("alloc", flow_run.get_name(), flow_run.get_id())
    revision = run_scenario(root, name, budget, population)
    return publish(root, revision)


if __name__ == "__main__":
    args = sys.argv[1:]
    allocation_flow(budget=float(args[0]) if args else None, population=Path(args[1]) if len(args) > 1 else None)
