"""The DVC stage modules, called in process: together they are fit_policy, step by step."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from budgetalloc.data.contract import load_trial, read_table
from budgetalloc.data.split import split_trial_file
from budgetalloc.errors import DataError, ParamsError
from budgetalloc.fit.fit_stream import fit_policy
from budgetalloc.params import load_params, params_from_dict, params_to_dict
from budgetalloc.policy import load_policy, save_policy
from budgetalloc.progress_line import parse_progress
from budgetalloc.serve import dashboards
from budgetalloc.stages import (
    StageReporter,
    allocate,
    cluster,
    distill,
    evaluate,
    policy,
    prepare,
    simulate,
    stage_app,
    train,
)
from budgetalloc.studies.simulate import SimulateParams, simulate_population, simulate_trial

ROOT = Path(__file__).resolve().parents[1]
# soft targets, missing values and a K the honest rows cannot
# support (two notes that must reach the summary)
PARAMS = {
    "seed": 4,
    "simulate": {"n_users": 7000, "missing_rate": 0.02},
    "train": {"hidden": 32, "head_hidden": 8, "epochs": 6, "batch_size": 512, "patience": 2},
    "cluster": {"k": 50, "n_init": 1, "roi_bins": 1},  # soft targets are over the k-means clusters
    "distill": {"hidden": 32, "epochs": 6, "batch_size": 512, "soft_temperature": 0.5},
    "statistics": {"n_scenarios": 10},
    "program": {"budget_levels": [0.05, 0.2, 0.5]},
    "allocate": {"budget": 100.0, "users": "population.csv"},
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stages_run(tmp_path_factory):
    """Every stage of dvc.yaml, in order, in a temporary directory (the cwd of each stage)."""
    d = tmp_path_factory.mktemp("stages")
    (d / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    p = d / "params.yaml"
    world = simulate_trial(SimulateParams(**PARAMS["simulate"]), seed=1)
    world.frame.to_csv(d / "trial.csv", index=False)
    simulate_population(SimulateParams(), seed=2, n_users=1200).frame.to_csv(d / "population.csv", index=False)
    prepare.main(trial=d / "trial.csv", fit=d / "fit.parquet", test=d / "test.parquet", params=p)
    train.main(data=d / "fit.parquet", preprocess=d / "pre.json", model=d / "rep", report=d / "train.json", params=p)
    cluster.main(data=d / "fit.parquet", preprocess=d / "pre.json", model=d / "rep", out=d / "clusters",
                 report=d / "cluster.json", params=p)
    distill.main(data=d / "fit.parquet", preprocess=d / "pre.json", model=d / "rep", clusters=d / "clusters",
                 out=d / "student", report=d / "distill.json", params=p)
    policy.main(data=d / "fit.parquet", preprocess=d / "pre.json", model=d / "rep", student=d / "student",
                train_report=d / "train.json", cluster_report=d / "cluster.json", distill_report=d / "distill.json",
                out=d / "policy", curve=d / "curve.csv", clusters=d / "clusters.csv", curve_plot=d / "curve.png",
                clusters_plot=d / "clusters.png", params=p)
    evaluate.main(policy=d / "policy", data=d / "test.parquet", out=d / "evaluate")
    return d


def test_stages_fit_exactly_the_policy_fit_policy_fits(stages_run, tmp_path):
    d = stages_run
    params = load_params(d / "params.yaml")
    reference = fit_policy(load_trial(d / "fit.parquet"), params)
    save_policy(reference, tmp_path / "reference")
    ours = d / "policy"
    files = sorted(p.relative_to(ours).as_posix() for p in ours.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "reference").as_posix()
                           for p in (tmp_path / "reference").rglob("*") if p.is_file())
    for name in files:
        if name not in ("params.yaml", "manifest.json"):
            assert sha(ours / name) == sha(tmp_path / "reference" / name), name
    summary = json.loads((ours / "summary.json").read_text())
    assert any("imputed" in n for n in summary["notes"]) and any("cluster.k lowered" in n for n in summary["notes"])
    # the policy stores its params without the scenario keys
    stored = load_policy(ours).params
    assert stored.allocate.budget != params.allocate.budget and stored.train == params.train
    assert params_to_dict(stored)["allocate"]["batch_size"] == params.allocate.batch_size


def test_policy_stage_tables(stages_run):
    d = stages_run
    curve = pd.read_csv(d / "curve.csv")
    assert list(curve.columns) == ["level", "budget", "expected_response", "expected_spend", "status"]
    assert (np.diff(curve["expected_spend"]) >= -1e-9).all()
    assert (curve["expected_spend"] <= curve["budget"] + 1e-9).all()
    clusters = pd.read_csv(d / "clusters.csv")
    k = load_policy(d / "policy").k
    assert len(clusters) == k and {"size", "estimate_rows", "response_arm_0", "cost_arm_4"} <= set(clusters.columns)
    metrics = json.loads((d / "evaluate" / "metrics.json").read_text())
    assert 0 < metrics["aucc"] <= 1 and (d / "evaluate" / "curve.png").exists()
    for picture in ("curve.png", "clusters.png"):
        assert (d / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pictures_are_the_same_bytes_for_the_same_table(stages_run):
    d = stages_run
    curve = pd.read_csv(d / "curve.csv")
    first = dashboards.budget_curve_png(curve, title="t", unit="per user")
    assert dashboards.budget_curve_png(curve, title="t", unit="per user") == first
    assert b"matplotlib" not in first  # no software version in the bytes
    assert dashboards.budget_curve_png(curve.assign(expected_response=curve["expected_response"] * 2),
                                       title="t", unit="per user") != first


def test_response_per_cost_and_analyst_table():
    clusters = pd.DataFrame({"cluster": [0, 1, 2], "size": [10, 20, 30],
                             "response_arm_0": [0.1, 0.1, 0.2], "response_arm_1": [0.3, 0.1, 0.2],
                             "response_arm_2": [0.2, 0.4, 0.2], "cost_arm_0": [0.0, 0.0, 0.0],
                             "cost_arm_1": [1.0, 1.0, 0.0], "cost_arm_2": [2.0, 1.5, 0.0],
                             "chosen_arm": [1, 2, 0]})
    ratio = dashboards.response_per_cost(clusters)
    np.testing.assert_allclose(ratio[:2], [0.2, 0.2])  # chosen arm over control
    assert np.isnan(ratio[2])  # a coupon that costs nothing more: no ratio
    table = dashboards.analyst_table(clusters.assign(response_arm_1=[0.123456, 0.1, 0.2]))
    assert list(table[0])[:3] == ["chosen_arm", "cluster", "size"]
    assert table[0]["response_arm_1"] == 0.123 and table[0]["size"] == 10


def test_allocate_stage_writes_the_allocation_and_its_report(stages_run, monkeypatch):
    d = stages_run
    monkeypatch.chdir(d)  # allocate.users is relative to the repository, the stage's cwd
    allocate.main(policy=d / "policy", out=d / "allocation.parquet", reports=d / "allocation", params=d / "params.yaml")
    frame = read_table(d / "allocation.parquet")
    assert len(frame) == 1200 and frame["expected_cost"].sum() <= 100.0 + 1e-9
    summary = json.loads((d / "allocation" / "summary.json").read_text())
    assert summary["budget"] == 100.0 and summary["users"] == 1200
    assert sum(summary["users_per_arm"].values()) == 1200
    curve = pd.read_csv(d / "allocation" / "budget_curve.csv")
    assert {"budget", "expected_response", "expected_spend", "budget_per_user"} <= set(curve.columns)
    assert (curve["expected_spend"] <= curve["budget"] + 1e-6).all()
    clusters = pd.read_csv(d / "allocation" / "clusters.csv")
    assert clusters["size"].sum() == 1200
    users = clusters[[c for c in clusters.columns if c.startswith("users_arm_")]].to_numpy()
    assert (users.sum(axis=1) == clusters["size"]).all()
    assert (clusters["chosen_arm"] == users.argmax(axis=1)).all()
    # the report comes from the program's counts, not the rows: the rows follow them exactly
    from_rows = np.zeros_like(users)
    np.add.at(from_rows, (frame["cluster"].to_numpy(), frame["treatment"].to_numpy()), 1)
    np.testing.assert_array_equal(users, from_rows)
    per_arm = frame["treatment"].value_counts().sort_index()
    assert summary["users_per_arm"] == {f"arm_{arm}": int(n) for arm, n in per_arm.items()}


def test_prepare_splits_deterministically_and_keeps_every_column(tmp_path):
    df = simulate_trial(SimulateParams(n_users=500, arm_shares=(0.4, 0.3, 0.1, 0.1, 0.1)), seed=0).frame
    df.to_csv(tmp_path / "trial.csv", index=False)
    p = params_from_dict({"seed": 5, "data": {"test_fraction": 0.2}})
    parts = [tmp_path / "fit.parquet", tmp_path / "test.parquet"]
    assert split_trial_file(tmp_path / "trial.csv", *parts, p) == (400, 100)
    fit, test = (read_table(part) for part in parts)
    assert list(fit.columns) == list(df.columns) and list(test.columns) == list(df.columns)
    assert set(fit["user_id"]).isdisjoint(test["user_id"])
    assert set(fit["user_id"]) | set(test["user_id"]) == set(df["user_id"])
    first = [sha(part) for part in parts]
    split_trial_file(tmp_path / "trial.csv", *parts, p)
    assert [sha(part) for part in parts] == first
    with pytest.raises(ParamsError, match="test_fraction"):
        split_trial_file(tmp_path / "trial.csv", *parts, params_from_dict({"data": {"test_fraction": 0.0}}))


def test_stage_errors_are_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    res = CliRunner().invoke(stage_app(prepare.main), [
        "--trial", str(tmp_path / "missing.csv"), "--fit", str(tmp_path / "f.parquet"),
        "--test", str(tmp_path / "t.parquet"), "--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 2
    assert "missing.csv: file not found" in res.output and "Traceback" not in res.output


def test_progress_lines_round_trip(capsys):
    reporter = StageReporter()
    reporter.epoch("representation", 3, 30, {"val_loss": 0.5})  # epochs count from 1 (nn.fit)
    reporter.note("something")
    lines = capsys.readouterr().out.splitlines()
    assert parse_progress(lines[0]) == ("representation", 3, 30)
    assert "[##------------------]" in lines[0]  # the epoch bar: 3 of 30
    assert parse_progress(lines[1]) is None and reporter.notes == ["something"]


def test_an_early_stop_says_so(capsys):
    """A real training run that stops early: its last epoch line says at which epoch, of how many."""
    from budgetalloc.models.distill import train_student
    from budgetalloc.params import DistillParams

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=600)  # labels unrelated to X: validation loss soon stops improving
    reporter = StageReporter()
    params = DistillParams(hidden=32, epochs=40, batch_size=32, learning_rate=2e-2, patience=2)
    model = train_student(X, labels, n_clusters=3, params=params, seed=0,
                          progress=reporter.epoch_callback("distillation", params.epochs))
    h = model.history
    assert h.stopped_early
    out = capsys.readouterr().out
    assert f"distillation: stopped early at epoch {h.epochs_run} of 40 (patience 2)" in out
    assert "stopped_early_patience" not in out


def _dvc_project(root: Path, params: dict | None = None) -> Path:
    for name in (".dvc/config", ".dvcignore", "params.yaml", "data.dvc"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    if params is not None:
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        (root / "data.dvc").unlink()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def test_materialise_simulates_the_data_that_data_dvc_records(tmp_path):
    """On a fresh clone (empty cache) the default data is simulated and matches data.dvc."""
    root = _dvc_project(tmp_path)
    assert simulate.materialise(root) == "simulated"
    assert simulate.materialise(root) == "present"
    shutil.rmtree(root / "data")
    assert simulate.materialise(root) == "checked out of the DVC cache"


def test_materialise_refuses_data_that_does_not_match_data_dvc(tmp_path):
    root = _dvc_project(tmp_path, {"seed": 1, "simulate": {"n_users": 300}})
    assert simulate.materialise(root, population_size=50) == "simulated and added"
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 2, "simulate": {"n_users": 300}}))
    with pytest.raises(DataError, match="does not match data.dvc"):
        simulate.materialise(root, population_size=50)
