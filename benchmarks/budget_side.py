"""Budget-side cost variants on one fit per world: nominal capture and true spend / budget.

One fit per world (defaults, seed 0, the benchmark's 200k-row trial and 100k-user
population), then the same student and honest rows with each cost matrix given
to the program (see reports/variants.md). Prints one line per variant.

    .venv/bin/python benchmarks/budget_side.py feature_noise=0.25,feature_noise=1,binary,noisy,gmv
"""
import sys, time, numpy as np
from budgetalloc.benchmark import default_cases, _draw, _features
from budgetalloc.params import Params, with_overrides
from budgetalloc.simulate import max_spend, score_allocation
from budgetalloc import pipeline as P
from budgetalloc.clustering import assign_clusters
from budgetalloc.representation import embed, predict_outcomes
from budgetalloc.distill import predict_clusters
from budgetalloc.statistics import cluster_statistics
from budgetalloc.program import AllocationProgram
from budgetalloc.allocate import arms_in_file_order
from budgetalloc.sampling import split_mask

names = sys.argv[1].split(","); n = 200_000
params = with_overrides(Params(), {"statistics.cost_margin": 0.0})  # the variants add their own
LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35)
for name in names:
    case = [c for c in default_cases(n_users=n, quick=False) if c.name == name][0]
    t0 = time.time()
    trial, test, pop = _draw(case, 0, 1000, 100_000)
    rep = P.Reporter()
    tr_idx, h_idx = P.train_honest_rows(trial.n, params)
    pre, model = P.train_stage(trial, tr_idx, params, rep)
    Z = pre.transform(trial.X)
    clusters, _, _ = P.cluster_stage(Z[tr_idx], model, n_honest=len(h_idx), n_arms=trial.n_arms, params=params, reporter=rep)
    emb = embed(model, Z, batch_size=16384)
    teacher = assign_clusters(clusters, emb)
    s_idx, ho_idx = P.student_rows(trial.n, params)
    student = P.distill_stage(Z[s_idx], emb[s_idx], teacher[s_idx], clusters, params, rep)
    labels = predict_clusters(student, Z[h_idx], batch_size=16384)
    pr, pc = predict_outcomes(model, Z[h_idx], batch_size=16384)
    args = (labels, trial.treatment[h_idx], trial.response[h_idx], trial.cost[h_idx], trial.ipw[h_idx])
    K = student.n_clusters
    def stats_of(mask, p=params):
        return cluster_statistics(*(a[mask] for a in args), pr[mask], pc[mask], k=K, params=p.statistics, seed=0)
    allm = np.ones(len(h_idx), bool)
    base = stats_of(allm)
    raw = stats_of(allm, with_overrides(params, {"statistics.pooling": "rows", "statistics.shrinkage": 0.0}))
    fold = split_mask(len(h_idx), fraction=0.5, seed=99)
    fa, fb = stats_of(fold), stats_of(~fold)
    print(f"{name}: fit {time.time()-t0:.0f}s", flush=True)
    Xp = _features(pop.frame, trial.feature_names)
    cl = predict_clusters(student, pre.transform(Xp), batch_size=262144)
    nk = np.bincount(cl, minlength=K).astype(np.int64)
    scale = max_spend(pop.true_cost)
    def prog(st, c=None, cs=None):
        return AllocationProgram(st.response, st.cost if c is None else c, st.response_scenarios,
                                 st.cost_scenarios if cs is None else cs, params=params.program)
    pb = prog(base)
    pa_, pb_ = prog(fa), prog(fb)
    variants = {
        "pooled (now)": lambda B: pb.solve(nk, B).counts,
        "cost+0.5se": (lambda p: lambda B: p.solve(nk, B).counts)(prog(base, base.cost + 0.5 * base.cost_se, base.cost_scenarios + 0.5 * base.cost_se[None])),
        "raw cost": (lambda p: lambda B: p.solve(nk, B).counts)(prog(base, raw.cost, raw.cost_scenarios)),
        "cost+1se": (lambda p: lambda B: p.solve(nk, B).counts)(prog(base, base.cost + base.cost_se, base.cost_scenarios + base.cost_se[None])),
    }
    def crossfit(B):
        xa = pa_.solve(nk, B).counts; xb = pb_.solve(nk, B).counts
        own = (xa * fa.cost).sum() + (xb * fb.cost).sum()
        other = (xa * fb.cost).sum() + (xb * fa.cost).sum()
        rho = max(other / max(own, 1e-12), 1.0)
        return pb.solve(nk, B / rho).counts
    variants["crossfit rho"] = crossfit
    up = np.maximum(base.cost, raw.cost); ups = np.maximum(base.cost_scenarios, raw.cost_scenarios)
    variants["max(pooled,raw)"] = (lambda p: lambda B: p.solve(nk, B).counts)(prog(base, up, ups))
    for z in (0.5,):
        for nm, c0, cs0 in (("pooled", base.cost, base.cost_scenarios), ("max", up, ups)):
            variants[f"{nm}+{z}rawse"] = (lambda p: lambda B: p.solve(nk, B).counts)(prog(base, c0 + z * raw.cost_se, cs0 + z * raw.cost_se[None]))
    variants["max, point only"] = (lambda p: lambda B: p.solve(nk, B).counts)(prog(base, up, base.cost_scenarios))
    for vname, f in variants.items():
        out = []
        for lv in LEVELS:
            B = lv * scale
            arms, _ = arms_in_file_order(cl, f(B))
            s = score_allocation(arms, pop.true_response, pop.true_cost, B)
            out.append(f"{lv:g}: {s.capture:.3f}/{s.spend_ratio:.3f}")
        print(f"  {vname:>14} " + "  ".join(out), flush=True)
