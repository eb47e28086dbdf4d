"""DRM and DRP: networks that learn each coupon arm's ROI against control directly.

A ranking tower gives one output per non-control arm; an independent outcome tower
(:class:`~budgetalloc.studies.baselines.nets.OutcomeNet`, on the prediction loss) gives
the control response ``r_0`` and every arm's cost ``c_j``. The Lagrangian gets
``cost[i, j] = c_j(x_i)`` and ``value[i, j] = r_0(x_i) + roi_j(x_i) * max(c_j(x_i) - c_0(x_i), 0)``.
The losses and the score -> ROI maps are in docs/baselines.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.isotonic import IsotonicRegression

from budgetalloc.data.contract import Trial
from budgetalloc.errors import BudgetallocError
from budgetalloc.studies.baselines import nets
from budgetalloc.studies.baselines.base import arm_means, size_knobs

_DRP_BOUND = 8.0  # the log-ROI output is soft-clipped to [-8, 8] (scaled units)


class DirectNet(nnx.Module):
    """A ranking tower with ``M - 1`` outputs beside an independent outcome tower."""

    def __init__(self, n_in: int, n_arms: int, *, hidden: int, depth: int, rngs: nnx.Rngs):
        self.rank = nets.MLP(n_in, n_arms - 1, hidden=hidden, depth=depth, rngs=rngs)
        self.outcome = nets.OutcomeNet(n_in, n_arms, hidden=hidden, depth=depth, rngs=rngs)

    def __call__(self, x: jax.Array):
        raw_r, c_hat = self.outcome(x)
        return self.rank(x), raw_r, c_hat


class _DirectBase(nets.NeuralBaseline):
    """Training and value/cost assembly shared by DRM and DRP."""

    def _rank_loss(self, score: jax.Array, batch: dict, arm: int) -> jax.Array:  # pragma: no cover
        raise NotImplementedError

    def _roi(self, score: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _fit(self, Z: np.ndarray, trial: Trial, seed: int, rows=slice(None)) -> None:
        """Train both towers on ``rows`` of the trial."""
        binary, n_arms = trial.binary_response, trial.n_arms
        data, mean_r, mean_c = self._scaled_targets(Z, trial, rows)
        net = DirectNet(Z.shape[1], n_arms, hidden=self.hidden, depth=self.depth, rngs=nnx.Rngs(seed))
        net.outcome.start_at(mean_r, mean_c, binary)

        def loss_fn(model: DirectNet, batch: dict) -> jax.Array:
            score, raw_r, c_hat = model(batch["x"])
            pred = nets.prediction_loss(raw_r, c_hat, batch, binary)
            rank = sum(self._rank_loss(score[:, j - 1], batch, j) for j in range(1, n_arms))
            return pred + rank

        self._train(net, loss_fn, data, seed)

    def _predict(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, raw_r, c_hat = self._apply(Z)
        r0 = np.asarray(nets.response_mean(jnp.asarray(raw_r[:, 0]), self.binary_response_)) * self.scale_r_
        cost = c_hat.astype(np.float64) * self.scale_c_
        cost[:, self.free_arms_] = 0.0
        dc = np.maximum(cost[:, 1:] - cost[:, :1], 0.0)
        return np.column_stack([r0, r0[:, None] + self._roi(score.astype(np.float64)) * dc]), cost


def _group_mean(weights: jax.Array, values: jax.Array) -> jax.Array:
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)


@size_knobs
class DirectRankModel(_DirectBase):
    """DRM, the Direct Rank Model (Du, Lee & Ghaffarizadeh 2019): a rank score per arm, calibrated to ROI.

    Args:
        calibration_fraction: share of the trial held out for the score -> ROI map.
        n_bins: most score bins per arm in that map.
        epochs, hidden, depth, batch_size, learning_rate, weight_decay: of the networks.
    """

    name = "DRM"
    calibration_fraction: float = 0.3
    n_bins: int = 20

    def _rank_loss(self, score: jax.Array, batch: dict, arm: int) -> jax.Array:
        e = jnp.exp(jnp.tanh(score)) * batch["w"]
        treated = jnp.where(batch["t"] == arm, e, 0.0)
        control = jnp.where(batch["t"] == 0, e, 0.0)
        d_r = _group_mean(treated, batch["r"]) - _group_mean(control, batch["r"])
        d_c = _group_mean(treated, batch["c"]) - _group_mean(control, batch["c"])
        return -d_r / jnp.maximum(d_c, 1e-6)

    def _fit(self, Z: np.ndarray, trial: Trial, seed: int) -> None:
        if not 0.0 < self.calibration_fraction < 1.0:
            raise BudgetallocError(f"DRM: calibration_fraction must be in (0, 1), got {self.calibration_fraction}")
        perm = np.random.default_rng(seed).permutation(trial.n)
        n_cal = min(max(1, round(trial.n * self.calibration_fraction)), trial.n - 1)
        held_out, train_rows = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        super()._fit(Z, trial, seed, train_rows)
        score = np.tanh(self._apply(Z[held_out])[0])
        cal = trial.subset(held_out)
        self.calibrators_ = [roi_calibrator(score[:, j - 1], cal, j, self.n_bins) for j in range(1, trial.n_arms)]

    def _roi(self, score: np.ndarray) -> np.ndarray:
        return np.column_stack([cal.predict(np.tanh(score[:, k])) for k, cal in enumerate(self.calibrators_)])


def roi_calibrator(score: np.ndarray, trial: Trial, arm: int, n_bins: int,
                   min_rows: int = 250) -> IsotonicRegression:
    """A fitted increasing ``IsotonicRegression`` (clipped outside the scores seen) from the
    held-out ``trial`` rows' ``score`` to the ROI of ``arm`` against control, through the RCT
    means of at most ``n_bins`` quantile bins of at least ``min_rows`` rows (arm and control)."""
    pair = (trial.treatment == arm) | (trial.treatment == 0)
    s = score[pair]
    sub = trial.subset(pair)
    if s.size == 0:
        return IsotonicRegression(out_of_bounds="clip").fit([0.0], [0.0])
    bins = int(np.clip(len(s) // min_rows, 1, n_bins))
    edges = np.unique(np.quantile(s, np.linspace(0, 1, bins + 1)[1:-1]))
    which = np.searchsorted(edges, s, side="right")
    xs, ys, ws = [], [], []
    for b in range(len(edges) + 1):
        inside = which == b
        d_r, d_c = _pair_effects(sub.subset(inside), arm)
        if d_c > 0 and np.isfinite(d_r):
            xs.append(float(np.median(s[inside])))
            ys.append(d_r / d_c)
            ws.append(float(inside.sum()))
    if not xs:  # no bin with a positive incremental cost: fall back to the pair's ROI
        d_r, d_c = _pair_effects(sub, arm)
        xs, ys, ws = [0.0], [d_r / d_c if d_c > 0 else 0.0], [1.0]
    return IsotonicRegression(increasing=True, out_of_bounds="clip").fit(xs, ys, sample_weight=ws)


def _pair_effects(trial: Trial, arm: int) -> tuple[float, float]:
    """Propensity-weighted ``(mean r, mean c)`` of ``arm`` minus control; NaN if a side is empty."""
    if not ((trial.treatment == arm).any() and (trial.treatment == 0).any()):
        return float("nan"), float("nan")
    r, c = arm_means(trial, trial.response), arm_means(trial, trial.cost)
    return float(r[arm] - r[0]), float(c[arm] - c[0])


class DirectROIPrediction(_DirectBase):
    """DRP, Direct ROI Prediction (Zhou et al., AAAI 2023): log-ROI per arm by a convex loss.

    Args:
        epochs, hidden, depth, batch_size, learning_rate, weight_decay: of the networks.
    """

    name = "DRP"

    def _rank_loss(self, score: jax.Array, batch: dict, arm: int) -> jax.Array:
        s = _DRP_BOUND * jnp.tanh(score / _DRP_BOUND)
        row = -batch["r"] * jax.nn.log_sigmoid(s) - batch["c"] * jax.nn.log_sigmoid(-s)
        treated = jnp.where(batch["t"] == arm, batch["w"], 0.0)
        control = jnp.where(batch["t"] == 0, batch["w"], 0.0)
        return _group_mean(treated, row) - _group_mean(control, row)

    def _roi(self, score: np.ndarray) -> np.ndarray:
        s = _DRP_BOUND * np.tanh(score / _DRP_BOUND)
        return np.exp(s) * self.scale_r_ / self.scale_c_
