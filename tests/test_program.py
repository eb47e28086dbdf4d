"""Tests of the stage-4 integer program (budgetalloc.method.program) and its numpy safety net."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetalloc.errors import SolverError
from budgetalloc.method.greedy import SpendRule, greedy_allocation, repair_allocation, round_relaxed
from budgetalloc.method.program import (
    AllocationProgram,
    budget_bounds,
    solve_budget_table,
)
from budgetalloc.params import ProgramParams


def random_stats(seed: int, n_clusters: int, n_arms: int, n_scen: int, noise: float = 0.15):
    """Concave-in-arm responses, increasing costs (control free), noisy scenarios."""
    rng = np.random.default_rng(seed)
    level = np.log1p(np.arange(n_arms)) / np.log1p(max(n_arms - 1, 1))
    r_mean = rng.uniform(0.01, 0.1, (n_clusters, 1)) + rng.uniform(0, 0.1, (n_clusters, 1)) * level
    c_mean = rng.uniform(0.5, 2.0, (n_clusters, 1)) * np.arange(n_arms)
    r_scen = r_mean * (1 + noise * rng.standard_normal((n_scen, n_clusters, n_arms)))
    c_scen = c_mean * np.exp(noise * rng.standard_normal((n_scen, n_clusters, n_arms)))
    return r_mean, c_mean, r_scen, c_scen


def tiny_stats():
    """Two clusters, three arms, one scenario equal to the point estimates."""
    r_mean = np.array([[0.0, 1.0, 1.5], [0.0, 0.55, 0.6]])
    c_mean = np.array([[0.0, 1.0, 3.0], [0.0, 1.0, 2.0]])
    return r_mean, c_mean, r_mean[None], c_mean[None]


def assert_valid(sol, program: AllocationProgram, n_users) -> None:
    """Counts are non-negative integers with the right row sums, within every rule."""
    assert sol.counts.dtype == np.int64
    assert np.all(sol.counts >= 0)
    np.testing.assert_array_equal(sol.counts.sum(axis=1), n_users)
    assert sol.expected_cost <= sol.budget
    assert program.rule.holds(sol.counts, sol.budget)
    if not program.params.allow_control:
        assert np.all(sol.counts[:, 0] == 0)
    if not program.params.split:
        assert np.all((sol.counts > 0).sum(axis=1) <= 1)


# ----------------------------------------------------------------- exact optima
@pytest.mark.parametrize(
    ("budget", "arms", "response"), [(25.0, [0, 1], 11.0), (30.0, [1, 1], 21.0), (9.0, [0, 0], 0.0)]
)
def test_tiny_whole_cluster_optimum(budget, arms, response):
    program = AllocationProgram(*tiny_stats(), ProgramParams(split=False))
    sol = program.solve([10, 20], budget)
    np.testing.assert_array_equal(sol.arms, arms)
    assert sol.expected_response == pytest.approx(response)
    assert sol.status == "optimal"


def test_tiny_split_optimum():
    # Hand-solved: cluster 0 to arm 1 (1 response per unit cost), then 15 users of
    # cluster 1 to arm 1 (0.55 per unit); every other upgrade has a worse ratio.
    program = AllocationProgram(*tiny_stats(), ProgramParams(split=True))
    sol = program.solve(np.array([10, 20]), 25.0)
    np.testing.assert_array_equal(sol.counts, [[0, 10, 0], [5, 15, 0]])
    assert sol.expected_response == pytest.approx(18.25)
    assert sol.expected_cost == pytest.approx(25.0)
    assert sol.status == "optimal"


def compositions(total: int, parts: int):
    """Every way to split ``total`` users over ``parts`` arms."""
    for cuts in itertools.combinations(range(total + parts - 1), parts - 1):
        edges = (-1, *cuts, total + parts - 1)
        yield [edges[i + 1] - edges[i] - 1 for i in range(parts)]


def cvar_by_definition(spends: np.ndarray, alpha: float) -> float:
    """``min_t t + sum_s max(0, spend_s - t) / (alpha S)``; the minimum sits at a spend."""
    ts = spends[:, None]
    return float(np.min(ts[:, 0] + np.maximum(spends[None, :] - ts, 0).sum(axis=1)
                        / (alpha * len(spends))))


def brute_force(stats, n_users, budget, *, split: bool, max_violations: int = 0,
                cvar_alpha: float | None = None) -> float:
    """Best mean-scenario response over every allocation, by enumeration.

    The point spend must be within budget and at most ``max_violations``
    scenarios over it (the chance constraint itself, as the big-M encodes it),
    or, with ``cvar_alpha``, the CVaR of the scenario spends within budget.
    """
    r_mean, c_mean, r_scen, c_scen = stats
    n_arms = r_mean.shape[1]
    if split:
        rows = [list(compositions(int(n), n_arms)) for n in n_users]
    else:
        rows = [[list(np.eye(n_arms, dtype=int)[j] * n) for j in range(n_arms)] for n in n_users]
    best = -np.inf
    for choice in itertools.product(*rows):
        counts = np.array(choice, dtype=float)
        spends = np.einsum("km,skm->s", counts, c_scen)
        if cvar_alpha is None:
            scenarios_ok = np.sum(spends > budget) <= max_violations
        else:
            scenarios_ok = cvar_by_definition(spends, cvar_alpha) <= budget
        if np.sum(counts * c_mean) <= budget and scenarios_ok:
            best = max(best, float(np.sum(counts * r_scen.mean(axis=0))))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_cluster_matches_brute_force(seed):
    stats = random_stats(seed, 4, 3, 5)
    n_users = np.array([30, 10, 50, 20])
    program = AllocationProgram(*stats, ProgramParams(split=False, mip_rel_gap=0.0))
    budget = 0.4 * budget_bounds(program, n_users).all_max_arm
    sol = program.solve(n_users, budget)
    assert np.sum(sol.counts * r_obj(stats)) == pytest.approx(
        brute_force(stats, n_users, budget, split=False), rel=1e-9)


@pytest.mark.parametrize("seed", [3, 4])
def test_split_matches_brute_force(seed):
    stats = random_stats(seed, 2, 3, 4)
    n_users = np.array([4, 5])
    program = AllocationProgram(*stats, ProgramParams(split=True, mip_rel_gap=0.0))
    budget = 0.45 * budget_bounds(program, n_users).all_max_arm
    sol = program.solve(n_users, budget)
    assert np.sum(sol.counts * r_obj(stats)) == pytest.approx(
        brute_force(stats, n_users, budget, split=True), rel=1e-9)


@pytest.mark.parametrize(("seed", "split"), [(5, False), (6, False), (7, True)])
def test_bigm_matches_brute_force_chance_constraint(seed, split):
    stats = random_stats(seed, 3 if split else 5, 3, 10, noise=0.4)
    n_users = np.array([3, 4, 2]) if split else np.array([30, 10, 50, 20, 40])
    params = ProgramParams(split=split, alpha=0.2, chance="bigm", mip_rel_gap=0.0)
    program = AllocationProgram(*stats, params)
    budget = 0.35 * budget_bounds(program, n_users).all_max_arm
    sol = program.solve(n_users, budget)
    assert sol.status == "optimal"
    assert np.sum(sol.counts * r_obj(stats)) == pytest.approx(
        brute_force(stats, n_users, budget, split=split, max_violations=2), rel=1e-9)


def r_obj(stats):
    """The objective's per-user response: the scenario mean."""
    return stats[2].mean(axis=0)


@pytest.mark.parametrize(("seed", "split"), [(8, False), (9, True)])
def test_cvar_matches_brute_force(seed, split):
    stats = random_stats(seed, 3 if split else 5, 3, 10, noise=0.4)
    n_users = np.array([3, 4, 2]) if split else np.array([30, 10, 50, 20, 40])
    params = ProgramParams(split=split, alpha=0.3, chance="cvar", mip_rel_gap=0.0)
    program = AllocationProgram(*stats, params)
    budget = 0.35 * budget_bounds(program, n_users).all_max_arm
    sol = program.solve(n_users, budget)
    assert np.sum(sol.counts * r_obj(stats)) == pytest.approx(
        brute_force(stats, n_users, budget, split=split, cvar_alpha=0.3), rel=1e-9)


# ------------------------------------------------------------ scenario rules
@pytest.mark.parametrize("split", [True, False])
def test_alpha_zero_holds_in_every_scenario(split):
    stats = random_stats(3, 12, 4, 10)
    n_users = np.arange(12) * 7 + 5
    program = AllocationProgram(*stats, ProgramParams(split=split, alpha=0.0))
    top = budget_bounds(program, n_users).all_max_arm
    for level in (0.1, 0.3, 0.6):
        sol = program.solve(n_users, level * top)
        assert_valid(sol, program, n_users)
        assert sol.scenario_costs.max() <= sol.budget


@pytest.mark.parametrize(("chance", "split"), itertools.product(["cvar", "bigm"], [True, False]))
def test_chance_constraint_holds(chance, split):
    stats = random_stats(4, 10, 4, 20, noise=0.3)
    n_users = np.full(10, 40)
    params = ProgramParams(split=split, alpha=0.2, chance=chance, time_limit=5.0)
    program = AllocationProgram(*stats, params)
    sol = program.solve(n_users, 0.3 * budget_bounds(program, n_users).all_max_arm)
    assert_valid(sol, program, n_users)
    assert np.mean(sol.scenario_costs > sol.budget) <= 0.2
    if chance == "cvar":
        assert program.rule.scenario_measure(sol.scenario_costs) <= sol.budget


@given(st.lists(st.floats(-100, 100), min_size=1, max_size=30), st.floats(0.01, 0.99))
def test_cvar_measure_matches_its_definition(spends, alpha):
    scen = np.array(spends)
    rule = SpendRule(np.zeros((1, 1)), np.zeros((len(spends), 1, 1)), "cvar", alpha, np.ones(1, bool))
    assert rule.scenario_measure(scen) == pytest.approx(
        cvar_by_definition(scen, alpha), rel=1e-9, abs=1e-9)


# ------------------------------------------------------------- budget table
@pytest.mark.parametrize("split", [True, False])
def test_budget_table_is_monotone(split):
    stats = random_stats(5, 15, 5, 8)
    n_users = np.arange(15) * 13 + 3
    program = AllocationProgram(*stats, ProgramParams(split=split))
    budgets = np.linspace(0.0, 1.1, 12) * budget_bounds(program, n_users).all_max_arm
    table = solve_budget_table(program, n_users, budgets)
    assert [s.budget for s in table] == pytest.approx(list(budgets))
    for prev, cur in itertools.pairwise(table):
        assert cur.expected_cost >= prev.expected_cost
        assert cur.expected_response >= prev.expected_response
    for sol in table:
        assert_valid(sol, program, n_users)


def test_budget_table_rejects_decreasing_budgets():
    program = AllocationProgram(*tiny_stats(), ProgramParams())
    with pytest.raises(SolverError, match="non-decreasing"):
        solve_budget_table(program, [10, 20], [5.0, 3.0])


# -------------------------------------------------- budgets at and below the edge
@pytest.mark.parametrize("split", [True, False])
def test_budget_zero_gives_everyone_control(split):
    stats = random_stats(6, 8, 4, 6)
    n_users = np.arange(8) + 1
    sol = AllocationProgram(*stats, ProgramParams(split=split)).solve(n_users, 0.0)
    np.testing.assert_array_equal(sol.counts[:, 0], n_users)
    assert sol.expected_cost == 0.0


def test_budget_below_cheapest_spend_raises_without_control():
    stats = random_stats(7, 6, 4, 5)
    n_users = np.full(6, 10)
    program = AllocationProgram(*stats, ProgramParams(allow_control=False))
    need = budget_bounds(program, n_users).min_feasible
    with pytest.raises(SolverError, match="below the minimum feasible spend"):
        program.solve(n_users, 0.5 * need)
    sol = program.solve(n_users, need)
    assert_valid(sol, program, n_users)
    assert np.all(sol.counts[:, 0] == 0)


@pytest.mark.parametrize("budget", [-1.0, float("nan"), float("inf")])
def test_bad_budget_raises(budget):
    program = AllocationProgram(*tiny_stats(), ProgramParams())
    with pytest.raises(SolverError, match="budget"):
        program.solve([10, 20], budget)


@pytest.mark.parametrize("n_users", [[10], [10, -1], [1.5, 2]])
def test_bad_population_raises(n_users):
    program = AllocationProgram(*tiny_stats(), ProgramParams())
    with pytest.raises(SolverError, match="n_users"):
        program.solve(n_users, 5.0)


def test_bad_statistics_raise():
    r_mean, c_mean, r_scen, c_scen = tiny_stats()
    with pytest.raises(SolverError, match="c_scen"):
        AllocationProgram(r_mean, c_mean, r_scen, c_scen[:, :1], ProgramParams())
    with pytest.raises(SolverError, match="NaN"):
        AllocationProgram(r_mean * np.nan, c_mean, r_scen, c_scen, ProgramParams())


# ------------------------------------------------------ time limit and fallbacks
def test_tiny_time_limit_still_returns_a_feasible_allocation():
    stats = random_stats(8, 80, 6, 30)
    n_users = np.random.default_rng(0).integers(50, 500, 80)
    params = ProgramParams(split=False, time_limit=1e-3, mip_rel_gap=0.0)
    program = AllocationProgram(*stats, params)
    sol = program.solve(n_users, 0.3 * budget_bounds(program, n_users).all_max_arm)
    assert sol.status in ("time_limit", "greedy")
    assert_valid(sol, program, n_users)


@pytest.mark.parametrize("split", [True, False])
def test_infeasible_time_limited_point_is_repaired(monkeypatch, split):
    stats = random_stats(13, 10, 4, 12)
    n_users = np.full(10, 100)
    program = AllocationProgram(*stats, ProgramParams(split=split))
    dearest = np.zeros((10, 4))
    dearest[:, -1] = n_users if split else 1.0  # counts (split) or shares (whole)
    monkeypatch.setattr(program, "_run", lambda *a: ("user_limit", np.nan, dearest))
    sol = program.solve(n_users, 0.25 * budget_bounds(program, n_users).all_max_arm)
    assert sol.status == "time_limit"
    assert_valid(sol, program, n_users)


def test_no_solver_point_falls_back_to_greedy(monkeypatch):
    stats = random_stats(14, 10, 4, 12)
    n_users = np.full(10, 100)
    program = AllocationProgram(*stats, ProgramParams())
    monkeypatch.setattr(program, "_run", lambda *a: ("user_limit", np.nan, None))
    sol = program.solve(n_users, 0.25 * budget_bounds(program, n_users).all_max_arm)
    assert sol.status == "greedy"
    assert_valid(sol, program, n_users)


def test_repair_brings_an_overspent_point_within_budget():
    stats = random_stats(9, 10, 4, 12)
    n_users = np.full(10, 100)
    program = AllocationProgram(*stats, ProgramParams())
    budget = 0.25 * budget_bounds(program, n_users).all_max_arm
    dearest = np.zeros((10, 4), np.int64)
    dearest[:, -1] = n_users
    assert not program.rule.holds(dearest, budget)
    fixed = repair_allocation(dearest, program.r_obj, program.rule, budget, whole=False)
    assert program.rule.holds(fixed, budget)
    np.testing.assert_array_equal(fixed.sum(axis=1), n_users)


def test_rounding_keeps_row_sums_and_allowed_arms():
    stats = random_stats(10, 5, 3, 4)
    rule = AllocationProgram(*stats, ProgramParams(allow_control=False)).rule
    values = np.array([[3.0, 2.4, 4.6], [0, 0, 10.0000001], [1, 1, 1], [0, 5.5, 4.5], [0, 0, 0]])
    n_users = np.array([7, 10, 2, 10, 0])
    counts = round_relaxed(values, n_users, rule, stats[0], whole=False)
    np.testing.assert_array_equal(counts.sum(axis=1), n_users)
    assert np.all(counts[:, 0] == 0) and np.all(counts >= 0)


@pytest.mark.parametrize("split", [True, False])
def test_greedy_is_feasible_and_no_better_than_the_program(split):
    stats = random_stats(11, 20, 5, 10)
    n_users = np.arange(20) * 11 + 1
    program = AllocationProgram(*stats, ProgramParams(split=split))
    budget = 0.35 * budget_bounds(program, n_users).all_max_arm
    greedy = greedy_allocation(program.r_obj, program.rule, n_users, budget, whole=not split)
    assert program.rule.holds(greedy, budget)
    np.testing.assert_array_equal(greedy.sum(axis=1), n_users)
    sol = program.solve(n_users, budget)
    assert np.sum(greedy * program.r_obj) <= np.sum(sol.counts * program.r_obj) + 1e-9


def test_same_inputs_give_identical_counts():
    stats = random_stats(12, 30, 5, 10)
    n_users = np.arange(30) * 17 + 2
    first = AllocationProgram(*stats, ProgramParams()).solve(n_users, 2000.0)
    again = AllocationProgram(*stats, ProgramParams())
    again.solve(n_users * 2, 900.0)  # an unrelated earlier solve must not matter
    np.testing.assert_array_equal(again.solve(n_users, 2000.0).counts, first.counts)


# ------------------------------------------------------------- property test
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(1, 6), st.integers(2, 4), st.integers(1, 8)),
    level=st.floats(0.0, 1.2),
    alpha=st.sampled_from([0.0, 0.25, 0.5]),
    chance=st.sampled_from(["cvar", "bigm"]),
    split=st.booleans(),
    allow_control=st.booleans(),
    data=st.data(),
)
def test_any_solution_is_integer_complete_and_within_budget(
    seed, shape, level, alpha, chance, split, allow_control, data
):
    n_clusters, n_arms, n_scen = shape
    stats = random_stats(seed, n_clusters, n_arms, n_scen, noise=0.3)
    n_users = np.array(data.draw(st.lists(st.integers(0, 60), min_size=n_clusters,
                                          max_size=n_clusters)))
    params = ProgramParams(alpha=alpha, chance=chance, split=split, allow_control=allow_control,
                           time_limit=2.0)
    program = AllocationProgram(*stats, params)
    bounds = budget_bounds(program, n_users)
    budget = bounds.min_feasible + level * max(bounds.all_max_arm - bounds.min_feasible, 0.0)
    sol = program.solve(n_users, budget)
    assert_valid(sol, program, n_users)
    assert sol.status in ("optimal", "time_limit", "greedy")


def test_large_cold_solve_and_warm_re_solve_stay_valid():
    # 600 x 8 cells: the cold LP goes through the interior point method + crossover.
    stats = random_stats(15, 600, 8, 5)
    n_users = np.random.default_rng(1).integers(0, 3000, 600)
    program = AllocationProgram(*stats, ProgramParams())
    top = budget_bounds(program, n_users).all_max_arm
    for level, warm in [(0.3, False), (0.35, True)]:
        sol = program.solve(n_users, level * top, warm_start=warm)
        assert sol.status == "optimal"
        assert_valid(sol, program, n_users)


def test_first_solve_prints_nothing_on_stdout():
    """HiGHS's banner (C++, descriptor 1) must not land in the CLI's output."""
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from budgetalloc.params import ProgramParams\n"
        "from budgetalloc.method.program import AllocationProgram\n"
        "r = np.array([[0.1, 0.3], [0.2, 0.25]]); c = np.array([[0.0, 1.0], [0.0, 1.0]])\n"
        "p = AllocationProgram(r, c, r[None], c[None], params=ProgramParams())\n"
        "print('counts', p.solve(np.array([10, 10]), 10.0).counts.sum())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.startswith("counts 20") and "HiGHS" not in out, out
