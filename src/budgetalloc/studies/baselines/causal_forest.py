"""TPM-CF: a two-phase method on EconML's generalized random (causal) forest.

Per target (response, then cost), one multi-treatment :class:`econml.grf.CausalForest`
gives every coupon arm's effect against control, and a boosting model on the control
rows gives the control level. The method and its sources: docs/baselines.md.
"""

from __future__ import annotations

import warnings

import numpy as np
from econml.grf import CausalForest

from budgetalloc.data.contract import Trial
from budgetalloc.studies.baselines.base import Baseline, size_knobs
from budgetalloc.studies.baselines.meta_learners import gradient_boosting, predict_mean, row_weights


@size_knobs
class TPMCausalForest(Baseline):
    """TPM-CF: ``value[i, j] = mu_0(x_i) + theta_j(x_i)``, likewise the cost.

    Args:
        n_estimators: trees per forest (rounded to a multiple of 4 for EconML's subforests).
        max_samples: share of rows each tree subsamples (half for splits, half for leaves).
        min_samples_leaf, max_depth, max_features: tree size.
        n_jobs: threads for the forests (more than one is not reproducible bit for bit).
        control_max_iter: boosting rounds of the control-level models.
    """

    name = "TPM-CF"
    n_estimators: int = 24
    max_samples: float = 0.2
    min_samples_leaf: int = 50
    max_depth: int | None = 10
    max_features: float = 0.5
    n_jobs: int = 2
    control_max_iter: int = 200

    def _forest(self, seed: int) -> CausalForest:
        return CausalForest(n_estimators=max(4, 4 * round(self.n_estimators / 4)), criterion="het",
                            max_samples=self.max_samples, min_samples_leaf=self.min_samples_leaf,
                            max_depth=self.max_depth, max_features=self.max_features, honest=True,
                            inference=False, n_jobs=self.n_jobs, random_state=seed)

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
            model = gradient_boosting(y[control], seed + 10 + k, binary=binary, max_iter=self.control_max_iter)
            self.control_models_[key] = model.fit(Z[control], y[control], sample_weight=row_weights(w[control]))

    def _predict_target(self, Z: np.ndarray, key: str) -> np.ndarray:
        base = predict_mean(self.control_models_[key], Z)
        theta = self.forests_[key].predict(Z).reshape(Z.shape[0], self.n_arms_ - 1)
        return np.column_stack([base, base[:, None] + theta])

    def _predict(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._predict_target(Z, "response"), self._predict_target(Z, "cost")
