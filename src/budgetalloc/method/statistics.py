"""Per-cluster response and cost per arm, with uncertainty (stage 3), on the fit's trial rows.

The network's cluster mean plus a doubly robust correction from the rows that
received each arm, robustified (``estimator``), pooled towards a prior
(``pooling``), costs raised by ``cost_margin`` standard errors; ``S`` Poisson(1)
bootstrap reweightings give the scenarios.

Invariants: every estimate is a ratio of additive sums (:class:`StatisticsAccumulator`)
over blocks of ``STAT_BLOCK`` rows counted from the first row given, each block
seeded by ``(seed, tag, b)``, so the result does not depend on how the rows were
batched. No cluster is dropped or merged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from budgetalloc.data.blocks import Rebatcher
from budgetalloc.data.sampling import CLIP_SAMPLE, seeded_sample
from budgetalloc.params import StatisticsParams

MAD_TO_SD = 1.4826
#: Rows per block of the accumulation: fixes the summation order and the random draws.
STAT_BLOCK = 8192
_BOOTSTRAP, _MOM = 5, 6  # seed-stream tags of the per-block draws


@dataclass(frozen=True)
class ClusterStatistics:
    """Estimates per (cluster, arm) and their bootstrap scenarios."""

    counts: np.ndarray  # int64 (K, M) trial rows per cell
    response: np.ndarray  # float64 (K, M)
    cost: np.ndarray  # float64 (K, M)
    response_se: np.ndarray  # float64 (K, M)
    cost_se: np.ndarray  # float64 (K, M)
    response_scenarios: np.ndarray  # float64 (S, K, M)
    cost_scenarios: np.ndarray  # float64 (S, K, M)

    def save(self, path: str | Path) -> None:
        """Write all arrays to one ``.npz`` (no pickle)."""
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> ClusterStatistics:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})


def clip_band(values: np.ndarray, treatment: np.ndarray, n_arms: int, *, clip_z: float) -> np.ndarray:
    """Per arm, ``median -+ clip_z`` robust sd of its non-zero values: float64 ``(2, n_arms)``
    lower and upper bounds (``-inf, inf`` for an arm without non-zero values)."""
    band = np.empty((2, n_arms))
    band[0], band[1] = -np.inf, np.inf
    for arm in range(n_arms):
        v = values[(treatment == arm) & (values != 0)].astype(np.float64)
        if v.size == 0:
            continue
        med = np.median(v)
        spread = clip_z * MAD_TO_SD * np.median(np.abs(v - med))
        band[:, arm] = med - spread, med + spread
    return band


def clip_to_band(values: np.ndarray, treatment: np.ndarray, band: np.ndarray) -> np.ndarray:
    """A copy of ``values`` with each non-zero value clipped to its arm's band."""
    out = values.astype(np.float64, copy=True)
    nz = np.flatnonzero(values != 0)
    arm = treatment[nz]
    out[nz] = np.clip(out[nz], band[0, arm], band[1, arm])
    return out


def clip_sample_rows(n: int, params: StatisticsParams, seed: int) -> np.ndarray | None:
    """Positions (among the honest rows) the winsorize bands are taken from; ``None``: all."""
    return seeded_sample(n, params.clip_sample, (seed, CLIP_SAMPLE))


def winsorize_bands(treatment, response, cost, n_arms: int, *, params: StatisticsParams) -> np.ndarray | None:
    """``(2, 2, M)`` bands of response and cost (``None`` unless winsorizing), from the
    honest rows at :func:`clip_sample_rows`."""
    if params.estimator != "winsorize":
        return None
    return np.stack([clip_band(response, treatment, n_arms, clip_z=params.clip_z),
                     clip_band(cost, treatment, n_arms, clip_z=params.clip_z)])


def _layout(m: int) -> dict[str, slice]:
    """Columns of the per-row terms: per-cluster sums, then per-(cluster, arm) sums (one-hot by arm)."""
    names = ("pred_response", "pred_cost", "rows", "weight", "wresid_response", "wresid_cost",
             "resid_response", "resid2_response", "resid_cost", "resid2_cost", "cost_positive")
    out = {"one": slice(0, 1)}
    for i, name in enumerate(names):
        out[name] = slice(1 + i * m, 1 + (i + 1) * m)
    return out


def _residuals(treatment, outcome, pred) -> np.ndarray:
    """Each row's outcome minus the network's prediction for the arm it received."""
    return outcome - pred[np.arange(treatment.shape[0]), treatment]


def _row_terms(treatment, response, cost, ipw, pred_r, pred_c, m: int) -> np.ndarray:
    """``(b, 1 + 11 M)``: what each row adds to the sums of its cluster (see :func:`_layout`)."""
    b = treatment.shape[0]
    out = np.zeros((b, 1 + 11 * m))
    out[:, 0] = 1.0
    out[:, 1 : 1 + m] = pred_r
    out[:, 1 + m : 1 + 2 * m] = pred_c
    res_r, res_c = _residuals(treatment, response, pred_r), _residuals(treatment, cost, pred_c)
    per_cell = (1.0, ipw, ipw * res_r, ipw * res_c, res_r, res_r * res_r, res_c, res_c * res_c, (cost > 0) * 1.0)
    rows = np.arange(b)
    for i, v in enumerate(per_cell):  # one-hot by arm: the value in its arm's column, 0 elsewhere
        out[rows, (2 + i) * m + 1 + treatment] = v
    return out


def _segment_sums(bounds: np.ndarray, weights: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """``(W, K, C)``: per weight column, the weighted sum of the terms of each cluster's rows.

    Rows are sorted by cluster (cluster ``c`` holds rows ``bounds[c]:bounds[c + 1]``) and
    both operands are C-contiguous in their rows, so every product is one BLAS call.
    """
    out = np.zeros((weights.shape[1], bounds.shape[0] - 1, terms.shape[1]))
    for c in np.flatnonzero(np.diff(bounds)):
        lo, hi = bounds[c], bounds[c + 1]
        out[:, c] = weights[lo:hi].T @ terms[lo:hi]
    return out


class StatisticsAccumulator:
    """Additive sufficient statistics of the trial rows, fed in row order in chunks of any
    size: :meth:`finalize` gives the same :class:`ClusterStatistics` bit for bit however
    the rows were cut. ``seed`` seeds the per-block bootstrap and median-of-means draws;
    ``bands`` are the ``(2, 2, M)`` winsorize bands (:func:`winsorize_bands`), or ``None``.
    """

    def __init__(self, *, k: int, n_arms: int, params: StatisticsParams, seed: int,
                 bands: np.ndarray | None = None) -> None:
        self.k, self.m, self.params, self.seed, self.bands = k, n_arms, params, seed, bands
        self._layout = _layout(n_arms)
        self._sums = np.zeros((params.n_scenarios + 1, k, 1 + 11 * n_arms))
        self._mom = np.zeros((3, k * n_arms * params.mom_blocks))
        self._blocks = Rebatcher(STAT_BLOCK)
        self._n_blocks = 0

    def update(self, labels, treatment, response, cost, ipw, pred_response, pred_cost) -> None:
        """Add trial rows: cluster, arm, outcomes, inverse-propensity weight, (n, M) predictions."""
        chunk = [np.asarray(a, dtype=np.int64) for a in (labels, treatment)] + [
            np.asarray(a, dtype=np.float64) for a in (response, cost, ipw, pred_response, pred_cost)]
        # The per-cluster products are small: one BLAS thread runs them 3-4x faster than two.
        with threadpool_limits(1, user_api="blas"):
            for block in self._blocks.push(*chunk):
                self._add_block(*block)

    def _add_block(self, labels, treatment, response, cost, ipw, pred_r, pred_c) -> None:
        b, p, index = labels.shape[0], self.params, self._n_blocks
        self._n_blocks += 1
        if self.bands is not None:
            response = clip_to_band(response, treatment, self.bands[0])
            cost = clip_to_band(cost, treatment, self.bands[1])
        if p.estimator == "median_of_means":
            part = np.random.default_rng((self.seed, _MOM, index)).integers(0, p.mom_blocks, size=b)
            slot = (labels * self.m + treatment) * p.mom_blocks + part
            per_row = (ipw, ipw * _residuals(treatment, response, pred_r), ipw * _residuals(treatment, cost, pred_c))
            for i, v in enumerate(per_row):
                self._mom[i] += np.bincount(slot, weights=v, minlength=self._mom.shape[1])
        # Rows sorted by cluster (stable: file order within a cluster); weight column 0 is the
        # point estimate's (1 per row), columns 1..S the scenarios' Poisson(1) draws.
        order = np.argsort(labels, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=self.k))])
        weights = np.empty((b, p.n_scenarios + 1))
        weights[:, 0] = 1.0
        weights[:, 1:] = np.random.default_rng((self.seed, _BOOTSTRAP, index)).poisson(
            1.0, size=(b, p.n_scenarios))[order]
        sorted_rows = (a[order] for a in (treatment, response, cost, ipw, pred_r, pred_c))
        self._sums += _segment_sums(bounds, weights, _row_terms(*sorted_rows, self.m))

    def finalize(self) -> ClusterStatistics:
        """The estimates, standard errors and scenarios of the rows added so far."""
        last = self._blocks.flush()
        if last is not None:
            with threadpool_limits(1, user_api="blas"):
                self._add_block(*last)
        sums, cols, p = self._sums, self._layout, self.params
        size = sums[..., cols["one"]]  # (S + 1, K, 1)
        n = sums[..., cols["rows"]]  # rows per cell; Poisson-weighted in the scenarios
        counts = np.rint(n[0]).astype(np.int64)
        est = {}
        for name in ("response", "cost"):
            base = sums[..., cols[f"pred_{name}"]] / np.maximum(size, 1e-12)
            weight, wresid = sums[..., cols["weight"]], sums[..., cols[f"wresid_{name}"]]
            corr = wresid / np.maximum(weight, 1e-12)
            if p.estimator == "median_of_means":
                corr[0] = self._median_of_means(name)
            se2 = self._sampling_variance(name)
            known = np.sqrt(np.where(np.isfinite(se2), se2, 0.0))
            if p.pooling == "rows":
                lam = n / (n + p.shrinkage)
                values = base + lam * corr
                se = lam[0] * known
            else:
                # (S + 1, 1, M): every cluster's arm-j rows together, per scenario
                arm = wresid.sum(axis=1, keepdims=True) / np.maximum(weight.sum(axis=1, keepdims=True), 1e-12)
                corr = np.where(weight > 0, corr, arm)  # a cell a bootstrap draw left empty
                raw = base + corr  # the unpooled doubly-robust estimate
                prior = calibrated_prior(raw, base, np.where(np.isfinite(se2), n[0], 0.0),
                                         fit_slope=name == "response")
                lam = pooling_weights(raw[0], prior[0], se2)
                values = prior + lam * (raw - prior)
                se = lam * known
                if name == "cost" and p.budget_cost == "upward":
                    values = np.maximum(values, raw)  # pooled up, never down
            if name == "cost" and p.cost_margin > 0:
                values = values + p.cost_margin * se[None]
            est[name] = (values[0], values[1:], se)
        # Arms that never cost anything in the trial (control) cost exactly 0, not the
        # network's small non-zero prediction.
        free = sums[0, :, cols["cost_positive"]].sum(axis=0) == 0
        response, response_scenarios, response_se = est["response"]
        cost, cost_scenarios, cost_se = (np.where(free, 0.0, v) for v in est["cost"])
        return ClusterStatistics(counts, response, np.maximum(cost, 0.0), response_se, cost_se,
                                 response_scenarios, np.maximum(cost_scenarios, 0.0))

    def _sampling_variance(self, name: str) -> np.ndarray:
        """(K, M) variance of each cell's mean residual; ``inf`` for cells with fewer than 2 rows."""
        cols = self._layout
        n = self._sums[0][:, cols["rows"]]
        s1, s2 = self._sums[0][:, cols[f"resid_{name}"]], self._sums[0][:, cols[f"resid2_{name}"]]
        var = np.maximum(s2 / np.maximum(n, 1) - (s1 / np.maximum(n, 1)) ** 2, 0.0)
        return np.where(n >= 2, var / np.maximum(n - 1, 1), np.inf)

    def _median_of_means(self, name: str) -> np.ndarray:
        """(K, M) median over the cell's random blocks of its weighted residual means."""
        blocks = self.params.mom_blocks
        wsum, rsum = self._mom[0], self._mom[1 if name == "response" else 2]
        means = (rsum / np.maximum(wsum, 1e-12)).reshape(-1, blocks)
        present = wsum.reshape(-1, blocks) > 0
        masked = np.where(present, means, np.nan)
        with np.errstate(all="ignore"):
            med = np.nanmedian(np.where(present.any(axis=1, keepdims=True), masked, 0.0), axis=1)
        return np.nan_to_num(med).reshape(self.k, self.m)


def calibrated_prior(raw: np.ndarray, base: np.ndarray, weight: np.ndarray, *, fit_slope: bool = True) -> np.ndarray:
    """Per arm and scenario, the line ``a + b * base`` that best predicts ``raw`` across
    clusters (weighted least squares, ``b`` in [0, 3]): the Fay-Herriot prior.

    Args:
        raw: (S + 1, K, M) unpooled estimates.
        base: (S + 1, K, M) the network's mean prediction per cell.
        weight: (K, M) weight of each cell in the fit (0: left out).
        fit_slope: ``False`` fixes ``b = 1`` (only the common offset is corrected).

    Returns:
        (S + 1, K, M) the prior mean of every cell; with a slope fitted, the arm's
        weighted mean of ``raw`` where it has fewer than three weighted cells.
    """
    w = weight[None]
    total = np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    x_mean, y_mean = (w * base).sum(axis=1, keepdims=True) / total, (w * raw).sum(axis=1, keepdims=True) / total
    dx = base - x_mean
    sxx = (w * dx * dx).sum(axis=1, keepdims=True)
    sxy = (w * dx * (raw - y_mean)).sum(axis=1, keepdims=True)
    enough = ((weight > 0).sum(axis=0) >= 3)[None, None, :] & (sxx > 1e-18)
    if not fit_slope:
        return y_mean + dx
    slope = np.where(enough, np.clip(sxy / np.where(sxx > 1e-18, sxx, 1.0), 0.0, 3.0), 0.0)
    return y_mean + slope * dx


def pooling_weights(raw: np.ndarray, prior: np.ndarray, se2: np.ndarray) -> np.ndarray:
    """Empirical-Bayes weights ``tau2 / (tau2 + se2)`` in [0, 1] of each cell's own estimate.

    Args:
        raw, prior: (K, M) each cell's unpooled estimate and its prior mean.
        se2: (K, M) sampling variance of ``raw`` (``inf`` where a cell has < 2 rows: weight 0).
    """
    usable = np.isfinite(se2)
    cells = np.maximum(usable.sum(axis=0), 1)
    spread = np.where(usable, (raw - prior) ** 2, 0.0).sum(axis=0) / cells
    noise = np.where(usable, se2, 0.0).sum(axis=0) / cells
    tau2 = np.maximum(spread - noise, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        lam = np.where(usable, tau2 / (tau2 + se2), 0.0)
    return np.nan_to_num(lam, nan=1.0)  # tau2 = se2 = 0: a noiseless cell keeps its own value


def cluster_statistics(
    labels: np.ndarray, treatment: np.ndarray, response: np.ndarray, cost: np.ndarray, ipw: np.ndarray,
    pred_response: np.ndarray, pred_cost: np.ndarray, *, k: int, params: StatisticsParams, seed: int,
) -> ClusterStatistics:
    """:class:`StatisticsAccumulator` on in-memory honest rows (as its ``update`` takes them), one
    ``update``, with the winsorize bands of its :func:`clip_sample_rows`."""
    m = pred_response.shape[1]
    rows = clip_sample_rows(labels.shape[0], params, seed)
    pick = slice(None) if rows is None else rows
    bands = winsorize_bands(treatment[pick], response[pick], cost[pick], m, params=params)
    acc = StatisticsAccumulator(k=k, n_arms=m, params=params, seed=seed, bands=bands)
    acc.update(labels, treatment, response, cost, ipw, pred_response, pred_cost)
    return acc.finalize()
