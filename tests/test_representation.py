"""Tests of the multi-task representation network (stage 1) and the shared nn helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from budgetalloc.errors import DataError, PolicyError
from budgetalloc.models import nn, weights
from budgetalloc.models.representation import (
    MultiTaskNet,
    embed,
    load_representation,
    multitask_loss,
    predict_outcomes,
    robust_center_scale,
    save_representation,
    train_representation,
    weight_decay_for,
)
from budgetalloc.params import TrainParams

M = 3
TINY = TrainParams(hidden=16, head_hidden=8, epochs=4, batch_size=256, patience=2)


def _world(n: int, *, seed: int = 0, binary: bool = True):
    """Response depends on x and arm: arm j lifts the logit by ``j * x1`` (only when x1 > 0)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5)).astype(np.float32)
    t = rng.integers(0, M, n)
    arms = np.arange(M)[None, :]
    logit = 1.5 * X[:, :1] + arms * np.maximum(X[:, 1:2], 0) - 0.5
    p = 1 / (1 + np.exp(-logit))  # (n, M) truth
    expected_cost = arms * (1.0 + 0.5 * (X[:, 2:3] > 0)) * np.ones((n, 1))
    y = (rng.random(n) < p[np.arange(n), t]).astype(float) if binary else p[np.arange(n), t] * 10
    cost = expected_cost[np.arange(n), t] * rng.gamma(4.0, 0.25, n)
    return X, t, y, cost, np.ones(n), p, expected_cost


@pytest.fixture(scope="module")
def trained():
    X, t, y, c, w, p, ec = _world(6000)
    params = TrainParams(
        hidden=32, head_hidden=8, epochs=12, batch_size=256, patience=3, learning_rate=5e-3
    )
    model = train_representation(
        X, t, y, c, w, n_arms=M, binary_response=True, params=params, seed=3
    )
    return model, X, p, ec


def test_masked_loss_reaches_only_the_received_arm():
    net = MultiTaskNet(5, hidden=16, head_hidden=8, n_arms=M, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    rng = np.random.default_rng(1)
    batch = {
        "x": jnp.asarray(rng.standard_normal((64, 5)), jnp.float32),
        "arm": jnp.ones(64, jnp.int32),
        "response": jnp.asarray(rng.integers(0, 2, 64), jnp.float32),
        "cost": jnp.asarray(rng.random(64), jnp.float32),
        "weight": jnp.ones(64),
    }

    def loss(p):
        total, weight = multitask_loss(nnx.merge(graphdef, p), batch, binary=True, huber_delta=1.0)
        return total / weight

    towers = jax.grad(loss)(params)["towers"]
    for name in ("w1", "b1", "w2", "b2"):
        g = np.asarray(towers[name][...])
        for task in range(2 * M):  # response towers 0..M-1, cost towers M..2M-1
            if task % M == 1:
                assert np.any(g[task] != 0), (name, task)
            else:
                assert np.all(g[task] == 0), (name, task)


def test_network_learns_per_arm_truth(trained):
    model, X, p, ec = trained
    prob, cost = predict_outcomes(model, X)
    assert prob.shape == cost.shape == (len(X), M)
    assert np.all((prob >= 0) & (prob <= 1)) and np.all(cost >= 0)
    mse_model = np.mean((prob - p) ** 2)
    mse_const = np.mean((p.mean(axis=0) - p) ** 2)
    assert mse_model < 0.3 * mse_const
    for arm in range(M):
        assert np.corrcoef(prob[:, arm], p[:, arm])[0, 1] > 0.9
    lift = prob[:, 2] - prob[:, 0]
    assert np.corrcoef(lift, p[:, 2] - p[:, 0])[0, 1] > 0.7
    assert np.corrcoef(cost[:, 2], ec[:, 2])[0, 1] > 0.5


def test_history_and_progress_callback():
    X, t, y, c, w, *_ = _world(1500)
    seen = []
    model = train_representation(
        X,
        t,
        y,
        c,
        w,
        n_arms=M,
        binary_response=True,
        params=TINY,
        seed=0,
        progress=lambda e, m: seen.append((e, m)),
    )
    assert [e for e, _ in seen] == list(range(1, model.history.epochs_run + 1))
    assert set(seen[0][1]) == {"train_loss", "val_loss"}
    assert model.history.best_val_loss == min(m["val_loss"] for _, m in seen)


def test_early_stopping_stops_before_max_epochs():
    rng = np.random.default_rng(0)  # pure noise: nothing to learn, a big step overfits
    n = 600
    X = rng.standard_normal((n, 5)).astype(np.float32)
    params = TrainParams(
        hidden=64, head_hidden=16, epochs=60, batch_size=32, patience=2, learning_rate=2e-2
    )
    model = train_representation(
        X,
        rng.integers(0, M, n),
        rng.integers(0, 2, n).astype(float),
        rng.random(n),
        np.ones(n),
        n_arms=M,
        binary_response=True,
        params=params,
        seed=0,
    )
    h = model.history
    assert h.stopped_early and h.epochs_run < 60
    assert h.epochs_run == h.best_epoch + params.patience


def test_continuous_response_in_original_units():
    X, t, y, c, w, p, _ = _world(3000, binary=False)
    y = y + 1000.0  # far from zero: the stored centre and scale must bring it back
    model = train_representation(
        X, t, y, c, w, n_arms=M, binary_response=False, params=TINY, seed=0
    )
    response, _ = predict_outcomes(model, X)
    assert abs(response.mean() - y.mean()) < 1.0
    assert np.corrcoef(response[:, 2], p[:, 2])[0, 1] > 0.5


def test_robust_scale_ignores_zeros_and_outliers():
    rng = np.random.default_rng(0)
    cost = np.where(rng.random(10_000) < 0.7, 0.0, rng.uniform(1, 2, 10_000))
    center, scale = robust_center_scale(cost)
    cost[:100] *= 10  # 1% records 10x too large
    assert center == 0.0 and 1.5 < scale < 2.0
    assert abs(robust_center_scale(cost)[1] - scale) < 0.05
    assert robust_center_scale(np.zeros(5)) == (0.0, 1.0)


def test_embed_shape_and_batch_size_invariance(trained):
    model, X, *_ = trained
    h = embed(model, X[:1000])
    assert h.shape == (1000, 32) and h.dtype == np.float32
    np.testing.assert_array_equal(embed(model, X[:1000], batch_size=7), h)
    np.testing.assert_array_equal(embed(model, X[:1000], batch_size=1000), h)
    np.testing.assert_array_equal(embed(model, X[:200]), h[:200])  # a row's bits do not depend on its company
    assert embed(model, X[:0]).shape == (0, 32)


@pytest.mark.parametrize("n", [1, 5, 4096, 4097, 10_000])
def test_inference_batch_size_is_bounded(n):
    size = nn.inference_batch_size(n, 65536)
    assert size >= min(n, 65536) and size < max(n, 1) + nn.INFERENCE_CHUNK
    assert size % nn.INFERENCE_CHUNK == 0


def test_same_seed_same_weights():
    X, t, y, c, w, *_ = _world(1200)
    a, b = (
        train_representation(X, t, y, c, w, n_arms=M, binary_response=True, params=TINY, seed=5)
        for _ in range(2)
    )
    for la, lb in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert a.history == b.history


def test_save_load_round_trip_is_bit_identical(trained, tmp_path):
    model, X, *_ = trained
    save_representation(model, tmp_path / "rep")
    loaded = load_representation(tmp_path / "rep")
    assert loaded.config == model.config and loaded.history == model.history
    np.testing.assert_array_equal(embed(loaded, X), embed(model, X))
    for a, b in zip(predict_outcomes(loaded, X), predict_outcomes(model, X), strict=True):
        np.testing.assert_array_equal(a, b)


def test_edited_weights_are_refused(trained, tmp_path):
    model, *_ = trained
    path = save_representation(model, tmp_path / "rep") / weights.WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(PolicyError, match="checksum"):
        load_representation(tmp_path / "rep")


def test_bad_inputs_raise_data_error():
    X, t, y, c, w, *_ = _world(100)
    with pytest.raises(DataError, match="treatment"):
        train_representation(X, t + 1, y, c, w, n_arms=M, binary_response=True, params=TINY, seed=0)
    X[0, 0] = np.nan
    with pytest.raises(DataError, match="finite"):
        train_representation(X, t, y, c, w, n_arms=M, binary_response=True, params=TINY, seed=0)


def test_default_regularisation_keeps_the_network_from_memorising_noise():
    """Pure-noise labels: the earlier optimiser (no weight decay to speak of, constant 0.002) memorises
    them; the default (decoupled decay 1, cosine from 0.01) keeps training and validation loss close."""
    rng = np.random.default_rng(0)
    n = 600
    X = rng.standard_normal((n, 5)).astype(np.float32)
    t, y, c = rng.integers(0, M, n), rng.integers(0, 2, n).astype(float), rng.random(n)
    gaps, last_val = [], []
    for knobs in ({"weight_decay": 1e-5, "schedule": "constant", "learning_rate": 2e-3}, {}):
        params = TrainParams(hidden=64, head_hidden=16, epochs=40, batch_size=32, patience=40, **knobs)
        h = train_representation(X, t, y, c, np.ones(n), n_arms=M, binary_response=True, params=params,
                                 seed=0).history
        assert h.epochs_run == 40
        gaps.append(h.val_loss[-1] - h.train_loss[-1])
        last_val.append(h.val_loss[-1])
    assert gaps[1] < gaps[0] / 3  # measured: 0.20 against 1.05
    assert last_val[1] < last_val[0]


@pytest.mark.parametrize("rows,expected", [(50_000, 1.0), (200_000, 1.0), (800_000, 0.25), (4_000_000, 0.05)])
def test_weight_decay_is_scaled_down_in_proportion_above_decay_rows(rows, expected):
    """AdamW decays once per step: a trial four times the reference takes four times the steps per
    epoch, so its decay is a quarter, and an epoch shrinks the weights as much as at the reference."""
    assert weight_decay_for(TrainParams(), rows) == pytest.approx(expected)
    assert weight_decay_for(TrainParams(decay_rows=0), rows) == 1.0  # 0: never scaled
