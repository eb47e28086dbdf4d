"""Stage 1: the multi-task representation network, its training and its embeddings.

:class:`MultiTaskNet` is a shared bottom of two dense relu layers ``x -> h(x)``
(the representation clustered in stage 2) and ``2M`` towers on ``h``: response
and cost under each of the ``M`` arms, applied as one ``einsum`` over a task axis.

Invariants: a row is scored only on the towers of the arm it received (no
gradient to the arms it did not); rows are weighted by their propensity weights;
a continuous response and the cost are fitted robustly in scaled units and
predictions come back in original units. Training is
:func:`budgetalloc.models.nn.fit`. Why: ``docs/design.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from budgetalloc.errors import DataError
from budgetalloc.models import nn, weights
from budgetalloc.params import TrainParams

KIND = "representation"


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


class RepresentationModel(nn.TrainedNet):
    """A trained representation network (:class:`~budgetalloc.models.nn.TrainedNet`)."""

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


def _arm_means(
    values: np.ndarray, treatment: np.ndarray, weight: np.ndarray, n_arms: int
) -> np.ndarray:
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


def multitask_loss(
    module: MultiTaskNet, batch: dict[str, jax.Array], *, binary: bool, huber_delta: float
) -> tuple[jax.Array, jax.Array]:
    """Masked multi-task loss: each row scores only the towers of its own arm.

    Args:
        module: the network.
        batch: ``x``, ``arm`` (int), ``response`` and ``cost`` (already scaled), ``weight``.
        binary: sigmoid cross-entropy for the response instead of Huber.
        huber_delta: Huber threshold in scaled units.

    Returns:
        ``(sum of weighted row losses, sum of weights)``.
    """
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
    for name, v in (
        ("treatment", treatment),
        ("response", response),
        ("cost", cost),
        ("weight", weight),
    ):
        if v.shape != (n,):
            raise DataError(f"{name} has shape {v.shape}, expected ({n},)")
    if treatment.min() < 0 or treatment.max() >= n_arms:
        raise DataError(f"treatment must lie in 0..{n_arms - 1}")
    if not (np.isfinite(X).all() and np.isfinite(response).all() and np.isfinite(cost).all()):
        raise DataError("features, response and cost must be finite (impute before training)")
    if not np.isfinite(weight).all() or weight.min() < 0:
        raise DataError("weights must be finite and >= 0")


def _config_and_data(
    X, treatment, response, cost, weight, *, n_arms: int, binary: bool, params: TrainParams
) -> tuple[RepresentationConfig, dict[str, np.ndarray]]:
    r_center, r_scale = (0.0, 1.0) if binary else robust_center_scale(response)
    c_center, c_scale = robust_center_scale(cost)
    config = RepresentationConfig(
        n_features=X.shape[1],
        hidden=params.hidden,
        head_hidden=params.head_hidden,
        n_arms=n_arms,
        binary_response=binary,
        response_center=r_center,
        response_scale=r_scale,
        cost_center=c_center,
        cost_scale=c_scale,
    )
    data = {
        "x": np.ascontiguousarray(X, dtype=np.float32),
        "arm": treatment.astype(np.int32),
        "response": ((response - r_center) / r_scale).astype(np.float32),
        "cost": ((cost - c_center) / c_scale).astype(np.float32),
        "weight": weight.astype(np.float32),
    }
    return config, data


def _build(config: RepresentationConfig, seed: int, output_bias=None) -> MultiTaskNet:
    return MultiTaskNet(
        config.n_features,
        hidden=config.hidden,
        head_hidden=config.head_hidden,
        n_arms=config.n_arms,
        rngs=nnx.Rngs(seed),
        output_bias=output_bias,
    )


def train_representation(
    X: np.ndarray,
    treatment: np.ndarray,
    response: np.ndarray,
    cost: np.ndarray,
    weight: np.ndarray,
    *,
    n_arms: int,
    binary_response: bool,
    params: TrainParams,
    seed: int,
    progress: nn.Progress | None = None,
) -> RepresentationModel:
    """Train the multi-task network on an RCT.

    Args:
        X: float32 ``(n, d)`` preprocessed features, no NaN.
        treatment: int ``(n,)`` received arm in ``0..n_arms-1``.
        response: ``(n,)`` 0/1 if ``binary_response`` else a continuous value.
        cost: ``(n,)`` cost incurred, ``>= 0``.
        weight: ``(n,)`` propensity weights ``1/(M p(t_i))``.
        n_arms: number of arms ``M``.
        binary_response: cross-entropy on a logit instead of Huber on a value.
        params: the ``train`` section of params.yaml.
        seed: seeds the initialisation, the validation split and the shuffles.
        progress: called after every epoch with ``(epoch, {"train_loss", "val_loss"})``.

    Returns:
        The trained :class:`RepresentationModel` (weights of the best validation epoch).

    Raises:
        DataError: arrays of the wrong shape, non-finite values or arms out of range.
    """
    X, treatment, response, cost, weight = map(np.asarray, (X, treatment, response, cost, weight))
    _check_inputs(X, treatment, response, cost, weight, n_arms)
    config, data = _config_and_data(
        X, treatment, response, cost, weight, n_arms=n_arms, binary=binary_response, params=params
    )
    module = _build(config, seed, _initial_bias(data, n_arms, binary_response))

    def loss_fn(m, batch):
        return multitask_loss(m, batch, binary=binary_response, huber_delta=params.huber_delta)

    graphdef, best, history = nn.fit(
        module,
        loss_fn,
        data,
        tx=optax.adamw(params.learning_rate, weight_decay=params.weight_decay),
        epochs=params.epochs,
        batch_size=params.batch_size,
        patience=params.patience,
        val_fraction=params.val_fraction,
        seed=seed,
        progress=progress,
    )
    return RepresentationModel(graphdef, best, config, history)


def embed(model: RepresentationModel, X: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
    """The hidden representation ``h(x)`` of every row.

    Args:
        model: a trained model.
        X: float32 ``(n, d)`` preprocessed features.
        batch_size: rows per compiled call (the last batch is padded).

    Returns:
        float32 ``(n, hidden)``.
    """
    return nn.batched_apply(model.graphdef, model.params, X, method="embed", batch_size=batch_size)


def predict_outcomes(
    model: RepresentationModel, X: np.ndarray, *, batch_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Expected response and cost of every row under every arm, in original units.

    Args:
        model: a trained model.
        X: float32 ``(n, d)`` preprocessed features.
        batch_size: rows per compiled call.

    Returns:
        ``(response, cost)``, float64 ``(n, M)`` each; the response is a probability
        when it is binary; cost is clipped at 0 (costs are non-negative by contract).
    """
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
    """Write the representation model as ``weights.msgpack`` + ``config.json`` (no pickle).

    Returns:
        The directory.
    """
    return weights.save_model(directory, kind=KIND, net=model)


def load_representation(directory: str | Path) -> RepresentationModel:
    """Read a model written by :func:`save_representation`; outputs are bit-identical.

    Raises:
        PolicyError: files missing, edited, or not matching their configuration.
    """
    return weights.load_model(directory, kind=KIND, cls=RepresentationModel,
                              config_cls=RepresentationConfig, build=lambda c: _build(c, 0))


def _decision_outputs(model: RepresentationModel):
    """``h -> (uplift of every coupon arm, cost of every coupon arm)`` in original units."""
    module, c, m = model.module, model.config, model.config.n_arms

    def outputs(h: jax.Array) -> jax.Array:
        out = module.towers(h[None])[0]
        if c.binary_response:
            response = jax.nn.sigmoid(out[:m])
        else:
            response = c.response_scale * out[:m]
        cost = c.cost_scale * out[m:]
        return jnp.concatenate([response[1:] - response[0], cost[1:]])

    return outputs


def task_metric(model: RepresentationModel, emb: np.ndarray, *, rank: int = 16, sample: int = 5000,
                seed: int = 0) -> np.ndarray:
    """A projection of ``h`` whose Euclidean distances follow what the task heads read from it.

    With ``J(h)`` the Jacobian of the decision outputs (each arm's uplift over control
    and each arm's cost, every output divided by its spread across users) with respect
    to ``h``, the metric is ``G = E[J^T J]``; the projection keeps its top ``rank``
    eigenvectors scaled by the square roots of their eigenvalues, so that
    ``|P^T (h - h')|^2 ~ |outputs(h) - outputs(h')|^2`` to first order.

    Args:
        model: the trained network.
        emb: ``(n, hidden)`` embeddings of training users (a seeded sample is used).
        rank: number of metric directions kept.
        sample: users averaged over.
        seed: sampling seed.

    Returns:
        float32 ``(hidden, rank)`` projection.
    """
    rng = np.random.default_rng(seed)
    rows = emb if emb.shape[0] <= sample else emb[np.sort(rng.choice(emb.shape[0], sample, replace=False))]
    outputs = _decision_outputs(model)
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
