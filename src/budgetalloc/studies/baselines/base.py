"""What every baseline shares: the interface, preprocessing and the Lagrangian allocation.

A baseline learns, from a randomized trial, each user's expected response and cost
under every arm (or what the Lagrangian can use in their place), then allocates with
:func:`~budgetalloc.method.lagrangian.lagrangian_allocation`; the methods differ only
in ``_fit`` and ``_predict``. Conventions are scikit-learn's: ``__init__`` only stores
keyword-only size knobs, ``fit(trial, seed=...)`` returns ``self``, learned attributes
end in ``_``. Fits and predictions run with one OpenMP thread (docs/baselines.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_limits

from budgetalloc.data.contract import Preprocessor, Trial
from budgetalloc.errors import BudgetallocError, DataError
from budgetalloc.method.lagrangian import LagrangianAllocation, lagrangian_allocation

OPENMP_THREADS = 1
#: The class decorator of every baseline: its annotated class attributes become the
#: keyword-only size knobs of ``__init__`` (identity equality and :meth:`Baseline.__repr__` kept).
size_knobs = functools.partial(dataclass, kw_only=True, eq=False, repr=False)


class Baseline:
    """The interface of every comparison method; subclasses define ``_fit`` and ``_predict``.

    * ``_fit(Z, trial, seed)`` learns from standardised, imputed float32 features ``Z``
      and the trial's targets;
    * ``_predict(Z) -> (value, cost)`` gives ``(n, M)`` arrays in the trial's units.
    """

    name: str = ""

    def fit(self, trial: Trial, *, seed: int) -> Baseline:
        """Fit the preprocessor and the method on a validated ``trial`` (the contract gives it
        two arms or more, arm 0 the control); ``seed`` seeds every choice (splits, init, trees)."""
        self.preprocessor_ = Preprocessor.fit(trial.X)
        self.n_arms_ = int(trial.n_arms)
        self.n_features_ = int(trial.X.shape[1])
        self.binary_response_ = bool(trial.binary_response)
        # an arm that never cost anything in the trial (control, as a rule) is predicted free
        spent = np.bincount(trial.treatment, weights=trial.cost, minlength=trial.n_arms)
        self.free_arms_ = spent <= 0.0
        with threadpool_limits(limits=OPENMP_THREADS, user_api="openmp"):
            self._fit(self.preprocessor_.transform(trial.X), trial, int(seed))
        return self

    def outcomes(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted ``(value, cost)`` of raw features ``X`` ``(n, d)`` (trial order, NaN imputed)
        under every arm: float64 ``(n, M)`` each, finite; cost ``>= 0``, exactly 0 for the arms
        that never cost anything in the trial."""
        Z = self._transform(X)
        with threadpool_limits(limits=OPENMP_THREADS, user_api="openmp"):
            value, cost = self._predict(Z)
        value = np.asarray(value, dtype=np.float64)
        cost = np.maximum(np.asarray(cost, dtype=np.float64), 0.0)
        cost[:, self.free_arms_] = 0.0
        if not (np.isfinite(value).all() and np.isfinite(cost).all()):
            raise BudgetallocError(f"{self.name}: non-finite predictions (diverged fit?)")
        return value, cost

    def allocation(self, X: np.ndarray, budget: float) -> LagrangianAllocation:
        """The per-user Lagrangian allocation of raw features ``X`` under ``budget`` (``>= 0``).

        Its ``spend``, in this method's predicted cost, never exceeds ``budget`` when a
        free arm exists.
        """
        if not np.isfinite(budget) or budget < 0:
            raise BudgetallocError(f"{self.name}: budget must be a finite number >= 0, got {budget!r}")
        value, cost = self.outcomes(X)
        return lagrangian_allocation(value, cost, float(budget))

    def allocate(self, X: np.ndarray, budget: float) -> np.ndarray:
        """One arm per user, ``(n,)`` int32; see :meth:`allocation`."""
        return self.allocation(X, budget).arms

    def knobs(self) -> dict:
        """The size knobs given to the constructor."""
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def _transform(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "preprocessor_"):
            raise NotFittedError(f"{self.name}: call fit() before outcomes() or allocate()")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_:
            raise DataError(f"{self.name}: expected features of shape (n, {self.n_features_}), got {X.shape}")
        return self.preprocessor_.transform(X)

    def _fit(self, Z: np.ndarray, trial: Trial, seed: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def _predict(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.knobs().items())
        return f"{type(self).__name__}({knobs})"


def arm_propensities(trial: Trial) -> np.ndarray:
    """Each arm's mean assignment probability ``(M,)``: the mean propensity of its rows."""
    sums = np.bincount(trial.treatment, weights=trial.propensity, minlength=trial.n_arms)
    counts = np.bincount(trial.treatment, minlength=trial.n_arms)
    return sums / np.maximum(counts, 1)


def arm_means(trial: Trial, values: np.ndarray) -> np.ndarray:
    """Propensity-weighted mean of ``values`` in each arm, ``(M,)``."""
    w = trial.ipw
    num = np.bincount(trial.treatment, weights=w * values, minlength=trial.n_arms)
    den = np.bincount(trial.treatment, weights=w, minlength=trial.n_arms)
    return num / np.maximum(den, 1e-300)


def target_scale(values: np.ndarray, *, binary: bool = False) -> float:
    """A positive unit for a target: 1 for binary, else the mean absolute value."""
    if binary:
        return 1.0
    scale = float(np.mean(np.abs(values)))
    return scale if scale > 1e-12 else 1.0
