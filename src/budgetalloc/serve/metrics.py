"""Offline evaluation of allocation policies: IPS value, AUCC, multi-arm Qini, capture at matched spend.

Every estimator reads a held-out randomized trial: ``treatment`` (int arms ``0..M-1``,
0 = control), ``response``, ``cost`` and ``propensity`` (probability of the arm each
row received; ``None`` means each arm's share of the rows). All functions are
vectorised numpy (sorts and cumulative sums over rows, loops only over policies), so
they run on millions of rows. Curves are returned as arrays or JSON-ready rows.
"""

from __future__ import annotations

from collections.abc import Sequence
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


# ---------------------------------------------------------------- validation helpers
def _vec(name: str, x, n: int | None = None, dtype=float) -> np.ndarray:
    """Return ``x`` as a 1-d array of ``dtype``, checking its length against ``n``."""
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise DataError(f"{name}: expected a 1-d array of length {n}, got shape {a.shape}")
    return a


def _arms(treatment) -> np.ndarray:
    """Return ``treatment`` as non-negative int arms."""
    t = np.asarray(treatment)
    if t.ndim != 1 or t.size == 0:
        raise DataError(f"treatment: expected a non-empty 1-d array, got shape {t.shape}")
    if not np.array_equal(t, np.round(t)) or t.min() < 0:
        raise DataError("treatment: arms must be integers 0..M-1")
    return t.astype(np.int64)


def _binary_treatment(treatment) -> np.ndarray:
    """Return a 0/1 treatment with both groups present (as scikit-uplift requires)."""
    t = _arms(treatment)
    if not np.array_equal(np.unique(t), [0, 1]):
        raise DataError(f"treatment: expected both arms 0 and 1 only, got {np.unique(t)}")
    return t


def _propensity(treatment: np.ndarray, propensity) -> np.ndarray:
    """Return the received-arm propensity; ``None`` gives each arm's share of rows."""
    n = treatment.shape[0]
    if propensity is None:
        return (np.bincount(treatment) / n)[treatment]
    p = _vec("propensity", propensity, n)
    if not np.all((p > 0) & (p <= 1)):
        raise DataError("propensity: every value must lie in (0, 1]")
    return p


def _gather(table, arms: np.ndarray, name: str) -> np.ndarray:
    """Return ``table[i, arms[i]]`` for an (n, M) table of per-user, per-arm truths."""
    tab = np.asarray(table, dtype=float)
    if tab.ndim != 2 or tab.shape[0] != arms.shape[0] or arms.max() >= tab.shape[1]:
        raise DataError(f"{name}: expected shape ({arms.shape[0]}, M > max arm), got {tab.shape}")
    return tab[np.arange(arms.shape[0]), arms]


# ---------------------------------------------------------------- IPS policy value
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
    """Per-user response and cost of a policy, estimated by inverse propensity scoring.

    ``V(pi) = (1/n) sum_i y_i 1[t_i = pi(x_i)] / p_i`` and ``C(pi)`` likewise with
    ``c_i``: the expected outcome metric (EOM) of Zhao, Fang & Simchi-Levi (2017),
    "Uplift modeling with multiple treatments and general response types", SDM.
    SEs are the standard deviation of the per-row terms over ``sqrt(n)``; intervals
    are normal 95% intervals.

    Plain IPS is the default: it is unbiased when the trial's propensities are known
    (they are, by design), and it is linear, so spends of disjoint groups add up. The
    self-normalised (Hajek) variant ``sum w y / sum w`` with ``w = 1[t = pi] / p``
    trades a small bias for lower variance; its SE is the delta-method one. With the
    default propensities (arm shares) and a constant policy the two coincide.

    Args:
        policy_arm: (n,) arm the policy gives each row.
        treatment: (n,) arm each row received in the trial.
        response, cost: (n,) observed response and cost.
        propensity: (n,) probability of the received arm; ``None`` = arm shares.
        self_normalized: use the self-normalised estimator.

    Returns:
        An :class:`IPSEstimate` of per-user response and cost.
    """
    t = _arms(treatment)
    n = t.shape[0]
    w = (_vec("policy_arm", policy_arm, n) == t) / _propensity(t, propensity)
    r, r_se = _ips_mean_se(w, _vec("response", response, n), self_normalized)
    c, c_se = _ips_mean_se(w, _vec("cost", cost, n), self_normalized)
    return IPSEstimate(r, c, r_se, c_se, r - Z_95 * r_se, r + Z_95 * r_se,
                       c - Z_95 * c_se, c + Z_95 * c_se, n, self_normalized)


def ips_curve(policies, budgets: Sequence[float], treatment, response, cost,
              propensity=None, *, self_normalized: bool = False) -> list[dict[str, float]]:
    """IPS response-versus-cost curve of a budget table (one policy per budget).

    Args:
        policies: list of (n,) arm arrays, or an (n_budgets, n) array.
        budgets: the budget each policy was built for (only carried into the rows).
        treatment, response, cost, propensity: the trial, as in :func:`ips_value`.
        self_normalized: passed to :func:`ips_value`.

    Returns:
        One row per budget: ``{budget, response, cost, response_lo, response_hi,
        cost_lo, cost_hi}`` (per-user values), ready for ``json.dump`` or pandas.
    """
    if len(policies) != len(budgets):
        raise DataError(f"ips_curve: {len(policies)} policies but {len(budgets)} budgets")
    rows = []
    for budget, arm in zip(budgets, policies):
        e = ips_value(arm, treatment, response, cost, propensity, self_normalized=self_normalized)
        rows.append({"budget": float(budget), "response": e.response, "cost": e.cost,
                     "response_lo": e.response_lo, "response_hi": e.response_hi,
                     "cost_lo": e.cost_lo, "cost_hi": e.cost_hi})
    return rows


# ---------------------------------------------------------------- AUCC
def _topk_cuts(sorted_score: np.ndarray, n_bins: int | None) -> np.ndarray:
    """Top-k sizes at quantiles ``ceil(b n / n_bins)``, moved to the end of tie groups.

    Users with equal scores are never split (the curve must not depend on row order);
    ``n_bins=None`` cuts after every distinct score.
    """
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


def aucc_curve(score, treatment, response, cost, *, n_bins: int | None = 100):
    """Cost curve of a binary trial; see :func:`aucc`.

    Returns:
        ``(x, y)``: cumulative incremental cost and response of the top-q users, each
        divided by its value for all users, from (0, 0) to (1, 1); all nan when the
        whole population's incremental response or cost is not positive.
    """
    t = _binary_treatment(treatment)
    n = t.shape[0]
    return _cost_curve(_vec("score", score, n), (t == 1).astype(float), (t == 0).astype(float),
                       _vec("response", response, n), _vec("cost", cost, n), n_bins)


def aucc(score, treatment, response, cost, *, n_bins: int | None = 100) -> float:
    """Area under the cost curve (AUCC) of a predicted incremental-ROI ranking.

    Users are sorted by ``score`` (descending). For the top ``k`` users (``k`` at
    ``n_bins`` quantiles, or every distinct score when ``None``; ties never split):
    ``inc_y(k) = (sum_{T,top} y / n_{T,top} - sum_{C,top} y / n_{C,top}) * k`` and
    ``inc_c(k)`` likewise. The curve plots ``inc_y(k)/inc_y(n)`` against
    ``inc_c(k)/inc_c(n)`` from (0, 0) to (1, 1); AUCC is its trapezoid area. Random
    ranking gives about 0.5, a perfect ROI ranking approaches 1. Source: Du, Lee &
    Ghaffarizadeh (2019), "Improve user retention with causal learning"; used by DRP
    (Zhou et al., AAAI 2023) and DFCL (Zhou et al., KDD 2024, arXiv 2407.13664).

    Conventions: quantiles where the top ``k`` has no treated or no control row are
    skipped (the estimate is undefined there). Points are integrated in rank order
    and nothing is clamped: on noisy data the curve may leave the unit square and the
    area may fall slightly outside [0, 1]; clamping would hide that noise.

    Args:
        score: (n,) predicted incremental ROI.
        treatment: (n,) 0/1 arm received.
        response, cost: (n,) observed outcomes.
        n_bins: number of quantiles, or ``None`` for every distinct score.

    Returns:
        The AUCC, or nan when the population's incremental response or cost is <= 0.
    """
    x, y = aucc_curve(score, treatment, response, cost, n_bins=n_bins)
    return float(np.trapezoid(y, x))  # nan when the curve is undefined


def multi_arm_aucc(score, recommended_arm, treatment, response, cost, propensity=None, *,
                   n_bins: int | None = 100) -> float:
    """AUCC of a multi-arm policy, IPS-weighted; equals :func:`aucc` when M = 2.

    Each user carries the policy's recommended non-control arm ``j*(i)`` and its
    predicted incremental ROI ``score``; users are ranked as in :func:`aucc`. In the
    top ``k`` the "treated" group is the rows that received their own ``j*(i)`` and
    the control group the arm-0 rows, each row weighted by ``1 / p_i``; group means
    are Hajek means ``sum w y / sum w``. With two arms and propensities constant per
    arm (the default) the weights cancel and the result is the binary AUCC exactly.
    ``inc_y(k)`` estimates the gain of giving the top ``k`` their ``j*`` over control.

    Args:
        score: (n,) predicted incremental ROI of the recommended arm.
        recommended_arm: (n,) the policy's arm per user, in ``1..M-1`` (users whose
            best arm is control should carry their best non-control arm and its ROI).
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


# ---------------------------------------------------------------- multi-arm Qini
def multi_arm_qini(policies, treatment, response, cost, propensity=None) -> QiniPath:
    """Multi-arm Qini curve of a budget path: each policy's gain over all-control against its spend.

    Both are per-user IPS estimates of the difference to all-control, from the row
    terms ``v_i (1[t_i = pi_b(x_i)] - 1[t_i = 0]) / p_i`` (docs/method.md, "Evaluation").

    Args:
        policies: list of (n,) arm arrays, or an (n_budgets, n) array, by budget.
        treatment, response, cost, propensity: the trial, as in :func:`ips_value`.

    Returns:
        A :class:`QiniPath` of per-user incremental spend, gain and their standard errors.
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


# ---------------------------------------------------------------- simulator truth
def capture(arms, true_response, true_cost, oracle_arms) -> float:
    """Share of the oracle's response gain over all-control that a policy captures.

    ``(R(pi) - R(0)) / (R(oracle) - R(0))`` with ``R(pi) = sum_i r[i, pi(i)]`` the
    true expected response (a simulator's truth), so the oracle scores 1 and
    all-control 0. ``true_cost`` is only checked for shape (the budget side is
    :func:`spend_ratio`).

    Args:
        arms: (n,) the policy's arms.
        true_response: (n, M) true expected response per user and arm.
        true_cost: (n, M) true expected cost per user and arm.
        oracle_arms: (n,) the oracle's arms at the same budget.

    Returns:
        The capture ratio; nan when the oracle gains nothing over control.
    """
    a = _arms(arms)
    o = _vec("oracle_arms", _arms(oracle_arms), a.shape[0], dtype=np.int64)
    _gather(true_cost, a, "true_cost")
    base = float(np.asarray(true_response, dtype=float)[:, 0].sum())
    denom = _gather(true_response, o, "true_response").sum() - base
    return float((_gather(true_response, a, "true_response").sum() - base) / denom) \
        if denom != 0 else float("nan")


def spend_ratio(arms, true_cost, budget: float) -> float:
    """True total spend of a policy divided by the total budget.

    Args:
        arms: (n,) the policy's arms.
        true_cost: (n, M) true expected cost per user and arm.
        budget: the total budget (> 0), in the units of ``sum_i true_cost[i, arm]``.

    Returns:
        ``sum_i true_cost[i, arms[i]] / budget`` (above 1 means overspent).
    """
    if not budget > 0:
        raise DataError(f"spend_ratio: budget must be > 0, got {budget}")
    return float(_gather(true_cost, _arms(arms), "true_cost").sum() / budget)


def uplift_at_spend(spend, uplift, targets) -> np.ndarray:
    """A method's true uplift at given true spends, read off its budget path.

    The path is the method's allocations over a grid of budgets, each scored in
    truth: ``(spend[g], uplift[g])``. All-control, ``(0, 0)``, is added; points are
    sorted by spend (points with equal spend are averaged) and linearly
    interpolated, which is what a coin flip between two neighbouring allocations
    achieves in expectation. Beyond the path's largest spend the uplift is held
    at that point's (the method does not spend more), so a target past it is
    not extrapolated.

    Args:
        spend: (G,) true spend of each allocation on the path (>= 0).
        uplift: (G,) its true uplift over all-control.
        targets: (T,) true spends to read the uplift at (>= 0).

    Returns:
        (T,) interpolated uplift.
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
    """Capture at matched true spend: :func:`uplift_at_spend` over the oracle's uplift.

    A method that overspends its budget buys uplift it was not given; reading its
    uplift where its *true* spend equals the target compares every method at the
    same money.

    Args:
        spend, uplift: the method's budget path in truth (see :func:`uplift_at_spend`).
        targets: (T,) target true spends.
        oracle_uplift: (T,) the oracle's uplift at each target budget.

    Returns:
        (T,) matched-spend capture (nan where the oracle gains nothing).
    """
    got = uplift_at_spend(spend, uplift, targets)
    ref = np.asarray(oracle_uplift, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ref > 0, got / np.where(ref > 0, ref, 1.0), np.nan)
