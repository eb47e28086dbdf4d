"""Stage 1: the multi-task representation network, its training and its embeddings.

:class:`MultiTaskNet` is a shared bottom of two dense relu layers ``x -> h(x)``
(the representation clustered in stage 2) and ``2M`` towers on ``h``: response
and cost under each of the ``M`` arms, applied as one ``einsum`` over a task axis.

Invariants: a row is scored only on the towers of the arm it received; rows are
weighted by their propensity weights; a continuous response and the cost are
fitted robustly in scaled units and predictions come back in original units.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from budgetalloc.errors import DataError
from budgetalloc.models import nn, weights
from budgetalloc.params import TrainParams


class TaskTowers(nnx.Module):
    """``n_tasks`` towers ``relu(h W1_t + b1_t) . w2_t + b2_t``, weights stacked on a task axis."""

    def __init__(self, in_dim: int, width: int, n_tasks: int, *, rngs: nnx.Rngs, bias=None):
        stacked = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.w1 = nnx.Param(stacked(rngs.params(), (n_tasks, in_dim, width)))
        self.b1 = nnx.Param(jnp.zeros((n_tasks, width)))
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (n_tasks, width)) / np.sqrt(width))
        self.b2 = nnx.Param(
            jnp.zeros((n_tasks,)) if bias is None else jnp.asarray(bias, jnp.float32)
        )

    def __call__(self, h: jax.Array) -> jax.Array:
        z = jax.nn.relu(jnp.einsum("bh,thk->btk", h, self.w1[...]) + self.b1[...])
        return jnp.einsum("btk,tk->bt", z, self.w2[...]) + self.b2[...]


class MultiTaskNet(nnx.Module):
    """Shared bottom ``d -> hidden -> hidden`` (relu) and 2M towers: response, then cost."""

    def __init__(
        self,
        n_features: int,
        *,
        hidden: int,
        head_hidden: int,
        n_arms: int,
        rngs: nnx.Rngs,
        output_bias=None,
    ):
        self.bottom1 = nnx.Linear(n_features, hidden, rngs=rngs)
        self.bottom2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.towers = TaskTowers(hidden, head_hidden, 2 * n_arms, rngs=rngs, bias=output_bias)
        self.n_arms = n_arms

    def embed(self, x: jax.Array) -> jax.Array:
        """The hidden representation ``h(x)``, ``(b, hidden)``."""
        return jax.nn.relu(self.bottom2(jax.nn.relu(self.bottom1(x))))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Raw outputs ``(response logit or scaled value, scaled cost)``, each ``(b, M)``."""
        out = self.towers(self.embed(x))
        return out[:, : self.n_arms], out[:, self.n_arms :]


@dataclass(frozen=True)
class RepresentationConfig:
    """Shape of the network and the target scaling needed to read its outputs."""

    n_features: int
    hidden: int
    head_hidden: int
    n_arms: int
    binary_response: bool
    response_center: float
    response_scale: float
    cost_center: float
    cost_scale: float

    def build(self, seed: int, output_bias=None) -> MultiTaskNet:
        """A freshly initialised network of this shape."""
        return MultiTaskNet(self.n_features, hidden=self.hidden, head_hidden=self.head_hidden,
                            n_arms=self.n_arms, rngs=nnx.Rngs(seed), output_bias=output_bias)


class RepresentationModel(nn.TrainedNet):
    """A trained representation network (:class:`~budgetalloc.models.nn.TrainedNet`)."""

    kind = "representation"
    config_cls = RepresentationConfig
    config: RepresentationConfig

    @property
    def n_arms(self) -> int:
        """``M``, the number of arms."""
        return self.config.n_arms


def robust_center_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and the 90% quantile of the non-zero absolute deviations from it (1 if none)."""
    center = float(np.median(values))
    deviations = np.abs(values - center)
    nonzero = deviations[deviations > 0]
    scale = float(np.quantile(nonzero, 0.9)) if nonzero.size else 1.0
    return center, scale


def _arm_means(values: np.ndarray, treatment: np.ndarray, weight: np.ndarray, n_arms: int) -> np.ndarray:
    sums = np.bincount(treatment, weights=weight * values, minlength=n_arms)
    counts = np.bincount(treatment, weights=weight, minlength=n_arms)
    overall = np.sum(weight * values) / max(np.sum(weight), 1e-12)
    return np.where(counts > 0, sums / np.maximum(counts, 1e-12), overall)


def _initial_bias(data: dict[str, np.ndarray], n_arms: int, binary: bool) -> np.ndarray:
    arm, w = data["arm"], data["weight"]
    response = _arm_means(data["response"], arm, w, n_arms)
    if binary:
        p = np.clip(response, 1e-4, 1 - 1e-4)
        response = np.log(p / (1 - p))
    return np.concatenate([response, _arm_means(data["cost"], arm, w, n_arms)])


def multitask_loss(module: MultiTaskNet, batch: dict[str, jax.Array], *, binary: bool,
                   huber_delta: float) -> tuple[jax.Array, jax.Array]:
    """Masked multi-task loss ``(sum of weighted row losses, sum of weights)``: each row of
    ``batch`` (``x``, int ``arm``, scaled ``response`` and ``cost``, ``weight``) scores only the
    towers of its own arm; sigmoid cross-entropy for a ``binary`` response, else Huber."""
    response_out, cost_out = module(batch["x"])
    arm = batch["arm"][:, None]
    response_pred = jnp.take_along_axis(response_out, arm, axis=1)[:, 0]
    cost_pred = jnp.take_along_axis(cost_out, arm, axis=1)[:, 0]
    if binary:
        response_loss = optax.sigmoid_binary_cross_entropy(response_pred, batch["response"])
    else:
        response_loss = optax.huber_loss(response_pred, batch["response"], delta=huber_delta)
    cost_loss = optax.huber_loss(cost_pred, batch["cost"], delta=huber_delta)
    weight = batch["weight"]
    return jnp.sum(weight * (response_loss + cost_loss)), jnp.sum(weight)


def _check_inputs(X, treatment, response, cost, weight, n_arms: int) -> None:
    n = X.shape[0] if X.ndim == 2 else -1
    if X.ndim != 2 or n < 2:
        raise DataError(f"features must be a 2-D array of at least 2 rows, got shape {X.shape}")
    for name, v in {"treatment": treatment, "response": response, "cost": cost, "weight": weight}.items():
        if v.shape != (n,):
            raise DataError(f"{name} has shape {v.shape}, expected ({n},)")
    if treatment.min() < 0 or treatment.max() >= n_arms:
        raise DataError(f"treatment must lie in 0..{n_arms - 1}")
    if not (np.isfinite(X).all() and np.isfinite(response).all() and np.isfinite(cost).all()):
        raise DataError("features, response and cost must be finite (impute before training)")
    if not np.isfinite(weight).all() or weight.min() < 0:
        raise DataError("weights must be finite and >= 0")


def weight_decay_for(params: TrainParams, n_rows: int) -> float:
    """``train.weight_decay`` for a network that learns from ``n_rows`` rows: scaled by
    ``decay_rows / n_rows`` above ``train.decay_rows``. AdamW shrinks the weights once per
    step, so at one decay a larger trial's epoch (more steps) shrinks them more; scaled,
    an epoch shrinks them as much as at ``decay_rows`` rows."""
    if params.decay_rows and n_rows > params.decay_rows:
        return params.weight_decay * params.decay_rows / n_rows
    return params.weight_decay


def train_representation(
    X: np.ndarray, treatment: np.ndarray, response: np.ndarray, cost: np.ndarray, weight: np.ndarray, *,
    n_arms: int, binary_response: bool, params: TrainParams, seed: int, progress: nn.Progress | None = None,
) -> RepresentationModel:
    """Train the multi-task network on an RCT (the weights of the best validation epoch).

    Args:
        X: float32 ``(n, d)`` preprocessed features, no NaN.
        treatment: int ``(n,)`` received arm in ``0..n_arms-1``.
        response: ``(n,)`` 0/1 if ``binary_response`` (cross-entropy on a logit), else a
            value (Huber).
        cost: ``(n,)`` cost incurred, ``>= 0``.
        weight: ``(n,)`` propensity weights ``1/(M p(t_i))``, ``M = n_arms``.
        params, seed, progress: the ``train`` section; as for :func:`budgetalloc.models.nn.fit`
            (``seed`` seeds the initialisation too).

    Raises:
        DataError: arrays of the wrong shape, non-finite values or arms out of range.
    """
    X, treatment, response, cost, weight = map(np.asarray, (X, treatment, response, cost, weight))
    _check_inputs(X, treatment, response, cost, weight, n_arms)
    r_center, r_scale = (0.0, 1.0) if binary_response else robust_center_scale(response)
    c_center, c_scale = robust_center_scale(cost)
    config = RepresentationConfig(
        n_features=X.shape[1], hidden=params.hidden, head_hidden=params.head_hidden, n_arms=n_arms,
        binary_response=binary_response, response_center=r_center, response_scale=r_scale,
        cost_center=c_center, cost_scale=c_scale,
    )
    data = {
        "x": np.ascontiguousarray(X, dtype=np.float32),
        "arm": treatment.astype(np.int32),
        "response": ((response - r_center) / r_scale).astype(np.float32),
        "cost": ((cost - c_center) / c_scale).astype(np.float32),
        "weight": weight.astype(np.float32),
    }
    module = config.build(seed, _initial_bias(data, n_arms, binary_response))

    def loss_fn(m, batch):
        return multitask_loss(m, batch, binary=binary_response, huber_delta=params.huber_delta)

    decay = weight_decay_for(params, X.shape[0])
    tx = nn.scheduled(partial(optax.adamw, weight_decay=decay), params.learning_rate, params.schedule)
    graphdef, best, history = nn.fit(module, loss_fn, data, tx=tx, params=params,
                                     val_fraction=params.val_fraction, seed=seed, progress=progress)
    return RepresentationModel(graphdef, best, config, history)


def embed(model: RepresentationModel, X: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
    """The hidden representation ``h(x)``, float32 ``(n, hidden)``, of preprocessed ``X`` ``(n, d)``."""
    return nn.batched_apply(model.graphdef, model.params, X, method="embed", batch_size=batch_size)


def predict_outcomes(model: RepresentationModel, X: np.ndarray, *,
                     batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Expected ``(response, cost)`` of every row of ``X`` under every arm, float64 ``(n, M)``
    each in original units: a probability for a binary response; cost clipped at 0."""
    response_out, cost_out = nn.batched_apply(
        model.graphdef, model.params, X, method="__call__", batch_size=batch_size
    )
    c = model.config
    if c.binary_response:
        response = 1.0 / (1.0 + np.exp(-response_out.astype(np.float64)))
    else:
        response = c.response_center + c.response_scale * response_out.astype(np.float64)
    cost = np.maximum(c.cost_center + c.cost_scale * cost_out.astype(np.float64), 0.0)
    return response, cost


def save_representation(model: RepresentationModel, directory: str | Path) -> Path:
    """Write ``model`` into ``directory`` (:func:`budgetalloc.models.weights.save_model`)."""
    return weights.save_model(model, directory)


def load_representation(directory: str | Path) -> RepresentationModel:
    """Read what :func:`save_representation` wrote, bit for bit (PolicyError if it is not intact)."""
    return weights.load_model(RepresentationModel, directory)


def task_metric(model: RepresentationModel, emb: np.ndarray, *, rank: int = 16, sample: int = 5000,
                seed: int = 0) -> np.ndarray:
    """A float32 ``(hidden, rank)`` projection of ``h`` whose Euclidean distances follow, to
    first order, what the task heads read from it (each arm's uplift and cost; ``docs/design.md``),
    averaged over a seeded ``sample`` of the embeddings ``emb`` ``(n, hidden)``."""
    module, c, m = model.module, model.config, model.config.n_arms

    def outputs(h: jax.Array) -> jax.Array:  # every coupon arm's uplift and cost, in original units
        out = module.towers(h[None])[0]
        response = jax.nn.sigmoid(out[:m]) if c.binary_response else c.response_scale * out[:m]
        return jnp.concatenate([response[1:] - response[0], (c.cost_scale * out[m:])[1:]])

    rng = np.random.default_rng(seed)
    rows = emb if emb.shape[0] <= sample else emb[np.sort(rng.choice(emb.shape[0], sample, replace=False))]
    jac = np.asarray(jax.jit(jax.vmap(jax.jacrev(outputs)))(jnp.asarray(rows)), dtype=np.float64)
    values = np.asarray(jax.jit(jax.vmap(outputs))(jnp.asarray(rows)), dtype=np.float64)
    spread = values.std(axis=0)
    jac /= np.where(spread > 1e-12, spread, 1.0)[None, :, None]
    gram = np.einsum("nop,noq->pq", jac, jac) / jac.shape[0]
    eigval, eigvec = np.linalg.eigh(gram)
    order = np.argsort(eigval)[::-1][: min(rank, gram.shape[0])]
    # Sign-normalise eigenvectors so the projection is reproducible bit for bit.
    vecs = eigvec[:, order]
    vecs *= np.where(vecs[np.argmax(np.abs(vecs), axis=0), np.arange(vecs.shape[1])] < 0, -1.0, 1.0)
    return (vecs * np.sqrt(np.maximum(eigval[order], 0.0))).astype(np.float32)
