"""DFCL: decision-focused causal learning (Zhou et al., KDD 2024, arXiv 2407.13664).

An outcome net trained on the prediction loss plus the EOM estimate of its softmax-relaxed
Lagrangian policy's value over a grid of multipliers; the loss, the control variate and
the measured defaults are in docs/baselines.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from budgetalloc.data.contract import Trial
from budgetalloc.studies.baselines import nets
from budgetalloc.studies.baselines.base import size_knobs


@size_knobs
class DecisionFocusedCausalLearning(nets.NeuralBaseline):
    """DFCL: per-arm response and cost trained on a decision loss plus a prediction loss.

    Args:
        decision_weight: weight of the decision loss against the prediction loss.
        temperature: softmax temperature, relative to the mean absolute uplift of the arms.
        n_lambdas: multipliers in the grid.
        lambda_span: the grid's ends, as multiples of the smallest and largest arm ROI.
        control_variate: centre the gain on the policy's predicted value.
        epochs, hidden, depth, batch_size, learning_rate, weight_decay: of the network.
    """

    name = "DFCL"
    batch_size: int = 1024
    decision_weight: float = 0.3
    temperature: float = 0.5
    n_lambdas: int = 8
    lambda_span: tuple[float, float] = (0.3, 3.0)
    control_variate: bool = True

    def _fit(self, Z: np.ndarray, trial: Trial, seed: int) -> None:
        binary = trial.binary_response
        data, mean_r, mean_c = self._scaled_targets(Z, trial)
        self.lambdas_ = lambda_grid(mean_r, mean_c, self.n_lambdas, self.lambda_span)
        uplift = float(np.mean(np.abs(mean_r[1:] - mean_r[0])))
        tau = self.temperature * (uplift if uplift > 1e-12 else 1.0)
        net = nets.OutcomeNet(Z.shape[1], trial.n_arms, hidden=self.hidden, depth=self.depth, rngs=nnx.Rngs(seed))
        net.start_at(mean_r, mean_c, binary)
        lambdas, weight = jnp.asarray(self.lambdas_, jnp.float32), self.decision_weight
        cv = self.control_variate

        def loss_fn(model: nets.OutcomeNet, batch: dict) -> jax.Array:
            raw_r, c_hat = model(batch["x"])
            pred = nets.prediction_loss(raw_r, c_hat, batch, binary)
            r_hat = nets.response_mean(raw_r, binary)
            return pred + weight * decision_loss(r_hat, c_hat, batch, lambdas, tau, cv)

        self._train(net, loss_fn, data, seed)

    def _predict(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw_r, c_hat = self._apply(Z)
        value = np.asarray(nets.response_mean(jnp.asarray(raw_r), self.binary_response_), np.float64)
        return value * self.scale_r_, c_hat.astype(np.float64) * self.scale_c_


def decision_loss(r_hat: jax.Array, c_hat: jax.Array, batch: dict, lambdas: jax.Array, temperature: float,
                  control_variate: bool = False) -> jax.Array:
    """Minus the EOM value of the softmax-relaxed Lagrangian policy, averaged over ``lambdas``.

    Args:
        r_hat, c_hat: ``(b, M)`` predicted (scaled) response and cost.
        batch: ``t`` (received arm), ``r``, ``c`` (scaled outcomes), ``w`` (inverse
            propensity normalised to 1 under uniform assignment, i.e. ``1 / (M p)``).
        lambdas: ``(K,)`` multipliers.
        temperature: of the softmax over arms.
        control_variate: subtract the policy's predicted value from the gain
            (constant in the gradient; the expected gradient is unchanged).

    Returns:
        The scalar loss ``-mean_k mean_i w_i pi_k[i, t_i] (r_i - lam_k c_i)``.
    """
    logits = (r_hat[None] - lambdas[:, None, None] * c_hat[None]) / temperature  # (K, b, M)
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    t = jnp.broadcast_to(batch["t"][None, :, None], (lambdas.shape[0], batch["t"].shape[0], 1))
    pi_t = jnp.exp(jnp.take_along_axis(log_pi, t, axis=-1)[..., 0])  # (K, b)
    gain = batch["r"][None] - lambdas[:, None] * batch["c"][None]  # (K, b)
    if control_variate:
        q = r_hat[None] - lambdas[:, None, None] * c_hat[None]
        gain = gain - jax.lax.stop_gradient(jnp.sum(jnp.exp(log_pi) * q, axis=-1))
    return -jnp.mean(batch["w"][None] * pi_t * gain)


def lambda_grid(mean_r: np.ndarray, mean_c: np.ndarray, n: int, span: tuple[float, float]) -> np.ndarray:
    """``(n,)`` geometric multipliers from ``span[0]`` times the smallest to ``span[1]`` times
    the largest positive ROI of an arm against control (around 1 when no arm has one)."""
    d_r, d_c = mean_r[1:] - mean_r[0], mean_c[1:] - mean_c[0]
    ok = (d_c > 0) & (d_r > 0)
    roi = d_r[ok] / d_c[ok]
    lo, hi = (roi.min(), roi.max()) if roi.size else (1.0, 1.0)
    return np.geomspace(span[0] * lo, span[1] * hi, max(1, n)).astype(np.float32)
