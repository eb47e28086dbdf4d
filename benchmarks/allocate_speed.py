"""Allocation throughput excluding file I/O: users per second through `allocate_population`.

Fits a policy with default params on a simulated trial (40 features), then allocates an
in-memory population several times and reports the best wall time per stage.

    .venv/bin/python benchmarks/allocate_speed.py [--trial 200000] [--users 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from budgetalloc.data.contract import Population, trial_from_frame
from budgetalloc.fit.fit_stream import fit_policy
from budgetalloc.params import Params, SimulateParams
from budgetalloc.serve.allocate import allocate_population, classify, program_for
from budgetalloc.studies.simulate import simulate_population, simulate_trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trial", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="reports/allocate_speed.json")
    args = ap.parse_args()
    world = SimulateParams(n_features=40)
    t0 = time.perf_counter()
    policy = fit_policy(trial_from_frame(simulate_trial(world, seed=0, n_users=args.trial).frame), Params())
    fit_s = time.perf_counter() - t0
    pop = simulate_population(world, seed=1, n_users=args.users).frame
    population = Population(pop["user_id"].to_numpy(), pop[list(policy.feature_names)].to_numpy(np.float32),
                            policy.feature_names)
    budget = 0.1 * float(np.asarray(policy.statistics.cost).max()) * args.users
    allocate_population(policy, population, budget)  # compile
    times, student, program = [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        allocate_population(policy, population, budget)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        classify(policy, population.X, policy.params.allocate.batch_size)
        student.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        clusters = classify(policy, population.X[:1000], 1000)
        program_for(policy).solve(np.bincount(clusters, minlength=policy.k) * (args.users // 1000), budget)
        program.append(time.perf_counter() - t0)
    result = {
        "trial_rows": args.trial, "users": args.users, "features": 40, "k": policy.k,
        "fit_seconds": round(fit_s, 1),
        "allocate_seconds_best": round(min(times), 3),
        "users_per_second": round(args.users / min(times)),
        "student_seconds_best": round(min(student), 3),
        "program_seconds_best": round(min(program), 3),
        "load_average": os.getloadavg()[0],
    }
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
