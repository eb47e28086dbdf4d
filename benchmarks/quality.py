"""HRC quality on the simulator: capture of the oracle's uplift and true spend / budget.

Worlds: clean binary (orders), GMV, and a noisy one (10% flipped labels, 3% of
costs logged 10x, feature noise 0.5); budgets 5%..35% of the all-max-coupon
spend; plus a sweep of K on the binary world. Writes reports/quality.json and
reports/quality.md.

    .venv/bin/python benchmarks/quality.py [--rows 1000000] [--ks 32,64,128,256]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pandas as pd

from budgetalloc.params import Params, with_overrides
from budgetalloc.studies.benchmark import Case, default_cases, run_case

LEVELS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--population", type=int, default=200_000)
    ap.add_argument("--ks", default="32,128,256")
    ap.add_argument("--out", default="reports")
    args = ap.parse_args()
    params = Params()
    cases = default_cases(n_users=args.rows, quick=True)[:3]
    rows = []
    started = time.time()
    for case in cases:
        part = run_case(case, ["HRC"], params, seed=0, n_test=100_000, n_population=args.population,
                        levels=LEVELS).rows
        for r in part:
            r["k"] = params.cluster.k
        rows += part
    for k in [int(v) for v in args.ks.split(",") if v]:
        p = with_overrides(params, {"cluster.k": k})
        part = run_case(Case(f"binary K={k}", cases[0].world), ["HRC"], p, seed=0, n_test=100_000,
                        n_population=args.population, levels=LEVELS).rows
        for r in part:
            r["k"] = k
        rows += part
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    meta = {"rows": args.rows, "population": args.population, "machine": f"{platform.machine()}, 2 cores",
            "k": params.cluster.k, "scenarios": params.statistics.n_scenarios, "alpha": params.program.alpha,
            "seconds": round(time.time() - started, 1)}
    (out / "quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    g = df.groupby(["case", "k"], sort=False)
    table = pd.DataFrame({"capture_mean": g["capture"].mean(), "capture_min": g["capture"].min(),
                          "matched_mean": g["matched_capture"].mean(), "matched_min": g["matched_capture"].min(),
                          "spend_ratio_max": g["spend_ratio"].max(), "aucc": g["aucc"].mean(),
                          "fit_s": g["fit_s"].mean()}).reset_index()
    (out / "quality.md").write_text(f"{meta}\n\n" + table.to_markdown(index=False, floatfmt=".3f") + "\n")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
