"""One benchmark report from several `budgetalloc benchmark` runs' directories.

The baselines do not change when HRC does, so HRC can be re-run alone and its
rows merged with an earlier run's baselines; rows of a (case, method) present in
several runs come from the last directory given.

    .venv/bin/python benchmarks/benchmark_merge.py --out reports/benchmark_matched RUN1 RUN2 \
        --meta "train rows=200000" --meta "seconds=..."
"""

from __future__ import annotations

import argparse

from budgetalloc.studies.benchmark import merge_reports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sources", nargs="+", help="run directories, later ones win")
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", action="append", default=[], help="key=value shown in the report's header")
    args = ap.parse_args()
    meta = dict(item.split("=", 1) for item in args.meta)
    summary = merge_reports(args.out, args.sources, meta)
    print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
