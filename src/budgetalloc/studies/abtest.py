"""A/B analysis: two groups of users, orders and GMV per user, lifts with CIs.

Two sources, analysed the same way: a logged per-user table (``group`` with two values,
``orders``, ``gmv``, ``cost``; :func:`analyse_ab`), or a simulated live test
(:func:`simulate_ab`): a simulated population split at random in two halves, each
allocated by its policy (or ``control``: everyone arm 0) under the same budget per
user, with outcomes drawn from the simulator's truth for the arms given. Lifts are
``mean_T / mean_C - 1`` with delta-method intervals and Welch p-values (null when
undefined). The statistics and the simulated test in full: docs/benchmark.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from budgetalloc.data.contract import USER_ID, population_from_frame, read_table
from budgetalloc.errors import BudgetallocError, DataError, PolicyError
from budgetalloc.params import SimulateParams
from budgetalloc.studies.simulate import World, draw_orders, simulate_population

GROUP, ORDERS, GMV, COST = "group", "orders", "gmv", "cost"
AB_COLUMNS = (GROUP, ORDERS, GMV, COST)
METRICS = (ORDERS, GMV)
CONTROL_POLICY = "control"


@dataclass(frozen=True)
class GroupStats:
    """Per-user means and total spend of one group."""

    name: str
    users: int
    orders_per_user: float
    gmv_per_user: float
    cost_per_user: float
    spend: float


@dataclass(frozen=True)
class MetricComparison:
    """Treatment versus control on one per-user metric."""

    metric: str
    control_mean: float
    treatment_mean: float
    diff: float
    lift: float | None
    lift_ci_low: float | None
    lift_ci_high: float | None
    p_value: float | None
    significant: bool

    @property
    def verdict(self) -> str:
        """``significant increase``, ``significant decrease`` or ``not significant``."""
        if not self.significant:
            return "not significant"
        return "significant increase" if self.diff > 0 else "significant decrease"


@dataclass(frozen=True)
class ABReport:
    """The whole analysis; :meth:`to_json` is what ``--out`` writes."""

    source: str
    control: str
    treatment: str
    alpha: float
    groups: tuple[GroupStats, GroupStats]
    metrics: tuple[MetricComparison, ...]
    simulation: dict | None = field(default=None)

    def to_json(self) -> dict:
        """A JSON-ready dict (NaN and infinities become null)."""
        raw = {
            "source": self.source,
            "control_group": self.control,
            "treatment_group": self.treatment,
            "alpha": self.alpha,
            "confidence": 1.0 - self.alpha,
            "groups": {g.name: asdict(g) for g in self.groups},
            "metrics": {m.metric: asdict(m) for m in self.metrics},
            "significant": {m.metric: m.significant for m in self.metrics},
            "verdict": {m.metric: m.verdict for m in self.metrics},
        }
        if self.simulation is not None:
            raw["simulation"] = self.simulation
        return _json_safe(raw)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _numeric(df: pd.DataFrame, name: str, source: str) -> np.ndarray:
    """A finite float column (booleans count as 0/1), or a one-line DataError naming it."""
    col = df[name]
    if not pd.api.types.is_numeric_dtype(col.dtype):
        coerced = pd.to_numeric(col, errors="coerce")
        bad = col[coerced.isna()]
        shown = bad.iloc[0] if len(bad) else col.iloc[0]
        raise DataError(f"{source}: column '{name}' is not numeric (value {shown!r})")
    values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{source}: column '{name}' has a missing or infinite value at row "
                        f"{int(np.flatnonzero(bad)[0])}")
    return values


def split_groups(df: pd.DataFrame, control_group: str | None, source: str) -> tuple[str, str, np.ndarray]:
    """``(control, treatment, is_treatment)``: the two groups' names (control: ``control_group``,
    default the first in sorted order) and a per-row mask of the treatment group."""
    col = df[GROUP]
    if col.isna().any():
        raise DataError(f"{source}: column '{GROUP}' has a missing value at row "
                        f"{int(np.flatnonzero(col.isna().to_numpy())[0])}")
    values = list(pd.unique(col))
    if len(values) != 2:
        shown = ", ".join(repr(str(v)) for v in values[:5])
        raise DataError(f"{source}: column '{GROUP}' must have exactly two values, found "
                        f"{len(values)} ({shown})")
    try:
        names = [str(v) for v in sorted(values)]
    except TypeError:
        names = sorted(str(v) for v in values)
    if len(set(names)) != 2:
        raise DataError(f"{source}: column '{GROUP}' values {names} are not distinct as text")
    control = names[0] if control_group is None else str(control_group)
    if control not in names:
        raise DataError(f"{source}: --control-group '{control}' is not a value of column '{GROUP}' "
                        f"(values: {', '.join(names)})")
    treatment = names[1] if control == names[0] else names[0]
    return control, treatment, col.astype(str).to_numpy() == treatment


def group_stats(name: str, orders, gmv, cost) -> GroupStats:
    """Users, per-user means and total spend of one group."""
    return GroupStats(name=name, users=len(orders), orders_per_user=float(np.mean(orders)),
                      gmv_per_user=float(np.mean(gmv)), cost_per_user=float(np.mean(cost)),
                      spend=float(np.sum(cost)))


def ratio_lift(treated: np.ndarray, control: np.ndarray, *, alpha: float) -> tuple[float, float, float]:
    """Relative lift ``mean_T / mean_C - 1`` of two independent groups, with its delta-method
    ``1 - alpha`` interval: ``(lift, low, high)``, all NaN when the control mean is 0."""
    m_t, m_c = float(np.mean(treated)), float(np.mean(control))
    if m_c == 0:
        return math.nan, math.nan, math.nan
    var_t = float(np.var(treated, ddof=1)) / len(treated)
    var_c = float(np.var(control, ddof=1)) / len(control)
    lift = m_t / m_c - 1.0
    se = math.sqrt(var_t / m_c**2 + m_t**2 * var_c / m_c**4)
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    return lift, lift - z * se, lift + z * se


def welch_p_value(treated: np.ndarray, control: np.ndarray) -> float:
    """Two-sided Welch t-test p-value for equal means (NaN when both groups are constant and equal)."""
    if np.var(treated) == 0 and np.var(control) == 0:
        return 0.0 if np.mean(treated) != np.mean(control) else math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(treated, control, equal_var=False).pvalue)


def compare_metric(metric: str, treated: np.ndarray, control: np.ndarray, *, alpha: float) -> MetricComparison:
    """Lift, interval, p-value and verdict of one metric."""
    lift, low, high = ratio_lift(treated, control, alpha=alpha)
    p = welch_p_value(treated, control)
    defined = math.isfinite(lift)
    return MetricComparison(
        metric=metric, control_mean=float(np.mean(control)), treatment_mean=float(np.mean(treated)),
        diff=float(np.mean(treated) - np.mean(control)),
        lift=lift if defined else None, lift_ci_low=low if defined else None,
        lift_ci_high=high if defined else None, p_value=p if math.isfinite(p) else None,
        significant=bool(math.isfinite(p) and p < alpha),
    )


def analyse_ab(df: pd.DataFrame, *, control_group: str | None = None, alpha: float = 0.05,
               source: str = "<memory>") -> ABReport:
    """The :class:`ABReport` of a per-user table with ``group``, ``orders``, ``gmv`` and ``cost``
    (other columns ignored): ``control_group`` (default the first in sorted order) against the
    other group, intervals at ``1 - alpha``; ``source`` names the table in errors and the report.

    Raises:
        DataError: a missing column, not exactly two groups, a non-numeric or
            missing value, a negative cost, or a group with fewer than 2 users.
    """
    if not 0.0 < alpha < 1.0:
        raise BudgetallocError(f"--alpha {alpha!r} must be between 0 and 1")
    for name in AB_COLUMNS:
        if name not in df.columns:
            raise DataError(f"{source}: missing column '{name}'")
    values = {name: _numeric(df, name, source) for name in (ORDERS, GMV, COST)}
    if (values[COST] < 0).any():
        raise DataError(f"{source}: column '{COST}' has a negative value")
    control, treatment, is_t = split_groups(df, control_group, source)
    sides = ((control, ~is_t), (treatment, is_t))
    for name, mask in sides:
        if mask.sum() < 2:
            raise DataError(f"{source}: group '{name}' has fewer than 2 users")
    groups = tuple(group_stats(name, *(values[c][mask] for c in (ORDERS, GMV, COST))) for name, mask in sides)
    metrics = tuple(compare_metric(m, values[m][is_t], values[m][~is_t], alpha=alpha) for m in METRICS)
    return ABReport(source=source, control=control, treatment=treatment, alpha=alpha,
                    groups=groups, metrics=metrics)


def simulator_params(policies: dict, world: str | None) -> SimulateParams:
    """Simulator settings with the policies' world, ``n_arms`` and ``n_features``.

    Args:
        policies: label -> loaded policy or ``None`` (control).
        world: ``binary`` or ``gmv``; ``None`` takes the fitted policies' (a
            binary-response policy was fitted in the binary world), else binary.

    Raises:
        PolicyError: the policies disagree, do not use the simulator's features, or
            were fitted for the other world (their costs would be off by its coupon scale).
    """
    if world not in (None, "binary", "gmv"):
        raise BudgetallocError(f"--world must be binary or gmv, got '{world}'")
    fitted = [p for p in policies.values() if p is not None]
    if not fitted:
        return SimulateParams(world=world or "binary")
    kinds = {"binary" if p.binary_response else "gmv" for p in fitted}
    arms = {p.n_arms for p in fitted}
    features = {p.feature_names for p in fitted}
    if len(arms) > 1 or len(features) > 1 or len(kinds) > 1:
        raise PolicyError("the two policies differ in arms, features or response type; "
                          "they cannot share a simulated population")
    kind = kinds.pop()
    if world is not None and world != kind:
        raise PolicyError(f"--world {world}: the policies were fitted on a {kind}-world trial")
    names = features.pop()
    if names != tuple(f"x{j}" for j in range(len(names))) or len(names) < 10:
        raise PolicyError(f"policy features ({', '.join(names[:3])}, ...) are not the simulator's "
                          "x0, x1, ...: --simulate needs policies fitted on simulated trials")
    return SimulateParams(world=kind, n_arms=arms.pop(), n_features=len(names))


def policy_arms(policy, frame: pd.DataFrame, budget: float) -> np.ndarray:
    """Arms a policy (or ``control`` for ``None``) gives the users of ``frame`` under ``budget``."""
    if policy is None:
        return np.zeros(len(frame), dtype=np.int64)
    from budgetalloc.serve.allocate import allocate_population

    population = population_from_frame(frame, policy.feature_names, source="simulated population")
    allocation = allocate_population(policy, population, budget)
    return allocation.frame["treatment"].to_numpy(dtype=np.int64)


def conversion_and_basket(pop: World, world: str) -> tuple[np.ndarray, np.ndarray]:
    """True order probability (n, M) and basket mean (n,), recovered from the truth.

    The truth is ``response = p * basket`` and ``cost = p * v``, so for a coupon arm ``j``
    ``basket = response[:, j] * v[j] / cost[:, j]``; the ``binary`` world's basket is 1.
    """
    if world == "binary":
        return pop.true_response, np.ones(pop.true_response.shape[0])
    v = pop.coupon_values
    j = int(np.flatnonzero(v > 0)[0])
    basket = pop.true_response[:, j] * v[j] / pop.true_cost[:, j]
    return pop.true_response / basket[:, None], basket


def simulate_ab(policy_a: str, policy_b: str, *, budget_per_user: float, users: int = 100_000,
                seed: int = 0, world: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Run a simulated live A/B test of two policies under the same budget per user.

    Args:
        policy_a: baseline policy directory, or ``control``; its users form group ``A``.
        policy_b: the challenger (group ``B``).
        budget_per_user: each half's total budget is this times its users.
        users: population size (split in two random halves).
        seed: seeds the population, the split and the outcome draws.
        world: the simulator's ``binary`` or ``gmv`` world (default: the policies').

    Returns:
        ``(table, info)``: a per-user table (``user_id, group, treatment, orders,
        gmv, cost``) and a dict with the truth's expected per-user values per group.
    """
    if not (math.isfinite(budget_per_user) and budget_per_user >= 0):
        raise BudgetallocError(f"--budget-per-user {budget_per_user!r} must be a finite number >= 0")
    if users < 4:
        raise BudgetallocError(f"--users {users} must be at least 4 (two users per group)")
    from budgetalloc.policy import load_policy

    policies = {label: None if spec == CONTROL_POLICY else load_policy(spec)
                for label, spec in (("A", policy_a), ("B", policy_b))}
    params = simulator_params(policies, world)
    world = params.world
    pop = simulate_population(params, seed=seed, n_users=users)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xAB]))
    perm = rng.permutation(users)
    halves = {"A": np.sort(perm[: users // 2]), "B": np.sort(perm[users // 2:])}
    arms = np.zeros(users, dtype=np.int64)
    for label, idx in halves.items():
        arms[idx] = policy_arms(policies[label], pop.frame.iloc[idx], budget_per_user * len(idx))
    p, basket = conversion_and_basket(pop, world)
    idx = np.arange(users)
    orders, gmv = draw_orders(rng, p[idx, arms], basket, world)  # outcomes drawn from the truth
    labels = np.full(users, "A", dtype=object)
    labels[halves["B"]] = "B"
    table = pd.DataFrame({USER_ID: pop.frame[USER_ID].to_numpy(), GROUP: labels, "treatment": arms,
                          ORDERS: orders, GMV: gmv, COST: orders * pop.coupon_values[arms]})
    truth = {"orders": p[idx, arms], "gmv": (p * basket[:, None])[idx, arms], "cost": pop.true_cost[idx, arms]}
    per_group = {}
    for label, rows in halves.items():
        per_group[label] = {f"expected_{k}_per_user": float(v[rows].mean()) for k, v in truth.items()}
        per_group[label]["arm_shares"] = (np.bincount(arms[rows], minlength=len(pop.coupon_values))
                                          / len(rows)).tolist()
    info = {"policy_a": policy_a, "policy_b": policy_b, "budget_per_user": budget_per_user, "users": int(users),
            "seed": seed, "world": world, "truth": per_group}
    return table, info


def run_abtest(*, data: str | Path | None = None, control_group: str | None = None,
               simulate: bool = False, policy_a: str | None = None, policy_b: str | None = None,
               budget_per_user: float | None = None, users: int = 100_000, seed: int = 0,
               world: str | None = None, alpha: float = 0.05, out: str | Path | None = None,
               outcomes: str | Path | None = None) -> ABReport:
    """The ``abtest`` command: :func:`analyse_ab` of a logged table ``data`` (mode a), or of the
    test :func:`simulate_ab` simulates (mode b, ``simulate``: group ``A``, ``policy_a``, is the
    control; ``outcomes`` receives its per-user table). Outputs (``out``: the JSON report)
    are written atomically, only when the analysis succeeds.
    """
    from budgetalloc.files import write_json, write_table

    if simulate == (data is not None):
        raise BudgetallocError("give either --data TABLE or --simulate (not both, not neither)")
    if simulate:
        if policy_a is None or policy_b is None or budget_per_user is None:
            raise BudgetallocError("--simulate needs --policy-a, --policy-b and --budget-per-user")
        table, info = simulate_ab(policy_a, policy_b, budget_per_user=budget_per_user, users=users,
                                  seed=seed, world=world)
        report = replace(analyse_ab(table, control_group="A", alpha=alpha, source="simulated"), simulation=info)
    else:
        if outcomes is not None:
            raise BudgetallocError("--outcomes applies only with --simulate")
        report = analyse_ab(read_table(data), control_group=control_group, alpha=alpha, source=str(data))
    if outcomes is not None:
        write_table(table, outcomes)
    if out is not None:
        write_json(report.to_json(), out)
    return report
