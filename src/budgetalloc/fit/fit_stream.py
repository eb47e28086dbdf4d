"""The fit, written once as passes over a row source: a Parquet trial read in batches, or arrays.

Passes: 1 checks every batch and keeps the samples (:mod:`budgetalloc.fit.trial_scan`),
the preprocessor and network learn from them; 2 k-means on the train rows' embeddings;
3 every row's teacher cluster, the student learns its sample's; 4 the statistics of the
fit rows (``statistics.rows``: all, or the honest ones) grouped by the student and its
cluster sizes; then the budget table. One process runs them all (:func:`fit_policy`,
:func:`fit_policy_file`), a DVC stage one boundary. Invariants: per row only a role byte
is held (and an id key in pass 1); passes follow fixed blocks from row 0, so the policy
does not depend on the batching or the source (``summary.fit_path`` aside). Rationale:
docs/scale.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from budgetalloc.data.blocks import Rebatcher, fixed_blocks, padded
from budgetalloc.data.contract import Preprocessor, Trial
from budgetalloc.data.readers import STREAM_BATCH_ROWS
from budgetalloc.fit.pipeline import (
    EMBED_BATCH,
    STUDENT_BATCH,
    Reporter,
    assemble_policy,
    cluster_k,
    program_stage,
    roi_parts,
)
from budgetalloc.fit.trial_scan import (
    HELD,
    HOLDOUT,
    HONEST,
    NETWORK,
    PREPROCESS,
    STUDENT,
    Scan,
    TrialFacts,
    TrialRows,
    memory_trial,
    open_trial,
    row_roles,
    scan_trial,
)
from budgetalloc.method.clustering import (
    ASSIGN_BATCH,
    ClusterModel,
    assign_clusters,
    centroid_soft_targets,
    fit_clusters_batches,
    roi_bin_edges,
    roi_cells,
    roi_scores,
)
from budgetalloc.method.statistics import ClusterStatistics, StatisticsAccumulator, winsorize_bands
from budgetalloc.models.distill import fixed_shape_clusters, train_student
from budgetalloc.models.nn import inference_batch_size
from budgetalloc.models.representation import (
    RepresentationModel,
    embed,
    predict_outcomes,
    task_metric,
    train_representation,
    weight_decay_for,
)
from budgetalloc.params import Params
from budgetalloc.policy import Policy


def estimating(roles: np.ndarray, params: Params) -> np.ndarray:
    """Which of these rows estimate the cells (``statistics.rows``): every one, or the honest ones."""
    if params.statistics.rows == "all":
        return np.ones(roles.shape, dtype=bool)
    return (roles & HONEST) != 0


def _embedded(model: RepresentationModel, Z: np.ndarray, size: int) -> np.ndarray:
    """``embed`` of a block of at most ``size`` rows, run at the in-memory call's shape."""
    return embed(model, padded(Z, size), batch_size=size)[: Z.shape[0]]


def _features(trial: TrialRows, roles: np.ndarray, pre: Preprocessor, *, train_only: bool = False):
    """``(Z, roles)`` of every batch's rows (only the train rows' with ``train_only``), in row order."""
    start = 0
    for X in trial.features():
        end = start + X.shape[0]
        r = roles[start:end]
        if train_only:
            keep = (r & HONEST) == 0
            X, r = X[keep], r[keep]
        yield pre.transform(X), r
        start = end


def cluster_pass(trial: TrialRows, roles: np.ndarray, pre: Preprocessor, model: RepresentationModel,
                 facts: TrialFacts, params: Params, reporter: Reporter) -> ClusterModel:
    """Pass 2: k-means on the train rows' embeddings."""
    reporter.stage("clustering")
    n_train = int(np.count_nonzero((roles & HONEST) == 0))
    n_estimate = int(np.count_nonzero(estimating(roles, params)))
    k = cluster_k(n_rows=n_estimate, n_arms=facts.n_arms, params=params, reporter=reporter)
    size = inference_batch_size(n_train, EMBED_BATCH)

    def batches():
        train_rows = ((Z,) for Z, _ in _features(trial, roles, pre, train_only=True))
        return (_embedded(model, Z, size) for (Z,) in fixed_blocks(train_rows, size))

    def metric(rows):  # cluster.metric "task": distances in the metric the task heads induce
        return task_metric(model, rows, rank=params.cluster.metric_rank, seed=params.seed)

    return fit_clusters_batches(batches, n_rows=n_train, k=k, params=params.cluster, seed=params.seed,
                                metric=metric if params.cluster.metric == "task" else None)


def teacher_pass(trial: TrialRows, roles: np.ndarray, pre: Preprocessor, model: RepresentationModel,
                 clusters: ClusterModel, params: Params, *, soft_targets: bool = True, parts: int = 1):
    """Pass 3: every row's teacher cell.

    A cell is a k-means cluster, or with ``parts`` > 1 (:func:`~budgetalloc.fit.pipeline.roi_parts`)
    one of its equal parts by the network's predicted best incremental ROI (the cuts are the
    student sample's quantiles per cluster). Returns the student sample's cells (and soft
    targets, or ``None``; none with ``soft_targets=False``), the holdout's cells, and the rows
    per k-means cluster.
    """
    size = inference_batch_size(trial.n, EMBED_BATCH)
    temperature = params.distill.soft_temperature if soft_targets else 0.0
    student, holdout, soft, scores = [], [], [], ([], [])
    sizes = np.zeros(clusters.k, dtype=np.int64)
    soft_blocks = Rebatcher(ASSIGN_BATCH)  # soft targets in fixed blocks of ASSIGN_BATCH rows

    def add_soft(emb: np.ndarray) -> None:
        soft.append(centroid_soft_targets(clusters, emb, temperature=temperature))

    for Z, r in fixed_blocks(_features(trial, roles, pre), size):
        emb = _embedded(model, Z, size)
        labels = assign_clusters(clusters, emb)
        sizes += np.bincount(labels, minlength=clusters.k)
        chosen, held_out = (r & STUDENT) != 0, (r & HOLDOUT) != 0
        student.append(labels[chosen])
        holdout.append(labels[held_out])
        if parts > 1:
            pred_r, pred_c = predict_outcomes(model, padded(Z, size), batch_size=EMBED_BATCH)
            score = roi_scores(pred_r[: Z.shape[0]], pred_c[: Z.shape[0]])
            scores[0].append(score[chosen])
            scores[1].append(score[held_out])
        if temperature > 0:
            for (block,) in soft_blocks.push(emb[chosen]):
                add_soft(block)
    last = soft_blocks.flush()
    if temperature > 0 and last is not None:
        add_soft(last[0])
    student, holdout = np.concatenate(student), np.concatenate(holdout)
    if parts > 1:
        student_scores, holdout_scores = np.concatenate(scores[0]), np.concatenate(scores[1])
        edges = roi_bin_edges(student, student_scores, k=clusters.k, bins=parts)
        student, holdout = roi_cells(student, student_scores, edges), roi_cells(holdout, holdout_scores, edges)
    cells = clusters.k * parts
    holdout = holdout.astype(np.int16 if cells <= 2**15 else np.int32)
    return student, (np.concatenate(soft) if soft else None), holdout, sizes


def student_pass(trial: TrialRows, roles: np.ndarray, pre: Preprocessor, student,
                 teacher_holdout: np.ndarray | None, parts: int = 1) -> tuple[np.ndarray, float | None, float | None]:
    """Every row's student cell: the rows per cell, and the agreement with ``teacher_holdout`` on
    the cell and on its k-means cluster (the cell's ``// parts``; the same number with one part)."""
    size = inference_batch_size(trial.n, STUDENT_BATCH)
    sizes = np.zeros(student.n_clusters, dtype=np.int64)
    agree, agree_cluster, seen = 0, 0, 0
    for Z, r in fixed_blocks(_features(trial, roles, pre), size):
        labels = fixed_shape_clusters(student, Z, size)
        sizes += np.bincount(labels, minlength=student.n_clusters)
        if teacher_holdout is not None:
            held_out = labels[(r & HOLDOUT) != 0]
            teacher = teacher_holdout[seen : seen + held_out.shape[0]]
            agree += int(np.count_nonzero(held_out == teacher))
            agree_cluster += int(np.count_nonzero(held_out // parts == teacher // parts))
            seen += held_out.shape[0]
    if teacher_holdout is None:
        return sizes, None, None
    return sizes, agree / max(seen, 1), agree_cluster / max(seen, 1)


def cell_parts(roles: np.ndarray, facts: TrialFacts, params: Params) -> int:
    """The parts each k-means cluster is cut into for this trial (:func:`~budgetalloc.fit.pipeline.roi_parts`)."""
    return roi_parts(n_rows=int(np.count_nonzero(estimating(roles, params))), n_arms=facts.n_arms, params=params)


def statistics_pass(trial: TrialRows, roles: np.ndarray, scan: Scan, pre: Preprocessor, model, student,
                    params: Params) -> ClusterStatistics:
    """Pass 4: statistics on the fit rows of ``statistics.rows`` (every row, or the honest ones)
    grouped by the student."""
    facts = scan.facts
    bands = winsorize_bands(scan.clip.treatment, scan.clip.response, scan.clip.cost, facts.n_arms,
                            params=params.statistics)
    acc = StatisticsAccumulator(k=student.n_clusters, n_arms=facts.n_arms, params=params.statistics,
                                seed=params.seed, bands=bands)
    size = inference_batch_size(int(np.count_nonzero(estimating(roles, params))), STUDENT_BATCH)

    def estimate_rows():
        for start, cols in trial.checked():
            h = estimating(roles[start : start + cols.treatment.shape[0]], params)
            p = None if cols.propensity is None else cols.propensity[h]
            yield (pre.transform(cols.X[h]), cols.treatment[h], cols.response[h], cols.cost[h],
                   facts.ipw(cols.treatment[h], p))

    for Z, treatment, response, cost, ipw in fixed_blocks(estimate_rows(), size):
        labels = fixed_shape_clusters(student, Z, size)
        pred_r, pred_c = predict_outcomes(model, padded(Z, size), batch_size=EMBED_BATCH)
        b = Z.shape[0]
        acc.update(labels, treatment, response, cost, ipw, pred_r[:b], pred_c[:b])
    return acc.finalize()


def scan_source(trial: TrialRows, params: Params, reporter: Reporter,
                held_roles: int = HELD) -> tuple[np.ndarray, Scan]:
    """Every row's roles and pass 1 (:func:`scan_trial`) over a row source, holding the samples of ``held_roles``."""
    reporter.stage("reading")
    roles = row_roles(trial.n, params)
    return roles, scan_trial(trial, roles, held_roles)


def scan_file(path: str | Path, params: Params, reporter: Reporter, *, batch_rows: int = STREAM_BATCH_ROWS,
              held_roles: int = HELD) -> tuple[TrialRows, np.ndarray, Scan]:
    """Open a Parquet trial and run :func:`scan_source` on it (a stage holds only the samples its step uses)."""
    trial = open_trial(path, params, batch_rows=batch_rows)
    return (trial, *scan_source(trial, params, reporter, held_roles))


def train_rows(roles: np.ndarray) -> int:
    """How many rows are train rows (not honest)."""
    return int(np.count_nonzero((roles & HONEST) == 0))


def representation_step(roles: np.ndarray, scan: Scan, params: Params,
                        reporter: Reporter) -> tuple[Preprocessor, RepresentationModel]:
    """The preprocessor on its sample and the network on its train rows, in memory."""
    facts, held = scan.facts, scan.held
    reporter.stage("representation")
    pre = Preprocessor.fit(held.X[held.having(PREPROCESS)])
    if facts.missing:
        reporter.note(f"{facts.missing} missing feature values imputed with training medians")
    n_train, net = train_rows(roles), held.having(NETWORK)
    if np.count_nonzero(net) < n_train:
        reporter.note(f"train.max_rows: the network learns from a seeded sample of {np.count_nonzero(net)} "
                      f"of the {n_train} train rows")
    decay = weight_decay_for(params.train, int(np.count_nonzero(net)))
    if decay != params.train.weight_decay:
        reporter.note(f"train.weight_decay scaled to {decay:.3g} for {np.count_nonzero(net)} network rows "
                      f"(train.decay_rows: {params.train.decay_rows})")
    model = train_representation(
        pre.transform(held.X[net]), held.treatment[net], held.response[net], held.cost[net],
        facts.ipw(held.treatment[net], None if held.propensity is None else held.propensity[net]),
        n_arms=facts.n_arms, binary_response=facts.binary_response, params=params.train, seed=params.seed,
        progress=reporter.epoch_callback("representation", params.train.epochs))
    return pre, model


def student_step(trial: TrialRows, roles: np.ndarray, scan: Scan, pre: Preprocessor, model: RepresentationModel,
                 clusters: ClusterModel, params: Params, reporter: Reporter):
    """Pass 3 and the student trained on its sample; returns the student and the holdout's teacher clusters."""
    reporter.stage("distillation")
    parts = cell_parts(roles, scan.facts, params)
    if parts > 1:
        reporter.note(f"cluster.roi_bins: each of the {clusters.k} clusters cut into {parts} cells by predicted ROI")
    labels, soft, teacher_holdout, _ = teacher_pass(trial, roles, pre, model, clusters, params, parts=parts)
    chosen = scan.held.having(STUDENT)
    student = train_student(pre.transform(scan.held.X[chosen]), labels, n_clusters=clusters.k * parts,
                            params=params.distill,
                            seed=params.seed, soft_targets=soft,
                            progress=reporter.epoch_callback("distillation", params.distill.epochs))
    return student, teacher_holdout


def budget_step(trial: TrialRows, roles: np.ndarray, scan: Scan, pre: Preprocessor, model, student,
                teacher_holdout: np.ndarray | None, params: Params, reporter: Reporter):
    """Pass 4, the student's cell sizes (and agreements), the budget table:
    ``(stats, sizes, (agreement, cluster_agreement), table)``."""
    reporter.stage("statistics")
    stats = statistics_pass(trial, roles, scan, pre, model, student, params)
    parts = cell_parts(roles, scan.facts, params)
    sizes, *agreements = student_pass(trial, roles, pre, student, teacher_holdout, parts)
    return stats, sizes, tuple(agreements), program_stage(stats, sizes, params, reporter)


def fit_source(trial: TrialRows, params: Params, reporter: Reporter | None = None, *,
               fit_path: str) -> Policy:
    """Every pass over ``trial`` in one process; the policy's ``summary.fit_path`` is ``fit_path``."""
    reporter = reporter or Reporter()
    roles, scan = scan_source(trial, params, reporter)
    pre, model = representation_step(roles, scan, params, reporter)
    clusters = cluster_pass(trial, roles, pre, model, scan.facts, params, reporter)
    student, teacher_holdout = student_step(trial, roles, scan, pre, model, clusters, params, reporter)
    scan.held = None  # the samples are no longer needed
    stats, n_users, agreements, table = budget_step(trial, roles, scan, pre, model, student, teacher_holdout,
                                                    params, reporter)
    return assemble_policy(scan.facts, params, preprocessor=pre, network=model, student=student,
                           statistics=stats, budget_table=table, n_users=n_users,
                           train_rows=train_rows(roles), agreement=agreements, notes=reporter.notes,
                           fit_path=fit_path)


def fit_policy(trial: Trial, params: Params, reporter: Reporter | None = None, *,
               batch_rows: int = STREAM_BATCH_ROWS) -> Policy:
    """Fit a policy (not yet saved) on a validated in-memory trial: the passes over its arrays in
    batches of ``batch_rows`` (the result does not depend on it); ``reporter`` shows progress.

    The student learns the teacher's clusters from every row except a seeded
    ``distill.holdout_fraction`` kept to measure its agreement: cluster labels come
    from features alone, so using the honest rows' features here leaks no outcome.
    The policy has the bytes :func:`fit_policy_file` gives on the same rows, but for
    ``summary["fit_path"] == "in memory"``.
    """
    return fit_source(memory_trial(trial, batch_rows), params, reporter, fit_path="in memory")


def fit_policy_file(path: str | Path, params: Params, reporter: Reporter | None = None, *,
                    batch_rows: int = STREAM_BATCH_ROWS) -> Policy:
    """:func:`fit_policy` on a Parquet trial read in batches of ``batch_rows``, in memory bounded by
    ``train.max_rows``, ``distill.max_rows``, ``data.preprocess_sample`` and
    ``statistics.clip_sample``; ``summary["fit_path"] == "streamed"``.

    Raises:
        DataError: the file is not a readable Parquet trial, or breaks the contract.
    """
    return fit_source(open_trial(path, params, batch_rows=batch_rows), params, reporter, fit_path="streamed")
