"""Per-cluster response and cost per arm, with uncertainty (stage 3).

Estimator (doubly robust, honest). The rows used here never trained the network
(honest split). For cluster ``k`` and arm ``j``::

    r[k, j] = mean_{i in k} mu[i, j]  +  lam[k, j] * resid[k, j]
    resid[k, j] = sum_{i in k, t_i = j} w_i (y_i - mu[i, j]) / sum_{i in k, t_i = j} w_i
    lam[k, j] = n[k, j] / (n[k, j] + shrinkage)

where ``mu`` is the network's prediction and ``w`` the inverse-propensity weight.
The first term uses every row of the cluster (low variance); the second corrects
it with the rows that actually received arm ``j`` (the RCT makes it unbiased).
``lam`` shrinks small cells towards the network's own prediction for the
cluster's users instead of trusting a handful of rows: with ``shrinkage = 20`` a
cell with 20 rows takes half its correction, one with 2,000 rows 99%. This
replaces merging small clusters: no cluster is dropped, none is over-trusted.
Cost is estimated the same way, with its own predictions.

Robustness (``estimator``):

* ``winsorize`` (default): per arm, non-zero outcomes are clipped to
  ``median +- clip_z * 1.4826 * MAD`` of that arm's non-zero values. Zeros (no
  order, coupon unused) are left alone. Costs logged an order of magnitude too
  high are pulled back to the typical coupon cost, heavy GMV tails are capped;
  the median/MAD are themselves unaffected by up to half the values being wrong.
  A quantile cap would not do: with 2% outliers a 99% quantile is an outlier.
* ``median_of_means``: the correction is the median over ``mom_blocks`` random
  blocks of the cell's weighted residual means.
* ``mean``: plain weighted means, for comparison.

Scenarios: ``S`` Poisson(1) bootstrap reweightings of the rows (vectorised with
``bincount``) give ``S`` draws of ``(r, c)``; the integer program holds the
budget against them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from budgetalloc.params import StatisticsParams

MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class ClusterStatistics:
    """Estimates per (cluster, arm) and their bootstrap scenarios."""

    counts: np.ndarray  # int64 (K, M) honest rows per cell
    response: np.ndarray  # float64 (K, M)
    cost: np.ndarray  # float64 (K, M)
    response_se: np.ndarray  # float64 (K, M)
    cost_se: np.ndarray  # float64 (K, M)
    response_scenarios: np.ndarray  # float64 (S, K, M)
    cost_scenarios: np.ndarray  # float64 (S, K, M)

    @property
    def shape(self) -> tuple[int, int]:
        return self.response.shape

    def save(self, path: str | Path) -> None:
        """Write all arrays to one ``.npz`` (no pickle)."""
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> ClusterStatistics:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})


def robust_clip(values: np.ndarray, treatment: np.ndarray, n_arms: int, *, clip_z: float) -> np.ndarray:
    """Clip each arm's non-zero values to median +- clip_z robust sd of those values.

    Args:
        values: (n,) outcomes (response or cost) as recorded.
        treatment: (n,) arm of each row.
        n_arms: number of arms.
        clip_z: width of the band in robust standard deviations.

    Returns:
        A clipped copy; zeros and values inside the band are unchanged.
    """
    out = values.astype(np.float64, copy=True)
    for arm in range(n_arms):
        idx = np.flatnonzero((treatment == arm) & (values != 0))
        if idx.size == 0:
            continue
        v = out[idx]
        med = np.median(v)
        spread = clip_z * MAD_TO_SD * np.median(np.abs(v - med))
        out[idx] = np.clip(v, med - spread, med + spread)
    return out


def _cell_index(labels, treatment, n_arms):
    return labels.astype(np.int64) * n_arms + treatment.astype(np.int64)


def _cluster_mean_predictions(labels, pred, k, weights=None):
    """(K, M) mean of predictions over each cluster's rows (optionally reweighted)."""
    w = np.ones(labels.shape[0]) if weights is None else weights
    size = np.bincount(labels, weights=w, minlength=k)
    sums = np.stack([np.bincount(labels, weights=w * pred[:, j], minlength=k) for j in range(pred.shape[1])], axis=1)
    return sums / np.maximum(size, 1e-12)[:, None]


def _cell_residual_means(cell, resid, w, n_cells):
    """Weighted mean residual per cell and the weight total per cell."""
    wsum = np.bincount(cell, weights=w, minlength=n_cells)
    rsum = np.bincount(cell, weights=w * resid, minlength=n_cells)
    return rsum / np.maximum(wsum, 1e-12), wsum


def _median_of_means(cell, resid, w, n_cells, blocks, rng):
    block = rng.integers(0, blocks, size=cell.shape[0])
    means, wsum = _cell_residual_means(cell * blocks + block, resid, w, n_cells * blocks)
    means = means.reshape(n_cells, blocks)
    present = wsum.reshape(n_cells, blocks) > 0
    masked = np.where(present, means, np.nan)
    with np.errstate(all="ignore"):
        med = np.nanmedian(np.where(present.any(axis=1, keepdims=True), masked, 0.0), axis=1)
    return np.nan_to_num(med)


def _estimate(labels, treatment, outcome, pred, ipw, k, m, params, rng, weights=None):
    """(K, M) doubly-robust, shrunk estimate of one outcome; optional bootstrap weights."""
    n_cells = k * m
    cell = _cell_index(labels, treatment, m)
    base = _cluster_mean_predictions(labels, pred, k, weights)
    resid = outcome - pred[np.arange(outcome.shape[0]), treatment]
    w = ipw if weights is None else ipw * weights
    if params.estimator == "median_of_means" and weights is None:
        corr = _median_of_means(cell, resid, w, n_cells, params.mom_blocks, rng)
        n_cell = np.bincount(cell, minlength=n_cells).astype(np.float64)
    else:
        corr, _ = _cell_residual_means(cell, resid, w, n_cells)
        n_cell = np.bincount(cell, weights=weights, minlength=n_cells)
    lam = n_cell / (n_cell + params.shrinkage)
    return (base.reshape(-1) + lam * corr).reshape(k, m)


def _standard_errors(labels, treatment, outcome, pred, k, m, shrinkage):
    cell = _cell_index(labels, treatment, m)
    resid = outcome - pred[np.arange(outcome.shape[0]), treatment]
    n = np.bincount(cell, minlength=k * m).astype(np.float64)
    s1 = np.bincount(cell, weights=resid, minlength=k * m)
    s2 = np.bincount(cell, weights=resid * resid, minlength=k * m)
    var = np.maximum(s2 / np.maximum(n, 1) - (s1 / np.maximum(n, 1)) ** 2, 0.0)
    lam = n / (n + shrinkage)
    return (lam * np.sqrt(var / np.maximum(n - 1, 1))).reshape(k, m)


def cluster_statistics(
    labels: np.ndarray,
    treatment: np.ndarray,
    response: np.ndarray,
    cost: np.ndarray,
    ipw: np.ndarray,
    pred_response: np.ndarray,
    pred_cost: np.ndarray,
    *,
    k: int,
    params: StatisticsParams,
    seed: int,
) -> ClusterStatistics:
    """Estimate response and cost per (cluster, arm) on honest rows, with scenarios.

    Args:
        labels: (n,) cluster id of each honest row (as the serving model assigns it).
        treatment: (n,) arm received.
        response, cost: (n,) recorded outcomes.
        ipw: (n,) inverse-propensity weights (1 for a uniform trial).
        pred_response, pred_cost: (n, M) network predictions for these rows.
        k: number of clusters.
        params: the ``statistics`` section.
        seed: random seed for bootstrap and median-of-means blocks.

    Returns:
        :class:`ClusterStatistics` with ``S = params.n_scenarios`` scenarios.
    """
    m = pred_response.shape[1]
    labels = labels.astype(np.int64)
    if params.estimator == "winsorize":
        response = robust_clip(response, treatment, m, clip_z=params.clip_z)
        cost = robust_clip(cost, treatment, m, clip_z=params.clip_z)
    rng = np.random.default_rng(seed)
    est = {}
    for name, y, pred in (("response", response, pred_response), ("cost", cost, pred_cost)):
        point = _estimate(labels, treatment, y, pred, ipw, k, m, params, rng)
        scen = np.empty((params.n_scenarios, k, m))
        for s in range(params.n_scenarios):
            boot = rng.poisson(1.0, size=labels.shape[0]).astype(np.float64)
            scen[s] = _estimate(labels, treatment, y, pred, ipw, k, m, params, rng, weights=boot)
        se = _standard_errors(labels, treatment, y, pred, k, m, params.shrinkage)
        est[name] = (point, scen, se)
    counts = np.bincount(_cell_index(labels, treatment, m), minlength=k * m).reshape(k, m)
    # Arms that never cost anything in the trial (control) cost exactly 0, not the
    # network's small non-zero prediction.
    free = np.bincount(treatment, weights=(cost > 0).astype(np.float64), minlength=m) == 0
    for key in ("cost",):
        point, scen, se = est[key]
        est[key] = (np.where(free, 0.0, point), np.where(free, 0.0, scen), np.where(free, 0.0, se))
    return ClusterStatistics(
        counts=counts.astype(np.int64),
        response=est["response"][0],
        cost=np.maximum(est["cost"][0], 0.0),
        response_se=est["response"][2],
        cost_se=est["cost"][2],
        response_scenarios=est["response"][1],
        cost_scenarios=np.maximum(est["cost"][1], 0.0),
    )
