"""Offline evaluation on a held-out randomized trial, written once as a pass over a row source.

The classify pass of the allocation (validated by the trial contract, one student
forward pass) keeps each row's cluster and outcomes; then, for a grid of total
budgets, the program is solved for the test population's own cluster sizes, users
take arms in file order, and the allocation's response and spend per user are
estimated by inverse propensity with 95% intervals (:mod:`budgetalloc.serve.metrics`),
with all-control and random allocation as references, the multi-arm Qini curve of
the budget path and the AUCC of the clusters' incremental ROI. Invariant: the reports' bytes do not depend on the
source kind, the batch size or the executor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from budgetalloc.data.contract import (
    MAX_ARMS,
    RESERVED,
    USER_ID,
    Trial,
    arm_propensity,
    check_arm_counts,
    trial_columns,
    user_ids,
)
from budgetalloc.data.readers import check_unique_ids, id_keys
from budgetalloc.data.sources import Partition, Source, file_source, memory_source
from budgetalloc.errors import DataError
from budgetalloc.files import atomic_files, write_json
from budgetalloc.fit.pipeline import budget_scale
from budgetalloc.policy import Policy
from budgetalloc.serve.allocate import (
    arms_in_file_order,
    as_policy,
    classify,
    classify_source,
    pass_rows,
    program_for,
)
from budgetalloc.serve.executor import Runner, injected_failure, inline
from budgetalloc.serve.metrics import ips_value, multi_arm_aucc, multi_arm_qini, qini_path_area

ARM_CHUNK_ROWS = 65_536  # users per arms_in_file_order call (its temporaries: M values a user)
DEFAULT_LEVELS = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.45, 0.6, 0.8, 1.0)


def cluster_roi(policy: Policy) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster: the coupon arm with the best incremental ROI, and that ROI."""
    s = policy.statistics
    gain = s.response[:, 1:] - s.response[:, :1]
    roi = gain / np.maximum(s.cost[:, 1:], 1e-12)
    best = np.argmax(roi, axis=1)
    return best + 1, roi[np.arange(len(best)), best]


class Outcomes(NamedTuple):
    """What the evaluation reads of a trial besides its clusters, per row in file order.

    A :class:`budgetalloc.data.contract.Trial` has these fields too; the pass keeps only these.
    """

    treatment: np.ndarray  # (n,) int arms
    response: np.ndarray  # (n,) float64
    cost: np.ndarray  # (n,) float64
    propensity: np.ndarray  # (n,) float64, probability of the received arm
    n_arms: int

    @property
    def n(self) -> int:
        return int(self.treatment.shape[0])


def curve_rows(policy: Policy, clusters: np.ndarray, trial: Trial | Outcomes, levels=DEFAULT_LEVELS) -> list[dict]:
    """Per budget level (a fraction of the all-max-arm spend): the total ``budget``, the IPS response and
    cost per user with 95% intervals, the Qini point (incremental spend and gain over all-control per
    user, with SEs), the policy's own ``expected_response``/``expected_cost`` per user and the solver
    status, for test users of known clusters (file order).
    """
    n_users = np.bincount(clusters, minlength=policy.k).astype(np.int64)
    program = program_for(policy)
    scale = budget_scale(n_users, policy.statistics)
    rows = []
    for level in levels:  # one level's arms at a time: memory does not grow with the grid
        budget = float(level * scale)
        sol = program.solve(n_users, budget)
        arms = user_arms(clusters, sol.counts)
        e = ips_value(arms, trial.treatment, trial.response, trial.cost, trial.propensity)
        row = {"budget": budget, "response": e.response, "cost": e.cost, "response_lo": e.response_lo,
               "response_hi": e.response_hi, "cost_lo": e.cost_lo, "cost_hi": e.cost_hi}
        qini = multi_arm_qini([arms], trial.treatment, trial.response, trial.cost, trial.propensity)
        row |= {f"qini_{name}": float(value[0]) for name, value in qini._asdict().items()}
        row["expected_response"] = sol.expected_response / trial.n
        row["expected_cost"] = sol.expected_cost / trial.n
        row["status"] = sol.status
        rows.append(row)
    return rows


def user_arms(clusters: np.ndarray, counts: np.ndarray, *, chunk_rows: int = ARM_CHUNK_ROWS) -> np.ndarray:
    """Each user's arm in file order, in chunks carrying the running offsets (temporaries: M values a user)."""
    arms = np.empty(clusters.shape[0], dtype=np.int32)
    offsets = None
    for start in range(0, clusters.shape[0], chunk_rows):
        arms[start:start + chunk_rows], offsets = arms_in_file_order(clusters[start:start + chunk_rows], counts,
                                                                     offsets)
    return arms


def reference_points(trial: Trial | Outcomes) -> dict:
    """IPS values of all-control and of a uniformly random coupon arm, per user."""
    control = ips_value(np.zeros(trial.n, dtype=np.int64), trial.treatment, trial.response, trial.cost,
                        trial.propensity)
    coupon = [ips_value(np.full(trial.n, j), trial.treatment, trial.response, trial.cost, trial.propensity)
              for j in range(1, trial.n_arms)]
    return {
        "control": {"response": control.response, "cost": control.cost},
        "random_coupon": {"response": float(np.mean([c.response for c in coupon])),
                          "cost": float(np.mean([c.cost for c in coupon]))},
    }


def plot_curve(rows: list[dict], refs: dict, path: Path, *, title: str) -> None:
    """Response versus spend per user with CIs and the two references, and the Qini curve, as PNG."""
    cost = np.array([r["cost"] for r in rows])
    resp = np.array([r["response"] for r in rows])
    fig, (ax, qx) = plt.subplots(1, 2, figsize=(11.0, 4.4), dpi=110)
    ax.fill_between(cost, [r["response_lo"] for r in rows], [r["response_hi"] for r in rows], alpha=0.2,
                    label="95% CI")
    ax.plot(cost, resp, "o-", label="policy (IPS)")
    c0, rc = refs["control"], refs["random_coupon"]
    ax.plot([c0["cost"], rc["cost"]], [c0["response"], rc["response"]], "--", color="grey", label="random")
    ax.axhline(c0["response"], color="black", lw=0.8, ls=":", label="all control")
    ax.set_xlabel("spend per user")
    ax.set_ylabel("response per user")
    ax.set_title(title)
    ax.legend(loc="lower right")
    spend, gain, gain_se = (np.array([r[f"qini_{k}"] for r in rows]) for k in ("spend", "gain", "gain_se"))
    qx.fill_between(spend, gain - 1.96 * gain_se, gain + 1.96 * gain_se, alpha=0.2, label="95% CI")
    qx.plot(spend, gain, "o-", label="policy (IPS)")
    qx.set_xlabel("incremental spend per user")
    qx.set_ylabel("gain over all-control per user")
    qx.set_title("multi-arm Qini curve")
    qx.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_evaluation(policy: Policy, clusters: np.ndarray, trial: Trial | Outcomes, out_dir: str | Path, *,
                     levels=DEFAULT_LEVELS) -> dict:
    """The metrics (``aucc``, ``qini_mean_gain``: the Qini curve's mean height over its spend range,
    ``curve``, references, sizes), written atomically as metrics.json, curve.json and curve.png, for
    test users of known clusters."""
    rows = curve_rows(policy, clusters, trial, levels)
    best_arm, roi = cluster_roi(policy)
    aucc = multi_arm_aucc(roi[clusters], best_arm[clusters], trial.treatment, trial.response, trial.cost,
                          trial.propensity)
    spend = [r["qini_spend"] for r in rows]
    top = max(spend)
    qini = qini_path_area(spend, [r["qini_gain"] for r in rows], max_spend=top) / top if top > 0 else float("nan")
    metrics = {"aucc": float(aucc), "qini_mean_gain": qini, "curve": rows, "references": reference_points(trial),
               "n_test": trial.n, "k": policy.k}
    with atomic_files(out_dir) as tmp:
        write_json(metrics, tmp / "metrics.json")
        write_json([{k: r[k] for k in ("budget", "response", "cost")} for r in rows], tmp / "curve.json")
        plot_curve(rows, metrics["references"], tmp / "curve.png", title=f"policy on {trial.n} held-out users")
    return metrics


# -- the pass --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialPart:
    """What the pass keeps of a partition, per batch: clusters, outcomes, id keys; the arm counts."""

    clusters: list
    treatment: list
    response: list
    cost: list
    propensity: list  # empty when the source has no propensity column
    keys: list
    arm_counts: np.ndarray
    run_count: int = 1


def _owned(values: np.ndarray) -> np.ndarray:
    """``values`` as an array of its own: a view would keep the whole batch's memory alive."""
    return values if values.base is None else values.copy()


def classify_trial_partition(policy, part: Partition, rows: int, index: int = 0) -> TrialPart:
    """Validate (the trial contract, row by row) and classify every batch of a trial partition."""
    policy = as_policy(policy)
    dtype = np.int16 if policy.k <= np.iinfo(np.int16).max else np.int32
    kept = TrialPart([], [], [], [], [], [], np.zeros(MAX_ARMS, dtype=np.int64))
    first = part.first_row
    for batch in part.batches([*RESERVED, *policy.feature_names], rows):
        cols = batch if isinstance(batch, Trial) else trial_columns(
            batch, features=policy.feature_names, source=part.name, first_row=first)
        first += len(cols.treatment)
        if int(cols.treatment.max()) + 1 > policy.n_arms:
            raise DataError(f"{part.name}: trial has {int(cols.treatment.max()) + 1} arms, "
                            f"the policy knows {policy.n_arms}")
        kept.clusters.append(classify(policy, cols.X, rows).astype(dtype))
        kept.treatment.append(cols.treatment.astype(np.int8))
        kept.response.append(_owned(cols.response))
        kept.cost.append(_owned(cols.cost))
        if cols.propensity is not None:
            kept.propensity.append(_owned(cols.propensity))
        kept.keys.append(_owned(id_keys(cols.user_id)))
        kept.arm_counts[:] += np.bincount(cols.treatment, minlength=MAX_ARMS)
    injected_failure("classify", index)
    return kept


def source_outcomes(policy: Policy, source: Source, *, batch_size: int | None = None, run: Runner = inline,
                    ref=None, partitions: int | None = None) -> tuple[np.ndarray, Outcomes]:
    """Each test row's cluster and outcomes, in source order, after the checks over all rows.

    Raises:
        DataError: the source breaks the trial contract, or has more arms than the policy.
    """
    rows = pass_rows(policy, source, batch_size)
    parts, source = classify_source(policy, source, rows, run=run, ref=ref, partitions=partitions,
                            fn=classify_trial_partition)
    joined = {f: [c for p in parts for c in getattr(p, f)] for f in TrialPart.__dataclass_fields__
              if f not in ("arm_counts", "run_count")}
    if not joined["clusters"]:
        raise DataError(f"{source.name}: table has no rows")
    arm_counts = sum(p.arm_counts for p in parts)
    n_arms = check_arm_counts(arm_counts, source.name)
    check_unique_ids(np.concatenate(joined.pop("keys")), lambda: (
        batch.user_id if isinstance(batch, Trial) else user_ids(batch, source.name)
        for part in source.partitions() for batch in part.batches([USER_ID], rows)), source.name)
    whole = {f: np.concatenate(v) for f, v in joined.items() if v}
    propensity = whole.get("propensity")
    if propensity is None:
        propensity = arm_propensity(whole["treatment"], arm_counts[:n_arms])
    return whole["clusters"], Outcomes(treatment=whole["treatment"], response=whole["response"],
                                       cost=whole["cost"], propensity=propensity, n_arms=n_arms)


def evaluate(policy: Policy, source: Source, out_dir: str | Path, *, levels=DEFAULT_LEVELS,
             batch_size: int | None = None, run: Runner = inline, ref=None, partitions: int | None = None) -> dict:
    """Evaluate ``policy`` on a held-out trial source; write metrics.json, curve.json, curve.png atomically.

    ``run``, ``ref`` and ``partitions`` map the classify pass as :func:`budgetalloc.serve.allocate.allocate` does.
    """
    clusters, outcomes = source_outcomes(policy, source, batch_size=batch_size, run=run, ref=ref,
                                         partitions=partitions)
    return write_evaluation(policy, clusters, outcomes, out_dir, levels=levels)


def evaluate_policy(policy: Policy, trial: Trial, out_dir: str | Path, *, levels=DEFAULT_LEVELS) -> dict:
    """:func:`evaluate` on a validated trial in memory."""
    return evaluate(policy, memory_source(trial), out_dir, levels=levels)


def evaluate_file(policy: Policy, path: str | Path, out_dir: str | Path, *, levels=DEFAULT_LEVELS,
                  batch_size: int | None = None) -> dict:
    """:func:`evaluate` on a trial file (Parquet or CSV) or a folder of Parquet parts, read in batches."""
    return evaluate(policy, file_source(path), out_dir, levels=levels, batch_size=batch_size)
