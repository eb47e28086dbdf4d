"""End to end: fit a policy on a small trial, allocate a population, score against truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_PARAMS as TINY
from typer.testing import CliRunner

from budgetalloc.cli.app import app
from budgetalloc.data.contract import population_from_frame, trial_from_frame
from budgetalloc.errors import PolicyError
from budgetalloc.fit.fit_stream import fit_policy
from budgetalloc.policy import load_policy, save_policy
from budgetalloc.serve.allocate import allocate_population, arms_in_file_order
from budgetalloc.studies.simulate import (
    SimulateParams,
    max_spend,
    score_allocation,
    simulate_population,
    simulate_trial,
)


def random_allocation(rng, true_cost, budget):
    """Random users get random coupons until the (true) budget is spent."""
    n, m = true_cost.shape
    arms = rng.integers(1, m, size=n)
    order = rng.permutation(n)
    fits = np.cumsum(true_cost[order, arms[order]]) <= budget
    out = np.zeros(n, dtype=np.int64)
    out[order[fits]] = arms[order[fits]]
    return out


@pytest.fixture()
def fitted(tiny_fitted):
    return tiny_fitted


def test_allocation_beats_random_and_respects_budget(fitted):
    directory, pop, _ = fitted
    policy = load_policy(directory)
    population = population_from_frame(pop.frame, policy.feature_names)
    scale = max_spend(pop.true_cost)
    rng = np.random.default_rng(0)
    for level in (0.1, 0.25):
        budget = level * scale
        alloc = allocate_population(policy, population, budget)
        assert alloc.frame["expected_cost"].sum() <= budget + 1e-9
        arms = alloc.frame["treatment"].to_numpy()
        ours = score_allocation(arms, pop.true_response, pop.true_cost, budget)
        rand = score_allocation(random_allocation(rng, pop.true_cost, budget), pop.true_response,
                                pop.true_cost, budget)
        assert ours.capture > rand.capture + 0.1, (level, ours, rand)
        assert ours.spend_ratio < 1.15


def test_budget_zero_gives_control_and_huge_budget_leaves_unspent(fitted):
    directory, pop, _ = fitted
    policy = load_policy(directory)
    population = population_from_frame(pop.frame, policy.feature_names)
    zero = allocate_population(policy, population, 0.0)
    assert (zero.frame["treatment"] == 0).all() and zero.frame["expected_cost"].sum() == 0
    huge = allocate_population(policy, population, 1e9)
    assert huge.unspent > 0.99e9


def test_fit_and_allocate_are_bit_identical(fitted, tmp_path):
    directory, pop, params = fitted
    world = simulate_trial(SimulateParams(n_users=12_000), seed=1)
    again = fit_policy(trial_from_frame(world.frame, source="trial"), params)
    save_policy(again, tmp_path / "p2")
    for name in ("statistics.npz", "budget_table.json", "preprocess.json"):
        assert (directory / name).read_bytes() == (tmp_path / "p2" / name).read_bytes(), name
    population = population_from_frame(pop.frame, again.feature_names)
    a = allocate_population(load_policy(directory), population, 500.0).frame
    b = allocate_population(load_policy(tmp_path / "p2"), population, 500.0).frame
    pd.testing.assert_frame_equal(a, b)


def test_edited_policy_is_refused(fitted, tmp_path):
    import shutil

    directory, _, _ = fitted
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    with open(copy / "budget_table.json", "a") as fh:
        fh.write(" ")
    with pytest.raises(PolicyError, match="budget_table.json' does not match its hash"):
        load_policy(copy)


def test_arms_in_file_order_respects_counts_across_batches():
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 4, 1000)
    sizes = np.bincount(clusters, minlength=4)
    counts = np.stack([sizes // 3, sizes // 3, sizes - 2 * (sizes // 3)], axis=1)
    whole, _ = arms_in_file_order(clusters, counts)
    parts, offsets = [], None
    for chunk in np.array_split(np.arange(1000), 7):
        arms, offsets = arms_in_file_order(clusters[chunk], counts, offsets)
        parts.append(arms)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    for k in range(4):
        np.testing.assert_array_equal(np.bincount(whole[clusters == k], minlength=3), counts[k])


def test_cli_fit_allocate_roundtrip(tmp_path):
    import yaml

    runner = CliRunner()
    # a small, unbalanced trial (propensity column written) with missing feature values
    world = simulate_trial(SimulateParams(n_users=4000, arm_shares=(0.4, 0.3, 0.1, 0.1, 0.1)), seed=5)
    frame = world.frame.copy()
    frame.loc[::50, "x3"] = np.nan
    frame.to_parquet(tmp_path / "trial.parquet")
    pop = simulate_population(SimulateParams(), seed=6, n_users=500).frame.assign(extra="kept out")
    pop.to_csv(tmp_path / "pop.csv", index=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "cluster": {"k": 40, "n_init": 1}}))
    res = runner.invoke(app, ["fit", "--data", str(tmp_path / "trial.parquet"), "--out", str(tmp_path / "pol"),
                              "--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 0, res.output
    assert "student agreement" in res.output and "imputed" in res.output
    assert "cluster.k lowered from 40" in res.output  # K adapts to the rows the statistics use and says so
    out = tmp_path / "alloc.parquet"
    res = runner.invoke(app, ["allocate", "--policy", str(tmp_path / "pol"), "--users", str(tmp_path / "pop.csv"),
                              "--budget", "40", "--out", str(out)])
    assert res.exit_code == 0, res.output
    alloc = pd.read_parquet(out)
    assert list(alloc.columns) == ["user_id", "cluster", "treatment", "expected_response", "expected_cost"]
    assert alloc["expected_cost"].sum() <= 40 + 1e-9
    for bad in ("-1", "nan", "lots"):
        res = runner.invoke(app, ["allocate", "--policy", str(tmp_path / "pol"), "--users",
                                  str(tmp_path / "pop.csv"), "--budget", bad, "--out", str(tmp_path / "x.parquet")])
        assert res.exit_code == 2 and "budget" in res.output and not (tmp_path / "x.parquet").exists()
    pop.drop(columns=["x7"]).to_csv(tmp_path / "pop_bad.csv", index=False)
    res = runner.invoke(app, ["allocate", "--policy", str(tmp_path / "pol"), "--users", str(tmp_path / "pop_bad.csv"),
                              "--budget", "10", "--out", str(tmp_path / "y.parquet")])
    assert res.exit_code == 2 and "missing feature column 'x7'" in res.output
