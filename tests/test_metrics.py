"""Tests of budgetalloc.serve.metrics: hand-computed examples, simulated trials."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetalloc.errors import DataError
from budgetalloc.serve import metrics as m

# ----------------------------------------------------------------------------- IPS
# Six rows, three arms. Policy matches rows 0, 2, 4 (t == pi); the others drop out.
T6 = np.array([0, 0, 1, 1, 2, 2])
P6 = np.array([0.5, 0.5, 0.25, 0.25, 0.25, 0.25])
Y6 = np.array([1.0, 0.0, 2.0, 1.0, 3.0, 0.0])
C6 = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
PI6 = np.array([0, 1, 1, 2, 2, 0])


def test_ips_value_hand_computed():
    e = m.ips_value(PI6, T6, Y6, C6, P6)
    # response terms y*1[t=pi]/p = [1/.5, 0, 2/.25, 0, 3/.25, 0] = [2, 0, 8, 0, 12, 0]
    # mean 22/6; deviations (-5, -11, 13, -11, 25, -11)/3, squares sum 1182/9
    # var (ddof 1) = 1182/45, SE = sqrt(1182/45/6)
    assert e.response == pytest.approx(22 / 6, abs=1e-12)
    assert e.response_se == pytest.approx(np.sqrt(1182 / 45 / 6), abs=1e-12)
    # cost terms [0, 0, 1/.25, 0, 2/.25, 0] = [0, 0, 4, 0, 8, 0]: mean 2,
    # squared deviations 4+4+4+4+36+4 = 56, var 56/5, SE = sqrt(56/5/6)
    assert e.cost == pytest.approx(2.0, abs=1e-12)
    assert e.cost_se == pytest.approx(np.sqrt(56 / 30), abs=1e-12)
    assert e.response_lo == pytest.approx(22 / 6 - m.Z_95 * e.response_se)
    assert e.cost_hi == pytest.approx(2.0 + m.Z_95 * e.cost_se)
    assert (e.n, e.self_normalized) == (6, False)


def test_ips_value_hand_computed_variants():
    # Self-normalised: weights 1[t=pi]/p = [2, 0, 4, 0, 4, 0], sum 10;
    # sum w y = 2 + 8 + 12 = 22 -> 2.2; sum w c = 4 + 8 = 12 -> 1.2.
    e = m.ips_value(PI6, T6, Y6, C6, P6, self_normalized=True)
    assert (e.response, e.cost) == (pytest.approx(2.2), pytest.approx(1.2))
    # Default propensity: every arm has 2 of 6 rows, p = 1/3, weights 3 on matches:
    # response (3*1 + 3*2 + 3*3)/6 = 3, cost (3*1 + 3*2)/6 = 1.5.
    e = m.ips_value(PI6, T6, Y6, C6)
    assert (e.response, e.cost) == (pytest.approx(3.0), pytest.approx(1.5))


def _rct(seed: int, n: int, probs=(0.5, 0.3, 0.2)):
    """A 3-arm trial with known per-user means mu (n, M) and cost means kappa."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=n)
    arms = np.arange(len(probs))
    mu = 0.2 + 0.3 * x[:, None] * np.sqrt(arms)[None, :]
    kappa = arms[None, :] * (0.5 + x[:, None])
    t = rng.choice(len(probs), size=n, p=probs)
    y = rng.binomial(1, mu[np.arange(n), t]).astype(float)
    c = kappa[np.arange(n), t] * rng.uniform(0.5, 1.5, size=n)
    return x, t, np.asarray(probs)[t], y, c, mu, kappa


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("self_normalized", [False, True])
def test_ips_value_unbiased_on_simulated_rct(seed, self_normalized):
    x, t, p, y, c, mu, kappa = _rct(seed, 40_000)
    policy = np.where(x > 0.6, 2, np.where(x > 0.3, 1, 0))
    e = m.ips_value(policy, t, y, c, p, self_normalized=self_normalized)
    rows = np.arange(len(t))
    assert abs(e.response - mu[rows, policy].mean()) < 4 * e.response_se
    assert abs(e.cost - kappa[rows, policy].mean()) < 4 * e.cost_se


@pytest.mark.parametrize("bad", [
    {"treatment": [0, 1, -1]},
    {"propensity": [0.5, 0.0, 0.5]},
    {"response": [1.0, 2.0]},
])
def test_ips_value_rejects_bad_inputs(bad):
    args = {"policy_arm": [0, 1, 1], "treatment": [0, 1, 1], "response": [1.0, 0.0, 1.0],
                "cost": [0.0, 1.0, 1.0], "propensity": None} | bad
    with pytest.raises(DataError):
        m.ips_value(**args)


# ----------------------------------------------------------------------------- AUCC
def aucc(score, t, y, c, **kw):
    """The binary AUCC: every user's recommended arm is 1."""
    return m.multi_arm_aucc(score, np.ones(len(t), int), t, y, c, **kw)


def binary_curve(score, t, y, c, n_bins):
    """The unweighted binary cost curve (treated = arm 1, control = arm 0)."""
    t = np.asarray(t)
    return m._cost_curve(np.asarray(score, float), (t == 1) * 1.0, (t == 0) * 1.0, y, c, n_bins)


# Eight users, already in score order; treated cost 1, control 0.
S8 = np.arange(8, 0, -1, dtype=float)
T8 = np.array([1, 0, 1, 0, 1, 0, 1, 0])
Y8 = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
C8 = T8.astype(float)


def test_aucc_hand_computed_every_row():
    # k=1 has no control row: skipped. For k = 2..8 (mean_T y - mean_C y) * k:
    #   2, 3, 4, 10/3, 4, 21/4, (3/4 - 1/4) * 8 = 4; cost: k (mean_T c = 1, mean_C c = 0).
    # Normalised by (4, 8): points (0,0) (2/8,1/2) (3/8,3/4) (4/8,1) (5/8,5/6) (6/8,1)
    # (7/8,21/16) (1,1). Trapezoids: 1/16 + 5/64 + 7/64 + 11/96 + 11/96 + 37/256 + 37/256
    # = (48 + 144 + 176 + 222)/768 = 295/384.
    x, y = binary_curve(S8, T8, Y8, C8, n_bins=None)
    np.testing.assert_allclose(x, [0, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1])
    np.testing.assert_allclose(y, [0, 1 / 2, 3 / 4, 1, 5 / 6, 1, 21 / 16, 1])
    assert aucc(S8, T8, Y8, C8, n_bins=None) == pytest.approx(295 / 384, abs=1e-12)


def test_aucc_hand_computed_quartiles():
    # n_bins=4 cuts at k = 2, 4, 6, 8: points (0,0) (1/4,1/2) (1/2,1) (3/4,1) (1,1);
    # area 1/16 + 3/16 + 1/4 + 1/4 = 3/4.
    assert aucc(S8, T8, Y8, C8, n_bins=4) == pytest.approx(0.75, abs=1e-12)


def test_aucc_constant_score_is_diagonal():
    # one tie group: the only cut is the whole population, curve (0,0)-(1,1).
    assert aucc(np.ones(8), T8, Y8, C8) == pytest.approx(0.5, abs=1e-12)


def test_aucc_undefined_without_positive_increment():
    assert np.isnan(aucc(S8, T8, np.zeros(8), C8))


def _binary_roi_world(seed: int, n: int = 40_000):
    """Binary trial: incremental ROI = x, treated cost heterogeneous in (0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=n)
    unit_cost = rng.uniform(0.5, 1.5, size=n)
    t = rng.integers(0, 2, size=n)
    y = rng.binomial(1, 0.1 + t * 0.5 * x * unit_cost).astype(float)
    return x, t, y, t * unit_cost, rng


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aucc_random_near_half_true_roi_higher(seed):
    x, t, y, c, rng = _binary_roi_world(seed)
    random_auc = aucc(rng.uniform(size=len(t)), t, y, c)
    true_auc = aucc(x, t, y, c)
    assert abs(random_auc - 0.5) < 0.1
    assert true_auc > 0.6 and true_auc > random_auc + 0.1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 60), n_bins=st.sampled_from([None, 3, 10]))
def test_multi_arm_aucc_equals_aucc_for_two_arms(seed, n, n_bins):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 5, size=n).astype(float)  # many ties
    t = np.r_[0, 1, rng.integers(0, 2, size=n - 2)]
    y, c = rng.normal(1.0, 1.0, size=n), t * rng.uniform(0.5, 1.5, size=n)
    binary = np.trapezoid(*binary_curve(score, t, y, c, n_bins)[::-1])
    for p in (None, np.where(t == 1, 0.3, 0.7)):  # any propensity constant per arm
        multi = m.multi_arm_aucc(score, np.ones(n, int), t, y, c, p, n_bins=n_bins)
        np.testing.assert_allclose(multi, binary, rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 60))
def test_aucc_invariant_to_row_order(seed, n):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 4, size=n).astype(float)
    t = np.r_[0, 1, rng.integers(0, 2, size=n - 2)]
    y, c = rng.uniform(size=n), t * rng.uniform(size=n)
    perm = rng.permutation(n)
    a, b = aucc(score, t, y, c), aucc(score[perm], t[perm], y[perm], c[perm])
    # summation order changes the last bits; degenerate tiny samples can give large |AUCC|
    assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_multi_arm_aucc_ranks_true_roi_above_random():
    _x, t, p, y, c, mu, kappa = _rct(3, 60_000)
    rec = np.full(len(t), 2)
    roi = (mu[:, 2] - mu[:, 0]) / kappa[:, 2]
    rng = np.random.default_rng(0)
    true_auc = m.multi_arm_aucc(roi, rec, t, y, c, p)
    random_auc = m.multi_arm_aucc(rng.uniform(size=len(t)), rec, t, y, c, p)
    assert abs(random_auc - 0.5) < 0.1 and true_auc > random_auc + 0.05
    with pytest.raises(DataError):
        m.multi_arm_aucc(roi, np.zeros(len(t), int), t, y, c, p)


# ----------------------------------------------------------------- multi-arm Qini
def test_multi_arm_qini_starts_at_zero_and_tracks_truth():
    x, t, p, y, c, mu, kappa = _rct(4, 40_000)
    n = len(t)
    path = [np.zeros(n, int), np.where(x > 0.5, 1, 0), np.where(x > 0.5, 2, 1), np.full(n, 2)]
    q = m.multi_arm_qini(path, t, y, c, p)
    assert q.gain[0] == 0.0 and q.spend[0] == 0.0 and q.gain_se[0] == 0.0
    rows = np.arange(n)
    for b, arm in enumerate(path[1:], start=1):
        true_gain = (mu[rows, arm] - mu[:, 0]).mean()
        true_spend = (kappa[rows, arm] - kappa[:, 0]).mean()
        assert abs(q.gain[b] - true_gain) < 4 * q.gain_se[b]
        assert abs(q.spend[b] - true_spend) < 4 * q.spend_se[b]
    # the gain equals the difference of the two IPS values
    full = m.ips_value(path[-1], t, y, c, p).response - m.ips_value(path[0], t, y, c, p).response
    assert q.gain[-1] == pytest.approx(full, abs=1e-12)


@pytest.mark.parametrize("max_spend, expected", [
    (3.0, 1.0 + 2.5 + 3.0),   # (0,0)-(1,2): 1; (1,2)-(2,3): 2.5; flat at 3 until 3: 3
    (1.5, 1.0 + 1.125),       # half of the second segment: 0.5 * (2 + 2.5) / 2
    (0.5, 0.25),              # 0.5 * (0 + 1) / 2
])
def test_qini_path_area_hand_computed(max_spend, expected):
    # points given out of order: the curve is sorted by spend
    assert m.qini_path_area([2.0, 1.0], [3.0, 2.0], max_spend=max_spend) == pytest.approx(expected)


def test_qini_path_area_rejects_nonpositive_limit():
    with pytest.raises(DataError, match="max_spend"):
        m.qini_path_area([1.0], [1.0], max_spend=0.0)


# ----------------------------------------------------------------------------- matched spend
def test_uplift_at_spend_hand_computed():
    # path (0, 0), (2, 1), (4, 3), (6, 2): at 1 half of 1, at 3 between 1 and 3, at 5 between 3 and 2,
    # at 8 past the path's largest spend: held at 2
    got = m.uplift_at_spend([4.0, 2.0, 6.0], [3.0, 1.0, 2.0], [0.0, 1.0, 3.0, 5.0, 8.0])
    np.testing.assert_allclose(got, [0.0, 0.5, 2.0, 2.5, 2.0], atol=1e-12)
    # two allocations with the same spend 2 (uplifts 1 and 3) count as their mean, 2
    got = m.uplift_at_spend([2.0, 2.0, 4.0], [1.0, 3.0, 5.0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(got, [1.0, 2.0, 3.5], atol=1e-12)


def test_matched_capture_hand_computed():
    got = m.matched_capture([2.0, 4.0, 6.0], [1.0, 3.0, 2.0], [1.0, 3.0, 5.0], [1.0, 4.0, 0.0])
    np.testing.assert_allclose(got[:2], [0.5, 0.5], atol=1e-12)
    assert np.isnan(got[2])  # the oracle gains nothing there


def test_uplift_at_spend_rejects_negative_spend():
    with pytest.raises(DataError, match="uplift_at_spend"):
        m.uplift_at_spend([-1.0], [0.0], [1.0])
