"""Offline evaluation of a policy on a held-out randomized trial.

For a grid of total budgets the policy allocates the test users (student ->
program for the test population's own cluster sizes -> arms), and the
allocation's response and spend per user are estimated by inverse propensity
(:func:`budgetalloc.serve.metrics.ips_curve`), with 95% confidence intervals. Budgets
are totals for the test population, in the same units as ``allocate``.

References drawn with the curve: all-control (the IPS value of giving nobody a
coupon, at zero spend) and random allocation (a random share of users given a
uniformly random coupon arm: the straight line from all-control to the IPS value
of the uniform-coupon policy).

AUCC ranks test users by the policy's predicted incremental ROI: each user's
cluster recommends the coupon arm with the best ``(r[k, j] - r[k, 0]) / c[k, j]``,
and that ratio is the score (:func:`budgetalloc.serve.metrics.multi_arm_aucc`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from budgetalloc.data.contract import Trial
from budgetalloc.files import atomic_files, write_json
from budgetalloc.fit.pipeline import budget_scale
from budgetalloc.policy import Policy
from budgetalloc.serve.allocate import arms_in_file_order, population_clusters, program_for
from budgetalloc.serve.metrics import ips_curve, ips_value, multi_arm_aucc

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

    A :class:`budgetalloc.data.contract.Trial` has these fields too; the streamed evaluation
    (:mod:`budgetalloc.serve.evaluate_stream`) keeps only these.
    """

    treatment: np.ndarray  # (n,) int arms
    response: np.ndarray  # (n,) float64
    cost: np.ndarray  # (n,) float64
    propensity: np.ndarray  # (n,) float64, probability of the received arm
    n_arms: int

    @property
    def n(self) -> int:
        return int(self.treatment.shape[0])


def policy_curve(policy: Policy, trial: Trial, levels=DEFAULT_LEVELS) -> tuple[list[dict], np.ndarray]:
    """IPS response/cost per user of the policy at each budget level; also the clusters.

    Args:
        policy: a fitted policy.
        trial: held-out trial (not used to fit the policy).
        levels: budgets as fractions of the test population's all-max-arm spend.

    Returns:
        ``(rows, clusters)``: the :func:`curve_rows` and each user's cluster.
    """
    clusters = population_clusters(policy, trial.X, batch_size=policy.params.allocate.batch_size)
    return curve_rows(policy, clusters, trial, levels), clusters


def curve_rows(policy: Policy, clusters: np.ndarray, trial: Trial | Outcomes, levels=DEFAULT_LEVELS) -> list[dict]:
    """IPS response/cost per user of the policy at each budget level, for users of known clusters.

    Args:
        policy: a fitted policy.
        clusters: (n,) each test user's cluster, in file order.
        trial: the test users' outcomes, in the same order.
        levels: budgets as fractions of the test population's all-max-arm spend.

    Returns:
        One row per budget with ``budget`` (total), per-user ``response``/``cost`` and
        their CIs, ``expected_response``/``expected_cost`` per user from the policy's
        own estimates, and the solver status.
    """
    n_users = np.bincount(clusters, minlength=policy.k).astype(np.int64)
    program = program_for(policy)
    scale = budget_scale(n_users, policy.statistics)
    rows = []
    for level in levels:  # one level's arms at a time: memory does not grow with the grid
        budget = float(level * scale)
        sol = program.solve(n_users, budget)
        arms = user_arms(clusters, sol.counts)
        row = ips_curve([arms], [budget], trial.treatment, trial.response, trial.cost, trial.propensity)[0]
        row["expected_response"] = sol.expected_response / trial.n
        row["expected_cost"] = sol.expected_cost / trial.n
        row["status"] = sol.status
        rows.append(row)
    return rows


def user_arms(clusters: np.ndarray, counts: np.ndarray, *, chunk_rows: int = ARM_CHUNK_ROWS) -> np.ndarray:
    """Each user's arm in file order (:func:`budgetalloc.serve.allocate.arms_in_file_order`), in chunks.

    The same arms as one call, whose temporaries hold ``M`` values per user; chunks
    carry the running offsets, as the streamed allocation's batches do.
    """
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
    """Response versus spend per user with CIs and the two references, as PNG."""
    cost = np.array([r["cost"] for r in rows])
    resp = np.array([r["response"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_policy(policy: Policy, trial: Trial, out_dir: str | Path, *, levels=DEFAULT_LEVELS) -> dict:
    """Evaluate ``policy`` on a held-out ``trial``; write metrics.json and curve.png atomically.

    Args:
        policy: a fitted policy.
        trial: a held-out randomized trial with the policy's features.
        out_dir: directory for ``metrics.json``, ``curve.json`` and ``curve.png``.
        levels: budget grid as fractions of the all-max-arm spend (>= 10 points).

    Returns:
        The metrics dict (``aucc``, ``curve``, references, sizes).
    """
    clusters = population_clusters(policy, trial.X, batch_size=policy.params.allocate.batch_size)
    return write_evaluation(policy, clusters, trial, out_dir, levels=levels)


def evaluation_metrics(policy: Policy, clusters: np.ndarray, trial: Trial | Outcomes, *,
                       levels=DEFAULT_LEVELS) -> dict:
    """The metrics dict (``aucc``, ``curve``, references, sizes) for test users of known clusters."""
    rows = curve_rows(policy, clusters, trial, levels)
    best_arm, roi = cluster_roi(policy)
    aucc = multi_arm_aucc(roi[clusters], best_arm[clusters], trial.treatment, trial.response, trial.cost,
                          trial.propensity)
    return {
        "aucc": float(aucc),
        "curve": rows,
        "references": reference_points(trial),
        "n_test": trial.n,
        "k": policy.k,
    }


def write_evaluation(policy: Policy, clusters: np.ndarray, trial: Trial | Outcomes, out_dir: str | Path, *,
                     levels=DEFAULT_LEVELS) -> dict:
    """:func:`evaluation_metrics`, written atomically as metrics.json, curve.json and curve.png."""
    metrics = evaluation_metrics(policy, clusters, trial, levels=levels)
    rows = metrics["curve"]
    with atomic_files(out_dir) as tmp:
        write_json(metrics, tmp / "metrics.json")
        write_json([{k: r[k] for k in ("budget", "response", "cost")} for r in rows], tmp / "curve.json")
        plot_curve(rows, metrics["references"], tmp / "curve.png", title=f"policy on {trial.n} held-out users")
    return metrics
