"""What every pass of the fit shares: the row splits and samples, the steps run in memory, the policy's assembly.

Splits and samples depend on the row count and seed only (:mod:`budgetalloc.fit.trial_scan`
turns them into a role byte per row); the network, the student and the integer
program run on what the passes hand them. The passes themselves, and the one driver
that runs them over arrays or a file: :mod:`budgetalloc.fit.fit_stream`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from budgetalloc.data.contract import Preprocessor, Trial
from budgetalloc.method.clustering import effective_k
from budgetalloc.method.program import AllocationProgram, solve_budget_table
from budgetalloc.method.statistics import ClusterStatistics
from budgetalloc.models.distill import StudentModel
from budgetalloc.models.representation import RepresentationModel
from budgetalloc.params import Params
from budgetalloc.policy import Policy

EpochCallback = Callable[[int, dict], None]
MIN_ROWS_PER_CELL = 30
#: Rows per compiled call of the network (embeddings, predictions) and of the student
#: in the fit. The streamed fit runs the same shapes, so its blocks, and its memory,
#: follow them: 16,384 rows are 2.6 MB of 40 float32 features and 16 MB of 256-unit
#: embeddings a block (each call still runs 4,096-row chunks: ``nn.INFERENCE_CHUNK``).
EMBED_BATCH = 16_384
STUDENT_BATCH = 16_384


class Reporter:
    """Progress sink: the CLI shows rich bars, Prefect publishes a progress artifact."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def stage(self, name: str) -> None:
        """A stage starts."""

    def epoch(self, stage: str, epoch: int, total: int, metrics: dict) -> None:
        """Epoch ``epoch`` (counted from 1, out of at most ``total``) of ``stage`` ended."""

    def note(self, message: str) -> None:
        """Something the user should know (data-size adaptations, fallbacks)."""
        self.notes.append(message)

    def epoch_callback(self, stage: str, total: int) -> EpochCallback:
        return lambda epoch, metrics: self.epoch(stage, epoch, total, metrics)


def roi_parts(*, n_rows: int, n_arms: int, params: Params) -> int:
    """Parts each k-means cluster is cut into: ``cluster.roi_bins`` where ``n_rows`` estimating rows
    keep ``cluster.roi_min_rows`` per (cell, arm) at the requested K, else 1."""
    c = params.cluster
    return c.roi_bins if n_rows >= c.k * c.roi_bins * n_arms * c.roi_min_rows else 1


def cluster_k(*, n_rows: int, n_arms: int, params: Params, reporter: Reporter) -> int:
    """K for the rows the statistics are estimated on (``clustering.effective_k``), with a note when lowered."""
    bins = roi_parts(n_rows=n_rows, n_arms=n_arms, params=params)
    k = effective_k(params.cluster.k, n_rows // bins, n_arms, rows_per_cell=MIN_ROWS_PER_CELL)
    if k < params.cluster.k:
        rows = "fit rows" if params.statistics.rows == "all" else "honest rows"
        cells = f"K={k}" if bins == 1 else f"K={k} x {bins} ROI parts"
        reporter.note(
            f"cluster.k lowered from {params.cluster.k} to {k}: {n_rows} {rows} support "
            f"about {MIN_ROWS_PER_CELL} rows per (cell, arm) at {cells}"
        )
    return k


def budget_scale(n_users: np.ndarray, stats: ClusterStatistics) -> float:
    """Total expected spend if every user got the most expensive arm."""
    return float((n_users * stats.cost.max(axis=1)).sum())


def program_stage(stats: ClusterStatistics, n_users: np.ndarray, params: Params, reporter: Reporter) -> list[dict]:
    """The budget table: per-user budget levels -> expected response, spend and arm shares."""
    reporter.stage("integer program")
    program = AllocationProgram(stats.response, stats.cost, stats.response_scenarios, stats.cost_scenarios,
                                params=params.program)
    total = int(n_users.sum())
    scale = budget_scale(n_users, stats)
    budgets = [level * scale for level in params.program.budget_levels]
    solutions = solve_budget_table(program, n_users, budgets)
    table = []
    for level, sol in zip(params.program.budget_levels, solutions):
        table.append(
            {
                "level": float(level),
                "budget_per_user": sol.budget / total,
                "expected_response_per_user": sol.expected_response / total,
                "expected_cost_per_user": sol.expected_cost / total,
                "status": sol.status,
                "arm_shares": (sol.counts / np.maximum(n_users, 1)[:, None]).round(6).tolist(),
            }
        )
    return table


def assemble_policy(trial: Trial, params: Params, *, preprocessor: Preprocessor,
                    network: RepresentationModel, student: StudentModel,
                    statistics: ClusterStatistics, budget_table: list[dict], n_users: np.ndarray,
                    train_rows: int, agreement: tuple[float | None, float | None], notes: list[str],
                    fit_path: str = "in memory") -> Policy:
    """The :class:`Policy` from the fitted parts (not yet saved), with the fit diagnostics it stores
    (``summary.json``). ``trial`` needs ``n``, ``n_arms``, ``feature_names`` and
    ``binary_response`` only (the streamed fit passes its file's facts). ``agreement``: the
    student's on the held-out cells and on their k-means clusters.
    """
    summary = {
        "rows": trial.n,
        "train_rows": train_rows,
        "honest_rows": trial.n - train_rows,
        "k": student.n_clusters,
        "n_arms": trial.n_arms,
        "student_agreement": agreement[0],
        "student_cluster_agreement": agreement[1],
        "representation_epochs": int(network.history.epochs_run),
        "cluster_sizes": n_users.tolist(),
        "budget_per_user_range": [budget_table[i]["budget_per_user"] for i in (0, -1)],
        "notes": list(notes),
        "fit_path": fit_path,
    }
    return Policy(feature_names=trial.feature_names, n_arms=trial.n_arms,
                  binary_response=trial.binary_response, preprocessor=preprocessor, student=student,
                  statistics=statistics, budget_table=budget_table, params=params, summary=summary)


def agreement_text(summary: dict) -> str:
    """The student's held-out agreement with the teacher's cells, and with their k-means clusters
    where the clusters were cut into ROI cells."""
    cells, clusters = summary["student_agreement"], summary.get("student_cluster_agreement")
    if clusters is None or clusters == cells:
        return f"{cells:.4f}"
    return f"{cells:.4f} (clusters {clusters:.4f})"
