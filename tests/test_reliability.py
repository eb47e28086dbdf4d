"""Reliability: bad input everywhere exits 2 with one line and no output; policies are
verified on load; fits are deterministic across processes; a killed fit leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY_PARAMS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from budgetalloc.cli.app import app
from budgetalloc.errors import PolicyError
from budgetalloc.params import params_from_dict
from budgetalloc.policy import load_policy
from budgetalloc.studies.simulate import SimulateParams, simulate_trial

runner = CliRunner()
BIN = Path(sys.executable).parent / "budgetalloc"


def one_error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def error_line(res) -> str:
    """The one error line of a command that may print progress before it (fit does): the last line."""
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and res.output.rstrip().endswith(errors[0]), res.output
    assert "Traceback" not in res.output
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_fitted):
    root = tmp_path_factory.mktemp("rel")
    policy_dir, pop, _ = tiny_fitted
    simulate_trial(SimulateParams(n_users=3000), seed=4).frame.to_parquet(root / "trial.parquet")
    pop.frame.iloc[:500].to_parquet(root / "pop.parquet")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return root, policy_dir


def _write(root: Path, name: str, content) -> Path:
    path = root / name
    if isinstance(content, pd.DataFrame):
        content.to_csv(path, index=False)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "file not found"),
        ("empty", "file is empty"),
        ("garbage_parquet", "not a readable Parquet file"),
        ("no_rows", "table has no rows"),
        ("extra_arm_gap", "arm 2 has no rows"),
        ("negative_cost", "negative value"),
        ("nan_response", "'response' has NaN"),
        ("text_feature", "feature column 'x1' is not numeric"),
        ("dup_ids", "duplicate user_id"),
        ("inf_feature", "infinite"),
    ],
)
def test_fit_rejects_bad_trials_without_output(files, tmp_path, case, message):
    root, _ = files
    good = pd.read_parquet(root / "trial.parquet").iloc[:400].copy()
    make = {
        "missing": lambda: tmp_path / "nope.parquet",
        "empty": lambda: _write(tmp_path, "e.csv", b""),
        "garbage_parquet": lambda: _write(tmp_path, "g.parquet", b"PAR1 not really"),
        "no_rows": lambda: _write(tmp_path, "n.csv", good.iloc[:0]),
        "extra_arm_gap": lambda: _write(tmp_path, "a.csv", good.assign(treatment=good.treatment.replace(2, 1))),
        "negative_cost": lambda: _write(tmp_path, "c.csv", good.assign(cost=-good.cost - 1)),
        "nan_response": lambda: _write(tmp_path, "r.csv", good.assign(response=np.nan)),
        "text_feature": lambda: _write(tmp_path, "t.csv", good.assign(x1="high")),
        "dup_ids": lambda: _write(tmp_path, "d.csv", good.assign(user_id=7)),
        "inf_feature": lambda: _write(tmp_path, "i.csv", good.assign(x2=np.inf)),
    }
    path = make[case]()
    out = tmp_path / "policy"
    res = runner.invoke(app, ["fit", "--data", str(path), "--out", str(out), "--params", str(root / "params.yaml")])
    line = one_error_line(res)
    assert message in line and str(path) in line
    assert not out.exists()


@pytest.mark.parametrize(
    "text,key",
    [
        ("cluster:\n  k: 1\n", "cluster.k"),
        ("program:\n  alpha: 1.5\n", "program.alpha"),
        ("allocate:\n  batch_size: 0\n", "allocate.batch_size"),
        ("train:\n  epochz: 3\n", "train.epochz"),
        ("statistics:\n  n_scenarios: many\n", "statistics.n_scenarios"),
    ],
)
def test_fit_rejects_bad_params(files, tmp_path, text, key):
    root, _ = files
    (tmp_path / "p.yaml").write_text(text)
    out = tmp_path / "policy"
    res = runner.invoke(app, ["fit", "--data", str(root / "trial.parquet"), "--out", str(out),
                              "--params", str(tmp_path / "p.yaml")])
    assert key in one_error_line(res)
    assert not out.exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(["train", "cluster", "statistics", "program", "distill", "allocate", "data"]),
       key=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
       value=st.one_of(st.integers(-10, 10), st.floats(allow_nan=True), st.text(max_size=4), st.none()))
def test_random_params_are_valid_or_named_errors(section, key, value):
    from budgetalloc.errors import ParamsError

    try:
        params_from_dict({section: {key: value}}, source="gen.yaml")
    except ParamsError as err:
        assert str(err).startswith("gen.yaml: ") and f"{section}.{key}" in str(err)


@pytest.mark.parametrize("budget", ["-5", "nan", "inf", "abc", ""])
def test_allocate_rejects_bad_budgets(files, tmp_path, budget):
    root, policy = files
    out = tmp_path / "a.parquet"
    res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(root / "pop.parquet"),
                              "--budget", budget, "--out", str(out)])
    assert "budget" in one_error_line(res)
    assert not out.exists()


def test_allocate_rejects_population_mismatch(files, tmp_path):
    root, policy = files
    pop = pd.read_parquet(root / "pop.parquet")
    cases = {
        "missing feature": (pop.drop(columns=["x5"]), "missing feature column 'x5'"),
        "text feature": (pop.assign(x0="a"), "feature column 'x0' is not numeric"),
        "duplicate id": (pop.assign(user_id=1), "duplicate user_id 1"),
        "no id": (pop.drop(columns=["user_id"]), "missing column 'user_id'"),
    }
    for name, (frame, message) in cases.items():
        path = _write(tmp_path, f"{name.replace(' ', '_')}.csv", frame)
        out = tmp_path / "a.parquet"
        res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(path), "--budget", "10",
                                  "--out", str(out)])
        assert message in one_error_line(res), name
        assert not out.exists()


def test_infeasible_budget_without_control_is_a_clear_error(files, tmp_path):
    root, _ = files
    params = dict(TINY_PARAMS, program={"allow_control": False, "budget_levels": [1.0]})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    res = runner.invoke(app, ["fit", "--data", str(root / "trial.parquet"), "--out", str(tmp_path / "pol"),
                              "--params", str(tmp_path / "p.yaml")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["allocate", "--policy", str(tmp_path / "pol"), "--users", str(root / "pop.parquet"),
                              "--budget", "1", "--out", str(tmp_path / "a.parquet")])
    assert "minimum feasible spend" in one_error_line(res)
    assert not (tmp_path / "a.parquet").exists()


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete", "extra", "version", "manifest"])
def test_damaged_policies_are_refused(files, tmp_path, damage):
    _, policy = files
    copy = tmp_path / "policy"
    shutil.copytree(policy, copy)
    weights = next(p for p in (copy / "student").iterdir() if p.suffix != ".json")
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "edit":
        stats = copy / "summary.json"
        stats.write_text(stats.read_text().replace('"k"', '"K"'))
    elif damage == "delete":
        (copy / "statistics.npz").unlink()
    elif damage == "extra":
        (copy / "model.pkl").write_bytes(b"\x80\x04")
    elif damage == "version":
        m = json.loads((copy / "manifest.json").read_text())
        m["format_version"] = 99
        (copy / "manifest.json").write_text(json.dumps(m))
    else:
        (copy / "manifest.json").write_text("{not json")
    with pytest.raises(PolicyError) as info:
        load_policy(copy)
    assert str(copy) in str(info.value) and "\n" not in str(info.value)
    res = runner.invoke(app, ["allocate", "--policy", str(copy), "--users", str(files[0] / "pop.parquet"),
                              "--budget", "10", "--out", str(tmp_path / "a.parquet")])
    one_error_line(res)


def _run(args, cwd, env=None, **kw):
    return subprocess.run([str(BIN), *args], cwd=cwd, capture_output=True, text=True, env=env, check=False, **kw)


@pytest.mark.slow
def test_fit_and_allocate_bit_identical_across_processes(files, tmp_path):
    root, _ = files
    outputs = []
    for run in ("a", "b"):
        res = _run(["fit", "--data", str(root / "trial.parquet"), "--out", str(tmp_path / run),
                    "--params", str(root / "params.yaml")], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        res = _run(["allocate", "--policy", str(tmp_path / run), "--users", str(root / "pop.parquet"),
                    "--budget", "25", "--out", str(tmp_path / f"{run}.parquet")], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        outputs.append(tmp_path / run)
    a, b = outputs
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


@pytest.mark.slow
def test_killed_fit_leaves_no_artifact_and_rerun_completes(files, tmp_path):
    root, _ = files
    out = tmp_path / "policy"
    args = ["fit", "--data", str(root / "trial.parquet"), "--out", str(out), "--params", str(root / "params.yaml")]
    for delay in (4.0, 8.0):
        proc = subprocess.Popen([str(BIN), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            assert not out.exists(), f"half-written policy after kill at {delay}s"
    res = _run(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    load_policy(out)
    assert not list(tmp_path.glob(".policy.*")), "temporaries left behind"


def test_population_allocation_uses_policy_feature_order(files, tmp_path):
    root, policy = files
    pop = pd.read_parquet(root / "pop.parquet")
    shuffled = pop[["user_id", *reversed([c for c in pop.columns if c != "user_id"])]]
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pop.to_csv(tmp_path / "p1.csv", index=False)
    shuffled.to_csv(tmp_path / "p2.csv", index=False)
    for src, out in ((tmp_path / "p1.csv", a), (tmp_path / "p2.csv", b)):
        res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(src), "--budget", "30",
                                  "--out", str(out)])
        assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
