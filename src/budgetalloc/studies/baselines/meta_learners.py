"""TPM-SL and TPM-XL: two-phase methods on the S- and X-learner (Künzel et al. 2019, PNAS).

Two-phase: predict every user's response and cost under every arm with scikit-learn's
histogram gradient boosting (early stopping on 10% of the rows, deterministic given the
seed), then allocate with the per-user Lagrangian. The learners: docs/baselines.md.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

from budgetalloc.data.contract import Trial
from budgetalloc.studies.baselines.base import Baseline, arm_propensities, size_knobs


def gradient_boosting(y: np.ndarray, seed: int, *, binary: bool, max_iter: int = 200, learning_rate: float = 0.1,
                      max_leaf_nodes: int = 31, min_samples_leaf: int = 50, categorical_features=None):
    """An unfitted ``HistGradientBoosting{Classifier,Regressor}`` for target ``y``.

    A classifier (log loss) when ``binary`` and ``y`` holds both 0 and 1 and nothing else;
    a regressor (squared error) otherwise. Early stopping on 10% of the rows, drawn from ``seed``.
    """
    classifier = binary and bool(np.isin(y, (0.0, 1.0)).all() and 0.0 < y.mean() < 1.0)
    cls = HistGradientBoostingClassifier if classifier else HistGradientBoostingRegressor
    return cls(max_iter=max_iter, learning_rate=learning_rate, max_leaf_nodes=max_leaf_nodes,
               min_samples_leaf=min_samples_leaf, categorical_features=categorical_features,
               early_stopping=True, validation_fraction=0.1, n_iter_no_change=10, random_state=seed)


def row_weights(w: np.ndarray) -> np.ndarray | None:
    """``w``, or ``None`` when it is constant (a constant weight does not change a boosting fit)."""
    return None if np.ptp(w) <= 1e-12 * np.abs(w).max() else w


def predict_mean(model, X: np.ndarray) -> np.ndarray:
    """Expected target: ``P(y = 1)`` for a classifier, the prediction for a regressor."""
    if isinstance(model, HistGradientBoostingClassifier):
        return model.predict_proba(X)[:, list(model.classes_).index(1.0)]
    return model.predict(X)


@size_knobs
class _Boosting(Baseline):
    """The size knobs of the boosting models.

    Args:
        max_iter, learning_rate, max_leaf_nodes, min_samples_leaf: of each boosting model.
    """

    max_iter: int = 200
    learning_rate: float = 0.1
    max_leaf_nodes: int = 31
    min_samples_leaf: int = 50

    def _model(self, y: np.ndarray, seed: int, *, binary: bool, categorical_features=None):
        return gradient_boosting(y, seed, binary=binary, categorical_features=categorical_features, **self.knobs())


class TPMSLearner(_Boosting):
    """TPM-SL: one boosting model ``f(x, arm)`` per target, the arm a categorical feature."""

    name = "TPM-SL"

    def _fit(self, Z: np.ndarray, trial: Trial, seed: int) -> None:
        A = _with_arm(Z, trial.treatment)
        cat = [Z.shape[1]]
        self.response_model_ = self._model(trial.response, seed, binary=trial.binary_response,
                                           categorical_features=cat).fit(A, trial.response)
        self.cost_model_ = self._model(trial.cost, seed + 1, binary=False, categorical_features=cat).fit(A, trial.cost)

    def _predict(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        value = np.empty((Z.shape[0], self.n_arms_))
        cost = np.empty_like(value)
        for j in range(self.n_arms_):
            A = _with_arm(Z, np.full(Z.shape[0], j))
            value[:, j] = predict_mean(self.response_model_, A)
            cost[:, j] = self.cost_model_.predict(A)
        return value, cost


def _with_arm(Z: np.ndarray, arms: np.ndarray) -> np.ndarray:
    return np.column_stack([Z, arms.astype(np.float32)])


class TPMXLearner(_Boosting):
    """TPM-XL: an X-learner per non-control arm against control, for response and cost."""

    name = "TPM-XL"

    def _fit(self, Z: np.ndarray, trial: Trial, seed: int) -> None:
        e = arm_propensities(trial)
        self.pair_weight_ = e / (e[0] + e)  # g_j; entry 0 unused
        self.response_ = self._fit_target(Z, trial, trial.response, trial.binary_response, seed)
        self.cost_ = self._fit_target(Z, trial, trial.cost, False, seed + 7919)

    def _fit_target(self, Z, trial: Trial, y: np.ndarray, binary: bool, seed: int) -> dict:
        t, w, M = trial.treatment, trial.ipw, trial.n_arms
        rows = [np.flatnonzero(t == k) for k in range(M)]

        def fit(target: np.ndarray, k: int, model_seed: int, binary: bool = False):
            """A boosting model of ``target`` (one value per row of arm ``k``) on those rows."""
            model = self._model(target, model_seed, binary=binary)
            return model.fit(Z[rows[k]], target, sample_weight=row_weights(w[rows[k]]))

        mu = [fit(y[rows[k]], k, seed + k, binary) for k in range(M)]
        tau0, tau1 = [None], [None]
        for j in range(1, M):
            d1 = y[rows[j]] - predict_mean(mu[0], Z[rows[j]])
            d0 = predict_mean(mu[j], Z[rows[0]]) - y[rows[0]]
            tau1.append(fit(d1, j, seed + 101 * j))
            tau0.append(fit(d0, 0, seed + 101 * j + 1))
        return {"mu0": mu[0], "tau0": tau0, "tau1": tau1}

    def _predict_target(self, Z: np.ndarray, models: dict) -> np.ndarray:
        base = predict_mean(models["mu0"], Z)
        out = np.empty((Z.shape[0], self.n_arms_))
        out[:, 0] = base
        for j in range(1, self.n_arms_):
            g = self.pair_weight_[j]
            tau = g * models["tau0"][j].predict(Z) + (1.0 - g) * models["tau1"][j].predict(Z)
            out[:, j] = base + tau
        return out

    def _predict(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._predict_target(Z, self.response_), self._predict_target(Z, self.cost_)
