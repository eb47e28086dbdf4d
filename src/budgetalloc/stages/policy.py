"""Stage ``policy``: cluster statistics, the budget table, and the policy artifact (METHOD stages 3-4).

The fit rows (``statistics.rows``) are grouped by the student; the budget table is solved over the fit
trial's own cluster sizes. The policy directory (:mod:`budgetalloc.policy`) is what
``allocate`` and ``evaluate`` read. Besides it, two small tables for reports and
dashboards: the budget curve (per user) and the clusters (size, per-arm estimates),
with their pictures (:mod:`budgetalloc.serve.dashboards`; the image plots of ``dvc plots``).

The policy embeds the params it was fitted with. Of the ``allocate`` section it keeps
only ``batch_size`` (a serving setting); ``budget`` and ``users`` describe a scenario,
not the policy, and are stored at their defaults so that a new scenario never
changes the policy's bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from budgetalloc.files import write_table
from budgetalloc.fit.fit_stream import budget_step, scan_file, train_rows
from budgetalloc.fit.pipeline import assemble_policy
from budgetalloc.models.distill import load_student
from budgetalloc.models.representation import load_representation
from budgetalloc.params import AllocateParams, load_params
from budgetalloc.policy import save_policy
from budgetalloc.serve.dashboards import (
    budget_curve_png,
    chosen_arms,
    cluster_frame,
    clusters_png,
    curve_frame,
    write_png,
)
from budgetalloc.stages import (
    PARAMS_FILE,
    StageReporter,
    read_json,
    read_preprocessor,
    run,
)


def main(
    data: Annotated[Path, typer.Option(help="fit part of the trial")],
    preprocess: Annotated[Path, typer.Option(help="preprocessor from `train`")],
    model: Annotated[Path, typer.Option(help="representation model from `train`")],
    student: Annotated[Path, typer.Option(help="student model from `distill`")],
    train_report: Annotated[Path, typer.Option(help="metrics of `train` (notes)")],
    cluster_report: Annotated[Path, typer.Option(help="metrics of `cluster` (notes)")],
    distill_report: Annotated[Path, typer.Option(help="metrics of `distill` (agreement)")],
    out: Annotated[Path, typer.Option(help="policy directory to write")],
    curve: Annotated[Path, typer.Option(help="budget curve to write (.csv)")],
    clusters: Annotated[Path, typer.Option(help="cluster table to write (.csv)")],
    curve_plot: Annotated[Path, typer.Option(help="budget curve picture to write (.png)")],
    clusters_plot: Annotated[Path, typer.Option(help="cluster picture to write (.png)")],
    params: Annotated[Path, typer.Option(help="params file")] = PARAMS_FILE,
) -> None:
    """Estimate the cluster statistics, solve the budget table, write the policy."""
    p = load_params(params)
    reporter = StageReporter()
    trial, roles, scan = scan_file(data, p, reporter, held_roles=0)  # no samples: only the checks and facts
    pre, net, student_model = read_preprocessor(preprocess), load_representation(model), load_student(student)
    stats, n_users, _, table = budget_step(trial, roles, scan, pre, net, student_model, None, p, reporter)
    scenario_free = p.model_copy(update={"allocate": AllocateParams(batch_size=p.allocate.batch_size)})
    notes = read_json(train_report)["notes"] + read_json(cluster_report)["notes"]
    distilled = read_json(distill_report)
    policy = assemble_policy(scan.facts, scenario_free, preprocessor=pre, network=net,
                             student=student_model, statistics=stats, budget_table=table,
                             n_users=n_users, train_rows=train_rows(roles),
                             agreement=(distilled["agreement"], distilled["cluster_agreement"]), notes=notes)
    save_policy(policy, out)
    curve_table, cluster_table = curve_frame(table), cluster_frame(stats, n_users)
    write_table(curve_table, curve)
    write_table(cluster_table, clusters)
    write_png(budget_curve_png(curve_table, title="Budget curve of the fitted policy (fit trial)",
                               unit="per user"), curve_plot)
    row, arms = chosen_arms(table)  # the clusters' arms at the middle budget level
    title = f"Clusters at budget {row['budget_per_user']:.3g} per user (level {row['level']:g})"
    write_png(clusters_png(cluster_table.assign(chosen_arm=arms), title=title), clusters_plot)
    print(f"policy: K={policy.k}, {len(table)} budget levels -> {out}")


if __name__ == "__main__":
    run(main)
