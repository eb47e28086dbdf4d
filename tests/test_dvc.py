"""The DVC pipeline in a temporary copy of the repository, with tiny params and data.

``dvc repro`` runs every stage, a second ``dvc repro`` does nothing and ``dvc status``
is clean; a budget scenario run with ``dvc exp run`` is brought back byte for byte by
``dvc exp apply`` and reproduced identically. ``tiny_repo`` is also used by test_flows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
_spec = importlib.util.spec_from_file_location("local_prefect", SCRIPTS / "local_prefect.py")
local_prefect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_prefect)
TINY, TINY_POPULATION = local_prefect.TINY, local_prefect.TINY_POPULATION
STAGES = ("prepare", "train", "cluster", "distill", "policy", "evaluate", "allocate")


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
    """A committed copy of the working tree with tiny params and freshly simulated tiny data
    (``scripts/local_prefect.py``, which the end-to-end scripts use too)."""
    return local_prefect.copy_repository(dst, TINY, population=TINY_POPULATION)


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
                 "allocations/allocation.parquet", "reports/evaluate/curve.png"):
        assert (repo / path).exists(), path
    # no per-row arrays: the fit and test parts only (and DVC's .gitignore)
    assert sorted(p.name for p in (repo / "prepared").iterdir()) == [".gitignore", "fit.parquet", "test.parquet"]
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    found = next(iter(metrics.values()))["data"]
    assert 0 < found["reports/evaluate/metrics.json"]["data"]["aucc"] <= 1
    assert 0 <= found["reports/distill.json"]["data"]["agreement"] <= 1
    summary = found["reports/allocation/summary.json"]["data"]
    assert summary["budget"] == TINY["allocate"]["budget"] >= summary["expected_spend"]
    plots = json.loads(dvc(repo, "plots", "show", "--json"))["data"]
    pictures = ("reports/evaluate/curve.png", "reports/policy/budget_curve.png", "reports/policy/clusters.png",
                "reports/allocation/budget_curve.png", "reports/allocation/clusters.png")
    assert sorted(plots) == sorted(pictures)
    for name in pictures:
        assert (repo / name).read_bytes()[:4] == b"\x89PNG", name


def test_plots_render_without_network(repro):
    """`dvc plots show` writes a page that loads nothing from the network (no Vega-Lite from a CDN)."""
    repo, _ = repro
    dvc(repo, "plots", "show", "-o", "plots_offline")
    page = (repo / "plots_offline" / "index.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    images = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(images) == 5
    for src in images:
        assert src.startswith("data:image/png") or (repo / "plots_offline" / src).is_file(), src


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
    # the README's one command for the scenarios: their budget and headline metrics only
    listed = sh(repo, "make", "-s", "scenarios", f"BIN={Path(sys.executable).parent}", "STAMP=")
    header, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in listed.splitlines()]
    assert header == ["Experiment", "aucc", "expected_response", "expected_spend", "users", "allocate.budget"]
    by_name = {re.sub(r".*\[(.*)\]", r"\1", row[0]): row for row in rows}
    assert by_name["budget-100"][-1] == "100" and by_name["budget-250"][-1] == "250"

    dvc(repo, "exp", "apply", "budget-100")
    assert allocation.read_bytes() == first
    assert json.loads((repo / "reports/allocation/summary.json").read_text())["budget"] == 100
    assert json.loads(dvc(repo, "status", "--json")) == {}
    dvc(repo, "repro", "--force", "--single-item", "allocate")  # recompute it: the same bytes
    assert allocation.read_bytes() == first
