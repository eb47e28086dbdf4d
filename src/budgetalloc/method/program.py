"""The stochastic integer program over clusters (stage 4), in CVXPY with HiGHS.

Given ``N[k]`` users per cluster, bootstrap scenarios ``r_s, c_s`` per (cluster,
arm) and a budget ``B``: maximise the mean scenario response of the counts
(integer, or whole clusters) with one arm per user, the point spend ``<= B`` and
the scenario spends ``<= B`` in at least ``1 - alpha`` of the scenarios.

Invariants: nothing from the solver is trusted (counts are rounded with exact
row sums, the spend rule is re-checked in numpy and repaired, else the greedy
allocation is returned with status ``"greedy"``); ``solve`` starts HiGHS cold,
so the same inputs give the same counts.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from budgetalloc.errors import SolverError
from budgetalloc.method.greedy import (
    SpendRule,
    cheapest_allocation,
    fill_allocation,
    greedy_allocation,
    repair_allocation,
    round_relaxed,
)
from budgetalloc.params import ProgramParams

# HiGHS heuristics that cost time for no gain here (docs/design.md)
_MIP_OPTIONS = {"mip_heuristic_run_feasibility_jump": False, "mip_heuristic_run_rins": False,
                "mip_heuristic_run_rens": False}
_IPM_CELLS = 4096  # cold LPs with this many (cluster, arm) cells use IPM + crossover
_banner_shown = False
_banner_lock = threading.Lock()


@contextmanager
def _without_highs_banner() -> Iterator[None]:
    """Point file descriptor 1 at ``os.devnull`` during a process's first solve, where
    HiGHS prints its banner from C++ whatever ``output_flag`` says."""
    global _banner_shown
    with _banner_lock:
        first, _banner_shown = not _banner_shown, True
    if not first:
        yield
        return
    try:
        sys.stdout.flush()
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no usable descriptor 1 (embedded interpreters)
        yield
        return
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


@dataclass(frozen=True)
class ProgramSolution:
    """One solved budget.

    Attributes:
        counts: (K, M) int64 users per (cluster, arm); rows sum to ``N``.
        expected_response, expected_cost: ``sum(counts * r_mean)``, ``sum(counts * c_mean)``
            (never above ``budget``).
        scenario_costs: (S,) spend in each scenario.
        status: ``"optimal"`` (proved within ``mip_rel_gap``), ``"time_limit"`` (the
            best point HiGHS found before its time limit, rounded and repaired) or
            ``"greedy"`` (no solver point survived the checks).
        solve_seconds: wall time of the solve, checks and repair included.
        budget: the total budget this allocation was solved for.
    """

    counts: np.ndarray
    expected_response: float
    expected_cost: float
    scenario_costs: np.ndarray
    status: str
    solve_seconds: float
    budget: float

    @property
    def arms(self) -> np.ndarray:
        """(K,) arm holding most users of each cluster (the arm, whole-cluster)."""
        return np.argmax(self.counts, axis=1)


class BudgetBounds(NamedTuple):
    """Spends that frame a budget grid for one population (:func:`budget_bounds`)."""

    min_feasible: float
    min_point: float
    all_max_arm: float


class _Model(NamedTuple):
    """A built CVXPY problem, its cell variable and its parameters."""

    problem: cp.Problem
    cells: cp.Variable
    budget: cp.Parameter
    floor: cp.Parameter
    users: cp.Parameter
    big_m: cp.Parameter | None


def _scenario_rule(params: ProgramParams, n_scenarios: int) -> str:
    """``"all"``, ``"cvar"`` or ``"quantile"`` (big-M) for these params."""
    if params.alpha == 0 or np.floor(params.alpha * n_scenarios + 1e-9) == 0:
        return "all"
    return "cvar" if params.chance == "cvar" else "quantile"


def _check_stats(r_mean, c_mean, r_scen, c_scen) -> tuple[np.ndarray, ...]:
    """Float64 copies of the statistics, or SolverError naming the bad one."""
    names = ("r_mean", "c_mean", "r_scen", "c_scen")
    arrays = [np.asarray(x, dtype=np.float64) for x in (r_mean, c_mean, r_scen, c_scen)]
    km, n_scen = arrays[0].shape, arrays[2].shape[:1]
    for name, arr in zip(names, arrays, strict=True):
        want = km if name.endswith("mean") else (*n_scen, *km)
        if len(km) != 2 or arr.shape != want or 0 in arr.shape:
            raise SolverError(f"{name} has shape {arr.shape}, expected (K, M) for the means "
                              f"and (S, K, M) for the scenarios, with r_mean {km}")
        if not np.all(np.isfinite(arr)):
            raise SolverError(f"{name} contains NaN or infinite values")
    return tuple(arrays)


class AllocationProgram:
    """The stage-4 program for fixed statistics, solved for many populations and budgets.

    Args:
        r_mean: (K, M) point estimate of the per-user response (reported).
        c_mean: (K, M) point estimate of the per-user cost (reported, always within budget).
        r_scen: (S, K, M) scenario responses; their mean is the objective.
        c_scen: (S, K, M) scenario costs.
        params: the ``program`` section of ``params.yaml``.
    """

    def __init__(self, r_mean, c_mean, r_scen, c_scen, params: ProgramParams):
        self.r_mean, self.c_mean, r_scen, self.c_scen = _check_stats(r_mean, c_mean, r_scen, c_scen)
        self.params = params
        self.r_obj = r_scen.mean(axis=0)
        n_scen, self.n_clusters, self.n_arms = r_scen.shape
        allowed = np.ones(self.n_arms, dtype=bool)
        allowed[0] = params.allow_control
        if not allowed.any():
            raise SolverError("allow_control=False leaves no arm to allocate (M = 1)")
        self.arms_ = np.flatnonzero(allowed)
        self.rule = SpendRule(self.c_mean, self.c_scen, _scenario_rule(params, n_scen),
                              params.alpha, allowed)
        self._models: dict[str, _Model] = {}

    def _model(self, kind: str) -> _Model:
        """The ``"lp"`` (CVaR LP for big-M) or ``"mip"`` model, built on first use."""
        if kind not in self._models:
            lp_rule = "cvar" if self.rule.rule == "quantile" else self.rule.rule
            rule = lp_rule if kind == "lp" else self.rule.rule
            self._models[kind] = self._build(relaxed=kind == "lp", rule=rule)
        return self._models[kind]

    def _build(self, *, relaxed: bool, rule: str) -> _Model:
        """Build the DPP problem over the allowed (cluster, arm) cells."""
        k, a = self.n_clusters, self.arms_.size

        def flat(m: np.ndarray) -> np.ndarray:  # (..., K, M) -> (..., K * allowed arms)
            return m[..., self.arms_].reshape(*m.shape[:-2], k * a)

        row_sum = sp.kron(sp.eye(k, format="csr"), np.ones((1, a)), format="csr")
        budget, floor = cp.Parameter(), cp.Parameter()
        if self.params.split:
            users = cp.Parameter(k, nonneg=True)
            cells = cp.Variable(k * a, integer=not relaxed, nonneg=True)
            counts, cons = cells, [row_sum @ cells == users]
        else:
            users = cp.Parameter(k * a, nonneg=True)  # N[k] repeated over the arms
            cells = cp.Variable(k * a, boolean=not relaxed)
            counts, cons = cp.multiply(users, cells), [row_sum @ cells == 1]
            cons += [cells >= 0, cells <= 1] if relaxed else []
        point = flat(self.c_mean) @ counts
        cons += [point <= budget, point >= floor]
        spend = flat(self.c_scen) @ counts
        rule_cons, big_m = self._scenario_constraints(spend, budget, relaxed, rule)
        problem = cp.Problem(cp.Maximize(flat(self.r_obj) @ counts), cons + rule_cons)
        return _Model(problem, cells, budget, floor, users, big_m)

    def _scenario_constraints(self, spend, budget, relaxed, rule):
        """Constraints of a scenario rule on the (S,) spend expression, and big-M."""
        n_scen = self.c_scen.shape[0]
        if rule == "all":
            return [spend <= budget], None
        if rule == "cvar":
            t, excess = cp.Variable(), cp.Variable(n_scen, nonneg=True)
            tail = t + cp.sum(excess) / (self.params.alpha * n_scen)
            return [excess >= spend - t, tail <= budget], None
        over = cp.Variable(n_scen, boolean=not relaxed)
        big_m = cp.Parameter(n_scen, nonneg=True)
        cons = [spend - budget <= cp.multiply(big_m, over), cp.sum(over) <= self.rule.n_violations]
        return cons + ([over >= 0, over <= 1] if relaxed else []), big_m

    def _checked(self, n_users, budget) -> tuple[np.ndarray, float, BudgetBounds]:
        """The (K,) int64 population, the budget as a float and its bounds; SolverError when
        the population is not K non-negative integers or the budget negative, NaN or infeasible."""
        n = np.asarray(n_users)
        if n.shape != (self.n_clusters,) or not np.all(np.isfinite(n)) or np.any(n < 0) \
                or np.any(n != np.round(n)):
            raise SolverError(f"n_users must be {self.n_clusters} non-negative integers")
        n, budget = n.astype(np.int64), float(budget)
        if not np.isfinite(budget) or budget < 0:
            raise SolverError(f"budget must be a finite number >= 0, got {budget}")
        bounds = budget_bounds(self, n)
        if budget < bounds.min_feasible:
            raise SolverError(f"budget {budget:.6g} is below the minimum feasible spend "
                              f"{bounds.min_feasible:.6g} (cheapest allowed arm in every cluster)")
        return n, budget, bounds

    def _set_parameters(self, model: _Model, n: np.ndarray, budget: float, floor: float):
        """Fill the parameters of a built model for one (population, budget)."""
        model.budget.value = budget
        model.floor.value = floor
        model.users.value = (n if self.params.split else np.repeat(n, self.arms_.size)) * 1.0
        if model.big_m is not None:
            top = np.einsum("k,sk->s", n * 1.0, self.c_scen[..., self.arms_].max(axis=2))
            model.big_m.value = np.maximum(top - budget, 0.0)

    def _run(self, model: _Model, n, budget, floor, warm) -> tuple[str, float, np.ndarray | None]:
        """Solve quietly: the cvxpy status, the objective and the (K, M) cell values (or None)."""
        self._set_parameters(model, n, budget, floor)
        opts = {"time_limit": self.params.time_limit, "mip_rel_gap": self.params.mip_rel_gap,
                **_MIP_OPTIONS}
        if model is self._models.get("lp") and not warm and model.cells.size >= _IPM_CELLS:
            opts["solver"] = "ipm"  # never on the MIP: HiGHS would drop the integrality
        try:
            with warnings.catch_warnings(), _without_highs_banner():  # "may be inaccurate": re-checked
                warnings.simplefilter("ignore", UserWarning)
                model.problem.solve(solver=cp.HIGHS, verbose=False, warm_start=warm,
                                    highs_options=opts)
        except cp.error.SolverError:
            return "solver_error", np.nan, None
        value = model.cells.value
        if model.problem.status not in cp.settings.SOLUTION_PRESENT or value is None \
                or value.shape != (self.n_clusters * self.arms_.size,):
            return model.problem.status, np.nan, None
        full = np.zeros((self.n_clusters, self.n_arms))
        full[:, self.arms_] = value.reshape(self.n_clusters, self.arms_.size)
        return model.problem.status, float(model.problem.value), full

    def _integer_point(self, values, n, budget) -> np.ndarray | None:
        """Round, repair and fill a solver point into an exactly feasible allocation."""
        if values is None:
            return None
        whole = not self.params.split
        counts = round_relaxed(values, n, self.rule, self.r_obj, whole=whole)
        counts = repair_allocation(counts, self.r_obj, self.rule, budget, whole=whole)
        if counts is None:
            return None
        counts = fill_allocation(counts, self.r_obj, self.rule, budget, whole=whole)
        return counts if self.rule.holds(counts, budget) else None

    def _objective(self, counts: np.ndarray | None) -> float:
        """Mean scenario response of an allocation (-inf for none)."""
        return -np.inf if counts is None else float(np.sum(counts * self.r_obj))

    def _solve_counts(self, n, budget, floor, warm) -> tuple[np.ndarray, str]:
        """Relax-and-round, then the MIP if the gap is not closed, then greedy."""
        status, bound, values = self._run(self._model("lp"), n, budget, floor, warm)
        rounded = self._integer_point(values, n, budget)
        certified = rounded is not None and status == cp.OPTIMAL and self.rule.rule != "quantile"
        gap = bound - self._objective(rounded)
        if certified and gap <= self.params.mip_rel_gap * abs(bound) + 1e-9:
            return rounded, "optimal"
        status, _, values = self._run(self._model("mip"), n, budget, floor, warm)
        best = max((self._integer_point(values, n, budget), rounded), key=self._objective)
        if best is not None:
            return best, "optimal" if status == cp.OPTIMAL else "time_limit"
        greedy = greedy_allocation(self.r_obj, self.rule, n, budget, whole=not self.params.split)
        if greedy is None:  # unreachable: budget >= min_feasible makes the cheapest arms feasible
            raise SolverError(f"no feasible allocation found for budget {budget:.6g}")
        return greedy, "greedy"

    def solve(self, n_users, budget: float, *, spend_floor: float | None = None,
              warm_start: bool = False) -> ProgramSolution:
        """Allocate a population under a total budget.

        Args:
            n_users: (K,) users per cluster (zeros allowed).
            budget: total budget, >= the minimum feasible spend.
            spend_floor: a lower bound on the point spend that steers the solver
                (not re-checked).
            warm_start: start HiGHS from this program's previous solve (faster; the
                answer may then depend on that solve when optima tie).

        Returns:
            The :class:`ProgramSolution`, exactly within budget.

        Raises:
            SolverError: bad population, or a negative, NaN or infeasible budget.
        """
        start = time.perf_counter()
        n, budget, bounds = self._checked(n_users, budget)
        if n.sum() == 0:
            counts, status = cheapest_allocation(self.rule, self.r_obj, n), "optimal"
        else:
            low = bounds.min_point - 1.0
            floor = low if spend_floor is None else max(low, spend_floor)
            counts, status = self._solve_counts(n, budget, floor, warm_start)
        seconds = time.perf_counter() - start
        point, scen = self.rule.spends(counts)
        return ProgramSolution(counts=counts, expected_response=float(np.sum(counts * self.r_mean)),
                               expected_cost=point, scenario_costs=scen, status=status,
                               solve_seconds=seconds, budget=budget)


def budget_bounds(program: AllocationProgram, n_users) -> BudgetBounds:
    """Spends that frame a budget grid for ``n_users`` (K,) users per cluster.

    Returns:
        ``min_feasible``: the least budget the cheapest allowed arms satisfy (point
        spend and scenario rule; smaller budgets raise SolverError); ``min_point``:
        their point spend; ``all_max_arm``: the point spend with every cluster on
        its dearest allowed arm (``budget_levels`` are fractions of it).
    """
    n = np.asarray(n_users, dtype=np.int64)
    cheap = cheapest_allocation(program.rule, program.r_obj, n)
    point, scen = program.rule.spends(cheap)
    dearest = np.where(program.rule.allowed[None, :], program.c_mean, -np.inf).max(axis=1)
    return BudgetBounds(max(point, program.rule.scenario_measure(scen)), point, float(n @ dearest))


def solve_budget_table(program: AllocationProgram, n_users, budgets) -> list[ProgramSolution]:
    """Solve non-decreasing ``budgets`` for ``n_users``; spend and response never decrease along them.

    Each solve after the first is warm-started and gets the previous point spend as
    a floor; a solution that spends or responds less than the previous one is
    replaced by the previous allocation (its status, the new budget and solve time).

    Returns:
        One :class:`ProgramSolution` per budget, in order.

    Raises:
        SolverError: budgets not non-decreasing, or any budget infeasible.
    """
    budgets = [float(b) for b in budgets]
    if any(b2 < b1 for b1, b2 in itertools.pairwise(budgets)):
        raise SolverError("budgets of a budget table must be non-decreasing")
    table: list[ProgramSolution] = []
    for budget in budgets:
        prev = table[-1] if table else None
        floor = None if prev is None else prev.expected_cost - 1e-9 * max(1.0, prev.expected_cost)
        sol = program.solve(n_users, budget, spend_floor=floor, warm_start=prev is not None)
        if prev is not None and (sol.expected_cost < prev.expected_cost
                                 or sol.expected_response < prev.expected_response):
            sol = replace(prev, budget=budget, solve_seconds=sol.solve_seconds)
        table.append(sol)
    return table
