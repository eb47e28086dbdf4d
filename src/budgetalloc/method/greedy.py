"""Budget checks, repair and greedy allocation in numpy: the integer program's safety net.

Every allocation the program returns is checked exactly by :class:`SpendRule`; three
moves turn any point into a good feasible one: :func:`repair_allocation` (down to
cheaper arms until the rule holds), :func:`fill_allocation` (upgrades while the budget
allows) and :func:`greedy_allocation` (fill from the cheapest arms: the fallback). An
allocation is a ``(K, M)`` int64 count matrix whose rows sum to the cluster sizes (a
whole cluster moves as one in that variant). Moves run in a fixed, tie-broken order:
every function here is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True, eq=False)
class SpendRule:
    """The spend constraints of the program, checked exactly in numpy.

    Attributes:
        c_mean: (K, M) point-estimate cost per user; its spend must be <= budget.
        c_scen: (S, K, M) scenario costs per user.
        rule: ``"all"`` (every scenario spend <= budget), ``"cvar"`` (the discrete
            CVaR at level ``alpha`` of the scenario spends <= budget) or
            ``"quantile"`` (at most ``floor(alpha * S)`` scenarios over budget).
        alpha: share of scenarios allowed over budget (ignored by ``"all"``).
        allowed: (M,) bool, the arms a user may get.
    """

    c_mean: np.ndarray
    c_scen: np.ndarray
    rule: str
    alpha: float
    allowed: np.ndarray

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
        """What the rule compares with the budget: the largest of the (S,) spends
        (``"all"``), their CVaR ``min_t t + sum_s max(0, scen_s - t) / (alpha S)``, or
        the ``(floor(alpha S) + 1)``-th largest (``"quantile"``)."""
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


def _candidate_moves(rule: SpendRule, r_obj: np.ndarray, *, upgrade: bool) -> tuple[np.ndarray, ...]:
    """All moves ``(k, a -> b)`` between allowed arms, in the order they are tried.

    Upgrades (``b`` responds strictly better) come by decreasing response gained
    per cost added, cost-free gains first; downgrades (``b`` strictly cheaper) by
    increasing response lost per cost saved. Ties break on (k, a, b).

    Returns:
        ``k, a, b`` and the point cost ``dc`` each move adds per user, in order.
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
    else:
        ok &= dc < 0
        key = dr / np.where(dc < 0, dc, -1.0)  # response lost per cost saved
    order = np.lexsort((b[ok], a[ok], k[ok], -dr[ok], key[ok]))
    k, a, b = k[ok][order], a[ok][order], b[ok][order]
    return k, a, b, rule.c_mean[k, b] - rule.c_mean[k, a]


def _boundary(good: int, bad: int, fits) -> int:
    """Bisect between a count that ``fits`` and one that does not: the last that fits."""
    while abs(bad - good) > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _largest_feasible_block(rule, point, scen, dp, ds, budget, cap, whole) -> int:
    """The most users (<= cap) one move can shift while the rule still holds.

    Assumes the current spends satisfy the rule. Closed form for the linear rules,
    bisection (on a convex rule for CVaR, a feasible answer for the quantile) else.
    """
    def fits(t):
        return rule.within(point + t * dp, scen + t * ds, budget)

    if whole:
        return cap if fits(cap) else 0
    if dp > 0:
        cap = min(cap, int(np.floor((budget - point) / dp)))
    if cap <= 0:
        return 0
    if rule.rule == "all":
        up = ds > 0
        if up.any():
            cap = min(cap, int(np.floor(np.min((budget - scen[up]) / ds[up]))))
        while cap > 0 and not fits(cap):
            cap -= 1  # floor() of a rounded quotient can sit one user too high
        return max(cap, 0)
    if not fits(1):
        return 0
    return cap if fits(cap) else _boundary(1, cap, fits)


def _smallest_fixing_block(rule, point, scen, dp, ds, budget, have, whole) -> int:
    """The fewest users (<= have) to move down so the rule holds, or ``have``."""
    def fits(t):
        return rule.within(point + t * dp, scen + t * ds, budget)

    if whole or not fits(have):
        return have
    return _boundary(have, 0, fits)


def _sweep(counts, rule: SpendRule, moves, budget: float, *, whole: bool, upgrade: bool) -> bool:
    """One pass over the ordered moves, each shifting as many users as its block rule
    allows (a repair stops once the rule holds); edits ``counts``, returns whether any moved."""
    block = _largest_feasible_block if upgrade else _smallest_fixing_block
    point, scen = rule.spends(counts)
    moved = False
    for k, a, b, dp in zip(*moves, strict=True):
        have = int(counts[k, a])
        if have == 0 or (dp > 0 and point + dp > budget):
            continue
        ds = rule.c_scen[:, k, b] - rule.c_scen[:, k, a]
        t = block(rule, point, scen, dp, ds, budget, have, whole)
        if t > 0:
            counts[k, a] -= t
            counts[k, b] += t
            point, scen, moved = point + t * dp, scen + t * ds, True
        if not upgrade and rule.within(point, scen, budget):
            break
    return moved


def fill_allocation(
    counts: np.ndarray, r_obj: np.ndarray, rule: SpendRule, budget: float, *, whole: bool,
    max_passes: int = 3,
) -> np.ndarray:
    """Upgrade users by best response per cost while the spend rule holds.

    Args:
        counts: (K, M) feasible starting allocation (not modified).
        r_obj: (K, M) response per user the program maximises.
        whole: move whole clusters only (whole-cluster variant).
        max_passes: passes over the ordered moves (a pass can open new moves).

    Returns:
        The improved (K, M) int64 allocation.
    """
    counts, moves = counts.copy(), _candidate_moves(rule, r_obj, upgrade=True)
    for _ in range(max_passes):
        if not _sweep(counts, rule, moves, budget, whole=whole, upgrade=True):
            break
    return counts


def repair_allocation(
    counts: np.ndarray, r_obj: np.ndarray, rule: SpendRule, budget: float, *, whole: bool
) -> np.ndarray | None:
    """Move users down to cheaper arms, least response lost per cost saved first.

    Args: as :func:`fill_allocation`; ``counts`` may be over budget.

    Returns:
        A (K, M) int64 allocation on which ``rule.holds`` is exactly true, or
        ``None`` when moving everything down is still not enough.
    """
    counts, moves = counts.copy(), _candidate_moves(rule, r_obj, upgrade=False)
    for _ in range(rule.c_mean.shape[1] + 1):
        if rule.holds(counts, budget):
            return counts
        _sweep(counts, rule, moves, budget, whole=whole, upgrade=False)
    return counts if rule.holds(counts, budget) else None


def greedy_allocation(
    r_obj: np.ndarray, rule: SpendRule, n_users: np.ndarray, budget: float, *, whole: bool
) -> np.ndarray | None:
    """Cheapest arm everywhere, then best-ratio upgrades (:func:`fill_allocation`).

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

    Split variant: cells are floored, a cluster's leftover users go to its cheapest
    allowed arm (the point spend never rises above the relaxed one), and a row over
    its size loses users from its dearest arms. Whole-cluster variant: a cluster
    whose largest share is (numerically) 1 takes that arm, a fractional one its
    cheapest arm with a positive share.

    ``values`` are counts (split) or assignment shares (``whole``); ``r_obj`` breaks the
    cheapest-arm ties. Returns (K, M) int64 counts, zero on forbidden arms.
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
