"""Cluster statistics: unbiased on a known world, robust to outliers, honest scenarios."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from budgetalloc.method.statistics import (
    STAT_BLOCK,
    ClusterStatistics,
    StatisticsAccumulator,
    calibrated_prior,
    clip_band,
    clip_sample_rows,
    clip_to_band,
    cluster_statistics,
    pooling_weights,
    winsorize_bands,
)
from budgetalloc.params import StatisticsParams


def _world(n=60_000, k=4, m=3, seed=0, outliers=0.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    t = rng.integers(0, m, n)
    true_r = 0.1 + 0.05 * np.arange(k)[:, None] + 0.04 * np.arange(m)[None, :] * (1 + np.arange(k)[:, None] % 2)
    coupon = np.array([0.0, 1.0, 2.0])[:m]
    y = (rng.random(n) < true_r[labels, t]).astype(float)
    c = y * coupon[t]
    if outliers:
        c[rng.random(n) < outliers] *= 10.0
    return labels, t, y, c, true_r, true_r * coupon[None, :]


@pytest.mark.parametrize("estimator", ["mean", "winsorize", "median_of_means"])
@pytest.mark.parametrize("pred_bias", [0.0, 0.1])
@pytest.mark.parametrize("pooling", ["empirical_bayes", "rows"])
def test_unbiased_whatever_the_predictions(estimator, pred_bias, pooling):
    """A biased network prediction is corrected by the honest rows (doubly robust)."""
    labels, t, y, c, tr, tc = _world()
    n, m = len(t), tr.shape[1]
    pred_r = np.full((n, m), y.mean() + pred_bias)
    pred_c = np.full((n, m), c.mean())
    params = StatisticsParams(cost_margin=0.0, estimator=estimator, pooling=pooling, shrinkage=0.0, n_scenarios=5)
    st = cluster_statistics(labels, t, y, c, np.ones(n), pred_r, pred_c, k=4, params=params, seed=0)
    np.testing.assert_allclose(st.response, tr, atol=5 * st.response_se.max() + 0.01)
    # 5,000 rows a cell: the plain mean is already 0.024 off in the worst of 12 cells
    np.testing.assert_allclose(st.cost, tc, atol=0.04)
    assert np.all(st.cost[:, 0] == 0.0)


def test_shrinkage_pulls_small_cells_to_predictions():
    labels, t, y, c, tr, _ = _world(n=400)
    n, m = len(t), tr.shape[1]
    pred = np.full((n, m), 0.5)
    heavy = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4,
                               params=StatisticsParams(cost_margin=0.0, pooling="rows", shrinkage=1e6,
                                                       n_scenarios=2), seed=0)
    np.testing.assert_allclose(heavy.response, 0.5, atol=1e-3)
    none = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4,
                              params=StatisticsParams(cost_margin=0.0, pooling="rows", shrinkage=0.0, n_scenarios=2,
                                                      estimator="mean"), seed=0)
    cell = (labels == 0) & (t == 1)
    assert none.response[0, 1] == pytest.approx(y[cell].mean())


def test_robust_estimate_beats_mean_under_cost_outliers():
    labels, t, y, c, _, tc = _world(outliers=0.03)
    n, m = len(t), tc.shape[1]
    pred = np.zeros((n, m))
    errs = {}
    for est in ("mean", "winsorize"):
        st = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4,
                                params=StatisticsParams(cost_margin=0.0, estimator=est, pooling="rows", shrinkage=0.0,
                                                        n_scenarios=2), seed=0)
        errs[est] = np.abs(st.cost - tc).max()
    assert errs["winsorize"] < 0.03 < errs["mean"]


def test_clip_band_keeps_zeros_and_typical_values():
    t = np.array([1, 1, 1, 1, 1, 0])
    v = np.array([0.0, 2.0, 2.0, 2.0, 20.0, 0.0])
    out = clip_to_band(v, t, clip_band(v, t, 2, clip_z=5.0))
    np.testing.assert_array_equal(out, [0.0, 2.0, 2.0, 2.0, 2.0, 0.0])


def test_scenarios_spread_like_standard_errors_and_roundtrip(tmp_path):
    labels, t, y, c, tr, _ = _world(n=20_000)
    n, m = len(t), tr.shape[1]
    pred = np.full((n, m), y.mean())
    params = StatisticsParams(cost_margin=0.0, estimator="mean", shrinkage=0.0, n_scenarios=200)
    st = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4, params=params, seed=1)
    boot_sd = st.response_scenarios.std(axis=0)
    ratio = boot_sd[:, 1:] / st.response_se[:, 1:]
    assert np.all((ratio > 0.7) & (ratio < 1.4))
    assert st.response_scenarios.shape == (200, 4, m)
    st.save(tmp_path / "s.npz")
    back = ClusterStatistics.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.cost_scenarios, st.cost_scenarios)
    again = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4, params=params, seed=1)
    np.testing.assert_array_equal(again.response_scenarios, st.response_scenarios)


def test_inverse_propensity_weights_correct_unbalanced_assignment():
    rng = np.random.default_rng(3)
    n = 80_000
    x = rng.random(n)
    labels = np.zeros(n, dtype=int)
    p1 = np.where(x > 0.5, 0.8, 0.2)  # arm 1 mostly given to high-x users
    t = (rng.random(n) < p1).astype(int)
    y = (rng.random(n) < 0.1 + 0.4 * x).astype(float)  # no treatment effect at all
    prop = np.where(t == 1, p1, 1 - p1)
    pred = np.zeros((n, 2))
    st = cluster_statistics(labels, t, y, np.zeros(n), 1.0 / (2 * prop), pred, pred, k=1,
                            params=StatisticsParams(cost_margin=0.0, estimator="mean", shrinkage=0.0,
                                                    n_scenarios=2), seed=0)
    assert st.response[0, 1] - st.response[0, 0] == pytest.approx(0.0, abs=0.01)


def _accumulated(labels, t, y, c, ipw, pred_r, pred_c, *, k, params, seed, cuts):
    """The statistics fed to the accumulator in chunks ending at ``cuts``."""
    m = pred_r.shape[1]
    rows = clip_sample_rows(len(t), params, seed)
    pick = slice(None) if rows is None else rows
    acc = StatisticsAccumulator(k=k, n_arms=m, params=params, seed=seed,
                                bands=winsorize_bands(t[pick], y[pick], c[pick], m, params=params))
    for lo, hi in zip([0, *cuts], [*cuts, len(t)]):
        acc.update(labels[lo:hi], t[lo:hi], y[lo:hi], c[lo:hi], ipw[lo:hi], pred_r[lo:hi], pred_c[lo:hi])
    return acc.finalize()


@pytest.mark.parametrize("estimator", ["mean", "winsorize", "median_of_means"])
@pytest.mark.parametrize("cuts", [[], [1], [STAT_BLOCK], [5000, 5001, 20_000, 33_333], list(range(777, 40_000, 777))],
                         ids=["one", "first-row", "block", "uneven", "many"])
def test_accumulating_in_chunks_equals_one_shot_exactly(estimator, cuts):
    """Sums and draws follow fixed blocks of rows, so how the rows are batched changes no bit."""
    labels, t, y, c, _, _ = _world(n=40_000, k=7, outliers=0.02, seed=5)
    rng = np.random.default_rng(1)
    n, m = len(t), 3
    pred_r, pred_c = rng.random((n, m)), rng.random((n, m))
    ipw = rng.uniform(0.5, 2.0, n)
    params = StatisticsParams(cost_margin=0.0, estimator=estimator, n_scenarios=7, clip_sample=10_000)
    one_shot = cluster_statistics(labels, t, y, c, ipw, pred_r, pred_c, k=7, params=params, seed=3)
    chunked = _accumulated(labels, t, y, c, ipw, pred_r, pred_c, k=7, params=params, seed=3, cuts=cuts)
    for f in fields(ClusterStatistics):
        assert np.array_equal(getattr(one_shot, f.name), getattr(chunked, f.name)), f.name
    assert one_shot.counts.sum() == n


def test_winsorize_bands_come_from_a_seeded_sample_above_clip_sample():
    _, t, y, c, _, tc = _world(n=30_000, outliers=0.03)
    m = tc.shape[1]
    small = StatisticsParams(cost_margin=0.0, clip_sample=5000)
    rows = clip_sample_rows(len(t), small, seed=0)
    assert len(rows) == 5000 and np.all(np.diff(rows) > 0)
    assert clip_sample_rows(len(t), StatisticsParams(cost_margin=0.0), seed=0) is None  # every row up to clip_sample
    band = winsorize_bands(t[rows], y[rows], c[rows], m, params=small)[1]
    # the sampled bands still pull the 10x costs back to the typical coupon cost
    assert band[1, 1] < 2.0 and band[1, 2] < 4.0 and np.isinf(band[1, 0])


def _arm_only_world(n=40_000, k=16, m=3, seed=1):
    """Response depends on the arm only; the network is off by an arm-level bias."""
    rng = np.random.default_rng(seed)
    labels, t = rng.integers(0, k, n), rng.integers(0, m, n)
    true_arm = np.array([0.10, 0.14, 0.17])[:m]
    y = (rng.random(n) < true_arm[t]).astype(float)
    pred = np.tile(true_arm + np.array([0.03, -0.02, 0.05])[:m], (n, 1))
    return labels, t, y, pred, np.tile(true_arm, (k, 1))


def test_empirical_bayes_pools_noise_but_keeps_real_differences():
    """Corrections that are pure noise are pooled to the arm; real cluster effects are kept."""
    labels, t, y, pred, truth = _arm_only_world()
    n, k = len(t), truth.shape[0]
    errors = {}
    for pooling in ("empirical_bayes", "rows"):
        st = cluster_statistics(labels, t, y, y, np.ones(n), pred, pred, k=k, seed=0,
                                params=StatisticsParams(cost_margin=0.0, estimator="mean", pooling=pooling,
                                                        shrinkage=0.0, n_scenarios=3))
        errors[pooling] = np.abs(st.response - truth).max()
    # arm-level bias removed by m[j]; per-cell noise (se ~0.008 at 800 rows) pooled away
    assert errors["empirical_bayes"] < 0.5 * errors["rows"]
    assert errors["empirical_bayes"] < 0.01

    labels, t, y, c, tr, _ = _world()  # clusters differ by 0.05: far above the noise
    pred = np.full((len(t), tr.shape[1]), y.mean())
    st = cluster_statistics(labels, t, y, c, np.ones(len(t)), pred, pred, k=4, seed=0,
                            params=StatisticsParams(cost_margin=0.0, estimator="mean", n_scenarios=3))
    raw = cluster_statistics(labels, t, y, c, np.ones(len(t)), pred, pred, k=4, seed=0,
                             params=StatisticsParams(cost_margin=0.0, estimator="mean", pooling="rows",
                                                     shrinkage=0.0, n_scenarios=3))
    np.testing.assert_allclose(st.response, raw.response, atol=0.002)


def test_pooling_weights():
    corr = np.array([[0.0, 0.1], [0.0, -0.1], [5.0, 0.0]])
    se2 = np.array([[0.01, 1e-4], [0.01, 1e-4], [np.inf, 1e-4]])
    lam = pooling_weights(corr, np.zeros(2), se2)
    assert lam[2, 0] == 0.0  # no usable variance: the arm-level value
    assert np.all(lam[:2, 0] == 0.0)  # spread (0) below noise (0.01): pooled completely
    assert np.all((lam[:, 1] > 0.98) & (lam[:, 1] <= 1.0))  # spread 0.0067 >> noise 1e-4


def test_calibrated_prior_trusts_the_network_only_as_far_as_the_rows_bear_it_out():
    rng = np.random.default_rng(3)
    k, m = 200, 2
    base = rng.normal(0.3, 0.05, size=(1, k, m))
    weight = np.full((k, m), 100.0)
    weight[:5] = 0.0  # left out of the fit
    # arm 0: the honest rows follow the network; arm 1: the network's spread is noise
    raw = np.stack([0.02 + base[0, :, 0] + rng.normal(0, 0.005, k), 0.25 + rng.normal(0, 0.005, k)], axis=1)[None]
    prior = calibrated_prior(raw, base, weight)
    slope0 = np.polyfit(base[0, :, 0], prior[0, :, 0], 1)[0]
    assert slope0 == pytest.approx(1.0, abs=0.05)
    assert np.ptp(prior[0, :, 1]) < 0.2 * np.ptp(base[0, :, 1])  # pulled flat, to about the arm's mean
    assert np.mean(prior[0, :, 1]) == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("pooling", ["empirical_bayes", "rows"])
def test_cost_margin_adds_standard_errors_to_every_cost(pooling):
    """The budget side: ``cost_margin`` standard errors on the point and every scenario, responses untouched."""
    labels, t, y, c, _, _ = _world(n=3000)
    n, m = len(t), 3
    pred = np.full((n, m), c.mean())
    common = {"estimator": "mean", "pooling": pooling, "n_scenarios": 4}
    plain = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4, seed=0,
                               params=StatisticsParams(cost_margin=0.0, **common))
    upper = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4, seed=0,
                               params=StatisticsParams(cost_margin=1.5, **common))
    assert (plain.cost_se[:, 1:] > 0).all()
    np.testing.assert_allclose(upper.cost, plain.cost + 1.5 * plain.cost_se, rtol=0, atol=1e-12)
    np.testing.assert_allclose(upper.cost_scenarios, np.maximum(plain.cost_scenarios + 1.5 * plain.cost_se, 0.0),
                               rtol=0, atol=1e-12)
    assert (upper.cost[:, 0] == 0).all()  # control stays free
    np.testing.assert_array_equal(upper.response, plain.response)
    np.testing.assert_array_equal(upper.response_scenarios, plain.response_scenarios)


def test_upward_budget_cost_is_never_below_the_pooled_or_the_raw_cost():
    """``budget_cost: upward`` keeps a cell's own (raw) cost wherever pooling would lower it."""
    labels, t, y, c, _, _ = _world(n=2000)
    n, m = len(t), 3
    pred = np.full((n, m), c.mean())
    common = {"estimator": "mean", "n_scenarios": 3, "cost_margin": 0.0}
    pooled = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4, seed=0,
                                params=StatisticsParams(budget_cost="pooled", **common))
    raw = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4, seed=0,
                             params=StatisticsParams(pooling="rows", shrinkage=0.0, **common))
    up = cluster_statistics(labels, t, y, c, np.ones(n), pred, pred, k=4, seed=0,
                            params=StatisticsParams(budget_cost="upward", **common))
    np.testing.assert_allclose(up.cost, np.maximum(pooled.cost, raw.cost), rtol=0, atol=1e-12)
    assert (up.cost > pooled.cost + 1e-9).any()  # pooling lowered some cell, upward undoes it
