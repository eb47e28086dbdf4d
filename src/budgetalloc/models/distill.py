"""Stage 5: the serving student, a small classifier from raw features to cluster id.

Serving is one forward pass of :class:`StudentNet` (``d -> hidden -> K``, one
wide relu layer) and an ``argmax``: no representation network, no k-means, no
solver on the hot path. Targets are the teacher's hard cluster labels, or soft
targets from centroid distances.

Invariant: prediction uses a fixed batch shape (the last batch padded), so
serving never recompiles; labels are int32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from budgetalloc.data.blocks import padded
from budgetalloc.errors import DataError
from budgetalloc.models import nn, weights
from budgetalloc.params import DistillParams


class StudentNet(nnx.Module):
    """``d -> hidden`` (relu) ``-> K``: cluster logits from one wide hidden layer."""

    def __init__(self, n_features: int, *, hidden: int, n_clusters: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(n_features, hidden, rngs=rngs)
        self.logits = nnx.Linear(hidden, n_clusters, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Cluster logits ``(b, K)``."""
        return self.logits(jax.nn.relu(self.hidden(x)))

    def classify(self, x: jax.Array) -> jax.Array:
        """The most likely cluster, int32 ``(b,)``."""
        return jnp.argmax(self(x), axis=-1).astype(jnp.int32)


@dataclass(frozen=True)
class StudentConfig:
    """Shape of the student."""

    n_features: int
    hidden: int
    n_clusters: int

    def build(self, seed: int) -> StudentNet:
        """A freshly initialised student of this shape."""
        return StudentNet(self.n_features, hidden=self.hidden, n_clusters=self.n_clusters, rngs=nnx.Rngs(seed))


class StudentModel(nn.TrainedNet):
    """A trained student (:class:`~budgetalloc.models.nn.TrainedNet`)."""

    kind = "student"
    config_cls = StudentConfig
    config: StudentConfig

    @property
    def n_clusters(self) -> int:
        """``K``, the number of classes."""
        return self.config.n_clusters


def student_loss(module: StudentNet, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Weighted softmax cross-entropy ``(loss_sum, weight_sum)`` on integer ``label`` s, or on
    ``target`` distributions when the batch has them."""
    logits = module(batch["x"])
    if "target" in batch:
        ce = optax.softmax_cross_entropy(logits, batch["target"])
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.sum(batch["weight"] * ce), jnp.sum(batch["weight"])


def _student_data(X, labels, soft_targets, n_clusters: int) -> dict[str, np.ndarray]:
    X, labels = np.asarray(X), np.asarray(labels)
    if X.ndim != 2 or X.shape[0] < 2 or labels.shape != (X.shape[0],):
        raise DataError(f"need X (n >= 2, d) and labels (n,), got {X.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= n_clusters or not np.isfinite(X).all():
        raise DataError(f"labels must lie in 0..{n_clusters - 1} and X must be finite")
    data = {"x": np.ascontiguousarray(X, dtype=np.float32), "weight": np.ones(X.shape[0], np.float32)}
    if soft_targets is None:
        data["label"] = labels.astype(np.int32)
    else:
        if np.shape(soft_targets) != (X.shape[0], n_clusters):
            raise DataError(f"soft_targets must have shape {(X.shape[0], n_clusters)}")
        data["target"] = np.asarray(soft_targets, dtype=np.float32)
    return data


def train_student(
    X: np.ndarray, labels: np.ndarray, *, n_clusters: int, params: DistillParams, seed: int,
    soft_targets: np.ndarray | None = None, val_fraction: float = 0.1, progress: nn.Progress | None = None,
) -> StudentModel:
    """Distil the teacher's cluster assignment into a small classifier (best validation epoch).

    Args:
        X: float32 ``(n, d)`` preprocessed features (the serving input).
        labels: int ``(n,)`` teacher clusters in ``0..n_clusters-1`` (the targets unless
            ``soft_targets``, an ``(n, K)`` distribution per row, are given).
        params, seed, val_fraction, progress: the ``distill`` section; as for
            :func:`budgetalloc.models.nn.fit` (``seed`` seeds the initialisation too).

    Raises:
        DataError: arrays of the wrong shape or labels out of range.
    """
    data = _student_data(X, labels, soft_targets, n_clusters)
    config = StudentConfig(n_features=data["x"].shape[1], hidden=params.hidden, n_clusters=n_clusters)
    tx = nn.scheduled(optax.adam, params.learning_rate, params.schedule)
    graphdef, best, history = nn.fit(config.build(seed), student_loss, data, tx=tx, params=params,
                                     val_fraction=val_fraction, seed=seed, progress=progress)
    return StudentModel(graphdef, best, config, history)


def predict_clusters(student: StudentModel, X: np.ndarray, *, batch_size: int = 262144) -> np.ndarray:
    """The student's int32 cluster for every row of preprocessed ``X`` ``(n, d)``."""
    return nn.batched_apply(student.graphdef, student.params, X, method="classify", batch_size=batch_size)


def fixed_shape_clusters(student: StudentModel, X: np.ndarray, rows: int) -> np.ndarray:
    """The student's clusters for ``X`` (at most ``rows`` rows), always run as ``rows`` rows."""
    return predict_clusters(student, padded(X, rows), batch_size=rows)[: X.shape[0]]


def save_student(student: StudentModel, directory: str | Path) -> Path:
    """Write ``student`` into ``directory`` (:func:`budgetalloc.models.weights.save_model`)."""
    return weights.save_model(student, directory)


def load_student(directory: str | Path) -> StudentModel:
    """Read what :func:`save_student` wrote, bit for bit (PolicyError if it is not intact)."""
    return weights.load_model(StudentModel, directory)
