"""Simulated incentive trials with known ground truth, the oracle and scoring.

Users have standard-normal features; four latent segments come from feature
interactions; arm ``j`` is a coupon of value ``v[j]`` (arm 0: none) and the order
probability ``p[i, j]`` has diminishing, user-specific returns in ``v[j]``. The response
is the order (``binary`` world) or order x basket value (``gmv``); a coupon costs its
value when used, so the true expected cost is ``v[j] p[i, j]``. Noise knobs change what
the trial records, never the truth. The same seed gives the same tables bit for bit.
The world in full: docs/benchmark.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from budgetalloc.data.contract import COST, PROPENSITY, RESPONSE, TREATMENT, USER_ID
from budgetalloc.method.lagrangian import lagrangian_allocation
from budgetalloc.params import SimulateParams

SEGMENT_SENSITIVITY = np.array([0.25, 1.6, 0.8, 2.4])
GMV_COUPON_SCALE = 3.0
BASKET_SIGMA = 0.6  # log-normal noise of a basket's value around its mean (gmv world)


@dataclass(frozen=True)
class World:
    """A simulated table with the truth behind it."""

    frame: pd.DataFrame  # trial (or population) in the contract's layout
    true_response: np.ndarray  # (n, M) expected response per arm
    true_cost: np.ndarray  # (n, M) expected cost per arm
    coupon_values: np.ndarray  # (M,)


def coupon_values(n_arms: int, world: str) -> np.ndarray:
    """Coupon value per arm: 0 for control, then increasing steps."""
    steps = np.linspace(1.0, 1.0 + 0.75 * (n_arms - 2), n_arms - 1)
    values = np.concatenate([[0.0], steps])
    return values * (GMV_COUPON_SCALE if world == "gmv" else 1.0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    X = rng.standard_normal((n, d))
    X[:, 9] = 0.6 * X[:, 4] + 0.8 * X[:, 9]  # a correlated, otherwise irrelevant feature
    return X


def latent_segment(X: np.ndarray) -> np.ndarray:
    """Segment 0..3 from two interactions that no single feature shows."""
    a = (X[:, 0] * X[:, 1] > 0).astype(np.int64)
    b = (X[:, 2] ** 2 + X[:, 3] ** 2 > 1.4).astype(np.int64)
    return a + 2 * b


def true_outcomes(X: np.ndarray, world: str, n_arms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected response, expected cost (n, M) and basket means for true features ``X``."""
    seg = latent_segment(X)
    base = -1.6 + 0.5 * X[:, 4] + 0.3 * np.tanh(2.0 * X[:, 5]) - 0.4 * (seg == 3)
    sens = SEGMENT_SENSITIVITY[seg] * np.exp(0.3 * X[:, 6])
    rate = 0.25 + 0.6 * _sigmoid(X[:, 7] + (seg == 1))
    v = coupon_values(n_arms, world)
    v_unit = v / (GMV_COUPON_SCALE if world == "gmv" else 1.0)
    lift = sens[:, None] * (1.0 - np.exp(-rate[:, None] * v_unit[None, :]))
    p = _sigmoid(base[:, None] + lift)
    basket = np.exp(3.0 + 0.3 * X[:, 8] + 0.2 * (seg == 2)) if world == "gmv" else np.ones(len(X))
    return p * basket[:, None], p * v[None, :], basket


def draw_orders(rng: np.random.Generator, conversion: np.ndarray, basket: np.ndarray,
                world: str) -> tuple[np.ndarray, np.ndarray]:
    """Orders drawn with probability ``conversion`` and their value: the basket, with
    log-normal noise in the ``gmv`` world. Returns float ``(order, value)``, 0 without an order."""
    n = conversion.shape[0]
    order = (rng.random(n) < conversion).astype(np.float64)
    if world == "gmv":
        basket = basket * np.exp(BASKET_SIGMA * rng.standard_normal(n) - 0.5 * BASKET_SIGMA**2)
    return order, order * basket


def _assign(rng, n: int, n_arms: int, shares) -> tuple[np.ndarray, np.ndarray]:
    probs = np.full(n_arms, 1.0 / n_arms) if shares is None else np.asarray(shares, dtype=np.float64)
    if probs.shape[0] != n_arms:
        raise ValueError(f"arm_shares has {probs.shape[0]} entries for {n_arms} arms")
    t = rng.choice(n_arms, size=n, p=probs).astype(np.int64)
    return t, probs[t]


def _observed(rng, X: np.ndarray, p: SimulateParams) -> np.ndarray:
    Xo = X + p.feature_noise * rng.standard_normal(X.shape) if p.feature_noise > 0 else X.copy()
    if p.missing_rate > 0:
        Xo[rng.random(X.shape) < p.missing_rate] = np.nan
    return Xo


def _frame(user_id: np.ndarray, Xo: np.ndarray) -> pd.DataFrame:
    cols = {USER_ID: user_id}
    cols.update({f"x{j}": Xo[:, j].astype(np.float32) for j in range(Xo.shape[1])})
    return pd.DataFrame(cols)


def _record_outcomes(rng, world, t, r, basket, v, p: SimulateParams):
    order, response = draw_orders(rng, r[np.arange(t.shape[0]), t] / basket, basket, world)
    cost = order * v[t]
    if p.label_noise > 0:
        hit = rng.random(t.shape[0]) < p.label_noise
        if world == "gmv":
            response[hit] = rng.permutation(response)[hit]
        else:
            response[hit] = 1.0 - response[hit]
    if p.cost_outliers > 0:
        cost[rng.random(t.shape[0]) < p.cost_outliers] *= 10.0
    return response, cost


def simulate_trial(params: SimulateParams, *, seed: int, n_users: int | None = None, id_offset: int = 0) -> World:
    """Draw a randomized trial of ``n_users`` rows (default ``params.n_users``) and its truth.

    The frame has ``user_id`` (from ``id_offset``, so trials and populations do not collide),
    ``x0..``, ``treatment``, ``response``, ``cost`` (and ``propensity`` when ``arm_shares`` is
    set); the same seed gives the same table bit for bit.
    """
    n = params.n_users if n_users is None else n_users
    rng = np.random.default_rng(seed)
    X = _features(rng, n, params.n_features)
    r, c, basket = true_outcomes(X, params.world, params.n_arms)
    v = coupon_values(params.n_arms, params.world)
    t, prop = _assign(rng, n, params.n_arms, params.arm_shares)
    response, cost = _record_outcomes(rng, params.world, t, r, basket, v, params)
    frame = _frame(np.arange(id_offset, id_offset + n, dtype=np.int64), _observed(rng, X, params))
    frame[TREATMENT] = t
    frame[RESPONSE] = response
    frame[COST] = cost
    if params.arm_shares is not None:
        frame[PROPENSITY] = prop
    return World(frame, r, c, v)


def simulate_population(params: SimulateParams, *, seed: int, n_users: int, id_offset: int = 10**9) -> World:
    """Draw a population to allocate (features only) and its truth; see :func:`simulate_trial`."""
    rng = np.random.default_rng(seed)
    X = _features(rng, n_users, params.n_features)
    r, c, _ = true_outcomes(X, params.world, params.n_arms)
    frame = _frame(np.arange(id_offset, id_offset + n_users, dtype=np.int64), _observed(rng, X, params))
    return World(frame, r, c, coupon_values(params.n_arms, params.world))


def truth_frame(world: World) -> pd.DataFrame:
    """``user_id`` plus ``true_response_j`` and ``true_cost_j`` for every arm ``j``."""
    return pd.DataFrame({
        USER_ID: world.frame[USER_ID].to_numpy(),
        **{f"true_response_{j}": world.true_response[:, j] for j in range(world.true_response.shape[1])},
        **{f"true_cost_{j}": world.true_cost[:, j] for j in range(world.true_cost.shape[1])},
    })


def max_spend(true_cost: np.ndarray) -> float:
    """Spend if every user got the most expensive arm (the budget scale)."""
    return float(true_cost.max(axis=1).sum())


def oracle_arms(true_response: np.ndarray, true_cost: np.ndarray, budget: float) -> np.ndarray:
    """The per-user oracle: Lagrangian allocation on the true expectations."""
    return lagrangian_allocation(true_response, true_cost, budget).arms


def true_uplift(arms: np.ndarray, true_response: np.ndarray) -> float:
    """The true response that ``arms`` gain over all-control."""
    return float(true_response[np.arange(arms.shape[0]), arms].sum()) - float(true_response[:, 0].sum())


@dataclass(frozen=True)
class Score:
    """How an allocation does against the truth."""

    capture: float  # uplift over all-control / the oracle's uplift
    spend_ratio: float  # true spend / budget
    uplift: float  # true response gained over all-control
    oracle_uplift: float
    true_spend: float


def score_allocation(arms: np.ndarray, true_response: np.ndarray, true_cost: np.ndarray, budget: float) -> Score:
    """Score ``arms`` (one per user) against the truth and the oracle at the same ``budget`` (> 0).

    Capture is 1 for the oracle and 0 for all-control.
    """
    uplift = true_uplift(arms, true_response)
    oracle_uplift = true_uplift(oracle_arms(true_response, true_cost, budget), true_response)
    spend = float(true_cost[np.arange(arms.shape[0]), arms].sum())
    return Score(
        capture=uplift / oracle_uplift if oracle_uplift > 0 else float("nan"),
        spend_ratio=spend / budget if budget > 0 else float("inf") if spend > 0 else 0.0,
        uplift=uplift,
        oracle_uplift=oracle_uplift,
        true_spend=spend,
    )
