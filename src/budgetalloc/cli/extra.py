"""More ``budgetalloc`` commands: ``data import`` and ``abtest``.

Kept apart from ``app.py`` and added to its app by :func:`register`. Like every
command they only parse, call one library function (:mod:`budgetalloc.data.datasets`,
:mod:`budgetalloc.studies.abtest`) and print; errors go through the one rule of
:func:`budgetalloc.errors.handle_errors`. This module never imports ``app.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from budgetalloc.errors import handle_errors

console = Console()
data_app = typer.Typer(name="data", help="Public datasets: import into the trial contract.",
                       no_args_is_help=True, pretty_exceptions_enable=False)


@data_app.callback()
def _data() -> None:
    """Public datasets: import into the trial contract."""


@data_app.command("import")
@handle_errors
def import_(
    name: Annotated[str, typer.Argument(help="dataset: criteo, hillstrom or mt-lift")],
    src: Annotated[Path, typer.Argument(help="the released CSV file (local; .gz allowed)")],
    out: Annotated[Path, typer.Option("--out", help="trial file to write (.parquet, or .csv)")],
    response: Annotated[str | None, typer.Option(
        help="response column: hillstrom conversion|visit|spend, mt-lift conversion|click "
             "(default conversion)")] = None,
    cost_per_email: Annotated[float | None, typer.Option(
        help="hillstrom: cost of each e-mail sent (arms 1-2; control costs 0; default 1.0)")] = None,
    arm_costs: Annotated[str | None, typer.Option(
        help="mt-lift: coupon cost per arm, paid on conversion (default 0,1,2,3,4)")] = None,
) -> None:
    """Map a local public dataset file into the trial contract (streamed, atomic)."""
    from budgetalloc.data.datasets import ImportOptions, import_dataset, parse_arm_costs
    from budgetalloc.files import check_distinct

    check_distinct(out, src=src)
    options = ImportOptions(response=response, cost_per_email=cost_per_email,
                            arm_costs=None if arm_costs is None else parse_arm_costs(arm_costs))
    summary = import_dataset(name, src, out, options)
    table = Table(title=f"{summary.dataset}: {summary.rows} rows written to {summary.out}")
    for col in ("arm", "rows", f"mean response ({summary.response})", "mean cost"):
        table.add_column(col, justify="right")
    for arm, (rows, resp, cost) in enumerate(zip(summary.arm_rows, summary.arm_response,
                                                 summary.arm_cost, strict=True)):
        table.add_row(str(arm), str(rows), f"{resp:.4g}", f"{cost:.4g}")
    console.print(table)


def _fmt(value, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def report_tables(report) -> tuple[Table, Table]:
    """Rich tables of an :class:`~budgetalloc.studies.abtest.ABReport`: groups, then lifts."""
    groups = Table(title=f"A/B test ({report.source}): control '{report.control}', "
                         f"treatment '{report.treatment}'")
    for col in ("group", "users", "orders/user", "GMV/user", "cost/user", "spend"):
        groups.add_column(col, justify="right")
    for g in report.groups:
        groups.add_row(g.name, str(g.users), _fmt(g.orders_per_user), _fmt(g.gmv_per_user),
                       _fmt(g.cost_per_user), _fmt(g.spend))
    level = f"{100 * (1 - report.alpha):g}%"
    lifts = Table(title=f"Lift of '{report.treatment}' over '{report.control}'")
    for col in ("metric", "lift", f"{level} CI", "p-value (Welch)", f"verdict at {report.alpha:g}"):
        lifts.add_column(col, justify="right")
    for m in report.metrics:
        ci = "n/a" if m.lift is None else f"[{m.lift_ci_low:+.3%}, {m.lift_ci_high:+.3%}]"
        lifts.add_row(m.metric, "n/a" if m.lift is None else f"{m.lift:+.3%}", ci,
                      _fmt(m.p_value, ".3g"), m.verdict)
    return groups, lifts


@handle_errors
def abtest(
    data: Annotated[Path | None, typer.Option(
        "--data", help="logged per-user table: group, orders, gmv, cost")] = None,
    control_group: Annotated[str | None, typer.Option(
        help="baseline group (default: first in sorted order)")] = None,
    simulate: Annotated[bool, typer.Option(
        "--simulate", help="simulate a live test of --policy-a vs --policy-b instead")] = False,
    policy_a: Annotated[str | None, typer.Option(
        help="baseline policy directory, or 'control' (everyone arm 0)")] = None,
    policy_b: Annotated[str | None, typer.Option(help="challenger policy directory, or 'control'")] = None,
    budget_per_user: Annotated[float | None, typer.Option(help="budget per user for both halves")] = None,
    users: Annotated[int, typer.Option(help="simulated population size")] = 100_000,
    seed: Annotated[int, typer.Option(help="seed of population, split and outcomes")] = 0,
    world: Annotated[str | None, typer.Option(
        help="simulator world: binary or gmv (default: the fitted policies', else binary)")] = None,
    outcomes: Annotated[Path | None, typer.Option(
        help="with --simulate: also write the simulated per-user table")] = None,
    alpha: Annotated[float, typer.Option(help="significance level")] = 0.05,
    out: Annotated[Path | None, typer.Option("--out", help="JSON report to write")] = None,
) -> None:
    """Compare two groups of an A/B test: orders and GMV per user, lifts, CIs, p-values."""
    from budgetalloc.files import check_distinct
    from budgetalloc.studies.abtest import run_abtest

    if out is not None:
        check_distinct(out, data=data, outcomes=outcomes)
    if outcomes is not None:
        check_distinct(outcomes, data=data)
    report = run_abtest(data=data, control_group=control_group, simulate=simulate,
                        policy_a=policy_a, policy_b=policy_b, budget_per_user=budget_per_user,
                        users=users, seed=seed, world=world, alpha=alpha, out=out, outcomes=outcomes)
    for table in report_tables(report):
        console.print(table)
    if out is not None:
        console.print(f"report written to {out}")


def register(app: typer.Typer) -> None:
    """Add ``data import`` and ``abtest`` to ``app``."""
    app.add_typer(data_app, name="data")
    app.command("abtest")(abtest)
