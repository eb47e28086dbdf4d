"""The simulator's ground truth, the oracle and its budget bisection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetalloc.method.lagrangian import lagrangian_allocation
from budgetalloc.params import SimulateParams
from budgetalloc.studies.simulate import (
    latent_segment,
    max_spend,
    oracle_arms,
    score_allocation,
    simulate_population,
    simulate_trial,
    truth_frame,
)


@pytest.mark.parametrize("world", ["binary", "gmv"])
def test_trial_arm_means_match_truth(world):
    w = simulate_trial(SimulateParams(world=world, n_users=60_000), seed=3)
    t = w.frame["treatment"].to_numpy()
    for arm in range(w.true_response.shape[1]):
        rows = t == arm
        for observed, truth in ((w.frame["response"], w.true_response), (w.frame["cost"], w.true_cost)):
            obs = observed.to_numpy()[rows]
            se = obs.std() / np.sqrt(rows.sum()) + 1e-12
            assert abs(obs.mean() - truth[rows, arm].mean()) < 4 * se + 1e-9


def test_truth_has_diminishing_returns_and_free_control():
    w = simulate_trial(SimulateParams(n_users=5000), seed=0)
    r, c = w.true_response, w.true_cost
    assert np.all(c[:, 0] == 0)
    assert np.all(np.diff(r, axis=1) > 0) and np.all(np.diff(c, axis=1) > 0)
    gains = np.diff(r, axis=1) / np.diff(w.coupon_values)[None, :]
    # Returns diminish for (almost) everyone; the sigmoid's convex part can delay it for a few.
    assert np.mean(gains[:, -1] < gains[:, 0]) > 0.97


def test_segments_invisible_in_single_features():
    w = simulate_trial(SimulateParams(n_users=40_000), seed=1)
    X = w.frame.filter(like="x").to_numpy()
    seg = latent_segment(X)
    for j in range(X.shape[1]):
        corr = np.corrcoef(X[:, j], seg)[0, 1]
        assert abs(corr) < 0.05, (j, corr)


def test_same_seed_same_table_and_noise_knobs():
    p = SimulateParams(n_users=3000, label_noise=0.2, cost_outliers=0.05, feature_noise=0.5, missing_rate=0.1)
    a = simulate_trial(p, seed=5).frame
    b = simulate_trial(p, seed=5).frame
    assert a.equals(b)
    clean = simulate_trial(SimulateParams(n_users=3000), seed=5).frame
    assert a["x0"].isna().mean() == pytest.approx(0.1, abs=0.03)
    assert a["cost"].max() > 5 * clean["cost"].max()


def test_unbalanced_shares_write_propensity():
    p = SimulateParams(n_users=20_000, n_arms=3, arm_shares=(0.6, 0.3, 0.1))
    df = simulate_trial(p, seed=0).frame
    assert set(np.round(df["propensity"].unique(), 6)) == {0.6, 0.3, 0.1}
    assert (df["treatment"] == 0).mean() == pytest.approx(0.6, abs=0.02)


def test_truth_frame_roundtrip():
    pop = simulate_population(SimulateParams(), seed=2, n_users=100)
    df, arms = truth_frame(pop), range(pop.true_response.shape[1])
    r, c = (df[[f"true_{name}_{j}" for j in arms]].to_numpy() for name in ("response", "cost"))
    np.testing.assert_array_equal(r, pop.true_response)
    np.testing.assert_array_equal(c, pop.true_cost)


@pytest.fixture(scope="module")
def truth():
    w = simulate_population(SimulateParams(), seed=4, n_users=5000)
    return w.true_response, w.true_cost


@pytest.mark.parametrize("level", [0.0, 0.05, 0.2, 0.35, 0.8, 1.5])
def test_oracle_bisection_meets_budget(truth, level):
    r, c = truth
    budget = level * max_spend(c)
    alloc = lagrangian_allocation(r, c, budget)
    assert alloc.spend <= budget + 1e-9
    if 0 < level < 1:
        assert alloc.spend >= 0.995 * budget  # the fill step spends what the budget allows


def test_oracle_response_grows_with_budget(truth):
    r, c = truth
    values = [lagrangian_allocation(r, c, f * max_spend(c)).response for f in np.linspace(0, 1, 8)]
    assert np.all(np.diff(values) >= -1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), level=st.floats(0.02, 0.6))
def test_oracle_never_beaten(truth, seed, level):
    """No random feasible allocation, nor a perturbation of the oracle, beats the oracle."""
    r, c = truth
    budget = level * max_spend(c)
    best = oracle_arms(r, c, budget)
    idx = np.arange(len(best))
    rng = np.random.default_rng(seed)
    for _ in range(3):
        arms = rng.integers(0, r.shape[1], size=len(best))
        over = np.cumsum(c[idx, arms]) > budget
        arms[over] = 0
        score = score_allocation(arms, r, c, budget)
        assert score.true_spend <= budget + 1e-9
        assert score.capture <= 1.0 + 1e-9
    tweak = best.copy()
    flip = rng.choice(len(best), size=50, replace=False)
    tweak[flip] = rng.integers(0, r.shape[1], size=50)
    if c[idx, tweak].sum() <= budget:
        assert score_allocation(tweak, r, c, budget).capture <= 1.0 + 1e-6


def test_score_of_oracle_and_control(truth):
    r, c = truth
    budget = 0.2 * max_spend(c)
    assert score_allocation(oracle_arms(r, c, budget), r, c, budget).capture == pytest.approx(1.0)
    assert score_allocation(np.zeros(len(r), dtype=int), r, c, budget).capture == 0.0
