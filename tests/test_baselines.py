"""The six comparison methods: interface, budget feasibility, quality against random, determinism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError

from budgetalloc.data.contract import population_from_frame, trial_from_frame
from budgetalloc.errors import BudgetallocError, DataError
from budgetalloc.params import SimulateParams
from budgetalloc.studies.baselines import BASELINES, Baseline, make_baseline
from budgetalloc.studies.baselines.dfcl import decision_loss, lambda_grid
from budgetalloc.studies.baselines.direct import (
    DirectRankModel,
    DirectROIPrediction,
    roi_calibrator,
)
from budgetalloc.studies.simulate import (
    max_spend,
    score_allocation,
    simulate_population,
    simulate_trial,
)

NAMES = ("TPM-SL", "TPM-XL", "TPM-CF", "DRM", "DRP", "DFCL")

#: Small models: the whole file must run in about a minute on two cores.
TINY = {
    "TPM-SL": {"max_iter": 60},
    "TPM-XL": {"max_iter": 40},
    "TPM-CF": {"n_estimators": 16, "max_samples": 0.4, "min_samples_leaf": 20},
    "DRM": {"epochs": 10, "hidden": 32, "batch_size": 1024},
    "DRP": {"epochs": 10, "hidden": 32, "batch_size": 1024},
    "DFCL": {"epochs": 10, "hidden": 32, "batch_size": 512},
}


@pytest.fixture(scope="module")
def trial():
    # 16k rows: at 6-8k the direct methods (DRM, DRP) sometimes land within 0.1 of a
    # random allocation's capture (measured 0.49-0.52 vs 0.40); at 16k every method
    # clears it on three trial seeds (lowest 0.59) while each tiny fit stays under ~4 s.
    return trial_from_frame(simulate_trial(SimulateParams(n_users=16_000), seed=3).frame)


@pytest.fixture(scope="module")
def population():
    return simulate_population(SimulateParams(), seed=4, n_users=5000)


@pytest.fixture(scope="module")
def X(population, trial):
    return population_from_frame(population.frame, trial.feature_names).X


@pytest.fixture(scope="module")
def fitted(trial):
    cache: dict[str, Baseline] = {}

    def get(name: str) -> Baseline:
        if name not in cache:
            cache[name] = make_baseline(name, **TINY[name]).fit(trial, seed=0)
        return cache[name]

    return get


def random_capture(population, budget: float, draws: int = 20) -> float:
    """Mean capture of random feasible allocations: random users get random coupons until B."""
    rng = np.random.default_rng(0)
    r, c = population.true_response, population.true_cost
    n, m = r.shape
    captures = []
    for _ in range(draws):
        order = rng.permutation(n)
        arm = rng.integers(1, m, n)
        k = np.searchsorted(np.cumsum(c[order, arm[order]]), budget, side="right")
        arms = np.zeros(n, dtype=np.int64)
        arms[order[:k]] = arm[order[:k]]
        captures.append(score_allocation(arms, r, c, budget).capture)
    return float(np.mean(captures))


def test_registry_names_are_the_papers():
    assert tuple(BASELINES) == NAMES
    for name, cls in BASELINES.items():
        assert cls.name == name
        assert isinstance(make_baseline(name), Baseline)


def test_unknown_name_or_knob_is_one_error():
    with pytest.raises(BudgetallocError, match="unknown baseline 'TPM-ZZ'"):
        make_baseline("TPM-ZZ")
    with pytest.raises(BudgetallocError, match="DRM"):
        make_baseline("DRM", no_such_knob=3)


def test_init_only_stores_knobs():
    model = make_baseline("DFCL", epochs=3, hidden=8)
    assert (model.epochs, model.hidden) == (3, 8)
    assert not [k for k in vars(model) if k.endswith("_")]


@pytest.mark.parametrize("name", NAMES)
def test_outcomes_shapes_finite(name, fitted, X, trial):
    value, cost = fitted(name).outcomes(X)
    assert value.shape == cost.shape == (X.shape[0], trial.n_arms)
    assert np.isfinite(value).all() and np.isfinite(cost).all()
    assert (cost >= 0).all()
    assert (cost[:, 0] == 0).all()  # control never costs anything in the trial
    assert cost[:, 1:].mean() > 0


@pytest.mark.parametrize("name", NAMES)
def test_allocation_never_exceeds_the_budget_in_own_cost(name, fitted, X):
    model = fitted(name)
    _, cost = model.outcomes(X)
    scale = float(cost.max(axis=1).sum())
    for frac in (0.0, 0.01, 0.05, 0.2, 0.5, 2.0):
        budget = frac * scale
        alloc = model.allocation(X, budget)
        arms = model.allocate(X, budget)
        np.testing.assert_array_equal(arms, alloc.arms)
        own_spend = float(cost[np.arange(len(arms)), arms].sum())
        assert alloc.spend <= budget + 1e-9
        assert own_spend == pytest.approx(alloc.spend)
        assert arms.min() >= 0 and arms.max() < cost.shape[1]


@pytest.mark.parametrize("name", NAMES)
def test_beats_random_allocation_in_true_uplift(name, fitted, X, population):
    budget = 0.1 * max_spend(population.true_cost)
    arms = fitted(name).allocate(X, budget)
    score = score_allocation(arms, population.true_response, population.true_cost, budget)
    baseline = random_capture(population, budget)  # about 0.4 at this budget
    assert score.capture > baseline + 0.1, (score.capture, baseline)
    assert score.spend_ratio < 1.5  # the method's own cost model is not wildly off


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_arms(name, fitted, trial, X):
    again = make_baseline(name, **TINY[name]).fit(trial, seed=0)
    budget = 0.1 * max_spend(fitted(name).outcomes(X)[1])
    np.testing.assert_array_equal(again.allocate(X, budget), fitted(name).allocate(X, budget))


@pytest.mark.parametrize("name", NAMES)
def test_unequal_shares_and_missing_features(name):
    params = SimulateParams(n_users=1500, arm_shares=(0.4, 0.3, 0.1, 0.1, 0.1), missing_rate=0.1)
    small = trial_from_frame(simulate_trial(params, seed=5).frame)
    assert np.isnan(small.X).any() and not np.allclose(small.ipw, 1.0)
    knobs = {**TINY[name], **({"epochs": 2} if "epochs" in TINY[name] else {})}
    model = make_baseline(name, **knobs).fit(small, seed=1)
    value, cost = model.outcomes(small.X[:300])
    assert np.isfinite(value).all() and np.isfinite(cost).all()
    assert model.allocation(small.X[:300], 10.0).spend <= 10.0


def test_errors_are_named(fitted, X):
    with pytest.raises(NotFittedError, match="DRP"):
        make_baseline("DRP").outcomes(X)
    model = fitted("TPM-SL")
    with pytest.raises(DataError, match=r"shape \(n, 20\)"):
        model.outcomes(X[:, :5])
    with pytest.raises(BudgetallocError, match="budget"):
        model.allocate(X, -1.0)


@settings(max_examples=40, deadline=None)
@given(frac=st.floats(0.0, 1.5), rows=st.integers(1, 400))
def test_spend_within_budget_property(frac, rows, fitted, X):
    model = fitted("DFCL")
    _, cost = model.outcomes(X[:rows])
    budget = frac * float(cost.max(axis=1).sum())
    assert model.allocation(X[:rows], budget).spend <= budget + 1e-9


def test_drp_loss_is_minimised_at_the_roi():
    # One x: treated rows convert 0.5 at cost 2 each; control 0.3 at no cost -> ROI 0.1.
    t = jnp.array([1] * 10 + [0] * 10, dtype=jnp.int32)
    r = jnp.array([1.0] * 5 + [0.0] * 5 + [1.0] * 3 + [0.0] * 7)
    c = jnp.array([2.0] * 5 + [0.0] * 5 + [0.0] * 10)
    batch = {"t": t, "r": r, "c": c, "w": jnp.ones(20)}
    grid = jnp.linspace(-6, 2, 4001)
    losses = [
        float(DirectROIPrediction()._rank_loss(jnp.full(20, s), batch, 1)) for s in grid[::50]
    ]
    best = float(grid[::50][int(np.argmin(losses))])
    assert best == pytest.approx(np.log(0.2 / 1.0), abs=0.11)


def test_drm_loss_is_minus_incremental_roi_with_equal_scores():
    t = jnp.array([1, 1, 0, 0], dtype=jnp.int32)
    batch = {
        "t": t,
        "r": jnp.array([1.0, 0.0, 0.0, 0.0]),
        "c": jnp.array([2.0, 0.0, 0.0, 0.0]),
        "w": jnp.ones(4),
    }
    loss = DirectRankModel()._rank_loss(jnp.zeros(4), batch, 1)
    assert float(loss) == pytest.approx(-(0.5 - 0.0) / (1.0 - 0.0))


def test_decision_loss_prefers_the_arm_with_the_better_lagrangian_value():
    # Two arms; the row got arm 1 and r - lam c > 0, so raising arm 1's score lowers the loss.
    batch = {
        "t": jnp.array([1], jnp.int32),
        "r": jnp.array([1.0]),
        "c": jnp.array([1.0]),
        "w": jnp.ones(1),
    }
    lam = jnp.array([0.5])
    low = decision_loss(jnp.array([[0.0, 0.0]]), jnp.zeros((1, 2)), batch, lam, 1.0)
    high = decision_loss(jnp.array([[0.0, 2.0]]), jnp.zeros((1, 2)), batch, lam, 1.0)
    assert float(high) < float(low) < 0
    assert float(low) == pytest.approx(-0.5 * 0.5)


def test_control_variate_leaves_the_expected_gradient_unchanged():
    # One user, three arms, each received with probability 1/3: averaging over the
    # received arm gives the expected gradient, which centring must not change.
    r_hat, c_hat = jnp.array([[0.2, 0.5, 0.1]]), jnp.array([[0.0, 0.4, 0.9]])
    lam = jnp.array([0.3, 0.8])

    def expected_grad(cv: bool):
        def loss(r):
            total = 0.0
            for arm, (rr, cc) in enumerate([(0.1, 0.0), (0.6, 0.5), (0.9, 1.2)]):
                batch = {
                    "t": jnp.array([arm], jnp.int32),
                    "r": jnp.array([rr]),
                    "c": jnp.array([cc]),
                    "w": jnp.ones(1),
                }
                total = total + decision_loss(r, c_hat, batch, lam, 0.2, cv) / 3
            return total

        return jax.grad(loss)(r_hat)

    np.testing.assert_allclose(expected_grad(True), expected_grad(False), atol=1e-6)


def test_lambda_grid_spans_the_arm_rois():
    grid = lambda_grid(np.array([0.1, 0.3, 0.4]), np.array([0.0, 1.0, 3.0]), 5, (0.5, 2.0))
    assert grid[0] == pytest.approx(0.5 * 0.1) and grid[-1] == pytest.approx(2.0 * 0.2)
    assert np.all(np.diff(grid) > 0)


def test_roi_calibrator_is_increasing_and_recovers_a_known_roi(trial):
    sub = trial.subset(np.isin(trial.treatment, (0, 2)))
    score = np.random.default_rng(0).standard_normal(sub.n)  # an uninformative score
    cal = roi_calibrator(score, sub, 2, n_bins=8)
    pred = cal.predict(np.linspace(-3, 3, 50))
    assert np.all(np.diff(pred) >= 0)
    mean_r = [sub.response[sub.treatment == k].mean() for k in (0, 2)]
    mean_c = [sub.cost[sub.treatment == k].mean() for k in (0, 2)]
    overall = (mean_r[1] - mean_r[0]) / (mean_c[1] - mean_c[0])
    assert float(np.median(pred)) == pytest.approx(overall, rel=0.5)
