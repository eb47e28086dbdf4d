"""What each CLI command does, as plain functions (the CLI only parses and prints)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from budgetalloc.data import arm_summary, load_population, load_trial, trial_from_frame
from budgetalloc.files import write_table
from budgetalloc.params import load_params, with_overrides
from budgetalloc.simulate import simulate_population, simulate_trial, truth_frame


def run_simulate(
    *,
    out: Path,
    population: Path | None,
    truth: Path | None,
    population_size: int,
    params_path: Path | None,
    seed: int | None,
    overrides: dict,
) -> pd.DataFrame:
    """Simulate a trial (and optionally a population with its truth); return the arm summary."""
    params = with_overrides(
        load_params(params_path), {f"simulate.{k}": v for k, v in overrides.items()} | {"seed": seed}
    )
    sim, seed = params.simulate, params.seed
    world = simulate_trial(sim, seed=seed)
    write_table(world.frame, out)
    if population is not None:
        pop = simulate_population(sim, seed=seed + 1, n_users=population_size)
        write_table(pop.frame, population)
        if truth is not None:
            write_table(truth_frame(pop), truth)
    return arm_summary(trial_from_frame(world.frame, source=str(out)))


def run_fit(*, data: Path, out: Path, params_path: Path | None, reporter=None) -> dict:
    """Load and validate the trial, fit every stage, write the policy atomically; return its summary."""
    from budgetalloc.pipeline import fit_policy
    from budgetalloc.policy import save_policy

    params = load_params(params_path)
    trial = load_trial(data, features=params.data.features)
    policy = fit_policy(trial, params, reporter)
    save_policy(policy, out)
    return policy.summary


def run_allocate(*, policy_dir: Path, users: Path, budget, out: Path):
    """Allocate a population file under a total budget and write the allocation atomically."""
    from budgetalloc.allocate import allocate_population, check_budget
    from budgetalloc.policy import load_policy

    budget = check_budget(budget)
    policy = load_policy(policy_dir)
    population = load_population(users, policy.feature_names)
    allocation = allocate_population(policy, population, budget)
    write_table(allocation.frame, out)
    return allocation


def run_evaluate(*, policy_dir: Path, data: Path, out: Path) -> dict:
    """Evaluate a policy on a held-out trial file; write metrics.json, curve.json, curve.png."""
    from budgetalloc.evaluate import evaluate_policy
    from budgetalloc.policy import load_policy

    policy = load_policy(policy_dir)
    trial = load_trial(data, features=policy.feature_names)
    if trial.n_arms > policy.n_arms:
        from budgetalloc.errors import DataError

        raise DataError(f"{data}: trial has {trial.n_arms} arms, the policy knows {policy.n_arms}")
    return evaluate_policy(policy, trial, out)
