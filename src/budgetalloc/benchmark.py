"""The offline comparison: HRC against the six baselines on simulated worlds.

Each *case* is a simulated world (a :class:`SimulateParams`) at one noise level.
For each case: a training trial, a held-out test trial (IPS value, AUCC) and a
population with its truth (capture, true spend) are drawn from the same seed
family; every method is fitted on the training trial, then allocates the
population at each budget level (a fraction of the population's all-max-coupon
true spend). Reported per (case, method, budget): capture of the oracle's
uplift, true spend / budget, IPS response and spend per user on the test trial
at the same per-user budget, AUCC, fit and allocate seconds.

Every method, ours included, is given the same trial, seed and budgets; the
baselines allocate through the per-user Lagrangian on their own predictions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from budgetalloc.allocate import allocate_population
from budgetalloc.baselines import BASELINES, make_baseline
from budgetalloc.data import Population, Trial, trial_from_frame
from budgetalloc.evaluate import cluster_roi
from budgetalloc.metrics import ips_value, multi_arm_aucc
from budgetalloc.params import Params, SimulateParams
from budgetalloc.pipeline import fit_policy
from budgetalloc.simulate import max_spend, score_allocation, simulate_population, simulate_trial

METHODS = ("HRC", *BASELINES)
BUDGET_LEVELS = (0.05, 0.1, 0.2, 0.35)


@dataclass(frozen=True)
class Case:
    """One simulated world at one noise setting."""

    name: str
    world: SimulateParams
    noise: str = "none"  # which knob the sweep moves
    level: float = 0.0


def default_cases(*, n_users: int, quick: bool) -> list[Case]:
    """Worlds (clean binary, GMV, noisy) and the noise sweep, one knob at a time."""
    base = SimulateParams(n_users=n_users)
    cases = [
        Case("binary", base),
        Case("gmv", base.model_copy(update={"world": "gmv"})),
        Case("noisy", base.model_copy(update={"label_noise": 0.1, "cost_outliers": 0.03, "feature_noise": 0.5}),
             "mixed", 1.0),
    ]
    sweep = {
        "label_noise": (0.1, 0.2) if quick else (0.05, 0.1, 0.2, 0.3),
        "cost_outliers": (0.05,) if quick else (0.01, 0.03, 0.05, 0.1),
        "feature_noise": (0.5,) if quick else (0.25, 0.5, 1.0),
    }
    for knob, levels in sweep.items():
        for level in levels:
            cases.append(Case(f"{knob}={level:g}", base.model_copy(update={knob: level}), knob, level))
    return cases


class HRCMethod:
    """Our method behind the baselines' interface (fit, outcomes, allocate)."""

    name = "HRC"

    def __init__(self, *, params: Params) -> None:
        self.params = params

    def fit(self, trial: Trial, *, seed: int) -> HRCMethod:
        params = self.params.model_copy(update={"seed": seed})
        self.policy_ = fit_policy(trial, params)
        return self

    def _population(self, X: np.ndarray) -> Population:
        return Population(user_id=np.arange(X.shape[0]), X=X, feature_names=self.policy_.feature_names)

    def allocate(self, X: np.ndarray, budget: float) -> np.ndarray:
        frame = allocate_population(self.policy_, self._population(X), budget).frame
        return frame["treatment"].to_numpy()

    def roi_score(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from budgetalloc.allocate import population_clusters

        clusters = population_clusters(self.policy_, X, batch_size=self.policy_.params.allocate.batch_size)
        arm, roi = cluster_roi(self.policy_)
        return roi[clusters], arm[clusters]


def baseline_roi_score(model, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted best incremental ROI over coupon arms, and that arm."""
    value, cost = model.outcomes(X)
    roi = (value[:, 1:] - value[:, :1]) / np.maximum(cost[:, 1:] - cost[:, :1], 1e-12)
    best = np.argmax(roi, axis=1)
    return roi[np.arange(len(best)), best], best + 1


def make_method(name: str, params: Params, *, quick: bool):
    """HRC or a baseline, sized for quick or full runs."""
    if name == "HRC":
        return HRCMethod(params=params)
    return make_baseline(name, **({} if not quick else QUICK_SIZES.get(name, {})))


QUICK_SIZES: dict[str, dict] = {}


def _draw(case: Case, seed: int, n_test: int, n_population: int):
    train = simulate_trial(case.world, seed=seed)
    test = simulate_trial(case.world, seed=seed + 1, n_users=n_test, id_offset=10**8)
    pop = simulate_population(case.world, seed=seed + 2, n_users=n_population)
    return trial_from_frame(train.frame, source=case.name), test, pop


def _features(frame: pd.DataFrame, names) -> np.ndarray:
    return frame[list(names)].to_numpy(np.float32)


def run_case(case: Case, methods, params: Params, *, seed: int, n_test: int, n_population: int,
             quick: bool, levels=BUDGET_LEVELS, log: Callable[[str], None] = print) -> list[dict]:
    """All methods on one case; one result row per (method, budget level)."""
    trial, test, pop = _draw(case, seed, n_test, n_population)
    test_trial = trial_from_frame(test.frame, source=f"{case.name}-test")
    X_pop, X_test = _features(pop.frame, trial.feature_names), _features(test.frame, trial.feature_names)
    pop_scale, test_scale = max_spend(pop.true_cost), max_spend(test.true_cost)
    rows = []
    for name in methods:
        model = make_method(name, params, quick=quick)
        t0 = time.perf_counter()
        model.fit(trial, seed=seed)
        fit_s = time.perf_counter() - t0
        score, arm = model.roi_score(X_test) if name == "HRC" else baseline_roi_score(model, X_test)
        aucc = multi_arm_aucc(score, arm, test_trial.treatment, test_trial.response, test_trial.cost,
                              test_trial.propensity)
        for level in levels:
            t0 = time.perf_counter()
            arms = model.allocate(X_pop, level * pop_scale)
            alloc_s = time.perf_counter() - t0
            truth = score_allocation(arms, pop.true_response, pop.true_cost, level * pop_scale)
            ips = ips_value(model.allocate(X_test, level * test_scale), test_trial.treatment,
                            test_trial.response, test_trial.cost, test_trial.propensity)
            rows.append({
                "case": case.name, "noise": case.noise, "noise_level": case.level, "method": name,
                "budget_level": level, "capture": truth.capture, "spend_ratio": truth.spend_ratio,
                "ips_response": ips.response, "ips_cost": ips.cost, "aucc": aucc,
                "fit_s": fit_s, "allocate_s": alloc_s, "n_train": trial.n,
            })
        log(f"{case.name:>20} {name:>7}: capture {np.mean([r['capture'] for r in rows[-len(levels):]]):.3f} "
            f"max spend {max(r['spend_ratio'] for r in rows[-len(levels):]):.3f} fit {fit_s:.1f}s")
    return rows


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean capture, worst spend ratio, mean AUCC and fit time per (case, method)."""
    g = results.groupby(["case", "method"], sort=False)
    return pd.DataFrame({
        "capture_mean": g["capture"].mean(),
        "capture_min": g["capture"].min(),
        "spend_ratio_max": g["spend_ratio"].max(),
        "aucc": g["aucc"].mean(),
        "fit_s": g["fit_s"].mean(),
        "allocate_s": g["allocate_s"].mean(),
    }).reset_index()
