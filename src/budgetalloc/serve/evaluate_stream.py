"""Streamed evaluation: a held-out trial file read in batches, never whole.

:func:`evaluate_file` writes what :func:`budgetalloc.serve.evaluate.evaluate_policy`
writes for the same file, to the bit (the same metrics.json and curve.json bytes,
the same plot), without holding the feature matrix or the table:

1. **One pass over the file** (:func:`budgetalloc.data.readers.trial_frames`, Parquet or
   CSV, ``batch_rows`` rows at a time). Each batch gets the trial contract's row-wise
   checks (:func:`budgetalloc.data.contract.trial_columns`: columns, ids, arms, response, cost,
   features, propensity; row numbers count from the file's start), its arms are
   checked against the policy's, and it is imputed, standardised and classified by
   the student in one compiled call of a fixed shape
   (:func:`budgetalloc.models.distill.fixed_shape_clusters`).
2. **The checks over all rows**: ids unique across batches (a sorted 64-bit key
   per row; the file's ids are read again only if some key repeats, to name the
   first duplicate as the contract does), arm 0 present and no arm empty.
3. **The evaluation** (:func:`budgetalloc.serve.evaluate.write_evaluation`) on what was
   kept: the same function the in-memory path calls.

What is kept per row: the cluster (int16), the arm received (int8), response and
cost (float64) and, if the file has the column, the propensity (float64): 27
bytes a row, 19 without the column (the propensity then follows from the arm
counts), plus an 8-byte id key until the ids are checked.

Why rows and not per-(cluster, arm) sums: a user's arm at each budget level
depends on its rank within its cluster, with cut points known only when every
cluster's size is, after the pass; and the reported values are numpy sums in row
order (pairwise means and standard deviations; cumulative sums in score order for
the AUCC). Sums per (cluster, arm, level) would need a second read of the file and
would match only to rounding, so the DVC reports would change in their last digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from budgetalloc.data.contract import (
    MAX_ARMS,
    arm_propensity,
    check_arm_counts,
    trial_columns,
)
from budgetalloc.data.readers import (
    STREAM_BATCH_ROWS,
    IdsNotUniform,
    check_unique_file_ids,
    id_keys,
    trial_frames,
)
from budgetalloc.errors import DataError
from budgetalloc.models.distill import fixed_shape_clusters
from budgetalloc.policy import Policy
from budgetalloc.serve.evaluate import DEFAULT_LEVELS, Outcomes, write_evaluation
from budgetalloc.serve.streaming import compiled_rows

_INT16_MAX = np.iinfo(np.int16).max


@dataclass
class TrialPass:
    """What the pass keeps, per batch in file order."""

    clusters: list = field(default_factory=list)  # int16 (int32 when K allows no less)
    treatment: list = field(default_factory=list)  # int8
    response: list = field(default_factory=list)  # float64
    cost: list = field(default_factory=list)  # float64
    propensity: list = field(default_factory=list)  # float64; empty when the file has no such column
    keys: list = field(default_factory=list)  # uint64 id keys, until the ids are checked
    arm_counts: np.ndarray = field(default_factory=lambda: np.zeros(MAX_ARMS, dtype=np.int64))
    rows: int = 0
    ids_as_text: bool = False


def _owned(values: np.ndarray) -> np.ndarray:
    """``values`` as an array of its own: a view would keep the whole batch's memory alive."""
    return values if values.base is None else values.copy()


def check_policy_arms(treatment: np.ndarray, policy: Policy, source: str) -> None:
    """The trial may not hold more arms than the policy knows (checked per batch, so early)."""
    n_arms = int(treatment.max()) + 1
    if n_arms > policy.n_arms:
        raise DataError(f"{source}: trial has {n_arms} arms, the policy knows {policy.n_arms}")


def trial_pass(policy: Policy, frames, *, source: str, rows: int) -> TrialPass:
    """Validate and classify every batch; keep clusters and outcomes per row.

    Args:
        policy: the fitted policy.
        frames: trial batches of at most ``rows`` rows, in file order.
        source: file name for error messages.
        rows: the compiled batch shape.

    Returns:
        The :class:`TrialPass` (the checks over all rows are left to the caller).
    """
    kept = TrialPass()
    dtype = np.int16 if policy.k <= _INT16_MAX else np.int32
    for frame in frames:
        cols = trial_columns(frame, features=policy.feature_names, source=source, first_row=kept.rows)
        check_policy_arms(cols.treatment, policy, source)
        clusters = fixed_shape_clusters(policy.student, policy.preprocessor.transform(cols.X), rows)
        kept.clusters.append(clusters.astype(dtype))
        kept.treatment.append(cols.treatment.astype(np.int8))
        kept.response.append(_owned(cols.response))
        kept.cost.append(_owned(cols.cost))
        if cols.propensity is not None:
            kept.propensity.append(_owned(cols.propensity))
        kept.keys.append(_owned(id_keys(cols.user_id)))
        kept.arm_counts += np.bincount(cols.treatment, minlength=MAX_ARMS)
        kept.rows += len(frame)
    return kept


def file_trial_pass(policy: Policy, path: Path, *, rows: int) -> TrialPass:
    """:func:`trial_pass` over a file; a CSV whose ids change type is read again with text ids."""
    try:
        return trial_pass(policy, trial_frames(path, policy.feature_names, batch_rows=rows),
                          source=str(path), rows=rows)
    except IdsNotUniform:
        kept = trial_pass(policy, trial_frames(path, policy.feature_names, batch_rows=rows, ids_as_text=True),
                          source=str(path), rows=rows)
        kept.ids_as_text = True
        return kept


def _joined(chunks: list) -> np.ndarray:
    """One array from per-batch chunks, releasing them (peak: one column twice, not all)."""
    whole = np.concatenate(chunks)
    chunks.clear()
    return whole


def kept_outcomes(kept: TrialPass, source: str) -> tuple[np.ndarray, Outcomes]:
    """The clusters and the :class:`~budgetalloc.serve.evaluate.Outcomes`, after the arm checks over all rows."""
    if kept.rows == 0:
        raise DataError(f"{source}: table has no rows")
    n_arms = check_arm_counts(kept.arm_counts, source)
    treatment = _joined(kept.treatment)
    propensity = (_joined(kept.propensity) if kept.propensity
                  else arm_propensity(treatment, kept.arm_counts[:n_arms]))
    outcomes = Outcomes(treatment=treatment, response=_joined(kept.response), cost=_joined(kept.cost),
                        propensity=propensity, n_arms=n_arms)
    return _joined(kept.clusters), outcomes


def streamed_outcomes(policy: Policy, path: str | Path, *,
                      batch_size: int | None = None) -> tuple[np.ndarray, Outcomes]:
    """Each test user's cluster and outcomes, streamed from a trial file and checked by the contract.

    Args:
        policy: a fitted policy.
        path: held-out trial file (Parquet or CSV) with the policy's features.
        batch_size: rows per batch (default ``STREAM_BATCH_ROWS``), rounded up to
            the student's compiled shape.

    Returns:
        ``(clusters, outcomes)`` in file order.

    Raises:
        DataError: the file breaks the trial contract, or has more arms than the policy.
    """
    path = Path(path)
    rows = compiled_rows(batch_size or STREAM_BATCH_ROWS)
    kept = file_trial_pass(policy, path, rows=rows)
    if kept.rows:
        check_unique_file_ids(path, _joined(kept.keys), batch_rows=rows, ids_as_text=kept.ids_as_text)
    return kept_outcomes(kept, str(path))


def evaluate_file(policy: Policy, path: str | Path, out_dir: str | Path, *, levels=DEFAULT_LEVELS,
                  batch_size: int | None = None) -> dict:
    """Evaluate ``policy`` on a held-out trial file, streamed; write the reports atomically.

    Args:
        policy: a fitted policy.
        path: held-out trial file (Parquet or CSV).
        out_dir: directory for ``metrics.json``, ``curve.json`` and ``curve.png``.
        levels: budget grid as fractions of the all-max-arm spend.
        batch_size: rows per batch (see :func:`streamed_outcomes`).

    Returns:
        The metrics dict: exactly :func:`budgetalloc.serve.evaluate.evaluate_policy`'s for
        the file loaded whole.
    """
    clusters, outcomes = streamed_outcomes(policy, path, batch_size=batch_size)
    return write_evaluation(policy, clusters, outcomes, out_dir, levels=levels)
