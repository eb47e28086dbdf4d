"""Per-user Lagrangian allocation: the oracle's and every baseline's allocator.

Given per-user expected response ``r`` and cost ``c`` under every arm (n, M) and a
total budget ``B``, each user takes ``argmax_j r[i, j] - lam * c[i, j]``. Spend is
non-increasing in ``lam``, so ``lam`` is bisected to the smallest value whose
spend fits the budget. At that ``lam`` a whole block of indifferent users can
switch at once, which leaves budget unspent; a final fill step moves the users
whose choice differs between the two ends of the last bisection interval, best
incremental response per unit of incremental cost first, while the budget holds.
The result never spends more than ``B`` (with the same ``r``, ``c``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LagrangianAllocation:
    """Arms per user and the multiplier that produced them."""

    arms: np.ndarray  # int32 (n,)
    lam: float
    spend: float
    response: float


def _choose(r: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    return np.argmax(r - lam * c, axis=1).astype(np.int32)


def _spend(c: np.ndarray, arms: np.ndarray) -> float:
    return float(np.take_along_axis(c, arms[:, None], axis=1).sum())


def _fill(r, c, arms_hi, arms_lo, budget) -> np.ndarray:
    """Move users from their ``arms_hi`` choice to ``arms_lo`` by best ROI while B holds."""
    idx = np.flatnonzero(arms_hi != arms_lo)
    if idx.size == 0:
        return arms_hi
    dr = r[idx, arms_lo[idx]] - r[idx, arms_hi[idx]]
    dc = c[idx, arms_lo[idx]] - c[idx, arms_hi[idx]]
    useful = dr > 0
    idx, dr, dc = idx[useful], dr[useful], dc[useful]
    order = np.lexsort((idx, -dr / np.maximum(dc, 1e-300)))
    room = budget - _spend(c, arms_hi)
    take = np.cumsum(dc[order]) <= room
    # Only a prefix keeps the ranking honest: stop at the first user that does not fit.
    stop = np.argmin(take) if not take.all() else take.size
    arms = arms_hi.copy()
    chosen = idx[order[:stop]]
    arms[chosen] = arms_lo[chosen]
    return arms


def lagrangian_allocation(
    r: np.ndarray, c: np.ndarray, budget: float, *, iters: int = 60, fill: bool = True
) -> LagrangianAllocation:
    """Allocate one arm per user under a total ``budget`` by ``iters`` bisection steps on ``lam``.

    ``r`` and ``c`` are the ``(n, M)`` expected response and cost (arm 0 usually free);
    ``fill`` spends what the last bisection interval leaves (see the module doc). If even
    the cheapest choice exceeds the budget, the cheapest-per-user allocation is returned
    and its spend exceeds ``budget``.
    """
    r = np.asarray(r, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    arms = _choose(r, c, 0.0)
    if _spend(c, arms) <= budget:
        return _result(r, c, arms, 0.0)
    lo, hi = 0.0, 1.0
    while _spend(c, _choose(r, c, hi)) > budget and hi < 1e12:
        lo, hi = hi, hi * 4.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if _spend(c, _choose(r, c, mid)) > budget:
            lo = mid
        else:
            hi = mid
    arms = _choose(r, c, hi)
    if fill and _spend(c, arms) <= budget:
        arms = _fill(r, c, arms, _choose(r, c, lo), budget)
    return _result(r, c, arms, hi)


def _result(r, c, arms, lam) -> LagrangianAllocation:
    resp = float(np.take_along_axis(r, arms[:, None], axis=1).sum())
    return LagrangianAllocation(arms=arms, lam=float(lam), spend=_spend(c, arms), response=resp)
