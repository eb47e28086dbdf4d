"""The fit in memory, stage by stage, and the helpers every driver of the fit shares.

Order: a seeded split into train rows (network, k-means, student) and honest rows
(statistics only, so group means are not optimistic); the preprocessor and the
network (``train_stage``); k-means on the train rows' ``h(x)`` (``cluster_stage``);
the student on every row but a holdout (``distill_stage``); the honest rows'
statistics grouped by the student, which is what serves (``statistics_stage``); the
budget table over the trial's own cluster sizes (``program_stage``). Invariants:
splits and samples depend on the row count and seed only, and forward passes run
in fixed blocks, so :mod:`budgetalloc.fit.fit_stream` reproduces this fit from a file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from budgetalloc.data.contract import Preprocessor, Trial, count_missing
from budgetalloc.data.sampling import STUDENT_SAMPLE, TRAIN_SAMPLE, capped, split_mask
from budgetalloc.method.clustering import (
    ASSIGN_BATCH,
    ClusterModel,
    assign_clusters,
    centroid_soft_targets,
    cluster_sizes,
    effective_k,
    fit_clusters,
)
from budgetalloc.method.program import AllocationProgram, solve_budget_table
from budgetalloc.method.statistics import ClusterStatistics, cluster_statistics
from budgetalloc.models.distill import StudentModel, predict_clusters, train_student
from budgetalloc.models.representation import (
    RepresentationModel,
    embed,
    predict_outcomes,
    task_metric,
    train_representation,
)
from budgetalloc.params import Params
from budgetalloc.policy import Policy

EpochCallback = Callable[[int, dict], None]
MIN_HONEST_ROWS_PER_CELL = 30
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


@dataclass
class FitState:
    """What the stages produce, in order."""

    preprocessor: Preprocessor | None = None
    representation: RepresentationModel | None = None
    clusters: ClusterModel | None = None
    student: StudentModel | None = None
    statistics: ClusterStatistics | None = None
    budget_table: list[dict] | None = None
    summary: dict = field(default_factory=dict)


def split_rows(n: int, *, honest_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, honest) row indices, each sorted (the honest rows: :func:`~budgetalloc.data.sampling.split_mask`)."""
    honest = split_mask(n, fraction=honest_fraction, seed=seed)
    return np.flatnonzero(~honest), np.flatnonzero(honest)


def honest_mask(n: int, params: Params) -> np.ndarray:
    """Which of ``n`` trial rows are honest: ``data.honest_fraction``, ``seed``."""
    return split_mask(n, fraction=params.data.honest_fraction, seed=params.seed)


def holdout_mask(n: int, params: Params) -> np.ndarray:
    """Which of ``n`` trial rows the student never sees: ``distill.holdout_fraction``, ``seed + 1``."""
    return split_mask(n, fraction=params.distill.holdout_fraction, seed=params.seed + 1)


def train_honest_rows(n: int, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """The (train, honest) split of ``n`` trial rows (:func:`honest_mask`)."""
    honest = honest_mask(n, params)
    return np.flatnonzero(~honest), np.flatnonzero(honest)


def student_sample(rows: np.ndarray, params: Params) -> np.ndarray:
    """The rows the student learns from: a seeded sample of at most ``distill.max_rows`` of ``rows``."""
    return capped(rows, params.distill.max_rows, (params.seed, STUDENT_SAMPLE))


def student_rows(n: int, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """The (student, holdout) split (:func:`holdout_mask`); the student's part is :func:`student_sample`."""
    holdout = holdout_mask(n, params)
    return student_sample(np.flatnonzero(~holdout), params), np.flatnonzero(holdout)


def network_rows(train_idx: np.ndarray, params: Params) -> np.ndarray:
    """The train rows the network learns from: a seeded sample of at most ``train.max_rows``."""
    return capped(train_idx, params.train.max_rows, (params.seed, TRAIN_SAMPLE))


def missing_note(missing: int) -> str:
    return f"{missing} missing feature values imputed with training medians"


def network_rows_note(rows: int, train_rows: int) -> str:
    return f"train.max_rows: the network learns from a seeded sample of {rows} of the {train_rows} train rows"


def train_network(Z, treatment, response, cost, ipw, *, n_arms: int, binary_response: bool, params: Params,
                  reporter: Reporter) -> RepresentationModel:
    """The multi-task network on the (preprocessed) rows given."""
    return train_representation(
        Z, treatment, response, cost, ipw,
        n_arms=n_arms,
        binary_response=binary_response,
        params=params.train,
        seed=params.seed,
        progress=reporter.epoch_callback("representation", params.train.epochs),
    )


def train_stage(trial: Trial, train_idx: np.ndarray, params: Params, reporter: Reporter):
    """Fit the preprocessor on all rows and the multi-task network on (at most ``train.max_rows``) train rows."""
    reporter.stage("representation")
    pre = Preprocessor.fit(trial.X)
    missing = count_missing(trial.X)
    if missing:
        reporter.note(missing_note(missing))
    rows = network_rows(train_idx, params)
    if len(rows) < len(train_idx):
        reporter.note(network_rows_note(len(rows), len(train_idx)))
    model = train_network(pre.transform(trial.X[rows]), trial.treatment[rows], trial.response[rows],
                          trial.cost[rows], trial.ipw[rows], n_arms=trial.n_arms,
                          binary_response=trial.binary_response, params=params, reporter=reporter)
    return pre, model


def cluster_k(*, n_honest: int, n_arms: int, params: Params, reporter: Reporter) -> int:
    """K for the honest rows available (:func:`~budgetalloc.method.clustering.effective_k`), with a note when lowered."""
    k = effective_k(params.cluster.k, n_honest, n_arms, rows_per_cell=MIN_HONEST_ROWS_PER_CELL)
    if k < params.cluster.k:
        reporter.note(
            f"cluster.k lowered from {params.cluster.k} to {k}: {n_honest} honest rows support "
            f"about {MIN_HONEST_ROWS_PER_CELL} rows per (cluster, arm) cell at K={k}"
        )
    return k


def cluster_metric(model: RepresentationModel, params: Params):
    """The ``metric`` argument of :func:`~budgetalloc.method.clustering.fit_clusters` for ``cluster.metric``."""
    if params.cluster.metric != "task":
        return None
    return lambda rows: task_metric(model, rows, rank=params.cluster.metric_rank, seed=params.seed)


def cluster_stage(Z_train: np.ndarray, model: RepresentationModel, *, n_honest: int, n_arms: int,
                  params: Params, reporter: Reporter) -> tuple[ClusterModel, np.ndarray, np.ndarray]:
    """k-means on the train rows' representation; returns the model, embeddings and labels."""
    reporter.stage("clustering")
    k = cluster_k(n_honest=n_honest, n_arms=n_arms, params=params, reporter=reporter)
    emb = embed(model, Z_train, batch_size=EMBED_BATCH)
    clusters = fit_clusters(emb, k=k, params=params.cluster, seed=params.seed, metric=cluster_metric(model, params))
    return clusters, emb, assign_clusters(clusters, emb)


def student_soft_targets(clusters: ClusterModel, emb: np.ndarray | None, params: Params) -> np.ndarray | None:
    """Soft targets from centroid distances when ``distill.soft_temperature > 0``, else ``None``.

    Computed over blocks of ``ASSIGN_BATCH`` rows, as the streamed fit computes them.
    """
    temperature = params.distill.soft_temperature
    if temperature <= 0 or emb is None:
        return None
    return np.concatenate([centroid_soft_targets(clusters, emb[i : i + ASSIGN_BATCH], temperature=temperature)
                           for i in range(0, emb.shape[0], ASSIGN_BATCH)])


def train_student_stage(Z_train, labels_train, soft: np.ndarray | None, *, n_clusters: int, params: Params,
                        reporter: Reporter) -> StudentModel:
    """The student on the teacher's clusters (and soft targets, if any) of the rows given."""
    return train_student(
        Z_train,
        labels_train,
        n_clusters=n_clusters,
        params=params.distill,
        seed=params.seed,
        soft_targets=soft,
        progress=reporter.epoch_callback("distillation", params.distill.epochs),
    )


def distill_stage(Z_train, emb_train, labels_train, clusters: ClusterModel, params: Params,
                  reporter: Reporter) -> StudentModel:
    """Train the student on the teacher's clusters (soft targets when configured)."""
    reporter.stage("distillation")
    soft = student_soft_targets(clusters, emb_train, params)
    return train_student_stage(Z_train, labels_train, soft, n_clusters=clusters.k, params=params, reporter=reporter)


def statistics_stage(trial: Trial, honest_idx, Z_honest, model, student, params: Params,
                     reporter: Reporter) -> tuple[ClusterStatistics, np.ndarray]:
    """Estimate per-(cluster, arm) statistics on the honest rows grouped by the student."""
    reporter.stage("statistics")
    labels = predict_clusters(student, Z_honest, batch_size=STUDENT_BATCH)
    pred_r, pred_c = predict_outcomes(model, Z_honest, batch_size=EMBED_BATCH)
    stats = cluster_statistics(
        labels,
        trial.treatment[honest_idx],
        trial.response[honest_idx],
        trial.cost[honest_idx],
        trial.ipw[honest_idx],
        pred_r,
        pred_c,
        k=student.n_clusters,
        params=params.statistics,
        seed=params.seed,
    )
    return stats, labels


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


def budget_stage(trial: Trial, Z: np.ndarray, honest_idx: np.ndarray, model: RepresentationModel,
                 student: StudentModel, params: Params, reporter: Reporter):
    """Cluster statistics and the budget table over the trial's own (student) cluster sizes.

    Args:
        trial: the trial the policy is fitted on.
        Z: its preprocessed features, every row.
        honest_idx: the rows the statistics are estimated on.
        model, student: the fitted representation network and student.
        params: all params (``statistics`` and ``program`` are read).
        reporter: progress sink.

    Returns:
        ``(statistics, student_labels, n_users, budget_table)``: the student's cluster
        for every row and the users per cluster come along for the summary.
    """
    student_all = predict_clusters(student, Z, batch_size=STUDENT_BATCH)
    stats, _ = statistics_stage(trial, honest_idx, Z[honest_idx], model, student, params, reporter)
    n_users = cluster_sizes(student_all, student.n_clusters)
    table = program_stage(stats, n_users, params, reporter)
    return stats, student_all, n_users, table


def student_agreement(student_labels: np.ndarray, teacher_labels: np.ndarray, holdout_idx: np.ndarray) -> float:
    """Share of the held-out rows that the student puts in the teacher's cluster."""
    return float(np.mean(student_labels[holdout_idx] == teacher_labels[holdout_idx]))


def fit_summary(trial: Trial, *, train_rows: int, honest_rows: int, k: int, agreement: float,
                epochs: int, n_users: np.ndarray, table: list[dict], notes: list[str],
                fit_path: str = "in memory") -> dict:
    """The fit diagnostics stored in the policy (``summary.json``).

    ``trial`` needs ``n`` and ``n_arms`` only (the streamed fit passes its file's facts).
    """
    return {
        "rows": trial.n,
        "train_rows": train_rows,
        "honest_rows": honest_rows,
        "k": k,
        "n_arms": trial.n_arms,
        "student_agreement": agreement,
        "representation_epochs": epochs,
        "cluster_sizes": n_users.tolist(),
        "budget_per_user_range": [table[0]["budget_per_user"], table[-1]["budget_per_user"]],
        "notes": list(notes),
        "fit_path": fit_path,
    }


def assemble_policy(trial: Trial, params: Params, *, preprocessor: Preprocessor, student: StudentModel,
                    statistics: ClusterStatistics, budget_table: list[dict], summary: dict) -> Policy:
    """The :class:`Policy` from the fitted parts (not yet saved).

    ``trial`` needs ``feature_names``, ``n_arms`` and ``binary_response`` only.
    """
    return Policy(
        feature_names=trial.feature_names,
        n_arms=trial.n_arms,
        binary_response=trial.binary_response,
        preprocessor=preprocessor,
        student=student,
        statistics=statistics,
        budget_table=budget_table,
        params=params,
        summary=summary,
    )


def fit_policy(trial: Trial, params: Params, reporter: Reporter | None = None) -> Policy:
    """Run every stage on ``trial`` and return the fitted :class:`Policy`.

    The student learns the teacher's clusters from every row except a seeded
    ``distill.holdout_fraction`` kept to measure its agreement: cluster labels come
    from features alone, so using the honest rows' features here leaks no outcome.
    The DVC stages (:mod:`budgetalloc.stages`) run the same functions one by one.

    Args:
        trial: a validated randomized trial.
        params: all params (each stage reads its own section).
        reporter: progress sink; silent by default.

    Returns:
        The policy (not yet saved; see :func:`budgetalloc.policy.save_policy`).
    """
    reporter = reporter or Reporter()
    train_idx, honest_idx = train_honest_rows(trial.n, params)
    pre, model = train_stage(trial, train_idx, params, reporter)
    Z = pre.transform(trial.X)
    clusters, _, _ = cluster_stage(Z[train_idx], model, n_honest=len(honest_idx), n_arms=trial.n_arms,
                                   params=params, reporter=reporter)
    emb = embed(model, Z, batch_size=EMBED_BATCH)
    teacher = assign_clusters(clusters, emb)
    student_idx, holdout_idx = student_rows(trial.n, params)
    student = distill_stage(Z[student_idx], emb[student_idx], teacher[student_idx], clusters, params, reporter)
    del emb
    stats, student_all, n_users, table = budget_stage(trial, Z, honest_idx, model, student, params, reporter)
    summary = fit_summary(
        trial,
        train_rows=len(train_idx),
        honest_rows=len(honest_idx),
        k=clusters.k,
        agreement=student_agreement(student_all, teacher, holdout_idx),
        epochs=int(model.history.epochs_run),
        n_users=n_users,
        table=table,
        notes=reporter.notes,
    )
    return assemble_policy(trial, params, preprocessor=pre, student=student, statistics=stats,
                           budget_table=table, summary=summary)
