"""Offline evaluation of allocation policies: IPS value, AUCC, multi-arm Qini, capture at matched spend.

Every estimator reads a held-out randomized trial: ``treatment`` (int arms ``0..M-1``,
0 = control), ``response``, ``cost`` and ``propensity`` (probability of the arm each
row received; ``None`` means each arm's share of the rows). All functions are
vectorised numpy (sorts and cumulative sums over rows, loops only over policies), so
they run on millions of rows. Definitions and references: docs/method.md, "Evaluation".
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from budgetalloc.errors import DataError

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


class IPSEstimate(NamedTuple):
    """Per-user policy value: mean response and cost, standard errors, 95% intervals."""

    response: float
    cost: float
    response_se: float
    cost_se: float
    response_lo: float
    response_hi: float
    cost_lo: float
    cost_hi: float
    n: int
    self_normalized: bool


class QiniPath(NamedTuple):
    """Multi-arm Qini curve: per-user incremental spend and gain along a budget path, with SEs."""

    spend: np.ndarray
    gain: np.ndarray
    spend_se: np.ndarray
    gain_se: np.ndarray


def _vec(name: str, x, n: int | None = None, dtype=float) -> np.ndarray:
    """``x`` as a 1-d array of ``dtype``, checked against the length ``n``."""
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise DataError(f"{name}: expected a 1-d array of length {n}, got shape {a.shape}")
    return a


def _arms(treatment) -> np.ndarray:
    """``treatment`` as non-negative int arms."""
    t = np.asarray(treatment)
    if t.ndim != 1 or t.size == 0:
        raise DataError(f"treatment: expected a non-empty 1-d array, got shape {t.shape}")
    if not np.array_equal(t, np.round(t)) or t.min() < 0:
        raise DataError("treatment: arms must be integers 0..M-1")
    return t.astype(np.int64)


def _propensity(treatment: np.ndarray, propensity) -> np.ndarray:
    """The received arm's propensity; ``None`` gives each arm's share of rows."""
    n = treatment.shape[0]
    if propensity is None:
        return (np.bincount(treatment) / n)[treatment]
    p = _vec("propensity", propensity, n)
    if not np.all((p > 0) & (p <= 1)):
        raise DataError("propensity: every value must lie in (0, 1]")
    return p


def _mean_se(terms: np.ndarray) -> tuple[float, float]:
    """Sample mean of per-row terms and its standard error (ddof=1)."""
    n = terms.shape[0]
    se = float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return float(terms.mean()), se


def _ips_mean_se(w: np.ndarray, v: np.ndarray, self_normalized: bool) -> tuple[float, float]:
    """IPS (or self-normalised, with a delta-method SE) mean of ``v`` with weights ``w``."""
    if not self_normalized:
        return _mean_se(w * v)
    wbar = w.mean()
    if wbar == 0:
        return float("nan"), float("nan")
    est = float((w * v).sum() / w.sum())
    _, se = _mean_se(w * (v - est) / wbar)
    return est, se


def ips_value(policy_arm, treatment, response, cost, propensity=None, *,
              self_normalized: bool = False) -> IPSEstimate:
    """Per-user response and cost of a policy by inverse propensity scoring, with 95% intervals.

    ``V(pi) = (1/n) sum_i y_i 1[t_i = pi(x_i)] / p_i``, and ``C(pi)`` likewise with ``c_i``;
    ``self_normalized`` gives the Hajek variant ``sum w y / sum w``.

    Args:
        policy_arm: (n,) arm the policy gives each row.
        treatment: (n,) arm each row received in the trial.
        response, cost: (n,) observed response and cost.
        propensity: (n,) probability of the received arm; ``None`` = arm shares.
        self_normalized: use the self-normalised estimator.
    """
    t = _arms(treatment)
    n = t.shape[0]
    w = (_vec("policy_arm", policy_arm, n) == t) / _propensity(t, propensity)
    r, r_se = _ips_mean_se(w, _vec("response", response, n), self_normalized)
    c, c_se = _ips_mean_se(w, _vec("cost", cost, n), self_normalized)
    return IPSEstimate(r, c, r_se, c_se, r - Z_95 * r_se, r + Z_95 * r_se,
                       c - Z_95 * c_se, c + Z_95 * c_se, n, self_normalized)


def _topk_cuts(sorted_score: np.ndarray, n_bins: int | None) -> np.ndarray:
    """Top-k sizes at quantiles ``ceil(b n / n_bins)`` (every distinct score with ``None``),
    moved to the end of their tie group: the curve never depends on row order."""
    n = sorted_score.shape[0]
    k = np.arange(1, n + 1) if n_bins is None else np.ceil(np.arange(1, n_bins + 1) * n / n_bins)
    k = np.unique(k.astype(np.int64))
    neg = -sorted_score  # ascending, so searchsorted finds each tie group's end
    return np.unique(np.searchsorted(neg, neg[k - 1], side="right"))


def _cost_curve(score, w_treat, w_ctrl, y, c, n_bins) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (incremental cost, incremental response) points, starting at (0, 0)."""
    order = np.argsort(-score, kind="stable")
    cuts = _topk_cuts(score[order], n_bins) - 1
    wt, wc, y, c = w_treat[order], w_ctrl[order], y[order], c[order]
    nt, nc = np.cumsum(wt)[cuts], np.cumsum(wc)[cuts]
    ok = (nt > 0) & (nc > 0)  # the incremental estimate needs both groups in the top k
    ntop = (cuts + 1)[ok]
    inc = [(np.cumsum(wt * v)[cuts][ok] / nt[ok] - np.cumsum(wc * v)[cuts][ok] / nc[ok]) * ntop
           for v in (y, c)]
    if not ok[-1] or inc[0][-1] <= 0 or inc[1][-1] <= 0:
        return np.array([np.nan, np.nan]), np.array([np.nan, np.nan])
    return np.r_[0.0, inc[1] / inc[1][-1]], np.r_[0.0, inc[0] / inc[0][-1]]


def multi_arm_aucc(score, recommended_arm, treatment, response, cost, propensity=None, *,
                   n_bins: int | None = 100) -> float:
    """Area under the cost curve of a predicted incremental-ROI ranking, IPS-weighted over arms.

    Users are ranked by ``score``; in the top ``k`` (``n_bins`` quantiles, or every
    distinct score with ``None``; ties never split) the "treated" rows received their
    own ``recommended_arm`` and the control rows arm 0, each weighted by ``1 / p``.
    With two arms it is DFCL's binary AUCC; random ranking gives about 0.5.

    Args:
        score: (n,) predicted incremental ROI of the recommended arm.
        recommended_arm: (n,) the policy's coupon arm per user, in ``1..M-1``.
        treatment, response, cost, propensity: the trial, as in :func:`ips_value`.
        n_bins: number of quantiles, or ``None`` for every distinct score.

    Returns:
        The AUCC (nan when the population's incremental response or cost is <= 0).
    """
    t = _arms(treatment)
    n = t.shape[0]
    rec = _vec("recommended_arm", recommended_arm, n, dtype=np.int64)
    if rec.min() < 1:
        raise DataError("recommended_arm: must be a non-control arm (>= 1) for every user")
    inv_p = 1.0 / _propensity(t, propensity)
    x, y = _cost_curve(_vec("score", score, n), (t == rec) * inv_p, (t == 0) * inv_p,
                       _vec("response", response, n), _vec("cost", cost, n), n_bins)
    return float(np.trapezoid(y, x))


def multi_arm_qini(policies, treatment, response, cost, propensity=None) -> QiniPath:
    """Multi-arm Qini curve of a budget path: each policy's gain over all-control against its spend.

    Both are per-user IPS estimates of the difference to all-control, from the row
    terms ``v_i (1[t_i = pi_b(x_i)] - 1[t_i = 0]) / p_i``.

    Args:
        policies: list of (n,) arm arrays, or an (n_budgets, n) array, by budget.
        treatment, response, cost, propensity: the trial, as in :func:`ips_value`.
    """
    t = _arms(treatment)
    n = t.shape[0]
    inv_p = 1.0 / _propensity(t, propensity)
    y, c = _vec("response", response, n), _vec("cost", cost, n)
    out = np.empty((len(policies), 4))
    for b, arm in enumerate(policies):
        d = ((_vec("policy", arm, n) == t).astype(float) - (t == 0)) * inv_p
        (g, g_se), (s, s_se) = _mean_se(d * y), _mean_se(d * c)
        out[b] = s, g, s_se, g_se
    return QiniPath(*out.T.copy())


def qini_path_area(spend, gain, *, max_spend: float) -> float:
    """Area under a Qini curve from spend 0 to ``max_spend`` (divide by it for the mean gain).

    The curve interpolates (0, 0) and the points sorted by spend, held flat beyond
    the last point (the path plateaus once the budget stops binding).
    """
    if not max_spend > 0:
        raise DataError(f"qini_path_area: max_spend must be > 0, got {max_spend}")
    x = np.r_[0.0, np.asarray(spend, dtype=float)]
    y = np.r_[0.0, np.asarray(gain, dtype=float)]
    order = np.argsort(x, kind="stable")
    xs = np.unique(np.r_[0.0, x[(x > 0) & (x < max_spend)], max_spend])
    return float(np.trapezoid(np.interp(xs, x[order], y[order]), xs))


def uplift_at_spend(spend, uplift, targets) -> np.ndarray:
    """A method's true uplift at given true spends, read off its budget path.

    ``(spend[g], uplift[g])`` are its allocations over a grid of budgets, scored in
    truth. All-control ``(0, 0)`` is added, points of equal spend are averaged and
    the rest interpolated linearly (a coin flip between neighbouring allocations);
    past the largest spend the uplift is held, never extrapolated.

    Returns:
        (T,) interpolated uplift at each target spend.
    """
    x = np.r_[0.0, _vec("spend", spend)]
    y = np.r_[0.0, _vec("uplift", uplift, x.shape[0] - 1)]
    t = np.asarray(targets, dtype=float)
    if np.any(x < 0) or np.any(t < 0) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise DataError("uplift_at_spend: spends and targets must be finite and >= 0")
    xs, inverse = np.unique(x, return_inverse=True)
    ys = np.bincount(inverse, weights=y) / np.bincount(inverse)
    return np.interp(t, xs, ys)


def matched_capture(spend, uplift, targets, oracle_uplift) -> np.ndarray:
    """Capture at matched true spend: :func:`uplift_at_spend` over the oracle's uplift at each target.

    Returns:
        (T,) matched-spend capture (nan where the oracle gains nothing).
    """
    got = uplift_at_spend(spend, uplift, targets)
    ref = np.asarray(oracle_uplift, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ref > 0, got / np.where(ref > 0, ref, 1.0), np.nan)
