"""The ``budgetalloc`` command line: parse, call one library function, print.

Every user error is a :class:`~budgetalloc.errors.BudgetallocError`; it is printed
as one line on stderr and the command exits with code 2, without a traceback. So
is every fault of the environment (an ``OSError``: disk full, permissions, a path
that is a file or a directory, an unreachable scheduler), worded by
:func:`~budgetalloc.errors.describe_os_error` to name the path or address: one
rule for every command, in :func:`~budgetalloc.errors.handle_errors`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from budgetalloc.cli.extra import register
from budgetalloc.errors import handle_errors
from budgetalloc.fit.pipeline import agreement_text

app = typer.Typer(
    name="budgetalloc",
    help="Robust marketing budget allocation by hidden-representation clustering.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """Robust marketing budget allocation by hidden-representation clustering."""


def frame_table(df, title: str, *, digits: int = 4) -> Table:
    """A rich table of a small DataFrame."""
    table = Table(title=title)
    for col in df.columns:
        table.add_column(str(col), justify="right")
    for row in df.itertuples(index=False):
        table.add_row(*(f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in row))
    return table


ParamsOpt = Annotated[Path | None, typer.Option("--params", help="params.yaml (defaults when omitted)")]


@app.command()
@handle_errors
def simulate(
    out: Annotated[Path, typer.Option("--out", help="trial file to write (.parquet or .csv)")],
    population: Annotated[Path | None, typer.Option(help="also write a population file")] = None,
    truth: Annotated[Path | None, typer.Option(help="true expected response/cost of the population")] = None,
    n_users: Annotated[int | None, typer.Option(help="trial rows (default: params)")] = None,
    population_size: Annotated[int, typer.Option(help="population rows")] = 100_000,
    world: Annotated[str | None, typer.Option(help="binary or gmv (default: params)")] = None,
    label_noise: Annotated[float | None, typer.Option(help="share of mislabelled responses")] = None,
    cost_outliers: Annotated[float | None, typer.Option(help="share of costs recorded 10x")] = None,
    feature_noise: Annotated[float | None, typer.Option(help="std of noise added to features")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: params)")] = None,
    params: ParamsOpt = None,
) -> None:
    """Simulate a randomized incentive trial with known ground truth."""
    from budgetalloc.commands import run_simulate

    summary = run_simulate(
        out=out,
        population=population,
        truth=truth,
        population_size=population_size,
        params_path=params,
        seed=seed,
        overrides={
            "n_users": n_users,
            "world": world,
            "label_noise": label_noise,
            "cost_outliers": cost_outliers,
            "feature_noise": feature_noise,
        },
    )
    console.print(frame_table(summary, f"Simulated trial {out}"))
    if truth is not None and population is None:
        console.print("note: --truth is written only together with --population")


@app.command()
@handle_errors
def fit(
    data: Annotated[Path, typer.Option("--data", help="RCT trial file (.parquet or .csv)")],
    out: Annotated[Path, typer.Option("--out", help="policy directory to write")],
    params: ParamsOpt = None,
    stream: Annotated[bool | None, typer.Option(
        "--stream/--no-stream", help="read the trial in batches (Parquet) or whole; default: stream Parquet "
                                     "trials with more than data.stream_rows rows")] = None,
) -> None:
    """Fit a policy: representation, clustering, distillation, statistics, budget table."""
    from budgetalloc.cli.progress import RichReporter
    from budgetalloc.commands import run_fit

    with RichReporter(console) as reporter:
        summary = run_fit(data=data, out=out, params_path=params, reporter=reporter, stream=stream)
    lo, hi = summary["budget_per_user_range"]
    table = Table(title=f"Policy written to {out}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for item, value in (
        ("trial rows (train / honest)", f"{summary['rows']} ({summary['train_rows']} / {summary['honest_rows']})"),
        ("trial read", "streamed in batches" if summary["fit_path"] == "streamed" else "whole, in memory"),
        ("clusters K", str(summary["k"])),
        ("arms", str(summary["n_arms"])),
        ("student agreement (held-out)", agreement_text(summary)),
        ("representation epochs", str(summary["representation_epochs"])),
        ("budget per user in table", f"{lo:.4g} .. {hi:.4g}"),
    ):
        table.add_row(item, value)
    console.print(table)


@app.command()
@handle_errors
def allocate(
    policy: Annotated[Path, typer.Option("--policy", help="policy directory from `fit`")],
    users: Annotated[Path, typer.Option("--users", help="population file (.parquet or .csv)")],
    budget: Annotated[str, typer.Option("--budget", help="total budget for this population, in cost units")],
    out: Annotated[Path, typer.Option("--out", help="allocation file to write (.parquet or .csv)")],
    dask_address: Annotated[str | None, typer.Option(
        "--dask-address", help="partition-parallel on Dask: 'local' starts a LocalCluster, "
                               "else a scheduler address (tcp://host:8786); Parquet input")] = None,
    partitions: Annotated[int | None, typer.Option(
        "--partitions", help="Dask partitions: ranges of row groups (default one per row group)")] = None,
) -> None:
    """Allocate a population under a total budget: one arm per user (the file is streamed)."""
    from budgetalloc.commands import run_allocate

    result = run_allocate(policy_dir=policy, users=users, budget=budget, out=out,
                          dask_address=dask_address, partitions=partitions)
    shares = {arm: int(n) for arm, n in enumerate(result.users_per_arm) if n > 0}
    console.print(f"allocated {result.n_users} users to {out} (solver: {result.solution.status})")
    console.print("users per arm: " + ", ".join(f"{arm}: {n}" for arm, n in shares.items()))
    console.print(f"total expected spend {result.expected_cost:.6g} of budget {result.budget:.6g}")
    console.print(f"total expected response {result.expected_response:.6g}")
    if result.unspent > 0:
        console.print(f"note: {result.unspent:.6g} of the budget cannot be usefully spent and is left unspent")


@app.command()
@handle_errors
def evaluate(
    policy: Annotated[Path, typer.Option("--policy", help="policy directory from `fit`")],
    data: Annotated[Path, typer.Option("--data", help="held-out RCT trial file")],
    out: Annotated[Path, typer.Option("--out", help="directory for metrics.json and curve.png")],
) -> None:
    """Evaluate a policy on a held-out trial: IPS cost curve with CIs, multi-arm Qini curve, AUCC, plot."""
    from budgetalloc.commands import run_evaluate

    metrics = run_evaluate(policy_dir=policy, data=data, out=out)
    table = Table(title=f"Policy on {metrics['n_test']} held-out users (AUCC {metrics['aucc']:.4f}, "
                        f"Qini mean gain {metrics['qini_mean_gain']:.4g})")
    for col in ("budget", "spend/user", "95% CI", "response/user", "95% CI", "gain over control", "solver"):
        table.add_column(col, justify="right")
    for r in metrics["curve"]:
        table.add_row(f"{r['budget']:.6g}", f"{r['cost']:.4g}", f"{r['cost_lo']:.4g}..{r['cost_hi']:.4g}",
                      f"{r['response']:.4g}", f"{r['response_lo']:.4g}..{r['response_hi']:.4g}",
                      f"{r['qini_gain']:.4g} ± {1.96 * r['qini_gain_se']:.2g}", r["status"])
    console.print(table)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'curve.png'}")


@app.command()
@handle_errors
def benchmark(
    out: Annotated[Path, typer.Option("--out", help="directory for benchmark.csv, benchmark.md, plots")],
    quick: Annotated[bool, typer.Option("--quick", help="small worlds: about 10 minutes on 2 cores")] = False,
    methods: Annotated[str | None, typer.Option(help="comma-separated subset, e.g. HRC,TPM-XL")] = None,
    seed: Annotated[int, typer.Option(help="seed of the worlds and fits")] = 0,
    cases: Annotated[str | None, typer.Option(help="comma-separated worlds, e.g. binary,gmv,noisy")] = None,
    params: ParamsOpt = None,
    train_rows: Annotated[int | None, typer.Option(
        min=1000, help="rows of each training trial (default 200,000; 40,000 with --quick)")] = None,
) -> None:
    """HRC and the six baselines on simulated worlds with a noise sweep."""
    from budgetalloc.params import load_params
    from budgetalloc.studies.benchmark import METHODS, run_benchmark

    chosen = tuple(m.strip() for m in methods.split(",")) if methods else METHODS
    names = tuple(c.strip() for c in cases.split(",")) if cases else None
    summary = run_benchmark(out, load_params(params), quick=quick, seed=seed, methods=chosen, case_names=names,
                            train_rows=train_rows, log=lambda line: console.print(line, markup=False, highlight=False))
    console.print(frame_table(summary, f"Benchmark written to {out}", digits=3))


register(app)  # data import, abtest: after the commands above, as --help lists them


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
