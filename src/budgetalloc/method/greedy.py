"""Budget checks, repair and greedy allocation in numpy (the integer program's safety net).

The integer program in :mod:`budgetalloc.method.program` never trusts a solver's point:
every allocation it returns goes through :class:`SpendRule` here, which checks the
point-estimate spend and the scenario rule exactly. This module also holds the
three moves that turn any point into a good feasible one:

* :func:`repair_allocation` moves users from arms with the worst response lost per
  unit of cost saved down to cheaper arms until the rule holds (used after rounding
  a relaxed or time-limited solver point);
* :func:`fill_allocation` spends what the budget still allows, upgrading users by
  best incremental response per incremental cost (used after rounding, where the
  relaxation's fractional users were sent to a cheap arm);
* :func:`greedy_allocation` is ``fill_allocation`` started from the cheapest allowed
  arm everywhere: the fallback when the solver gives nothing usable.

An allocation is a ``(K, M)`` int64 count matrix whose rows sum to the cluster sizes.
In the whole-cluster variant a cluster moves as one block of ``N[k]`` users.
Moves are processed in a fixed, lexicographically tie-broken order, so every
function here is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

SCENARIO_RULES = ("all", "cvar", "quantile")


@dataclass(frozen=True, eq=False)
class SpendRule:
    """The spend constraints of the program, checked exactly in numpy.

    Attributes:
        c_mean: (K, M) point-estimate cost per user; its spend must be <= budget.
        c_scen: (S, K, M) scenario costs per user.
        rule: ``"all"`` (every scenario spend <= budget), ``"cvar"`` (the discrete
            CVaR at level ``alpha`` of the scenario spends <= budget, which implies
            the chance constraint) or ``"quantile"`` (at most ``floor(alpha * S)``
            scenarios over budget: the chance constraint itself).
        alpha: share of scenarios allowed over budget (ignored by ``"all"``).
        allowed: (M,) bool, the arms a user may get.
    """

    c_mean: np.ndarray
    c_scen: np.ndarray
    rule: str
    alpha: float
    allowed: np.ndarray

    def __post_init__(self):
        if self.rule not in SCENARIO_RULES:
            raise ValueError(f"unknown scenario rule {self.rule!r}, expected one of {SCENARIO_RULES}")

    @cached_property
    def n_violations(self) -> int:
        """How many scenarios may exceed the budget under the chance constraint."""
        return int(np.floor(self.alpha * self.c_scen.shape[0] + 1e-9))

    def spends(self, counts: np.ndarray) -> tuple[float, np.ndarray]:
        """Point-estimate spend and the (S,) scenario spends of an allocation."""
        point = float(np.sum(counts * self.c_mean))
        scen = np.einsum("km,skm->s", counts.astype(np.float64), self.c_scen)
        return point, scen

    def scenario_measure(self, scen: np.ndarray) -> float:
        """The number the scenario rule compares with the budget.

        Args:
            scen: (S,) scenario spends.

        Returns:
            The largest spend (``"all"``), the CVaR
            ``min_t t + sum_s max(0, scen_s - t) / (alpha S)`` (``"cvar"``), or the
            ``(floor(alpha S) + 1)``-th largest spend (``"quantile"``).
        """
        if self.rule == "all":
            return float(scen.max())
        if self.rule == "quantile":
            v = self.n_violations
            return float(np.partition(scen, scen.shape[0] - 1 - v)[scen.shape[0] - 1 - v])
        desc = np.sort(scen)[::-1]
        m = self.alpha * scen.shape[0]
        whole = int(np.floor(m))
        tail = (m - whole) * desc[whole] if whole < desc.shape[0] else 0.0
        return float((desc[:whole].sum() + tail) / m)

    def excess(self, counts: np.ndarray, budget: float) -> float:
        """How far an allocation is over budget (<= 0 when the rule holds)."""
        point, scen = self.spends(counts)
        return max(point, self.scenario_measure(scen)) - budget

    def holds(self, counts: np.ndarray, budget: float, *, rtol: float = 0.0) -> bool:
        """Whether the spend rule holds, up to ``rtol * max(budget, 1)``."""
        return self.excess(counts, budget) <= rtol * max(abs(budget), 1.0)

    def within(self, point: float, scen: np.ndarray, budget: float) -> bool:
        """The rule on spends already computed (used by the incremental moves)."""
        return point <= budget and self.scenario_measure(scen) <= budget


def cheapest_arms(c_mean: np.ndarray, r_obj: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Per cluster, the allowed arm of least mean cost (ties: best response, lowest index)."""
    cost = np.where(allowed[None, :], c_mean, np.inf)
    arm_idx = np.broadcast_to(np.arange(c_mean.shape[1]), c_mean.shape)
    order = np.lexsort((arm_idx, -r_obj, cost), axis=1)
    return order[:, 0]


def cheapest_allocation(rule: SpendRule, r_obj: np.ndarray, n_users: np.ndarray) -> np.ndarray:
    """Everyone on their cluster's cheapest allowed arm: the least-spend allocation."""
    counts = np.zeros(rule.c_mean.shape, dtype=np.int64)
    counts[np.arange(counts.shape[0]), cheapest_arms(rule.c_mean, r_obj, rule.allowed)] = n_users
    return counts


def _candidate_moves(
    rule: SpendRule, r_obj: np.ndarray, *, upgrade: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All moves (k, a -> b) between allowed arms in the order they are tried.

    Upgrades (``b`` responds strictly better) come by decreasing response gained
    per cost added, cost-free gains first. Downgrades (``b`` strictly cheaper) come
    by increasing response lost per cost saved. Ties break on (k, a, b).

    Returns:
        Three int arrays ``k, a, b`` of the moves in order.
    """
    n_clusters, n_arms = rule.c_mean.shape
    k, a, b = (g.ravel() for g in np.meshgrid(
        np.arange(n_clusters), np.arange(n_arms), np.arange(n_arms), indexing="ij"))
    dr = r_obj[k, b] - r_obj[k, a]
    dc = rule.c_mean[k, b] - rule.c_mean[k, a]
    ok = rule.allowed[a] & rule.allowed[b] & (a != b)
    if upgrade:
        ok &= dr > 0
        key = np.where(dc > 0, -dr / np.where(dc > 0, dc, 1.0), -np.inf)
        tiebreak = -dr
    else:
        ok &= dc < 0
        key = dr / np.where(dc < 0, dc, -1.0)  # response lost per cost saved
        tiebreak = -dr
    k, a, b, key, tiebreak = k[ok], a[ok], b[ok], key[ok], tiebreak[ok]
    order = np.lexsort((b, a, k, tiebreak, key))
    return k[order], a[order], b[order]


def _largest_feasible_block(rule, point, scen, dp, ds, budget, cap, whole) -> int:
    """The most users (<= cap) one move can shift while the rule still holds.

    Assumes the current spends satisfy the rule. Closed form for the linear rules,
    bisection (on a convex rule for CVaR, a feasible answer for the quantile) else.
    """
    if whole:
        return cap if rule.within(point + cap * dp, scen + cap * ds, budget) else 0
    if dp > 0:
        cap = min(cap, int(np.floor((budget - point) / dp)))
    if cap <= 0:
        return 0
    if rule.rule == "all":
        up = ds > 0
        if up.any():
            cap = min(cap, int(np.floor(np.min((budget - scen[up]) / ds[up]))))
        while cap > 0 and not rule.within(point + cap * dp, scen + cap * ds, budget):
            cap -= 1  # floor() of a rounded quotient can sit one user too high
        return max(cap, 0)
    if not rule.within(point + dp, scen + ds, budget):
        return 0
    lo, hi = 1, cap
    if rule.within(point + hi * dp, scen + hi * ds, budget):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rule.within(point + mid * dp, scen + mid * ds, budget):
            lo = mid
        else:
            hi = mid
    return lo


def fill_allocation(
    counts: np.ndarray, r_obj: np.ndarray, rule: SpendRule, budget: float, *, whole: bool,
    max_passes: int = 3,
) -> np.ndarray:
    """Upgrade users by best response per cost while the spend rule holds.

    Args:
        counts: (K, M) feasible starting allocation (not modified).
        r_obj: (K, M) response per user the program maximises.
        rule: the spend rule.
        budget: total budget.
        whole: move whole clusters only (whole-cluster variant).
        max_passes: passes over the ordered moves (a pass can open new moves).

    Returns:
        The improved (K, M) int64 allocation.
    """
    counts = counts.copy()
    k_, a_, b_ = _candidate_moves(rule, r_obj, upgrade=True)
    dcost = rule.c_mean[k_, b_] - rule.c_mean[k_, a_]
    for _ in range(max_passes):
        point, scen = rule.spends(counts)
        moved = False
        for i in range(k_.shape[0]):
            k, a, b, dp = k_[i], a_[i], b_[i], dcost[i]
            have = int(counts[k, a])
            if have == 0 or (dp > 0 and point + dp > budget):
                continue
            ds = rule.c_scen[:, k, b] - rule.c_scen[:, k, a]
            t = _largest_feasible_block(rule, point, scen, dp, ds, budget, have, whole)
            if t > 0:
                counts[k, a] -= t
                counts[k, b] += t
                point, scen, moved = point + t * dp, scen + t * ds, True
        if not moved:
            break
    return counts


def _smallest_fixing_block(rule, point, scen, dp, ds, budget, have, whole) -> int:
    """The fewest users (<= have) to move down so the rule holds, or ``have``."""
    if whole or not rule.within(point + have * dp, scen + have * ds, budget):
        return have
    lo, hi = 0, have  # lo infeasible, hi feasible
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rule.within(point + mid * dp, scen + mid * ds, budget):
            hi = mid
        else:
            lo = mid
    return hi


def repair_allocation(
    counts: np.ndarray, r_obj: np.ndarray, rule: SpendRule, budget: float, *, whole: bool
) -> np.ndarray | None:
    """Move users down to cheaper arms, least response lost per cost saved first.

    Args:
        counts: (K, M) allocation with correct row sums, possibly over budget.
        r_obj: (K, M) response per user the program maximises.
        rule: the spend rule.
        budget: total budget.
        whole: move whole clusters only.

    Returns:
        A (K, M) int64 allocation on which ``rule.holds`` is exactly true, or
        ``None`` when moving everything down is still not enough.
    """
    counts = counts.copy()
    k_, a_, b_ = _candidate_moves(rule, r_obj, upgrade=False)
    dcost = rule.c_mean[k_, b_] - rule.c_mean[k_, a_]
    for _ in range(rule.c_mean.shape[1] + 1):
        if rule.holds(counts, budget):
            return counts
        point, scen = rule.spends(counts)
        for i in range(k_.shape[0]):
            k, a, b = k_[i], a_[i], b_[i]
            have = int(counts[k, a])
            if have == 0:
                continue
            ds = rule.c_scen[:, k, b] - rule.c_scen[:, k, a]
            t = _smallest_fixing_block(rule, point, scen, dcost[i], ds, budget, have, whole)
            counts[k, a] -= t
            counts[k, b] += t
            point, scen = point + t * dcost[i], scen + t * ds
            if rule.within(point, scen, budget):
                break
    return counts if rule.holds(counts, budget) else None


def greedy_allocation(
    r_obj: np.ndarray, rule: SpendRule, n_users: np.ndarray, budget: float, *, whole: bool
) -> np.ndarray | None:
    """Feasible greedy allocation: cheapest arm everywhere, then best-ratio upgrades.

    Args:
        r_obj: (K, M) response per user to maximise.
        rule: the spend rule.
        n_users: (K,) users per cluster.
        budget: total budget.
        whole: move whole clusters only.

    Returns:
        The (K, M) int64 allocation, or ``None`` if even the cheapest arms break the rule.
    """
    start = cheapest_allocation(rule, r_obj, n_users)
    if not rule.holds(start, budget):
        return None
    filled = fill_allocation(start, r_obj, rule, budget, whole=whole)
    return filled if rule.holds(filled, budget) else repair_allocation(
        filled, r_obj, rule, budget, whole=whole)


def round_relaxed(
    values: np.ndarray, n_users: np.ndarray, rule: SpendRule, r_obj: np.ndarray, *, whole: bool
) -> np.ndarray:
    """Integer counts with exact row sums from a solver's (possibly fractional) point.

    Split variant: users are floored cell by cell and the users left over in a
    cluster go to its cheapest allowed arm (so the point spend never rises above
    the relaxed one); a row over its size loses users from its dearest arms.
    Whole-cluster variant: a cluster whose largest share is (numerically) 1 takes
    that arm, a fractional cluster its cheapest arm with a positive share.

    Args:
        values: (K, M) solver values: counts (split) or assignment shares (whole).
        n_users: (K,) users per cluster.
        rule: the spend rule (for costs and allowed arms).
        r_obj: (K, M) response per user (cheapest-arm ties).
        whole: whole-cluster variant.

    Returns:
        (K, M) int64 counts, rows summing to ``n_users``, zero on forbidden arms.
    """
    values = np.where(rule.allowed[None, :], np.nan_to_num(values), 0.0)
    rows = np.arange(values.shape[0])
    cheap = cheapest_arms(rule.c_mean, r_obj, rule.allowed)
    if whole:
        cost = np.where(values > 1e-6, rule.c_mean, np.inf)
        frac_arm = np.where(np.isfinite(cost.min(axis=1)), np.argmin(cost, axis=1), cheap)
        arm = np.where(values.max(axis=1) >= 1 - 1e-6, np.argmax(values, axis=1), frac_arm)
        counts = np.zeros(values.shape, dtype=np.int64)
        counts[rows, arm] = n_users
        return counts
    counts = np.floor(np.maximum(values, 0.0) + 1e-6).astype(np.int64)
    short = n_users - counts.sum(axis=1)
    counts[rows, cheap] += np.maximum(short, 0)
    dear_first = np.argsort(-np.where(rule.allowed[None, :], rule.c_mean, -np.inf), axis=1,
                            kind="stable")
    for k in np.flatnonzero(short < 0):  # only when the solver broke a row sum
        surplus = -short[k]
        for j in dear_first[k]:
            take = min(surplus, counts[k, j])
            counts[k, j] -= take
            surplus -= take
    return counts
