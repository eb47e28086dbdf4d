"""TPM-CF: two-phase method with a (generalized random) causal forest from EconML.

Uses :class:`econml.grf.CausalForest` (Athey, Tibshirani & Wager 2019, "Generalized
random forests", Annals of Statistics; Wager & Athey 2018, JASA), EconML's
implementation of GRF. EconML is maintained (PyWhy) and installs with this
project's numpy and scikit-learn.
"""

from __future__ import annotations

import warnings

import numpy as np
from econml.grf import CausalForest

from budgetalloc.data.contract import Trial
from budgetalloc.studies.baselines.base import BaselineBase
from budgetalloc.studies.baselines.meta_learners import gradient_boosting, predict_mean, row_weights


class TPMCausalForest(BaselineBase):
    """TPM-CF: a multi-treatment causal forest per target plus a control-level model.

    For each target ``y`` (response, then cost) one GRF causal forest is grown with
    the treatment one-hot encoded over the non-control arms, ``T = (1[t=1], ..,
    1[t=M-1])``. Each leaf solves the local moment equation of the linear model
    ``y = b(x) + theta(x) . T`` (with intercept), so ``theta_j(x)`` is the effect of
    arm ``j`` against control; the splitting criterion is GRF's (``criterion='het'``:
    the gradient-based approximation of heterogeneity in ``theta``), and the
    estimates are honest (half of each tree's subsample places the splits, the other
    half fills the leaves). Assignment in an RCT does not depend on ``x``, so no
    residualisation (DML) is needed; the intercept absorbs unequal arm shares.

    The control level ``mu_0(x)`` (which the forest does not return) comes from a
    gradient-boosting model on the control rows (log loss for a binary response,
    squared error otherwise). Then ``value[i, j] = mu_0(x_i) + theta^r_j(x_i)`` and
    ``cost[i, j] = mu^c_0(x_i) + theta^c_j(x_i)``.

    Loss: the forest minimises, per split, GRF's heterogeneity criterion for the
    moment ``E[(y - b - theta . T) (1, T)] = 0``; the control models minimise log loss
    or squared error.

    Args:
        n_estimators: trees per forest (a multiple of 4 for EconML's subforests).
        max_samples: share of rows each tree subsamples (half for splits, half for leaves).
        min_samples_leaf, max_depth, max_features: tree size.
        n_jobs: threads for the forests.
        control_max_iter: boosting rounds of the control-level models.
    """

    name = "TPM-CF"

    def __init__(
        self,
        *,
        n_estimators: int = 24,
        max_samples: float = 0.2,
        min_samples_leaf: int = 50,
        max_depth: int | None = 10,
        max_features: float = 0.5,
        n_jobs: int = 2,
        control_max_iter: int = 200,
    ):
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.min_samples_leaf = min_samples_leaf
        self.max_depth = max_depth
        self.max_features = max_features
        self.n_jobs = n_jobs
        self.control_max_iter = control_max_iter

    def _forest(self, seed: int) -> CausalForest:
        return CausalForest(
            n_estimators=max(4, 4 * round(self.n_estimators / 4)),
            criterion="het",
            max_samples=self.max_samples,
            min_samples_leaf=self.min_samples_leaf,
            max_depth=self.max_depth,
            max_features=self.max_features,
            honest=True,
            inference=False,
            n_jobs=self.n_jobs,
            random_state=seed,
        )

    def _control_model(self, y: np.ndarray, binary: bool, seed: int):
        return gradient_boosting(
            classifier=binary and bool(0.0 < y.mean() < 1.0),
            max_iter=self.control_max_iter,
            learning_rate=0.1,
            max_leaf_nodes=31,
            min_samples_leaf=50,
            seed=seed,
        )

    def _fit(self, Z: np.ndarray, trial: Trial, seed: int) -> None:
        T = np.eye(trial.n_arms)[trial.treatment][:, 1:]
        control = trial.treatment == 0
        w = trial.ipw
        targets = {"response": (trial.response, trial.binary_response), "cost": (trial.cost, False)}
        self.forests_, self.control_models_ = {}, {}
        for k, (key, (y, binary)) in enumerate(targets.items()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # EconML's deprecation chatter
                self.forests_[key] = self._forest(seed + k).fit(Z, T, y)
            model = self._control_model(y[control], binary, seed + 10 + k)
            self.control_models_[key] = model.fit(
                Z[control], y[control], sample_weight=row_weights(w[control])
            )

    def _predict_target(self, Z: np.ndarray, key: str) -> np.ndarray:
        base = predict_mean(self.control_models_[key], Z)
        theta = self.forests_[key].predict(Z).reshape(Z.shape[0], self.n_arms_ - 1)
        return np.column_stack([base, base[:, None] + theta])

    def _predict(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._predict_target(Z, "response"), self._predict_target(Z, "cost")
