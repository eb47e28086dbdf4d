"""Speed of the stage-4 integer program: build + first solve, re-solves, chance rules.

Compares a straightforward CVXPY formulation (a Python loop adding one
constraint per scenario, no Parameters, solved as a MIP) with
:class:`budgetalloc.method.program.AllocationProgram` (vectorised, DPP Parameters,
relax-and-round with a certified gap, MIP only when needed) on realistic synthetic
statistics, for the split and the whole-cluster variants. Prints a table and
writes ``reports/program_speed.json``.

    python benchmarks/program_speed.py [--clusters 256 --arms 8 --scenarios 50]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import cvxpy as cp
import numpy as np
import typer

from budgetalloc.method.program import AllocationProgram, budget_bounds, solve_budget_table
from budgetalloc.params import ProgramParams

TARGET_SECONDS = 0.5


def synthetic_stats(seed: int, n_clusters: int, n_arms: int, n_scen: int, total_users: int):
    """Heterogeneous clusters: concave responses, convex costs, ~10M users, noisy scenarios.

    Scenario costs get a small shared factor besides the per-cell noise, so that
    the scenario constraints bind (independent cell noise averages out over 256
    clusters and would leave only the point-estimate budget binding).

    Returns:
        ``(n_users, r_mean, c_mean, r_scen, c_scen)``; arm 0 is a free control.
    """
    rng = np.random.default_rng(seed)
    n_users = rng.multinomial(total_users, rng.dirichlet(np.full(n_clusters, 1.5)))
    arm = np.arange(n_arms)
    base = rng.beta(2, 30, (n_clusters, 1))  # control response, ~6%
    lift = rng.gamma(2.0, 0.02, (n_clusters, 1))  # heterogeneous treatment effects
    speed = rng.uniform(0.3, 1.5, (n_clusters, 1))
    r_mean = base + lift * (1 - np.exp(-speed * arm))  # increasing, diminishing returns
    c_mean = rng.lognormal(0.0, 0.4, (n_clusters, 1)) * arm**1.2  # increasing, control free
    rows = np.maximum(n_users[:, None] // 50, 20)  # trial rows behind each cell's estimate
    r_sd = np.sqrt(r_mean * (1 - r_mean) / rows)
    r_scen = np.clip(r_mean + r_sd * rng.standard_normal((n_scen, n_clusters, n_arms)), 0, 1)
    shared = rng.normal(0, 0.03, (n_scen, 1, 1))  # a draw heavy in big spenders moves every cell
    own = rng.normal(0, 0.5, (n_scen, n_clusters, n_arms)) / np.sqrt(rows / 20)
    c_scen = c_mean * np.exp(shared + own)
    return n_users, r_mean, c_mean, r_scen, c_scen


def straightforward_solve(n_users, r_scen, c_mean, c_scen, budget: float):
    """The naive formulation, built and solved from scratch; (seconds, objective, status)."""
    start = time.perf_counter()
    counts = cp.Variable(c_mean.shape, integer=True)
    cons = [counts >= 0, cp.sum(counts, axis=1) == n_users,
            cp.sum(cp.multiply(c_mean, counts)) <= budget]
    for s in range(c_scen.shape[0]):
        cons.append(cp.sum(cp.multiply(c_scen[s], counts)) <= budget)
    problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(r_scen.mean(axis=0), counts))), cons)
    problem.solve(solver=cp.HIGHS)
    return time.perf_counter() - start, float(problem.value), problem.status


def timed_first_solve(stats, params: ProgramParams, budget: float):
    """Build a fresh program and solve once; (seconds, program, solution)."""
    n_users, r_mean, c_mean, r_scen, c_scen = stats
    start = time.perf_counter()
    program = AllocationProgram(r_mean, c_mean, r_scen, c_scen, params)
    sol = program.solve(n_users, budget)
    return time.perf_counter() - start, program, sol


def objective(program: AllocationProgram, sol) -> float:
    """Mean-scenario response, the quantity every formulation maximises."""
    return float(np.sum(sol.counts * program.r_obj))


def row(variant: str, case: str, seconds: list[float], statuses, objective=None, **extra) -> dict:
    """One line of the report: median and max seconds over the runs of a case."""
    return {"variant": variant, "case": case, "seconds": statistics.median(seconds),
            "seconds_max": max(seconds), "status": ",".join(sorted(set(statuses))),
            "objective": objective, **extra}


def variant_rows(stats, variant: str, budget: float, grid, time_limit: float, repeats: int):
    """Timings of one variant (split or whole): alpha=0, its budget grid, CVaR and big-M."""
    split = variant == "split"
    base = ProgramParams(split=split, alpha=0.0, time_limit=time_limit)
    runs = [timed_first_solve(stats, base, budget) for _ in range(repeats)]
    program, sol = runs[0][1], runs[0][2]
    table = solve_budget_table(program, stats[0], grid)
    cold = [program.solve(stats[0], b) for b in grid]
    rows = [
        row(variant, "alpha=0 build + first solve", [r[0] for r in runs], [sol.status],
            objective(program, sol)),
        row(variant, f"alpha=0 re-solve warm, {len(grid)}-budget table (per budget)",
            [s.solve_seconds for s in table], [s.status for s in table]),
        row(variant, f"alpha=0 re-solve cold, same {len(grid)} budgets (per budget)",
            [s.solve_seconds for s in cold], [s.status for s in cold]),
    ]
    for chance in ("cvar", "bigm"):
        params = ProgramParams(split=split, alpha=0.1, chance=chance, time_limit=time_limit)
        secs, prog, sol = timed_first_solve(stats, params, budget)
        rows.append(row(variant, f"alpha=0.1 {chance} build + first solve", [secs], [sol.status],
                        objective(prog, sol),
                        violated_share=float(np.mean(sol.scenario_costs > budget))))
    return rows


def print_table(rows: list[dict]) -> None:
    """Plain-text table of the measurements."""
    print(f"{'variant':<16} {'case':<56} {'median s':>9} {'max s':>8} {'status':<20} objective")
    for r in rows:
        obj = "" if r.get("objective") is None else f"{r['objective']:.1f}"
        print(f"{r['variant']:<16} {r['case']:<56} {r['seconds']:>9.3f} {r['seconds_max']:>8.3f} "
              f"{r['status']:<20} {obj}")


def main(
    clusters: int = 256, arms: int = 8, scenarios: int = 50, users: int = 10_000_000,
    level: float = 0.3, grid_points: int = 20, repeats: int = 3, whole_time_limit: float = 1.0,
    bigm_time_limit: float = 5.0, seed: int = 0, out: Path = Path("reports/program_speed.json"),
) -> None:
    """Run the benchmark, print the table and write the JSON report."""
    stats = synthetic_stats(seed, clusters, arms, scenarios, users)
    probe = AllocationProgram(*stats[1:], ProgramParams())
    top = budget_bounds(probe, stats[0]).all_max_arm
    budget, grid = level * top, list(np.linspace(0.05, 1.0, grid_points) * top)
    naive = [straightforward_solve(stats[0], stats[3], stats[2], stats[4], budget)
             for _ in range(repeats)]
    rows = [row("split", "straightforward build + solve (MIP, no Parameters)",
                [r[0] for r in naive], [r[2] for r in naive], naive[0][1])]
    rows += variant_rows(stats, "split", budget, grid, bigm_time_limit, repeats)
    rows += variant_rows(stats, "whole-cluster", budget, grid, whole_time_limit, 1)
    print_table(rows)
    first = rows[1]["seconds"]
    verdict = "met" if first <= TARGET_SECONDS else "MISSED"
    print(f"\ntarget: split alpha=0 build + first solve <= {TARGET_SECONDS}s: {first:.3f}s, {verdict}")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {"clusters": clusters, "arms": arms, "scenarios": scenarios,
              "users": int(stats[0].sum()), "budget": budget, "grid_points": grid_points,
              "repeats": repeats, "whole_time_limit": whole_time_limit,
              "bigm_time_limit": bigm_time_limit, "seed": seed}
    report = {"config": config, "target_seconds": TARGET_SECONDS,
              "target_met": first <= TARGET_SECONDS, "rows": rows}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
