"""DRM and DRP: networks that learn a per-arm ranking score or ROI directly.

Both learn one output per non-control arm ``j`` that ranks users by the return on
investment of arm ``j`` against control, ``tau^r_j(x) / tau^c_j(x)``, from the RCT
without first predicting the two effects. A Lagrangian over several arms needs each
arm's value and cost, not only a ratio, so both methods form them the same way:

* an outcome tower (:class:`~budgetalloc.studies.baselines.nets.OutcomeNet`, its own
  parameters, trained with the masked prediction loss) gives the control response
  ``r_0(x)`` and every arm's cost ``c_j(x)``;
* ``cost[i, j] = c_j(x_i)`` and
  ``value[i, j] = r_0(x_i) + roi_j(x_i) * max(c_j(x_i) - c_0(x_i), 0)``.

Every user then takes ``argmax_j (roi_j - lam) * dc_j``: the arm whose incremental
cost earns the most above the shadow price. The ranking tower and the outcome
tower share no parameters, so summing their losses trains each exactly as if alone.
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
from budgetalloc.studies.baselines.base import BaselineBase, arm_means, target_scale

_DRP_BOUND = 8.0  # the log-ROI output is soft-clipped to [-8, 8] (scaled units)


class DirectNet(nnx.Module):
    """A ranking tower with ``M - 1`` outputs beside an independent outcome tower."""

    def __init__(self, n_in: int, n_arms: int, *, hidden: int, depth: int, rngs: nnx.Rngs):
        self.rank = nets.MLP(n_in, n_arms - 1, hidden=hidden, depth=depth, rngs=rngs)
        self.outcome = nets.OutcomeNet(n_in, n_arms, hidden=hidden, depth=depth, rngs=rngs)

    def __call__(self, x: jax.Array):
        raw_r, c_hat = self.outcome(x)
        return self.rank(x), raw_r, c_hat


class _DirectBase(BaselineBase):
    """Training and value/cost assembly shared by DRM and DRP."""

    def __init__(
        self,
        *,
        epochs: int = 20,
        hidden: int = 64,
        depth: int = 2,
        batch_size: int = 2048,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-4,
    ):
        self.epochs = epochs
        self.hidden = hidden
        self.depth = depth
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    def _rank_loss(self, score: jax.Array, batch: dict, arm: int) -> jax.Array:  # pragma: no cover
        raise NotImplementedError

    def _fit(self, Z: np.ndarray, trial: Trial, seed: int) -> None:
        self._fit_networks(Z, trial, seed, np.arange(trial.n))

    def _fit_networks(self, Z: np.ndarray, trial: Trial, seed: int, rows: np.ndarray) -> None:
        """Train both towers on ``rows`` of the trial (scales from the whole trial)."""
        binary = trial.binary_response
        self.scale_r_ = target_scale(trial.response, binary=binary)
        self.scale_c_ = target_scale(trial.cost)
        data = {
            "x": Z[rows],
            "t": trial.treatment[rows].astype(np.int32),
            "r": (trial.response[rows] / self.scale_r_).astype(np.float32),
            "c": (trial.cost[rows] / self.scale_c_).astype(np.float32),
            "w": trial.ipw[rows].astype(np.float32),
        }
        net = DirectNet(
            Z.shape[1], trial.n_arms, hidden=self.hidden, depth=self.depth, rngs=nnx.Rngs(seed)
        )
        bias = nets.output_bias(
            arm_means(trial, trial.response) / self.scale_r_,
            arm_means(trial, trial.cost) / self.scale_c_,
            binary,
        )
        nets.set_output_bias(net.outcome, bias)
        n_arms = trial.n_arms

        def loss_fn(model: DirectNet, batch: dict) -> jax.Array:
            score, raw_r, c_hat = model(batch["x"])
            pred = nets.prediction_loss(raw_r, c_hat, batch, binary)
            rank = sum(self._rank_loss(score[:, j - 1], batch, j) for j in range(1, n_arms))
            return pred + rank

        self.graphdef_, self.params_, self.history_ = nets.train(
            net,
            loss_fn,
            data,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=seed,
        )

    def _roi(self, score: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _predict(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, raw_r, c_hat = nets.predict(self.graphdef_, self.params_, Z)
        r0 = (
            np.asarray(nets.response_mean(jnp.asarray(raw_r[:, 0]), self.binary_response_))
            * self.scale_r_
        )
        cost = c_hat.astype(np.float64) * self.scale_c_
        cost[:, self.free_arms_] = 0.0
        roi = self._roi(score.astype(np.float64))
        dc = np.maximum(cost[:, 1:] - cost[:, :1], 0.0)
        value = np.column_stack([r0, r0[:, None] + roi * dc])
        return value, cost


def _group_mean(weights: jax.Array, values: jax.Array) -> jax.Array:
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)


class DirectRankModel(_DirectBase):
    """DRM: the Direct Rank Model (Du, Lee & Ghaffarizadeh 2019, "Improve User
    Retention with Causal Learning", PMLR 104, KDD'19 Causal Discovery workshop).

    Loss, per non-control arm ``j`` and minibatch: scores ``s_i = tanh(f_j(x_i))``;
    softmax weights ``p_i = w_i exp(s_i) / sum w exp(s)`` taken separately over the
    batch's arm-``j`` rows (T) and control rows (C) (``w`` the inverse-propensity
    weight); with ``dR = sum_T p r - sum_C p r`` and ``dC = sum_T p c - sum_C p c``,
    ``loss_j = -dR / max(dC, 1e-6)``: the incremental response per unit of
    incremental cost of the users the ranking puts on top, maximised. The total is
    ``sum_j loss_j`` plus the outcome tower's prediction loss. ``r`` and ``c`` are
    divided by their mean absolute values first; the ``tanh`` keeps the softmax from
    collapsing onto a few rows (as in the paper).

    Multi-arm: one score head per non-control arm against control. The score is a
    rank, not a ratio, so it is calibrated into an ROI on rows the network did not
    train on (``calibration_fraction``): per arm, users are cut into score quantile
    bins, each bin's ROI is the difference in (propensity-weighted) mean response
    over the difference in mean cost between arm ``j`` and control, and an isotonic
    (increasing) regression of bin ROI on bin score maps any score to an ROI.

    Args:
        epochs, hidden, depth, batch_size, learning_rate, weight_decay: of the
            networks (AdamW; every arm needs rows in a batch, hence large batches).
        calibration_fraction: share of the trial held out for the score -> ROI map.
        n_bins: most score bins per arm in the calibration.
    """

    name = "DRM"

    def __init__(self, *, calibration_fraction: float = 0.3, n_bins: int = 20, **knobs):
        super().__init__(**knobs)
        self.calibration_fraction = calibration_fraction
        self.n_bins = n_bins

    def _rank_loss(self, score: jax.Array, batch: dict, arm: int) -> jax.Array:
        e = jnp.exp(jnp.tanh(score)) * batch["w"]
        treated = jnp.where(batch["t"] == arm, e, 0.0)
        control = jnp.where(batch["t"] == 0, e, 0.0)
        d_r = _group_mean(treated, batch["r"]) - _group_mean(control, batch["r"])
        d_c = _group_mean(treated, batch["c"]) - _group_mean(control, batch["c"])
        return -d_r / jnp.maximum(d_c, 1e-6)

    def _fit(self, Z: np.ndarray, trial: Trial, seed: int) -> None:
        if not 0.0 < self.calibration_fraction < 1.0:
            raise BudgetallocError(
                f"DRM: calibration_fraction must be in (0, 1), got {self.calibration_fraction}"
            )
        perm = np.random.default_rng(seed).permutation(trial.n)
        n_cal = min(max(1, round(trial.n * self.calibration_fraction)), trial.n - 1)
        held_out, train_rows = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        self._fit_networks(Z, trial, seed, train_rows)
        score = np.tanh(nets.predict(self.graphdef_, self.params_, Z[held_out])[0])
        cal = trial.subset(held_out)
        self.calibrators_ = [
            roi_calibrator(score[:, j - 1], cal, j, self.n_bins) for j in range(1, trial.n_arms)
        ]

    def _roi(self, score: np.ndarray) -> np.ndarray:
        return np.column_stack(
            [cal.predict(np.tanh(score[:, k])) for k, cal in enumerate(self.calibrators_)]
        )


def roi_calibrator(
    score: np.ndarray, trial: Trial, arm: int, n_bins: int, min_rows: int = 250
) -> IsotonicRegression:
    """An increasing map from score to the ROI of ``arm`` against control, from binned RCT means.

    Args:
        score: ``(n,)`` scores of the trial's rows.
        trial: held-out rows (with their treatments, responses and costs).
        arm: the non-control arm.
        n_bins: the most quantile bins.
        min_rows: the fewest rows (arm plus control) a bin may have; fewer bins otherwise.

    Returns:
        A fitted ``IsotonicRegression`` (clipped outside the scores seen).
    """
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
    """DRP: Direct ROI Prediction (Zhou, Li, Jiang, Zheng & Wang 2023, "Direct
    Heterogeneous Causal Learning for Resource Allocation Problems in Marketing", AAAI).

    One output ``s_j(x)`` per non-control arm ``j`` is the decision factor
    ``log ROI_j(x)``, learned with the paper's convex loss: with
    ``l(s; r, c) = -r log sigmoid(s) - c log(1 - sigmoid(s))``,
    ``loss_j = mean_T w l(s_j; r, c) - mean_C w l(s_j; r, c)`` (arm-``j`` rows minus
    control rows of the batch, inverse-propensity weighted means). In expectation it
    is ``-tau^r_j(x) log sigmoid(s) - tau^c_j(x) log(1 - sigmoid(s))``, convex in ``s``
    when both effects are positive and minimised at ``sigmoid(s) / (1 - sigmoid(s)) =
    exp(s) = tau^r_j / tau^c_j``: the ROI, without predicting either effect. The total
    is ``sum_j loss_j`` plus the outcome tower's prediction loss; ``r`` and ``c`` are
    divided by their mean absolute values, so ``ROI_j = exp(s_j) * scale_r / scale_c``.
    ``s`` is soft-clipped to ``[-8, 8]`` because where an effect is negative the loss
    has no minimum.

    Multi-arm: one head per non-control arm against control, as for DRM (the ROI
    needs no calibration: it is the loss's minimiser).

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
