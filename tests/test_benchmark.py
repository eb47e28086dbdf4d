"""A test-sized benchmark: every method runs, the outputs have the promised shape."""

from __future__ import annotations

import pandas as pd
from conftest import TINY_PARAMS
from typer.testing import CliRunner

from budgetalloc.benchmark import METHODS, BenchmarkSize, Case, run_benchmark
from budgetalloc.cli import app
from budgetalloc.params import SimulateParams, params_from_dict


def test_tiny_benchmark_all_methods(tmp_path):
    cases = [Case("binary", SimulateParams()), Case("label_noise=0.2", SimulateParams(label_noise=0.2),
                                                   "label_noise", 0.2)]
    summary = run_benchmark(tmp_path, params_from_dict(TINY_PARAMS), quick=True,
                            size=BenchmarkSize(6000, 3000, 3000), cases=cases, log=lambda _: None)
    assert set(summary["method"]) == set(METHODS) == {"HRC", "TPM-SL", "TPM-XL", "TPM-CF", "DRM", "DRP", "DFCL"}
    results = pd.read_csv(tmp_path / "benchmark.csv")
    assert len(results) == len(METHODS) * 2 * 4
    assert results["capture"].between(-1, 1.6).all() and (results["spend_ratio"] > 0).all()
    assert results["aucc"].notna().all()
    hrc = results[results["method"] == "HRC"]
    assert (hrc["spend_ratio"] < 1.2).all()
    assert "## binary" in (tmp_path / "benchmark.md").read_text()
    for png in ("noise_sweep.png", "cost_curves.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_benchmark_cli_rejects_unknown_method(tmp_path):
    res = CliRunner().invoke(app, ["benchmark", "--out", str(tmp_path / "b"), "--methods", "HRC,XGB"])
    assert res.exit_code == 2 and "unknown method 'XGB'" in res.output
    assert not (tmp_path / "b").exists()
