"""The networks of DRM, DRP and DFCL and what fits them: an MLP, the outcome net, the trainer.

Training runs on the epoch loop of :mod:`budgetalloc.models.nn` with AdamW for a fixed
number of epochs (a size knob), no validation split, and full batches only: the rows
left after the last full batch sit out that epoch. The same seed gives the same
weights bit for bit on the same machine. Rationale: docs/baselines.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from budgetalloc.data.contract import Trial
from budgetalloc.models import nn
from budgetalloc.studies.baselines.base import Baseline, arm_means, size_knobs, target_scale

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


class OutcomeNet(nnx.Module):
    """Response and cost under every arm: an MLP with ``2M`` outputs.

    ``__call__`` returns ``(response, cost)``, each ``(b, M)``: the response is a logit
    when the response is binary, a scaled value otherwise; the scaled cost passes
    through softplus, so it is never negative.
    """

    def __init__(self, n_in: int, n_arms: int, *, hidden: int, depth: int, rngs: nnx.Rngs):
        self.mlp = MLP(n_in, 2 * n_arms, hidden=hidden, depth=depth, rngs=rngs)
        self.n_arms = n_arms

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = self.mlp(x)
        return out[:, : self.n_arms], jax.nn.softplus(out[:, self.n_arms :])

    def start_at(self, mean_r: np.ndarray, mean_c: np.ndarray, binary: bool) -> None:
        """Set the output biases to each arm's mean (scaled) response and cost."""
        r = np.clip(mean_r, 1e-4, 1 - 1e-4) if binary else mean_r
        r = np.log(r / (1 - r)) if binary else r
        c = np.log(np.expm1(np.maximum(mean_c, 1e-4)))  # inverse softplus
        self.mlp.out.bias[...] = jnp.asarray(np.concatenate([r, c]).astype(np.float32))


def response_mean(raw: jax.Array, binary: bool) -> jax.Array:
    """Expected (scaled) response from the response output: sigmoid of a logit if binary."""
    return jax.nn.sigmoid(raw) if binary else raw


def prediction_loss(raw_r: jax.Array, c_hat: jax.Array, batch: dict, binary: bool) -> jax.Array:
    """The masked per-arm fit: only the received arm's outputs meet the row's targets.

    Response: sigmoid cross-entropy (binary) or squared error; cost: squared error;
    the mean over rows weighted by ``batch["w"]``.
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


@size_knobs
class NeuralBaseline(Baseline):
    """A baseline fitted as a network: its size knobs, scaled targets, training and inference.

    Args:
        epochs, hidden, depth, batch_size, learning_rate, weight_decay: of the network
            and its AdamW training.
    """

    epochs: int = 20
    hidden: int = 64
    depth: int = 2
    batch_size: int = 2048
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4

    def _scaled_targets(self, Z: np.ndarray, trial: Trial, rows=slice(None)):
        """Training arrays of ``rows``, and each arm's mean response and cost, in scaled units.

        The scales (mean absolute values; 1 for a binary response) come from the whole trial.
        """
        self.scale_r_ = target_scale(trial.response, binary=trial.binary_response)
        self.scale_c_ = target_scale(trial.cost)
        data = {
            "x": Z[rows],
            "t": trial.treatment[rows].astype(np.int32),
            "r": (trial.response[rows] / self.scale_r_).astype(np.float32),
            "c": (trial.cost[rows] / self.scale_c_).astype(np.float32),
            "w": trial.ipw[rows].astype(np.float32),
        }
        return data, arm_means(trial, trial.response) / self.scale_r_, arm_means(trial, trial.cost) / self.scale_c_

    def _train(self, net: nnx.Module, loss_fn: LossFn, data: dict[str, np.ndarray], seed: int) -> None:
        """Fit ``net`` (left unchanged) to ``loss_fn`` on the rows of ``data``, permuted from ``seed``.

        Sets ``graphdef_``, ``params_`` and ``history_`` (the mean batch loss per epoch).
        """
        n = len(next(iter(data.values())))
        size = min(self.batch_size, n)
        n_batches = n // size
        rng = np.random.default_rng(seed)
        tx = optax.adamw(self.learning_rate, weight_decay=self.weight_decay)
        graphdef, params = nnx.split(net)
        params = jax.tree.map(jnp.copy, params)  # the epoch donates its state: never the caller's
        state = nn.TrainState(params, tx.init(params))
        device_data = {key: jnp.asarray(value) for key, value in data.items()}
        train_epoch = nn.make_train_epoch(graphdef, lambda m, b: (loss_fn(m, b), jnp.float32(1.0)), tx)
        history = []
        for _ in range(self.epochs):
            idx = rng.permutation(n)[: n_batches * size].reshape(n_batches, size).astype(np.int32)
            state, loss = train_epoch(state, device_data, jnp.asarray(idx), None)
            history.append(float(loss))
        self.graphdef_, self.params_, self.history_ = graphdef, state.params, history

    def _apply(self, Z: np.ndarray):
        """The trained network on ``Z``, in fixed-shape batches."""
        return nn.batched_apply(self.graphdef_, self.params_, Z, method="__call__", batch_size=_PREDICT_CHUNK)
