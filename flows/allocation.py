"""Allocation flow: one budget scenario as a DVC experiment, then its dashboards.

The scenario is ``dvc exp run -n NAME -S allocate.budget=... -S allocate.users=... allocate``
(upstream stages run first when they are not up to date), so every run is listed by
``dvc exp show`` and brought back exactly by ``dvc exp apply NAME``. The artifacts:
the population's budget curve and the policy's cost curve as pictures, its clusters
(a table, chosen arm first, and a picture), and a markdown report with the totals,
the policy's evaluation metrics and the experiment's name. A scenario with its own
budget or population leaves ``params.yaml`` and the workspace at their defaults.

    python -m flows.allocation [BUDGET [POPULATION]]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import NonNegativeFloat

from budgetalloc.serve import dashboards
from flows import orchestration as orch

ROOT = Path(__file__).resolve().parents[1]


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=orch.retry_if_transient,
      task_run_name="dvc exp run {name}")
def run_scenario(root: Path, name: str, budget: float | None, population: Path | None) -> orch.Revision:
    """Run the allocate stage as the DVC experiment `name`."""
    logger = get_run_logger()
    return orch.run_scenario(root, name=name, budget=budget, users=population, on_line=logger.info)


@task
def publish(root: Path, revision: orch.Revision) -> dict:
    """Publish the scenario's budget curve, cost curve, clusters and report as Prefect artifacts."""
    summary = orch.read_json(root, orch.ALLOCATION_SUMMARY)
    who = f"{summary['population']} ({summary['users']} users)"
    create_markdown_artifact(
        orch.curve_markdown(root, orch.ALLOCATION_CURVE_PLOT, orch.ALLOCATION_CURVE, f"Budget curve of {who}"),
        key="allocation-budget-curve", description=orch.card(
            f"Expected response and spend against the budget, {who}", orch.read_png(root, orch.ALLOCATION_CURVE_PLOT)),
    )
    create_markdown_artifact(orch.cost_curve_markdown(root), key="allocation-cost-curve", description=orch.card(
        "The policy's test-trial cost curve with its 95% confidence band", orch.read_png(root, orch.EVALUATION_PLOT)))
    clusters = pd.read_csv(Path(root) / orch.ALLOCATION_CLUSTERS)
    create_table_artifact(
        dashboards.analyst_table(clusters), key="allocation-clusters",
        description=(f"Clusters of {who}, chosen arm first (at budget {summary['budget']:.6g}): size, "
                     "estimated response and cost per arm, users per arm"),
    )
    title = f"Clusters of {who} at budget {summary['budget']:.6g}"
    png = orch.read_png(root, orch.ALLOCATION_CLUSTERS_PLOT)
    create_markdown_artifact(orch.clusters_markdown(png, title), key="allocation-clusters-chart",
                             description=orch.card("Clusters: size, chosen arm, response per cost", png))
    create_markdown_artifact(orch.allocation_markdown(root, revision), key="allocation-report",
                             description=f"Scenario {revision.experiment}: budget {summary['budget']:.6g}")
    return {"experiment": revision.experiment, "commit": revision.commit, **{
        k: summary[k] for k in ("budget", "users", "expected_spend", "expected_response")},
        "allocation": str(Path(root) / orch.ALLOCATION)}


@flow(name="allocation", log_prints=True)
def allocation_flow(budget: NonNegativeFloat | None = None, population: Path | None = None,
                    root: Path = ROOT) -> dict:
    """Allocate a population under a total budget as a reproducible DVC scenario.

    The run holds the DVC workspace while it runs. A budget or population other than
    ``params.yaml``'s is recorded as the experiment only: afterwards ``params.yaml``,
    ``dvc.lock`` and the allocate stage's files are as they were
    (:func:`~flows.orchestration.defaults_kept`).

    Args:
        budget: total budget for the population, in cost units (default: params.yaml's allocate.budget).
        population: population file, relative to the repository (default: allocate.users).
        root: the repository.
    """
    logger = get_run_logger()
    name = orch.experiment_name("alloc", flow_run.get_name(), flow_run.get_id())
    with orch.workspace_lock(root, f"allocation flow run {name}", on_wait=logger.info):
        other = bool(orch.scenario_sets(root, budget, population))
        with orch.defaults_kept(root, scenario=other):
            revision = run_scenario(root, name, budget, population)
            result = publish(root, revision)
        if other:
            logger.info(f"scenario {name} is recorded as a DVC experiment (dvc exp apply {name}); "
                        "params.yaml and the workspace keep their defaults")
        return result


if __name__ == "__main__":
    args = sys.argv[1:]
    allocation_flow(budget=float(args[0]) if args else None, population=Path(args[1]) if len(args) > 1 else None)
