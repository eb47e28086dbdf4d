"""The offline comparison: HRC against the six baselines on simulated worlds.

A *case* is a simulated world at one noise level. Per case, a training trial, a held-out
test trial and a population with its truth are drawn from one seed family; every method
is fitted on the same trial and seed, then allocates the population at each budget level
(a fraction of its all-max-coupon true spend) and along the budget path ``PATH_LEVELS``.
Reported per (case, method, level): nominal and matched-spend capture of the oracle's
uplift, true spend / budget, IPS response and spend per user on the test trial at the
same budget per user, AUCC, fit and allocate seconds. The baselines allocate through the
per-user Lagrangian on their own predictions. The metrics and why: docs/benchmark.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from budgetalloc.data.contract import Trial, trial_from_frame
from budgetalloc.errors import BudgetallocError
from budgetalloc.files import atomic_files
from budgetalloc.fit.fit_stream import fit_policy
from budgetalloc.method.lagrangian import lagrangian_allocation
from budgetalloc.params import Params, SimulateParams
from budgetalloc.serve.allocate import arms_in_file_order, classify, program_for
from budgetalloc.serve.evaluate import cluster_roi
from budgetalloc.serve.metrics import ips_value, matched_capture, multi_arm_aucc
from budgetalloc.studies.baselines import BASELINES, make_baseline
from budgetalloc.studies.simulate import (
    World,
    max_spend,
    oracle_arms,
    score_allocation,
    simulate_population,
    simulate_trial,
    true_uplift,
)

METHODS = ("HRC", *BASELINES)
BUDGET_LEVELS = (0.02, 0.05, 0.1, 0.2, 0.35)
#: Budgets every method also allocates, for matched-spend capture: 48 from 0.4% to 80% of
#: the all-max spend, 11% apart, plus the reported levels.
PATH_LEVELS = tuple(sorted(set(np.round(np.geomspace(0.004, 0.8, 48), 6)) | set(BUDGET_LEVELS)))
Allocator = Callable[[float], np.ndarray]


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
    """Our method with the baselines' ``fit``; it allocates as ``allocate`` serves."""

    name = "HRC"

    def __init__(self, *, params: Params) -> None:
        self.params = params

    def fit(self, trial: Trial, *, seed: int) -> HRCMethod:
        self.policy_ = fit_policy(trial, self.params.model_copy(update={"seed": seed}))
        return self

    def _clusters(self, X: np.ndarray) -> np.ndarray:
        return classify(self.policy_, X, self.policy_.params.allocate.batch_size)

    def allocator(self, X: np.ndarray) -> Allocator:
        """Budget -> arms for these users: the student runs once, the program per budget."""
        clusters = self._clusters(X)
        n_users = np.bincount(clusters, minlength=self.policy_.k).astype(np.int64)
        program = program_for(self.policy_)
        return lambda budget: arms_in_file_order(clusters, program.solve(n_users, budget).counts)[0]

    def roi_score(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each user's cluster's best incremental ROI, and that arm."""
        clusters = self._clusters(X)
        arm, roi = cluster_roi(self.policy_)
        return roi[clusters], arm[clusters]


def roi_score(model, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A method's predicted best incremental ROI over the coupon arms for each user, and that arm."""
    if isinstance(model, HRCMethod):
        return model.roi_score(X)
    value, cost = model.outcomes(X)
    roi = (value[:, 1:] - value[:, :1]) / np.maximum(cost[:, 1:] - cost[:, :1], 1e-12)
    best = np.argmax(roi, axis=1)
    return roi[np.arange(len(best)), best], best + 1


def method_allocator(model, X: np.ndarray) -> Allocator:
    """Budget -> arms for ``X``; a baseline predicts once and re-runs only its Lagrangian."""
    if isinstance(model, HRCMethod):
        return model.allocator(X)
    value, cost = model.outcomes(X)
    return lambda budget: lagrangian_allocation(value, cost, float(budget)).arms


def budget_path(allocate: Allocator, true_response: np.ndarray, true_cost: np.ndarray,
                budgets) -> tuple[np.ndarray, np.ndarray]:
    """True (spend, uplift over all-control) of the allocations at each budget."""
    idx = np.arange(true_response.shape[0])
    spend, uplift = [], []
    for budget in budgets:
        arms = allocate(budget)
        spend.append(float(true_cost[idx, arms].sum()))
        uplift.append(true_uplift(arms, true_response))
    return np.array(spend), np.array(uplift)


def oracle_uplift(true_response: np.ndarray, true_cost: np.ndarray, budgets) -> np.ndarray:
    """The per-user oracle's true uplift at each budget."""
    return np.array([true_uplift(oracle_arms(true_response, true_cost, b), true_response) for b in budgets])


def draw_case(case: Case, seed: int, n_test: int, n_population: int) -> tuple[Trial, World, World]:
    """A case's training trial (validated), held-out test trial and population, with their truth."""
    train = simulate_trial(case.world, seed=seed)
    test = simulate_trial(case.world, seed=seed + 1, n_users=n_test, id_offset=10**8)
    pop = simulate_population(case.world, seed=seed + 2, n_users=n_population)
    return trial_from_frame(train.frame, source=case.name), test, pop


def features_of(frame: pd.DataFrame, names) -> np.ndarray:
    """The named columns of a simulated table as a float32 matrix."""
    return frame[list(names)].to_numpy(np.float32)


class CaseResult(NamedTuple):
    """One case's rows: per (method, level) results and per (method, path budget) truth."""

    rows: list[dict]
    paths: list[dict]


def run_case(case: Case, methods, params: Params, *, seed: int, n_test: int, n_population: int,
             levels=BUDGET_LEVELS, log: Callable[[str], None] = print) -> CaseResult:
    """All methods (each at its default sizes) on one case: result rows per (method, budget level) and each
    method's budget path."""
    trial, test, pop = draw_case(case, seed, n_test, n_population)
    test_trial = trial_from_frame(test.frame, source=f"{case.name}-test")
    X_pop, X_test = features_of(pop.frame, trial.feature_names), features_of(test.frame, trial.feature_names)
    pop_scale, test_scale = max_spend(pop.true_cost), max_spend(test.true_cost)
    targets = [level * pop_scale for level in levels]
    oracle = oracle_uplift(pop.true_response, pop.true_cost, targets)
    outcomes = (test_trial.treatment, test_trial.response, test_trial.cost, test_trial.propensity)
    rows, paths = [], []
    for name in methods:
        model = HRCMethod(params=params) if name == "HRC" else make_baseline(name)
        t0 = time.perf_counter()
        model.fit(trial, seed=seed)
        fit_s = time.perf_counter() - t0
        aucc = multi_arm_aucc(*roi_score(model, X_test), *outcomes)
        t0 = time.perf_counter()
        allocate = method_allocator(model, X_pop)
        allocate(targets[0])
        alloc_s = time.perf_counter() - t0
        allocate_test = method_allocator(model, X_test)
        path_spend, path_uplift = budget_path(allocate, pop.true_response, pop.true_cost,
                                              [lv * pop_scale for lv in PATH_LEVELS])
        matched = matched_capture(path_spend, path_uplift, targets, oracle)
        paths += [{"case": case.name, "method": name, "budget_level": lv, "spend_ratio": s / (lv * pop_scale),
                   "true_spend_level": s / pop_scale, "uplift": u}
                  for lv, s, u in zip(PATH_LEVELS, path_spend, path_uplift, strict=True)]
        for i, level in enumerate(levels):
            truth = score_allocation(allocate(targets[i]), pop.true_response, pop.true_cost, targets[i])
            ips = ips_value(allocate_test(level * test_scale), *outcomes)
            rows.append({
                "case": case.name, "noise": case.noise, "noise_level": case.level, "method": name,
                "budget_level": level, "capture": truth.capture, "spend_ratio": truth.spend_ratio,
                "matched_capture": float(matched[i]),
                "ips_response": ips.response, "ips_cost": ips.cost, "aucc": aucc,
                "fit_s": fit_s, "allocate_s": alloc_s, "n_train": trial.n,
            })
        mine = rows[-len(levels):]
        log(f"{case.name:>20} {name:>7}: capture {np.mean([r['capture'] for r in mine]):.3f} "
            f"matched {np.mean([r['matched_capture'] for r in mine]):.3f} "
            f"max spend {max(r['spend_ratio'] for r in mine):.3f} fit {fit_s:.1f}s")
    return CaseResult(rows, paths)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per (case, method): nominal and matched-spend capture (mean, worst), worst spend ratio, AUCC, times."""
    return results.groupby(["case", "method"], sort=False).agg(
        capture_mean=("capture", "mean"),
        capture_min=("capture", "min"),
        matched_mean=("matched_capture", "mean"),
        matched_min=("matched_capture", "min"),
        spend_ratio_max=("spend_ratio", "max"),
        aucc=("aucc", "mean"),
        fit_s=("fit_s", "mean"),
        allocate_s=("allocate_s", "mean"),
    ).reset_index()


@dataclass(frozen=True)
class BenchmarkSize:
    """Row counts of one benchmark run."""

    n_train: int
    n_test: int
    n_population: int


QUICK = BenchmarkSize(n_train=40_000, n_test=20_000, n_population=20_000)
FULL = BenchmarkSize(n_train=200_000, n_test=100_000, n_population=100_000)


@contextmanager
def _figure(path, ncols: int = 1, figsize=(5.6, 4.0)):
    """A row of ``ncols`` axes, laid out and saved to ``path`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, dpi=110, squeeze=False)
    yield axes[0]
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_noise_sweep(summary: pd.DataFrame, cases: list[Case], path) -> None:
    """Mean capture against each noise knob's level, one line per method."""
    knobs = [k for k in ("label_noise", "cost_outliers", "feature_noise") if any(c.noise == k for c in cases)]
    with _figure(path, max(len(knobs), 1), (4.2 * max(len(knobs), 1), 3.6)) as axes:
        for ax, knob in zip(axes, knobs, strict=False):
            names = ["binary"] + [c.name for c in cases if c.noise == knob]
            levels = [0.0] + [c.level for c in cases if c.noise == knob]
            for method in summary["method"].unique():
                sub = summary[summary["method"] == method].set_index("case")
                ax.plot(levels, [sub.loc[n, "capture_mean"] if n in sub.index else np.nan for n in names],
                        "o-", label=method)
            ax.set_xlabel(knob)
            ax.set_ylabel("capture of oracle uplift")
        axes[0].legend(fontsize=7)


def plot_by_method(frame: pd.DataFrame, case: str, x: str, y: str, path, *, style: str, xlabel: str,
                   ylabel: str, title: str, x_max: float | None = None) -> None:
    """``y`` against ``x`` for one case, a line per method through its budget levels (``x <= x_max``)."""
    with _figure(path) as (ax,):
        for method, sub in frame[frame["case"] == case].groupby("method", sort=False):
            sub = (sub if x_max is None else sub[sub[x] <= x_max]).sort_values("budget_level")
            ax.plot(sub[x], sub[y], style, label=method)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)


def by_level(results: pd.DataFrame, case: str) -> pd.DataFrame:
    """One case's capture / matched capture / spend ratio at every budget level, a row per method."""
    sub = results[results["case"] == case]
    wide = sub.pivot_table(index="method", columns="budget_level", sort=False,
                           values=["capture", "matched_capture", "spend_ratio"])
    out = pd.DataFrame(index=wide.index)
    for level in sorted(sub["budget_level"].unique()):
        out[f"{level:g}: capture / matched / spend"] = [
            f"{c:.3f} / {m:.3f} / {r:.2f}" for c, m, r in zip(
                wide[("capture", level)], wide[("matched_capture", level)], wide[("spend_ratio", level)], strict=True)]
    return out.reset_index()


def benchmark_markdown(summary: pd.DataFrame, meta: dict, results: pd.DataFrame | None = None) -> str:
    """The report: run description, one summary table per case and (with ``results``) its budget levels."""
    lines = ["# Benchmark: HRC against six baselines", "",
             "| " + " | ".join(f"{k}: {v}" for k, v in meta.items()) + " |", "",
             ("capture: share of the per-user oracle's uplift at the nominal budget; matched: at the method's "
              "own true spend equal to the budget (budget path interpolated); spend: true spend / budget."), ""]
    cols = ["method", "capture_mean", "capture_min", "matched_mean", "matched_min", "spend_ratio_max", "aucc",
            "fit_s", "allocate_s"]
    for case, sub in summary.groupby("case", sort=False):
        lines += [f"## {case}", "", sub[cols].to_markdown(index=False, floatfmt=".3f"), ""]
        if results is not None:
            lines += ["By budget level (fraction of the all-max spend):", "",
                      by_level(results, case).to_markdown(index=False), ""]
    return "\n".join(lines)


def merge_reports(out_dir, sources, meta: dict) -> pd.DataFrame:
    """One report from several runs' directories (e.g. the baselines and a re-run of HRC).

    Rows of a (case, method) found in several sources come from the last one.
    """
    results = [pd.read_csv(Path(d) / "benchmark.csv") for d in sources]
    paths = [pd.read_csv(Path(d) / "budget_paths.csv") for d in sources]
    key = ["case", "method", "budget_level"]
    merged = pd.concat(results).drop_duplicates(key, keep="last")
    order = {m: i for i, m in enumerate(dict.fromkeys([*METHODS, *merged["method"]]))}
    case_order = {c: i for i, c in enumerate(dict.fromkeys(pd.concat(results)["case"]))}
    merged = merged.sort_values(key, key=lambda col: col.map(order) if col.name == "method"
                                else col.map(case_order) if col.name == "case" else col, kind="stable")
    path_frame = pd.concat(paths).drop_duplicates(key, keep="last")
    return write_report(out_dir, merged.reset_index(drop=True), path_frame.reset_index(drop=True), meta)


def _check_known(kind: str, names, known) -> None:
    """A one-line error naming the first of ``names`` that is not in ``known``."""
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BudgetallocError(f"unknown {kind} '{unknown[0]}' (choose from {', '.join(known)})")


def run_benchmark(out_dir, params: Params, *, quick: bool, seed: int = 0, methods=METHODS,
                  size: BenchmarkSize | None = None, train_rows: int | None = None,
                  cases: list[Case] | None = None, case_names=None,
                  log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run ``methods`` on every case; write benchmark.csv, benchmark.md and plots atomically.

    HRC fits with ``params``, the baselines with their own defaults; ``seed`` is the seed
    family of the simulated data and every fit; ``size`` the row counts (default ``QUICK``
    or ``FULL`` by ``quick``), with ``train_rows`` rows in each training trial if given;
    ``cases`` the worlds (default :func:`default_cases`), of which ``case_names`` picks
    some, in order; ``log`` gets a line per (case, method).
    Returns the summary table (one row per case and method).
    """
    _check_known("method", methods, METHODS)
    size = size or (QUICK if quick else FULL)
    if train_rows is not None:
        size = replace(size, n_train=train_rows)
    cases = cases or default_cases(n_users=size.n_train, quick=quick)
    if case_names:
        known = {c.name: c for c in cases}
        _check_known("case", case_names, known)
        cases = [known[n] for n in case_names]
    started = time.time()
    rows, paths = [], []
    for case in cases:
        world = case.world.model_copy(update={"n_users": size.n_train})
        part = run_case(Case(case.name, world, case.noise, case.level), methods, params, seed=seed,
                        n_test=size.n_test, n_population=size.n_population, log=log)
        rows += part.rows
        paths += part.paths
    meta = {"quick": quick, "train rows": size.n_train, "population": size.n_population,
            "test rows": size.n_test, "seed": seed, "seconds": round(time.time() - started, 1),
            "machine": "2 CPU cores"}
    return write_report(out_dir, pd.DataFrame(rows), pd.DataFrame(paths), meta)


def write_report(out_dir, results: pd.DataFrame, paths: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Write benchmark.csv, benchmark_summary.csv, budget_paths.csv, benchmark.md and plots atomically.

    Returns:
        The summary table (one row per case and method).
    """
    summary = summarise(results)
    first = results.drop_duplicates("case")  # the plots need each case's noise knob and level only
    cases = [Case(r.case, SimulateParams(), r.noise, float(r.noise_level)) for r in first.itertuples()]
    with atomic_files(out_dir) as tmp:
        results.to_csv(tmp / "benchmark.csv", index=False)
        summary.to_csv(tmp / "benchmark_summary.csv", index=False)
        paths.to_csv(tmp / "budget_paths.csv", index=False)
        (tmp / "benchmark.md").write_text(benchmark_markdown(summary, meta, results) + "\n")
        plot_noise_sweep(summary, cases, tmp / "noise_sweep.png")
        plot_by_method(results, cases[0].name, "ips_cost", "ips_response", tmp / "cost_curves.png", style="o-",
                       xlabel="spend per user (IPS, test trial)", ylabel="response per user (IPS)",
                       title=f"cost curves, {cases[0].name} world")
        plot_by_method(paths, cases[0].name, "true_spend_level", "uplift", tmp / "true_paths.png", style=".-",
                       xlabel="true spend / all-max spend", ylabel="true uplift over all-control",
                       title=f"budget paths in truth, {cases[0].name} world", x_max=0.45)
    return summary
