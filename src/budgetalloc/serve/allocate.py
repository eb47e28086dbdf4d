"""Allocation: one forward pass of the student, one small program, one lookup.

For a population and a total budget ``B``: the student assigns each user a
cluster; the integer program is solved for the population's *own* cluster sizes
``N[k]`` (milliseconds: its size does not depend on the number of users); then
each cluster's users take its arms in file order: the first ``counts[k, 0]``
users of cluster ``k`` get arm 0, the next ``counts[k, 1]`` arm 1, and so on.
Users within a cluster are exchangeable to the program, so file order is as
good as any order, and it is deterministic and streamable: a running offset per
cluster carries across batches or partitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from budgetalloc.data.contract import USER_ID, Population
from budgetalloc.errors import BudgetallocError
from budgetalloc.method.program import AllocationProgram, ProgramSolution
from budgetalloc.models.distill import predict_clusters
from budgetalloc.policy import Policy

ALLOCATION_COLUMNS = (USER_ID, "cluster", "treatment", "expected_response", "expected_cost")


class SolutionTotals:
    """Totals read off the program's solution (``self.solution``), for every allocation kind."""

    solution: ProgramSolution

    @property
    def expected_cost(self) -> float:
        return float(self.solution.expected_cost)

    @property
    def expected_response(self) -> float:
        return float(self.solution.expected_response)

    @property
    def users_per_arm(self) -> np.ndarray:
        """(M,) users given each arm (the program's counts: the written rows follow them)."""
        return self.solution.counts.sum(axis=0)


@dataclass(frozen=True)
class Allocation(SolutionTotals):
    """Arms for a population, with the program solution behind them."""

    frame: pd.DataFrame  # ALLOCATION_COLUMNS
    solution: ProgramSolution
    budget: float
    unspent: float  # budget the policy could not usefully spend
    cluster_sizes: np.ndarray  # (K,) int64 users per cluster

    @property
    def n_users(self) -> int:
        return len(self.frame)


def check_budget(budget) -> float:
    """A total budget as a finite float >= 0, or a one-line error."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise BudgetallocError(f"budget {budget!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise BudgetallocError(f"budget {budget!r} must be a finite number >= 0")
    return value


def population_clusters(policy: Policy, X: np.ndarray, *, batch_size: int) -> np.ndarray:
    """Cluster id per user: impute, standardise, one student forward pass."""
    return predict_clusters(policy.student, policy.preprocessor.transform(X), batch_size=batch_size)


def program_for(policy: Policy) -> AllocationProgram:
    """The policy's integer program (built once, re-solved per population/budget)."""
    s = policy.statistics
    return AllocationProgram(s.response, s.cost, s.response_scenarios, s.cost_scenarios,
                             params=policy.params.program)


def arms_in_file_order(clusters: np.ndarray, counts: np.ndarray, offsets: np.ndarray | None = None):
    """Arms for users in file order given per-cluster arm counts.

    Args:
        clusters: (n,) cluster of each user in this batch.
        counts: (K, M) users per (cluster, arm) for the whole population.
        offsets: (K,) users of each cluster already assigned in earlier batches.

    Returns:
        ``(arms, new_offsets)``.
    """
    k = counts.shape[0]
    offsets = np.zeros(k, dtype=np.int64) if offsets is None else offsets
    order = np.argsort(clusters, kind="stable")
    sizes = np.bincount(clusters, minlength=k)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(clusters.shape[0], dtype=np.int64)
    rank[order] = np.arange(clusters.shape[0]) - np.repeat(starts, sizes)
    rank += offsets[clusters]
    bounds = np.cumsum(counts, axis=1)
    arms = (bounds[clusters] <= rank[:, None]).sum(axis=1).astype(np.int32)
    return np.minimum(arms, counts.shape[1] - 1), offsets + sizes


def allocation_frame(policy: Policy, user_id, clusters, arms) -> pd.DataFrame:
    """The output table for one batch of users."""
    s = policy.statistics
    return pd.DataFrame(
        {
            USER_ID: user_id,
            "cluster": clusters.astype(np.int32),
            "treatment": arms.astype(np.int32),
            "expected_response": s.response[clusters, arms],
            "expected_cost": s.cost[clusters, arms],
        }
    )


def useful_spend_cap(policy: Policy, n_users: np.ndarray) -> float:
    """Spend of the best-response arm for every cluster: more budget buys nothing."""
    s = policy.statistics
    best = np.argmax(s.response, axis=1)
    return float((n_users * s.cost[np.arange(len(best)), best]).sum())


def unspent_budget(policy: Policy, n_users: np.ndarray, budget: float) -> float:
    """Budget beyond what the best-response arm of every cluster would spend."""
    return max(0.0, budget - useful_spend_cap(policy, n_users)) if budget > 0 else 0.0


def check_spend(spend: float, budget: float) -> None:
    """The last check of every allocation path: the written rows' expected spend is within budget."""
    if spend > budget * (1 + 1e-12) + 1e-9:
        raise BudgetallocError(f"internal check failed: expected spend {spend:.6g} exceeds budget {budget:.6g}")

def allocate_population(policy: Policy, population: Population, budget: float, *,
                        batch_size: int | None = None) -> Allocation:
    """Allocate every user of ``population`` under the total ``budget``.

    Args:
        policy: a fitted policy.
        population: validated users, features in the policy's order.
        budget: total budget in cost units (>= 0).
        batch_size: student inference batch (default ``allocate.batch_size``).

    Returns:
        An :class:`Allocation`; its expected spend never exceeds ``budget``.
    """
    budget = check_budget(budget)
    batch_size = batch_size or policy.params.allocate.batch_size
    clusters = population_clusters(policy, population.X, batch_size=batch_size)
    n_users = np.bincount(clusters, minlength=policy.k).astype(np.int64)
    solution = program_for(policy).solve(n_users, budget)
    arms, _ = arms_in_file_order(clusters, solution.counts)
    frame = allocation_frame(policy, population.user_id, clusters, arms)
    check_spend(float(frame["expected_cost"].sum()), budget)
    return Allocation(frame=frame, solution=solution, budget=budget,
                      unspent=unspent_budget(policy, n_users, budget), cluster_sizes=n_users)
