"""Budget-side cost variants on one fit per world: nominal capture and true spend / budget.

One fit per world (defaults, seed 0, the benchmark's 200k-row trial and 100k-user
population), then the same student and honest rows with each cost matrix given
to the program (see reports/variants.md). Prints one line per variant.

    .venv/bin/python benchmarks/budget_side.py feature_noise=0.25,feature_noise=1,binary,noisy,gmv
"""
import sys
import time

import numpy as np

from budgetalloc.data.readers import STREAM_BATCH_ROWS
from budgetalloc.data.sampling import split_mask
from budgetalloc.fit import fit_stream as S
from budgetalloc.fit import pipeline as P
from budgetalloc.fit.trial_scan import HONEST, memory_trial
from budgetalloc.method.program import AllocationProgram
from budgetalloc.method.statistics import cluster_statistics
from budgetalloc.models.distill import predict_clusters
from budgetalloc.models.representation import predict_outcomes
from budgetalloc.params import Params, with_overrides
from budgetalloc.serve.allocate import arms_in_file_order
from budgetalloc.studies.benchmark import default_cases, draw_case, features_of
from budgetalloc.studies.simulate import max_spend, score_allocation

PARAMS = with_overrides(Params(), {"statistics.cost_margin": 0.0})  # the variants add their own
LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35)
ROWS = 200_000


def fit_parts(name: str):
    """The fit's passes up to the honest rows' clusters and predictions, for one world."""
    case = next(c for c in default_cases(n_users=ROWS, quick=False) if c.name == name)
    trial, _, pop = draw_case(case, 0, 1000, 100_000)
    rep = P.Reporter()
    source = memory_trial(trial, STREAM_BATCH_ROWS)
    roles, scan = S.scan_source(source, PARAMS, rep)
    pre, model = S.representation_step(roles, scan, PARAMS, rep)
    clusters = S.cluster_pass(source, roles, pre, model, scan.facts, PARAMS, rep)
    student, _ = S.student_step(source, roles, scan, pre, model, clusters, PARAMS, rep)
    h_idx = np.flatnonzero(roles & HONEST)
    Z = pre.transform(trial.X[h_idx])
    labels = predict_clusters(student, Z, batch_size=16384)
    pr, pc = predict_outcomes(model, Z, batch_size=16384)
    rows = (labels, trial.treatment[h_idx], trial.response[h_idx], trial.cost[h_idx], trial.ipw[h_idx], pr, pc)
    cl = predict_clusters(student, pre.transform(features_of(pop.frame, trial.feature_names)), batch_size=262144)
    return rows, student.n_clusters, cl, pop


def stats_of(rows, k, mask, params=PARAMS):
    return cluster_statistics(*(a[mask] for a in rows), k=k, params=params.statistics, seed=0)


def program(st, cost=None, cost_scen=None):
    return AllocationProgram(st.response, st.cost if cost is None else cost, st.response_scenarios,
                             st.cost_scenarios if cost_scen is None else cost_scen, params=PARAMS.program)


def solver(prog, nk):
    return lambda budget: prog.solve(nk, budget).counts


def crossfit_solver(full, fold_a, fold_b, nk):
    """Budget / rho: rho = the halves' allocations priced by the other half over their own prices."""
    pa, pb, pf = program(fold_a), program(fold_b), program(full)

    def solve(budget):
        xa, xb = pa.solve(nk, budget).counts, pb.solve(nk, budget).counts
        own = (xa * fold_a.cost).sum() + (xb * fold_b.cost).sum()
        other = (xa * fold_b.cost).sum() + (xb * fold_a.cost).sum()
        return pf.solve(nk, budget / max(other / max(own, 1e-12), 1.0)).counts
    return solve


def variants_of(rows, k, nk):
    everyone = np.ones(rows[0].shape[0], bool)
    base = stats_of(rows, k, everyone)
    raw = stats_of(rows, k, everyone, with_overrides(PARAMS, {"statistics.pooling": "rows",
                                                              "statistics.shrinkage": 0.0}))
    fold = split_mask(rows[0].shape[0], fraction=0.5, seed=99)
    up, ups = np.maximum(base.cost, raw.cost), np.maximum(base.cost_scenarios, raw.cost_scenarios)
    se, rse = base.cost_se, raw.cost_se
    return {
        "pooled (now)": solver(program(base), nk),
        "cost+0.5se": solver(program(base, base.cost + 0.5 * se, base.cost_scenarios + 0.5 * se), nk),
        "raw cost": solver(program(base, raw.cost, raw.cost_scenarios), nk),
        "cost+1se": solver(program(base, base.cost + se, base.cost_scenarios + se), nk),
        "crossfit rho": crossfit_solver(base, stats_of(rows, k, fold), stats_of(rows, k, ~fold), nk),
        "max(pooled,raw)": solver(program(base, up, ups), nk),
        "pooled+0.5rawse": solver(program(base, base.cost + 0.5 * rse, base.cost_scenarios + 0.5 * rse), nk),
        "max+0.5rawse": solver(program(base, up + 0.5 * rse, ups + 0.5 * rse), nk),
        "max, point only": solver(program(base, up, base.cost_scenarios), nk),
    }


def main() -> None:
    for name in sys.argv[1].split(","):
        t0 = time.time()
        rows, k, cl, pop = fit_parts(name)
        nk = np.bincount(cl, minlength=k).astype(np.int64)
        print(f"{name}: fit {time.time() - t0:.0f}s", flush=True)
        scale = max_spend(pop.true_cost)
        for vname, solve in variants_of(rows, k, nk).items():
            out = []
            for lv in LEVELS:
                arms, _ = arms_in_file_order(cl, solve(lv * scale))
                s = score_allocation(arms, pop.true_response, pop.true_cost, lv * scale)
                out.append(f"{lv:g}: {s.capture:.3f}/{s.spend_ratio:.3f}")
            print(f"  {vname:>14} " + "  ".join(out), flush=True)


if __name__ == "__main__":
    main()
