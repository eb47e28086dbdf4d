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


@dataclass(frozen=True)
class BenchmarkSize:
    """Row counts of one benchmark run."""

    n_train: int
    n_test: int
    n_population: int


QUICK = BenchmarkSize(n_train=40_000, n_test=20_000, n_population=20_000)
FULL = BenchmarkSize(n_train=200_000, n_test=100_000, n_population=100_000)


def plot_noise_sweep(summary: pd.DataFrame, cases: list[Case], path) -> None:
    """Mean capture against each noise knob's level, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = [k for k in ("label_noise", "cost_outliers", "feature_noise") if any(c.noise == k for c in cases)]
    fig, axes = plt.subplots(1, max(len(knobs), 1), figsize=(4.2 * max(len(knobs), 1), 3.6), dpi=110,
                             squeeze=False)
    for ax, knob in zip(axes[0], knobs, strict=False):
        names = ["binary"] + [c.name for c in cases if c.noise == knob]
        levels = [0.0] + [c.level for c in cases if c.noise == knob]
        for method in summary["method"].unique():
            sub = summary[summary["method"] == method].set_index("case")
            ax.plot(levels, [sub.loc[n, "capture_mean"] if n in sub.index else np.nan for n in names],
                    "o-", label=method)
        ax.set_xlabel(knob)
        ax.set_ylabel("capture of oracle uplift")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cost_curves(results: pd.DataFrame, case: str, path) -> None:
    """IPS response versus IPS spend per user on the test trial, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=110)
    for method, sub in results[results["case"] == case].groupby("method", sort=False):
        sub = sub.sort_values("budget_level")
        ax.plot(sub["ips_cost"], sub["ips_response"], "o-", label=method)
    ax.set_xlabel("spend per user (IPS, test trial)")
    ax.set_ylabel("response per user (IPS)")
    ax.set_title(f"cost curves, {case} world")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def benchmark_markdown(summary: pd.DataFrame, meta: dict) -> str:
    """The report: run description and one table per case."""
    lines = ["# Benchmark: HRC against six baselines", "",
             "| " + " | ".join(f"{k}: {v}" for k, v in meta.items()) + " |", "", ]
    cols = ["method", "capture_mean", "capture_min", "spend_ratio_max", "aucc", "fit_s", "allocate_s"]
    for case, sub in summary.groupby("case", sort=False):
        lines += [f"## {case}", "", sub[cols].to_markdown(index=False, floatfmt=".3f"), ""]
    return "\n".join(lines)


def run_benchmark(out_dir, params: Params, *, quick: bool, seed: int = 0, methods=METHODS,
                  size: BenchmarkSize | None = None, cases: list[Case] | None = None,
                  log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run every method on every case; write benchmark.csv, benchmark.md and plots atomically.

    Args:
        out_dir: output directory.
        params: params for HRC (baselines use their own defaults).
        quick: the small configuration (minutes) instead of the full one.
        seed: seed family of the simulated data and every fit.
        methods: method names (``METHODS`` by default).
        size: row counts (default ``QUICK`` or ``FULL``).
        cases: worlds (default :func:`default_cases`).
        log: progress sink, one line per (case, method).

    Returns:
        The summary table (one row per case and method).
    """
    from budgetalloc.files import atomic_files

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        from budgetalloc.errors import BudgetallocError

        raise BudgetallocError(f"unknown method '{unknown[0]}' (choose from {', '.join(METHODS)})")
    size = size or (QUICK if quick else FULL)
    cases = cases or default_cases(n_users=size.n_train, quick=quick)
    started = time.time()
    rows = []
    for case in cases:
        world = case.world.model_copy(update={"n_users": size.n_train})
        rows += run_case(Case(case.name, world, case.noise, case.level), methods, params, seed=seed,
                         n_test=size.n_test, n_population=size.n_population, quick=quick, log=log)
    results = pd.DataFrame(rows)
    summary = summarise(results)
    meta = {"quick": quick, "train rows": size.n_train, "population": size.n_population,
            "test rows": size.n_test, "seed": seed, "seconds": round(time.time() - started, 1),
            "machine": "2 CPU cores"}
    with atomic_files(out_dir) as tmp:
        results.to_csv(tmp / "benchmark.csv", index=False)
        summary.to_csv(tmp / "benchmark_summary.csv", index=False)
        (tmp / "benchmark.md").write_text(benchmark_markdown(summary, meta) + "\n")
        plot_noise_sweep(summary, cases, tmp / "noise_sweep.png")
        plot_cost_curves(results, cases[0].name, tmp / "cost_curves.png")
    return summary
