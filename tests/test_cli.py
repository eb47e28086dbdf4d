"""The CLI: commands work, and user errors exit 2 with one line and no traceback."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from budgetalloc.cli.app import app

runner = CliRunner()


def test_simulate_writes_trial_population_and_truth(tmp_path):
    out, pop, truth = tmp_path / "t.parquet", tmp_path / "p.parquet", tmp_path / "truth.parquet"
    res = runner.invoke(
        app,
        ["simulate", "--out", str(out), "--population", str(pop), "--truth", str(truth),
         "--n-users", "2000", "--population-size", "300", "--world", "gmv"],
    )
    assert res.exit_code == 0, res.output
    assert "mean_response" in res.output
    trial = pd.read_parquet(out)
    assert len(trial) == 2000 and {"treatment", "response", "cost"} <= set(trial.columns)
    assert len(pd.read_parquet(pop)) == 300
    assert "true_cost_4" in pd.read_parquet(truth).columns


def test_bad_option_value_exits_2_with_one_line(tmp_path):
    out = tmp_path / "t.parquet"
    res = runner.invoke(app, ["simulate", "--out", str(out), "--world", "mars"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "simulate.world" in lines[0] and "Traceback" not in res.output
    assert not out.exists()


def test_rich_progress_counts_epochs_from_one():
    """nn.fit reports epochs 1..n: the bar ends full at the last epoch, not one past it."""
    import io

    from rich.console import Console

    from budgetalloc.cli.progress import RichReporter

    reporter = RichReporter(Console(file=io.StringIO()))
    reporter.epoch("representation", 1, 4, {"val_loss": 0.5})
    assert reporter.progress.tasks[0].completed == 1
    reporter.epoch("representation", 4, 4, {"val_loss": 0.4})
    assert reporter.progress.tasks[0].completed == 4 and reporter.progress.tasks[0].finished
