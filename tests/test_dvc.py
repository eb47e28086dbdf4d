"""The DVC pipeline in a temporary copy of the repository, with tiny params and data.

``dvc repro`` runs every stage, a second ``dvc repro`` does nothing and ``dvc status``
is clean; a budget scenario run with ``dvc exp run`` is brought back byte for byte by
``dvc exp apply`` and reproduced identically. ``tiny_repo`` is also used by test_flows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "seed": 3,
    "simulate": {"n_users": 8000},
    "train": {"hidden": 32, "head_hidden": 8, "epochs": 8, "batch_size": 512, "patience": 2},
    "cluster": {"k": 12, "n_init": 1},
    "distill": {"hidden": 32, "epochs": 8, "batch_size": 512},
    "statistics": {"n_scenarios": 10},
    "program": {"budget_levels": [0.05, 0.2, 0.5]},
    "allocate": {"budget": 150.0},
}
TINY_POPULATION = 1500
STAGES = ("prepare", "train", "embed", "cluster", "distill", "policy", "evaluate", "allocate")


def repo_env(repo: Path) -> dict[str, str]:
    """The environment of a command in the copy: this venv, the copy's own sources."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = str(repo / "src")
    return env


def sh(repo: Path, *args: str) -> str:
    """Run a command in the copy; its output (fails the test with the output on error)."""
    res = subprocess.run(args, cwd=repo, env=repo_env(repo), capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def dvc(repo: Path, *args: str) -> str:
    return sh(repo, sys.executable, "-m", "dvc", *args)


def tiny_repo(dst: Path) -> Path:
    """A committed copy of the working tree with tiny params and freshly simulated tiny data.

    The files git tracks or would track are copied (not data/, models/, caches);
    data/ is simulated from the tiny params and recorded in a new data.dvc.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for key, value in TINY.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dst / "data.dvc").unlink(missing_ok=True)
    sh(dst, "git", "init", "-q")
    sh(dst, sys.executable, "-m", "budgetalloc.stages.simulate", "--population-size", str(TINY_POPULATION))
    sh(dst, "git", "add", "-A")
    sh(dst, "git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "baseline")
    return dst


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """The tiny copy after one `dvc repro`, and that run's output."""
    repo = tiny_repo(tmp_path_factory.mktemp("dvc") / "repo")
    return repo, dvc(repo, "repro")


def test_dvc_yaml_stages_are_thin_commands_over_their_module():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert tuple(spec) == STAGES
    for name, stage in spec.items():
        assert stage["cmd"].startswith(f"python -m budgetalloc.stages.{name} ")
        assert f"src/budgetalloc/stages/{name}.py" in stage["deps"]
        for dep in stage["deps"]:
            assert dep.startswith(("${", "data/", "prepared/", "models/", "reports/", "src/"))


def test_repro_runs_every_stage_and_writes_metrics_and_plots(repro):
    repo, output = repro
    for name in STAGES:
        assert f"Running stage '{name}'" in output
    for path in ("models/policy/manifest.json", "models/representation", "models/student", "models/clusters",
                 "prepared/embeddings.npy", "allocations/allocation.parquet", "reports/evaluate/curve.png"):
        assert (repo / path).exists(), path
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    found = next(iter(metrics.values()))["data"]
    assert 0 < found["reports/evaluate/metrics.json"]["data"]["aucc"] <= 1
    assert 0 <= found["reports/distill.json"]["data"]["agreement"] <= 1
    summary = found["reports/allocation/summary.json"]["data"]
    assert summary["budget"] == TINY["allocate"]["budget"] >= summary["expected_spend"]
    plots = json.loads(dvc(repo, "plots", "show", "--json"))["data"]
    for name in ("reports/evaluate/curve.json", "reports/policy/budget_curve.csv",
                 "reports/allocation/budget_curve.csv", "reports/evaluate/curve.png"):
        assert name in plots, sorted(plots)


def test_second_repro_does_nothing_and_status_is_clean(repro):
    repo, _ = repro
    lock = (repo / "dvc.lock").read_text()
    again = dvc(repo, "repro")
    assert "Running stage" not in again
    assert (repo / "dvc.lock").read_text() == lock
    assert json.loads(dvc(repo, "status", "--json")) == {}


def test_dvc_lock_records_exactly_the_params_each_stage_lists(repro):
    repo, _ = repro
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock["allocate"]["params"]["params.yaml"]) == {"allocate.budget", "allocate.users"}
    assert set(lock["prepare"]["params"]["params.yaml"]) == {"seed", "data.features", "data.test_fraction"}
    assert "params" not in lock["evaluate"]
    assert lock["train"]["params"]["params.yaml"]["train"]["hidden"] == TINY["train"]["hidden"]


def test_budget_scenario_is_an_experiment_reproduced_exactly(repro):
    repo, _ = repro
    allocation = repo / "allocations" / "allocation.parquet"
    dvc(repo, "exp", "run", "-n", "budget-100", "-S", "allocate.budget=100", "allocate")
    first = allocation.read_bytes()
    dvc(repo, "exp", "run", "-n", "budget-250", "-S", "allocate.budget=250", "allocate")
    assert allocation.read_bytes() != first
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    budgets = {rev["name"]: rev["data"]["params"]["params.yaml"]["data"]["allocate"]["budget"]
               for baseline in shown for exp in baseline.get("experiments") or [] for rev in exp["revs"]}
    assert budgets == {"budget-100": 100, "budget-250": 250}

    dvc(repo, "exp", "apply", "budget-100")
    assert allocation.read_bytes() == first
    assert json.loads((repo / "reports/allocation/summary.json").read_text())["budget"] == 100
    assert json.loads(dvc(repo, "status", "--json")) == {}
    dvc(repo, "repro", "--force", "--single-item", "allocate")  # recompute it: the same bytes
    assert allocation.read_bytes() == first
