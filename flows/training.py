"""Training flow: the fit pipeline's DVC stages as Prefect tasks, then the dashboards.

Each task runs one stage of ``dvc.yaml`` with ``dvc repro --single-item`` (DVC skips
it when nothing changed), so ``dvc.lock`` stays the record; what a task hands to
the next is the stage's outputs as ``dvc.lock`` records them. At the end the
workspace is saved as a DVC experiment (``dvc exp save``), whose name the report
gives, and the artifacts are published: training progress (while it runs), the
budget curve and the held-out cost curve as pictures, the clusters as a table
(chosen arm first) and a picture, and a markdown report with the evaluation metrics.
The whole run holds the DVC workspace, so runs that share it wait for each other.

    python -m flows.training            # Prefect's ephemeral mode, no server needed
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from budgetalloc.serve import dashboards
from flows import orchestration as orch

ROOT = Path(__file__).resolve().parents[1]


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=orch.retry_if_transient,
      task_run_name="dvc repro {stage}")
def repro(stage: str, root: Path, upstream: list[orch.StageOutputs], progress: UUID, index: int) -> orch.StageOutputs:
    """Run one DVC stage; return its outputs as recorded in dvc.lock."""
    logger = get_run_logger()
    n = len(orch.TRAINING_STAGES)
    follow = orch.progress_follower(lambda f: update_progress_artifact(progress, 100.0 * (index + f) / n))

    def on_line(line: str) -> None:
        logger.info(line)
        follow(line)

    outputs = orch.repro_stage(root, stage, upstream, on_line=on_line)
    update_progress_artifact(progress, 100.0 * (index + 1) / n)
    return outputs


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=orch.retry_if_transient)
def save_experiment(root: Path, name: str) -> orch.Revision:
    """Record the workspace as a DVC experiment."""
    return orch.save_experiment(root, name)


@task
def publish(root: Path, revision: orch.Revision, budget_level: float | None) -> dict:
    """Publish the budget curve, the cost curve, the clusters and the report as Prefect artifacts."""
    create_markdown_artifact(
        orch.curve_markdown(root, orch.POLICY_CURVE_PLOT, orch.POLICY_CURVE, "Budget curve of the fitted policy"),
        key="budget-curve", description=orch.card("Expected response and spend per user against the budget "
                                                  "(fit trial)", orch.read_png(root, orch.POLICY_CURVE_PLOT)),
    )
    create_markdown_artifact(orch.cost_curve_markdown(root), key="cost-curve", description=orch.card(
        "Test-trial cost curve with its 95% confidence band", orch.read_png(root, orch.EVALUATION_PLOT)))
    clusters, row = orch.policy_clusters(root, budget_level)
    at = f"budget level {row['level']:g} ({row['budget_per_user']:.3g} per user)"
    create_table_artifact(
        dashboards.analyst_table(clusters), key="clusters",
        description=f"Clusters, chosen arm first (at {at}): size, estimated response and cost per arm",
    )
    title = f"Clusters of the fitted policy at {at}"
    png = dashboards.clusters_png(clusters, title=title)
    create_markdown_artifact(orch.clusters_markdown(png, title), key="clusters-chart",
                             description=orch.card("Clusters: size, chosen arm, response per cost", png))
    create_markdown_artifact(orch.training_markdown(root, revision), key="training-report",
                             description="Training run: fit summary, evaluation, reproduction")
    return {"experiment": revision.experiment, "commit": revision.commit,
            "aucc": orch.read_json(root, orch.EVALUATION)["aucc"], "policy": str(Path(root) / orch.POLICY_DIR)}


@flow(name="training", log_prints=True)
def training_flow(root: Path = ROOT, budget_level: float | None = None) -> dict:
    """Fit and evaluate the policy through DVC, record the run, publish the dashboards.

    The run holds the DVC workspace (:func:`~flows.orchestration.workspace_lock`)
    from its first stage to its last artifact: runs that share it never interleave.

    Args:
        root: the repository (dvc.yaml, params.yaml).
        budget_level: budget level whose chosen arms the clusters table shows
            (a fraction of the all-max-arm spend; default the middle of the budget table).
    """
    logger = get_run_logger()
    name = orch.experiment_name("train", flow_run.get_name(), flow_run.get_id())
    with orch.workspace_lock(root, f"training flow run {name}", on_wait=logger.info):
        progress = create_progress_artifact(0.0, key="training-progress",
                                            description="Training: share of the DVC stages done (%)")
        outputs: list[orch.StageOutputs] = []
        for index, stage in enumerate(orch.TRAINING_STAGES):
            outputs.append(repro(stage, root, list(outputs), progress, index))
        revision = save_experiment(root, name)
        return publish(root, revision, budget_level)


if __name__ == "__main__":
    training_flow()
