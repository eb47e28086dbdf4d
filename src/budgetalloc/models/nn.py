"""The one training loop, batched inference and the trained-network type.

Every network (the representation, the student, the neural baselines) is a Flax
NNX module split once into ``(graphdef, params)``; an epoch is one jitted
``lax.scan`` of a pure train step over a ``(n_batches, batch_size)`` plan of row
indices drawn in numpy from the seed. :func:`fit` adds a validation split and
early stopping, data parallel over several devices. Artifacts: :mod:`~budgetalloc.models.weights`.

Invariants: fixed shapes (a last partial batch is padded with row 0 at weight 0,
which counts for nothing), so nothing recompiles; the same seed gives the same
weights bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from budgetalloc.data.blocks import padded

#: ``loss_fn(module, batch) -> (sum of weighted row losses, sum of row weights)``.
LossFn = Callable[[nnx.Module, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]
#: ``progress(epoch, {"train_loss": ..., "val_loss": ...})`` after every epoch; the last epoch of
#: a run that stops early also carries ``STOPPED_EARLY: patience``.
Progress = Callable[[int, dict[str, float]], None]
STOPPED_EARLY = "stopped_early_patience"


def early_stop_message(epoch: int, epochs: int, metrics: dict) -> str | None:
    """``"stopped early at epoch 6 of 30 (patience 3)"`` for the last epoch of an early stop, else ``None``."""
    if STOPPED_EARLY not in metrics:
        return None
    return f"stopped early at epoch {epoch} of {epochs} (patience {int(metrics[STOPPED_EARLY])})"


_MIN_IMPROVEMENT = 1e-4  # relative: smaller gains in validation loss do not reset patience
INFERENCE_CHUNK = 4096  # rows per step inside a compiled batch: activations stay in cache
DATA_PARALLEL_ENV = "BUDGETALLOC_DATA_PARALLEL"  # "0": one device even when there are several


class TrainState(NamedTuple):
    """Everything an optimisation step changes."""

    params: nnx.State
    opt_state: optax.OptState


@dataclass(frozen=True)
class FitHistory:
    """What the epoch loop did."""

    epochs_run: int
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    train_loss: tuple[float, ...]
    val_loss: tuple[float, ...]

    @classmethod
    def from_dict(cls, raw: dict) -> FitHistory:
        """Rebuild from its JSON form (``dataclasses.asdict``)."""
        return cls(**{**raw, "train_loss": tuple(raw["train_loss"]), "val_loss": tuple(raw["val_loss"])})


@dataclass(frozen=True)
class TrainedNet:
    """A trained network: the split module, the configuration that rebuilds it, its history.

    A subclass names its artifact ``kind`` and its ``config_cls``: a frozen dataclass
    of JSON-serialisable fields, at least ``n_features``, whose ``build(seed)`` makes
    the module (saving and loading: :mod:`budgetalloc.models.weights`).
    """

    kind: ClassVar[str]
    config_cls: ClassVar[type]
    graphdef: nnx.GraphDef
    params: nnx.State
    config: Any
    history: FitHistory

    @property
    def module(self) -> nnx.Module:
        """The network as an nnx module (a fresh merge: editing it leaves this one alone)."""
        return nnx.merge(self.graphdef, self.params)

    @property
    def n_features(self) -> int:
        """``d``, the input width."""
        return self.config.n_features


def split_rows(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random split of ``range(n)`` into sorted ``(train_idx, val_idx)``, both non-empty."""
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def batch_plan(rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``rows`` into batches: ``idx`` int32 ``(n_batches, batch_size)``, the last padded
    with row 0, and ``valid`` float32 of the same shape (0 at the padding)."""
    n_batches = math.ceil(len(rows) / batch_size)
    idx = np.zeros(n_batches * batch_size, dtype=np.int32)
    valid = np.zeros(n_batches * batch_size, dtype=np.float32)
    idx[: len(rows)] = rows
    valid[: len(rows)] = 1.0
    return idx.reshape(n_batches, batch_size), valid.reshape(n_batches, batch_size)


def data_parallel_mesh() -> Mesh | None:
    """A 1-D ``"data"`` mesh over all devices; None with one device or ``$BUDGETALLOC_DATA_PARALLEL=0``."""
    devices = jax.devices()
    if len(devices) < 2 or os.environ.get(DATA_PARALLEL_ENV, "1").strip() == "0":
        return None
    return Mesh(np.array(devices), ("data",))


def round_up_to_devices(rows: int, n_devices: int) -> int:
    """The smallest multiple of ``n_devices`` that is ``>= rows``: a batch every device splits evenly."""
    return -(-rows // n_devices) * n_devices


def _place(tree: Any, mesh: Mesh | None, spec: P) -> Any:
    """``tree`` on ``mesh`` laid out as ``spec``; untouched without a mesh (one device)."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, spec))


def _gather(
    data: dict[str, jax.Array], idx: jax.Array, valid: jax.Array | None, mesh: Mesh | None = None
) -> dict[str, jax.Array]:
    """The rows ``idx`` of ``data``; padded rows (``valid`` 0) get weight 0."""
    batch = {key: value[idx] for key, value in data.items()}
    if valid is not None:
        batch["weight"] = batch["weight"] * valid
    if mesh is not None:  # rows split across devices: the partitioner all-reduces the grads
        batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P("data")))
    return batch


def make_train_epoch(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                     mesh: Mesh | None = None):
    """A jitted ``train_epoch(state, data, idx, valid) -> (state, mean loss)``: one scan.

    ``valid`` may be ``None`` when every batch is full (no padded rows). With a
    ``mesh``, each gathered batch is sharded along its rows and the outputs are
    replicated (data parallelism); without one, it runs on one device.
    """

    def objective(params, batch):
        loss_sum, weight_sum = loss_fn(nnx.merge(graphdef, params), batch)
        return loss_sum / jnp.maximum(weight_sum, 1e-12), (loss_sum, weight_sum)

    def train_epoch(state, data, idx, valid):
        def body(state: TrainState, plan):
            grads, sums = jax.grad(objective, has_aux=True)(state.params, _gather(data, *plan, mesh))
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return TrainState(optax.apply_updates(state.params, updates), opt_state), sums

        state, (loss_sums, weight_sums) = jax.lax.scan(body, state, (idx, valid))
        return state, jnp.sum(loss_sums) / jnp.maximum(jnp.sum(weight_sums), 1e-12)

    if mesh is None:
        return jax.jit(train_epoch, donate_argnums=0)
    return jax.jit(train_epoch, donate_argnums=0, out_shardings=NamedSharding(mesh, P()))


def make_evaluate(graphdef: nnx.GraphDef, loss_fn: LossFn, mesh: Mesh | None = None):
    """A jitted ``evaluate(params, data, idx, valid) -> weighted mean loss`` (``mesh``: as above)."""

    def evaluate(params, data, idx, valid):
        def body(carry, plan):
            batch = _gather(data, *plan, mesh)
            loss_sum, weight_sum = loss_fn(nnx.merge(graphdef, params), batch)
            return (carry[0] + loss_sum, carry[1] + weight_sum), None

        (loss_sum, weight_sum), _ = jax.lax.scan(body, (0.0, 0.0), (idx, valid))
        return loss_sum / jnp.maximum(weight_sum, 1e-12)

    return jax.jit(evaluate)


def scheduled(optimiser: Callable[[Any], optax.GradientTransformation], rate: float, schedule: str):
    """The ``tx`` :func:`fit` takes: ``optimiser(rate)``, or with ``schedule`` ``"cosine"`` a function
    of the run's step count whose optimiser's rate decays from ``rate`` to 0 along a cosine."""
    if schedule == "constant":
        return optimiser(rate)
    return lambda steps: optimiser(optax.cosine_decay_schedule(rate, decay_steps=steps))


def fit(
    module: nnx.Module,
    loss_fn: LossFn,
    data: dict[str, np.ndarray],
    *,
    tx: optax.GradientTransformation | Callable[[int], optax.GradientTransformation],
    params: Any,
    val_fraction: float,
    seed: int,
    progress: Progress | None = None,
) -> tuple[nnx.GraphDef, nnx.State, FitHistory]:
    """Minibatch training with a validation split and early stopping.

    Args:
        module: the initialised network (left unchanged).
        loss_fn: ``(module, batch) -> (loss_sum, weight_sum)``.
        data: equal-length arrays, one of them ``"weight"`` (row weights).
        tx: the optax optimiser, or a function of the number of steps of ``epochs``
            epochs that returns it (a learning-rate schedule over the whole run).
        params: a params section: at most ``epochs`` passes over the training rows,
            ``batch_size`` rows a step (with several devices, rounded up to a multiple
            of their number), stopping after ``patience`` epochs without a relative
            improvement of the validation loss larger than 1e-4.
        val_fraction: share of rows held out for validation.
        seed: seeds the split and the per-epoch shuffles.
        progress: called after every epoch with ``(epoch, {"train_loss", "val_loss"})``
            (plus :data:`STOPPED_EARLY` on the epoch it stops early).

    Returns:
        ``(graphdef, params, history)`` with the parameters of the best validation
        epoch, on one device. With several devices training is data parallel
        (:func:`data_parallel_mesh`).
    """
    epochs, batch_size, patience = params.epochs, params.batch_size, params.patience
    rng = np.random.default_rng(seed)
    n = len(data["weight"])
    train_rows, val_rows = split_rows(n, val_fraction, rng)
    mesh = data_parallel_mesh()
    n_devices = 1 if mesh is None else mesh.size
    train_batch = round_up_to_devices(min(batch_size, len(train_rows)), n_devices)
    val_batch = round_up_to_devices(min(max(batch_size, 8192), len(val_rows)), n_devices)
    if callable(tx):
        tx = tx(epochs * math.ceil(len(train_rows) / train_batch))
    device_data = _place({key: jnp.asarray(value) for key, value in data.items()}, mesh, P())
    graphdef, weights = nnx.split(module)
    weights = jax.tree.map(jnp.copy, weights)  # the epoch donates its state: never the caller's
    train_epoch, evaluate = make_train_epoch(graphdef, loss_fn, tx, mesh), make_evaluate(graphdef, loss_fn, mesh)
    val_plan = _place(batch_plan(val_rows, val_batch), mesh, P(None, "data"))
    state = _place(TrainState(weights, tx.init(weights)), mesh, P())
    best_params, best_loss, best_epoch = None, math.inf, 0
    train_hist: list[float] = []
    val_hist: list[float] = []
    for epoch in range(1, epochs + 1):
        plan = _place(batch_plan(rng.permutation(train_rows), train_batch), mesh, P(None, "data"))
        state, train_loss = train_epoch(state, device_data, *plan)
        val_loss = float(evaluate(state.params, device_data, *val_plan))
        train_hist.append(float(train_loss))
        val_hist.append(val_loss)
        improved = best_params is None or val_loss < best_loss - _MIN_IMPROVEMENT * abs(best_loss)
        if improved:
            best_params = jax.tree.map(jnp.copy, state.params)
            best_loss, best_epoch = val_loss, epoch
        stop = not improved and epoch - best_epoch >= patience
        if progress is not None:
            metrics = {"train_loss": train_hist[-1], "val_loss": val_loss}
            progress(epoch, {**metrics, STOPPED_EARLY: patience} if stop and epoch < epochs else metrics)
        if stop:
            break
    history = FitHistory(epochs_run=len(val_hist), best_epoch=best_epoch, best_val_loss=best_loss,
                         stopped_early=len(val_hist) < epochs, train_loss=tuple(train_hist), val_loss=tuple(val_hist))
    if mesh is not None:  # inference and saving run on one device
        best_params = jax.device_put(best_params, jax.devices()[0])
    return graphdef, best_params, history


@partial(jax.jit, static_argnames=("graphdef", "method", "chunk"))
def _apply(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, method: str, chunk: int):
    fn = getattr(nnx.merge(graphdef, params), method)
    if x.shape[0] <= chunk:
        return fn(x)
    out = jax.lax.map(fn, x.reshape(-1, chunk, x.shape[1]))
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out)


def inference_batch_size(n: int, batch_size: int) -> int:
    """``min(batch_size, n)`` rounded up to a multiple of ``INFERENCE_CHUNK`` (at least one chunk).

    Every row is computed inside a matrix product of exactly ``INFERENCE_CHUNK`` rows, so
    its bits do not depend on how many rows come with it (the CPU's product kernels
    block and split a product by its shape).
    """
    size = max(1, min(batch_size, n))
    return -(-size // INFERENCE_CHUNK) * INFERENCE_CHUNK


def batched_apply(
    graphdef: nnx.GraphDef, params: nnx.State, X: np.ndarray, *, method: str, batch_size: int
) -> Any:
    """Apply ``module.<method>`` (``(b, d)`` to arrays with leading ``b``) to float32 ``X``
    ``(n, d)`` in fixed-shape batches of at most about ``batch_size`` rows (the last padded),
    on the device that holds ``params``; returns the output pytree for all rows, in numpy."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    size = inference_batch_size(n, batch_size)
    result, pending = None, None
    for start in range(0, max(n, 1), size):
        chunk = padded(X[start : start + size], size)
        current = (_apply(graphdef, params, chunk, method, INFERENCE_CHUNK), start)
        if pending is not None:
            result = _write(result, *pending, n)
        pending = current
    return _write(result, *pending, n)


def _write(result: Any, out: Any, start: int, n: int) -> Any:
    """Copy one batch's outputs into ``result`` (allocated on first use)."""
    if result is None:
        result = jax.tree.map(lambda a: np.empty((n, *a.shape[1:]), a.dtype), out)
    rows = min(n - start, jax.tree.leaves(out)[0].shape[0])

    def copy(dst, src):
        dst[start : start + rows] = np.asarray(src)[:rows]

    jax.tree.map(copy, result, out)
    return result
