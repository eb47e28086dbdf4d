"""The networks of DRM, DRP and DFCL: an MLP, the outcome net, and a fixed-epoch trainer.

Training runs on the one loop of :mod:`budgetalloc.models.nn` (a pure
``train_step``, one jitted ``lax.scan`` per epoch over row indices drawn in numpy
from the seed), with AdamW for a fixed number of epochs and no validation split:
the epochs are a size knob. Every batch is full (the rows left after the last full
batch sit out that epoch; a new permutation gives them their turn), because DRM's
group-softmax loss is a ratio of batch sums that padded rows would distort. The
same seed gives the same weights bit for bit on the same machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from budgetalloc.models import nn

#: ``loss_fn(module, batch) -> scalar`` (a dict of ``(batch_size, ...)`` arrays).
LossFn = Callable[[nnx.Module, dict[str, jax.Array]], jax.Array]

_PREDICT_CHUNK = 65536


class MLP(nnx.Module):
    """``depth`` relu layers of ``hidden`` units, then a linear map to ``n_out`` outputs."""

    def __init__(self, n_in: int, n_out: int, *, hidden: int, depth: int, rngs: nnx.Rngs):
        sizes = [n_in] + [hidden] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.out = nnx.Linear(sizes[-1], n_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.out(x)


def train(
    module: nnx.Module,
    loss_fn: LossFn,
    data: dict[str, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
) -> tuple[nnx.GraphDef, nnx.State, list[float]]:
    """Minibatch AdamW for a fixed number of epochs, on :mod:`budgetalloc.models.nn`'s loop.

    Every batch is full: the rows left after the last full batch sit out that epoch.

    Args:
        module: the initialised network (left unchanged).
        loss_fn: ``(module, batch) -> scalar loss``.
        data: equal-length arrays (rows on the first axis).
        epochs: passes over the rows.
        batch_size: rows per step (capped at the number of rows).
        learning_rate, weight_decay: of ``optax.adamw``.
        seed: seeds the per-epoch permutations.

    Returns:
        ``(graphdef, params, mean batch loss per epoch)``.
    """
    n = len(next(iter(data.values())))
    size = min(batch_size, n)
    n_batches = n // size
    rng = np.random.default_rng(seed)
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    graphdef, params = nnx.split(module)
    params = jax.tree.map(jnp.copy, params)  # the epoch donates its state: never the caller's
    state = nn.TrainState(params, tx.init(params))
    device_data = {key: jnp.asarray(value) for key, value in data.items()}
    train_epoch = nn.make_train_epoch(graphdef, lambda m, b: (loss_fn(m, b), jnp.float32(1.0)), tx)
    history = []
    for _ in range(epochs):
        idx = rng.permutation(n)[: n_batches * size].reshape(n_batches, size).astype(np.int32)
        state, loss = train_epoch(state, device_data, jnp.asarray(idx), None)
        history.append(float(loss))
    return graphdef, state.params, history


def predict(graphdef: nnx.GraphDef, params: nnx.State, Z: np.ndarray, method: str = "__call__"):
    """Apply ``module.<method>`` to ``Z`` in fixed-shape batches (:func:`budgetalloc.models.nn.batched_apply`)."""
    return nn.batched_apply(graphdef, params, Z, method=method, batch_size=_PREDICT_CHUNK)


class OutcomeNet(nnx.Module):
    """Response and cost under every arm: an MLP with ``2M`` outputs.

    ``__call__`` returns raw outputs ``(response, cost)``, each ``(b, M)``: the
    response is a logit when the response is binary, a scaled value otherwise; the
    cost is a scaled value passed through softplus so it is never negative.
    """

    def __init__(self, n_in: int, n_arms: int, *, hidden: int, depth: int, rngs: nnx.Rngs):
        self.mlp = MLP(n_in, 2 * n_arms, hidden=hidden, depth=depth, rngs=rngs)
        self.n_arms = n_arms

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = self.mlp(x)
        return out[:, : self.n_arms], jax.nn.softplus(out[:, self.n_arms :])


def response_mean(raw: jax.Array, binary: bool) -> jax.Array:
    """Expected (scaled) response from the response output: sigmoid of a logit if binary."""
    return jax.nn.sigmoid(raw) if binary else raw


def prediction_loss(raw_r: jax.Array, c_hat: jax.Array, batch: dict, binary: bool) -> jax.Array:
    """Masked per-arm fit: only the received arm's outputs meet the row's targets.

    Response: sigmoid cross-entropy (binary) or squared error (continuous, scaled);
    cost: squared error (scaled). Rows weighted by ``batch["w"]`` (inverse propensity);
    the result is the weighted mean of response plus cost loss.
    """
    arm = batch["t"][:, None]
    r_raw = jnp.take_along_axis(raw_r, arm, axis=1)[:, 0]
    c_pred = jnp.take_along_axis(c_hat, arm, axis=1)[:, 0]
    if binary:
        loss_r = optax.sigmoid_binary_cross_entropy(r_raw, batch["r"])
    else:
        loss_r = (r_raw - batch["r"]) ** 2
    loss_c = (c_pred - batch["c"]) ** 2
    w = batch["w"]
    return jnp.sum(w * (loss_r + loss_c)) / jnp.maximum(jnp.sum(w), 1e-12)


def output_bias(mean_r: np.ndarray, mean_c: np.ndarray, binary: bool) -> np.ndarray:
    """Initial output biases matching each arm's mean (scaled) response and cost."""
    r = np.clip(mean_r, 1e-4, 1 - 1e-4) if binary else mean_r
    r = np.log(r / (1 - r)) if binary else r
    c = np.log(np.expm1(np.maximum(mean_c, 1e-4)))  # inverse softplus
    return np.concatenate([r, c]).astype(np.float32)


def set_output_bias(net: OutcomeNet, bias: np.ndarray) -> None:
    """Start the outcome net at the arm means so the first epochs learn heterogeneity."""
    net.mlp.out.bias[...] = jnp.asarray(bias)
