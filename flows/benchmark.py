"""Benchmark flow: our method against the baselines on simulated worlds, one task per world.

A thin wrapper over :mod:`budgetalloc.studies.benchmark` (the library the ``benchmarks/``
scripts use): each case (a world at one noise level) is a task that fits every
method on its trial and scores the allocations against the truth. The results
are written to ``reports/benchmark/`` (``results.csv``, ``summary.csv``) and
published as a table and a markdown report. The benchmark is not a DVC stage:
it draws its own worlds from the seed and reads only ``params.yaml``.

    python -m flows.benchmark
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from budgetalloc.files import write_table
from budgetalloc.params import Params, load_params
from budgetalloc.studies import benchmark
from flows import orchestration as orch

ROOT = Path(__file__).resolve().parents[1]


@task(retries=1, retry_delay_seconds=30, task_run_name="case {case.name}")
def run_case(case: benchmark.Case, methods: list[str], params: Params, seed: int, n_test: int,
             n_population: int, levels: list[float]) -> benchmark.CaseResult:
    """Fit and score every method on one simulated world."""
    logger = get_run_logger()
    return benchmark.run_case(case, methods, params, seed=seed, n_test=n_test, n_population=n_population,
                              levels=tuple(levels), log=logger.info)


@task
def publish(root: Path, summary: pd.DataFrame, out: Path, settings: dict) -> None:
    """Publish the summary table and the report."""
    records = orch.frame_records(summary)
    create_table_artifact(records, key="benchmark-summary",
                          description=("Mean capture (nominal and at matched true spend), worst spend ratio, "
                                       f"AUCC and fit seconds per (case, method) ({out})"))
    create_markdown_artifact(orch.benchmark_markdown(records, settings, orch.git_revision(root), out),
                             key="benchmark-report", description="Benchmark: HRC against the baselines")


@flow(name="benchmark", log_prints=True)
def benchmark_flow(n_users: int = 200_000, methods: list[str] | None = None, cases: list[str] | None = None,
                   quick: bool = True, seed: int = 0, n_test: int = 100_000, n_population: int = 100_000,
                   levels: list[float] | None = None, root: Path = ROOT) -> dict:
    """Run the benchmark and publish its results.

    Args:
        n_users: trial rows per world.
        methods: methods to compare (default: ours and every baseline).
        cases: names of the worlds to run (default: all of ``default_cases``).
        quick: the short noise sweep.
        seed: the seed family of every world.
        n_test, n_population: held-out trial and population sizes.
        levels: budget levels (fractions of the all-max-coupon spend).
        root: the repository (params.yaml; results go to reports/benchmark/).
    """
    params = load_params(root / "params.yaml")
    chosen = [c for c in benchmark.default_cases(n_users=n_users, quick=quick) if cases is None or c.name in cases]
    methods = list(methods or benchmark.METHODS)
    levels = list(levels or benchmark.BUDGET_LEVELS)
    rows, paths = [], []
    for case in chosen:
        result = run_case(case, methods, params, seed, n_test, n_population, levels)
        rows += result.rows
        paths += result.paths
    results = pd.DataFrame(rows)
    summary = benchmark.summarise(results)
    out = root / "reports" / "benchmark"
    write_table(results, out / "results.csv")
    write_table(summary, out / "summary.csv")
    write_table(pd.DataFrame(paths), out / "budget_paths.csv")
    settings = {"n_users": n_users, "methods": methods, "cases": [c.name for c in chosen], "quick": quick,
                "seed": seed, "n_test": n_test, "n_population": n_population, "levels": levels}
    publish(root, summary, out, settings)
    return {"results": str(out / "results.csv"), "summary": str(out / "summary.csv"), "rows": len(results)}


if __name__ == "__main__":
    benchmark_flow()
