"""Tests of the serving student (stage 5)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from budgetalloc.errors import DataError, PolicyError
from budgetalloc.models import nn
from budgetalloc.models.distill import (
    StudentConfig,
    load_student,
    predict_clusters,
    save_student,
    student_loss,
    train_student,
)
from budgetalloc.params import DistillParams

K = 6
TINY = DistillParams(hidden=16, epochs=15, batch_size=256, learning_rate=1e-2, patience=3)


def _clustered(n: int, *, seed: int = 0, spread: float = 0.6, rows_seed: int | None = None):
    """Rows around K well-separated centres in 8 dimensions; labels are the centres.

    ``seed`` fixes the world (the centres); ``rows_seed`` draws other rows of it.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((K, 8)) * 3
    if rows_seed is not None:
        rng = np.random.default_rng(rows_seed)
    labels = rng.integers(0, K, n)
    X = (centres[labels] + spread * rng.standard_normal((n, 8))).astype(np.float32)
    return X, labels, centres


@pytest.fixture(scope="module")
def student():
    X, labels, _ = _clustered(4000)
    return train_student(X, labels, n_clusters=K, params=TINY, seed=1), X, labels


def test_student_agrees_with_teacher(student):
    model, X, labels = student
    X_new, labels_new, _ = _clustered(2000, seed=0, rows_seed=99)  # same world, new rows
    assert np.mean(predict_clusters(model, X) == labels) > 0.95
    assert np.mean(predict_clusters(model, X_new) == labels_new) > 0.95


def test_soft_targets_train_too():
    X, labels, centres = _clustered(3000, seed=2)
    d2 = ((X[:, None, :] - centres[None]) ** 2).sum(-1)
    soft = np.exp(-(d2 - d2.min(1, keepdims=True)) / 4.0)
    soft /= soft.sum(1, keepdims=True)
    model = train_student(X, labels, n_clusters=K, params=TINY, seed=0, soft_targets=soft)
    assert np.mean(predict_clusters(model, X) == labels) > 0.95


def test_predictions_are_int32_and_batch_size_invariant(student):
    model, X, _ = student
    y = predict_clusters(model, X)
    assert y.dtype == np.int32 and y.shape == (len(X),)
    np.testing.assert_array_equal(predict_clusters(model, X, batch_size=7), y)
    np.testing.assert_array_equal(predict_clusters(model, X, batch_size=1000), y)
    assert predict_clusters(model, X[:0]).shape == (0,)


def test_progress_and_early_stopping():
    X, labels, _ = _clustered(1000, spread=4.0)  # overlapping: the validation loss turns up
    seen = []
    params = DistillParams(hidden=64, epochs=80, batch_size=32, learning_rate=2e-2, patience=2)
    model = train_student(
        X, labels, n_clusters=K, params=params, seed=0, progress=lambda e, m: seen.append(m)
    )
    assert model.history.stopped_early and model.history.epochs_run == len(seen) < 80
    assert set(seen[0]) == {"train_loss", "val_loss"}


def test_same_seed_same_student():
    X, labels, _ = _clustered(1500, seed=3)
    a, b = (train_student(X, labels, n_clusters=K, params=TINY, seed=7) for _ in range(2))
    for la, lb in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    c = train_student(X, labels, n_clusters=K, params=TINY, seed=8)
    assert not np.array_equal(
        np.asarray(jax.tree.leaves(a.params)[0]), np.asarray(jax.tree.leaves(c.params)[0])
    )


def test_save_load_round_trip_is_bit_identical(student, tmp_path):
    model, X, _ = student
    save_student(model, tmp_path / "student")
    loaded = load_student(tmp_path / "student")
    assert loaded.config == model.config and loaded.n_clusters == K
    np.testing.assert_array_equal(predict_clusters(loaded, X), predict_clusters(model, X))
    logits = nn.batched_apply(model.graphdef, model.params, X, method="__call__", batch_size=512)
    logits_loaded = nn.batched_apply(
        loaded.graphdef, loaded.params, X, method="__call__", batch_size=512
    )
    np.testing.assert_array_equal(logits_loaded, logits)


def test_wrong_artifact_kind_is_refused(student, tmp_path):
    from budgetalloc.models.representation import load_representation

    save_student(student[0], tmp_path / "student")
    with pytest.raises(PolicyError, match="not a representation"):
        load_representation(tmp_path / "student")
    with pytest.raises(PolicyError, match="cannot read"):
        load_student(tmp_path / "missing")


def test_bad_labels_raise_data_error():
    X, labels, _ = _clustered(100)
    with pytest.raises(DataError, match="labels"):
        train_student(X, labels + K, n_clusters=K, params=TINY, seed=0)
    with pytest.raises(DataError, match="soft_targets"):
        train_student(X, labels, n_clusters=K, params=TINY, seed=0, soft_targets=np.ones((100, 2)))


def test_a_schedule_spans_every_step_of_the_run():
    """A ``tx`` factory gets the run's step count; a learning rate of 0 leaves the weights as they were."""
    X, labels, _ = _clustered(1000)
    steps = []

    def frozen(total):
        steps.append(total)
        return optax.sgd(0.0)

    module = StudentConfig(n_features=8, hidden=16, n_clusters=K).build(0)
    before = jax.tree.map(np.asarray, nnx.state(module, nnx.Param))
    data = {"x": X, "label": labels.astype(np.int32), "weight": np.ones(len(X), np.float32)}
    _, after, _ = nn.fit(module, student_loss, data, tx=frozen, params=DistillParams(epochs=3, batch_size=64),
                         val_fraction=0.1, seed=0)
    assert steps == [3 * 15]  # 900 training rows in batches of 64: 15 steps an epoch
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def test_cosine_schedule_trains_the_student():
    X, labels, _ = _clustered(4000)
    cosine = train_student(X, labels, n_clusters=K, params=TINY.model_copy(update={"schedule": "cosine"}), seed=1)
    assert np.mean(predict_clusters(cosine, X) == labels) > 0.95
