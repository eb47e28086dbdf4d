"""`budgetalloc evaluate`: IPS cost curve with CIs, AUCC, plot, on a held-out trial."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from budgetalloc.cli.app import app
from budgetalloc.studies.simulate import SimulateParams, simulate_trial


def test_evaluate_writes_metrics_and_plot(tiny_fitted, tmp_path):
    directory, _, _ = tiny_fitted
    test = simulate_trial(SimulateParams(n_users=6000), seed=9).frame
    test.to_parquet(tmp_path / "test.parquet")
    out = tmp_path / "reports"
    out.mkdir()
    (out / "keep.txt").write_text("other report")
    res = CliRunner().invoke(app, ["evaluate", "--policy", str(directory), "--data", str(tmp_path / "test.parquet"),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["aucc"] <= 1
    curve = metrics["curve"]
    assert len(curve) >= 10
    for row in curve:
        assert {"budget", "response", "cost", "response_lo", "response_hi"} <= set(row)
        assert row["response_lo"] <= row["response"] <= row["response_hi"]
        # the policy's own expected spend respects every budget
        assert row["expected_cost"] * 6000 <= row["budget"] + 1e-6
    budgets = [r["budget"] for r in curve]
    assert budgets == sorted(budgets) and budgets[0] == 0.0
    # at budget 0 everyone is control: the IPS value equals the control reference
    assert np.isclose(curve[0]["response"], metrics["references"]["control"]["response"])
    assert curve[0]["cost"] == 0.0
    # spending the budget buys response: the top of the curve is above all-control
    assert curve[-1]["response"] > curve[0]["response"]
    # the Qini curve: gain and spend over all-control, zero at budget 0, the IPS difference elsewhere
    control = metrics["references"]["control"]
    assert curve[0]["qini_gain"] == 0.0 and curve[0]["qini_spend"] == 0.0
    for row in curve:
        assert np.isclose(row["qini_gain"], row["response"] - control["response"])
        assert np.isclose(row["qini_spend"], row["cost"] - control["cost"])
    assert 0 < metrics["qini_mean_gain"] < curve[-1]["qini_gain"] + 3 * curve[-1]["qini_gain_se"]
    assert (out / "curve.png").stat().st_size > 1000 and (out / "keep.txt").exists()


def test_evaluate_rejects_foreign_trial(tiny_fitted, tmp_path):
    directory, _, _ = tiny_fitted
    test = simulate_trial(SimulateParams(n_users=600), seed=9).frame.drop(columns=["x4"])
    test.to_csv(tmp_path / "test.csv", index=False)
    res = CliRunner().invoke(app, ["evaluate", "--policy", str(directory), "--data", str(tmp_path / "test.csv"),
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "missing feature column 'x4'" in res.output
    assert not (tmp_path / "r" / "metrics.json").exists()
