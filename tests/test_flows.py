"""The Prefect flows under ``prefect_test_harness`` on a tiny copy of the repository,
and the deployments of prefect.yaml against a real local Prefect server."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from test_dvc import ROOT, TINY, dvc, local_prefect, sh, tiny_repo

from flows import orchestration as orch

IMAGE = "](data:image/png;base64,"  # a markdown image that holds a PNG


def load_module(name: str):
    """A module of flows/ by path, as Prefect loads entrypoints."""
    spec = importlib.util.spec_from_file_location(f"flows_{name}", ROOT / "flows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny_repo(tmp_path_factory.mktemp("flows") / "repo")


def read_artifacts(state) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))


def artifacts_of(state) -> dict:
    """Artifacts of a flow run by key: (type, data)."""
    return {a.key: (a.type, json.loads(a.data) if a.type == "table" else a.data) for a in read_artifacts(state)}


def descriptions_of(state) -> dict:
    """Artifacts of a flow run by key: their description (the UI shows it on the Artifacts tab)."""
    return {a.key: a.description for a in read_artifacts(state)}


def experiments(repo: Path) -> set[str]:
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    return {rev["name"] for b in shown for exp in b.get("experiments") or [] for rev in exp["revs"]}


@pytest.fixture(scope="module")
def trained(harness, repo):
    state = load_module("training").training_flow(root=repo, return_state=True)
    assert state.is_completed(), state
    return state


def test_training_flow_runs_the_dvc_stages_and_publishes_dashboards(trained, repo):
    result = trained.result()
    arts = artifacts_of(trained)
    described = descriptions_of(trained)
    for key in ("budget-curve", "cost-curve", "clusters-chart"):  # pictures, held in the markdown itself
        kind, text = arts[key]
        assert kind == "markdown" and IMAGE in text and IMAGE in described[key], key
    assert "expected_response" in arts["budget-curve"][1] and "response_lo" in arts["cost-curve"][1]
    kind, clusters = arts["clusters"]
    assert kind == "table" and len(clusters) >= 2
    assert list(clusters[0])[:3] == ["chosen_arm", "cluster", "size"]
    assert {"response_arm_0", "cost_arm_4"} <= set(clusters[0])
    floats = [v for row in clusters for v in row.values() if isinstance(v, float)]
    assert floats and all(v == float(f"{v:.3g}") for v in floats)
    kind, report = arts["training-report"]
    assert kind == "markdown" and "AUCC" in report and result["experiment"] in report
    kind, progress = arts["training-progress"]
    assert kind == "progress" and float(progress) == 100.0
    # DVC is the record: the stages are up to date and the run is an experiment
    assert result["experiment"] in experiments(repo)
    status = json.loads(dvc(repo, "status", "--json", *orch.TRAINING_STAGES))
    assert status == {}


def test_allocation_flow_is_a_reproducible_scenario(trained, repo):
    flows = load_module("allocation")
    state = flows.allocation_flow(root=repo, return_state=True)  # the default scenario
    assert state.is_completed(), state
    result = state.result()
    assert result["budget"] == TINY["allocate"]["budget"] >= result["expected_spend"]
    arts = artifacts_of(state)
    described = descriptions_of(state)
    for key in ("allocation-budget-curve", "allocation-cost-curve", "allocation-clusters-chart"):
        kind, text = arts[key]
        assert kind == "markdown" and IMAGE in text and IMAGE in described[key], key
    assert list(arts["allocation-clusters"][1][0])[:3] == ["chosen_arm", "cluster", "size"]
    assert "users_arm_0" in arts["allocation-clusters"][1][0]
    report = arts["allocation-report"][1]
    assert f"dvc exp apply {result['experiment']}" in report and "AUCC" in report
    assert result["experiment"] in experiments(repo)
    assert json.loads(dvc(repo, "status", "--json")) == {}


def test_a_scenario_leaves_the_defaults_alone(trained, repo):
    """A budget of its own: recorded as an experiment; params.yaml, dvc.lock and outputs stay as they were."""
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "trained")
    watched = ("params.yaml", "dvc.lock", *orch.stage_files(repo, "allocate"))
    before = {rel: (repo / rel).read_bytes() for rel in watched}
    state = load_module("allocation").allocation_flow(budget=120.0, root=repo, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["budget"] == 120.0 != TINY["allocate"]["budget"] and result["expected_spend"] <= 120.0
    assert "budget: **120**" in artifacts_of(state)["allocation-report"][1]  # the dashboards show the scenario
    after = {rel: (repo / rel).read_bytes() for rel in before}
    assert [rel for rel in before if after[rel] != before[rel]] == []
    assert sh(repo, "git", "status", "--porcelain") == ""
    assert json.loads(dvc(repo, "status", "--json")) == {}
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    budgets = {rev["name"]: rev["data"]["params"]["params.yaml"]["data"]["allocate"]["budget"]
               for b in shown for exp in b.get("experiments") or [] for rev in exp["revs"]}
    assert budgets[result["experiment"]] == 120.0


def test_benchmark_flow_writes_and_publishes_results(harness, repo):
    flows = load_module("benchmark")
    state = flows.benchmark_flow(n_users=4000, methods=["HRC"], cases=["binary"], n_test=2000,
                                 n_population=2000, levels=[0.1, 0.2], root=repo, return_state=True)
    assert state.is_completed(), state
    kind, summary = artifacts_of(state)["benchmark-summary"]
    assert kind == "table" and summary[0]["method"] == "HRC" and "capture_mean" in summary[0]
    assert (repo / "reports/benchmark/summary.csv").exists()


def test_tasks_retry_only_transient_failures():
    locked = orch.DvcFailed(["repro"], 255, "ERROR: Unable to acquire lock. Most likely another DVC process")
    busy = orch.DvcFailed(["repro"], 255, "ERROR: 'reports/policy/budget_curve.csv' is busy, it is being "
                                          "blocked by:\n  (PID 123): dvc exp run")
    assert busy.transient
    killed = orch.DvcFailed(["repro"], 255, "failed to run: python -m x, exited with -9")
    bad_data = orch.DvcFailed(["repro"], 255, "failed to run: python -m x, exited with 2")
    assert locked.transient and killed.transient and not bad_data.transient
    training = load_module("training")
    assert training.repro.retries == 2 and training.repro.retry_condition_fn is orch.retry_if_transient


def test_workspace_lock_makes_a_second_run_wait(tmp_path):
    """Another process holds the workspace: the run waits (and says for whom) until it is released."""
    code = ("import sys, time; from flows import orchestration as o\n"
            "with o.workspace_lock(sys.argv[1], 'flow run other'):\n print('held', flush=True); time.sleep(3)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])})
    try:
        assert holder.stdout.readline().strip() == "held"
        waits, start = [], time.monotonic()
        with orch.workspace_lock(tmp_path, "flow run this", on_wait=waits.append, poll_s=0.2):
            waited = time.monotonic() - start
            assert (tmp_path / orch.WORKSPACE_LOCK).read_text().startswith("flow run this")
        assert waited > 1.0 and len(waits) == 1 and "held by flow run other" in waits[0]
    finally:
        holder.wait(timeout=30)
    with orch.workspace_lock(tmp_path, "again", on_wait=waits.append):  # free now: no wait
        assert len(waits) == 1


def test_dvc_hints_are_shown_once():
    orch._shown_hints.clear()
    lines = ["Running stage 'a':", "", "To track the changes with git, run:", "", "\tgit add dvc.lock",
             "Running stage 'b':", "To track the changes with git, run:", "\tgit add dvc.lock"]
    assert [line for line in lines if orch.shown_once(line)] == [
        "Running stage 'a':", "To track the changes with git, run:", "\tgit add dvc.lock", "Running stage 'b':"]


def test_prefect_yaml_deployments_load_with_their_schedules(tmp_path, harness):
    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    for name in ("prefect.yaml", *(f"flows/{p.name}" for p in (ROOT / "flows").glob("*.py"))):
        (project / name).write_bytes((ROOT / name).read_bytes())
    port = local_prefect.free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": url, "PWD": str(project)}
    env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        local_prefect.wait_healthy(url, server)
        for cmd in (["work-pool", "create", "budgetalloc-process", "--type", "process"],
                    ["--no-prompt", "deploy", "--all"]):
            res = subprocess.run([str(bin_dir / "prefect"), *cmd], cwd=project, env=env, capture_output=True,
                                 text=True, check=False)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        spec = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            for flow_name, name in (("training", "weekly-retraining"), ("allocation", "daily-allocation"),
                                    ("benchmark", "on-demand")):
                d = client.read_deployment_by_name(f"{flow_name}/{name}")
                expected = [(s["cron"], s["timezone"]) for s in spec[name]["schedules"]]
                assert [(s.schedule.cron, s.schedule.timezone) for s in d.schedules] == expected
                assert d.work_pool_name == "budgetalloc-process"
                assert d.parameters == spec[name]["parameters"]
                assert d.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(project)
        assert expected == [] and spec["weekly-retraining"]["schedules"][0]["cron"] == "0 3 * * 1"
        # serve.py uses its own names and refuses to run the deployed schedules a second time
        serve = load_module("serve")
        with temporary_settings({PREFECT_API_URL: url}):
            problem = serve.guard(serve.deployments())
        assert problem and "training/weekly-retraining" in problem and "allocation/daily-allocation" in problem
        assert "benchmark/on-demand" not in problem and "schedule pause" in problem
    finally:
        local_prefect.stop(server)


def test_serve_builds_the_same_deployments_as_prefect_yaml(monkeypatch):
    monkeypatch.chdir(ROOT)
    serve = load_module("serve")
    spec = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    built = {d.name.removesuffix(serve.SUFFIX): d for d in serve.deployments()}
    assert set(built) == set(spec)
    assert all(d.name == f"{name}-served" for name, d in built.items())  # never prefect deploy's names
    for name, d in built.items():
        assert d.entrypoint == spec[name]["entrypoint"]
        assert [(s.schedule.cron, s.schedule.timezone) for s in d.schedules] == [
            (s["cron"], s["timezone"]) for s in spec[name]["schedules"]]
        assert d.parameters == spec[name]["parameters"]
