"""Hostile tables and params: values that would overflow the float32 computation, column names that
are repeated, undecodable or reserved in another case, a trial with one arm, params with a repeated
key. Each is refused with one line naming the file, column (and row) before any output exists."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_PARAMS
from test_reliability import error_line, one_error_line
from typer.testing import CliRunner

from budgetalloc.cli.app import app
from budgetalloc.data.contract import Z_LIMIT, Preprocessor
from budgetalloc.errors import ParamsError
from budgetalloc.params import load_params
from budgetalloc.policy import load_policy
from budgetalloc.serve.allocate import allocate_file

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_fitted):
    from budgetalloc.studies.simulate import SimulateParams, simulate_trial

    root = tmp_path_factory.mktemp("data")
    policy_dir, pop, _ = tiny_fitted
    trial = simulate_trial(SimulateParams(n_users=600), seed=4).frame
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return root, policy_dir, trial, pop.frame.iloc[:300].reset_index(drop=True)


def _fit_error(root, path, tmp_path, *, stream: bool = False) -> str:
    out = tmp_path / "policy"
    args = ["fit", "--data", str(path), "--out", str(out), "--params", str(root / "params.yaml")]
    res = runner.invoke(app, args + (["--stream"] if stream else []))
    line = error_line(res) if stream else one_error_line(res)
    assert str(path) in line
    assert not out.exists()
    return line


@pytest.mark.parametrize("column,value,row,message", [
    ("response", 1e308, 17, "value 1e+308 at row 17"),
    ("response", -1e300, 3, "value -1e+300 at row 3"),
    ("cost", 1e308, 250, "value 1e+308 at row 250"),
    ("cost", 2e15, 0, "value 2e+15 at row 0"),
    ("propensity", 1e-300, 42, "value 1e-300 at row 42 is below"),
    ("propensity", 0.0, 5, "outside (0, 1] (row 5)"),
])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_values_beyond_the_computation_are_refused_with_column_and_row(world, tmp_path, column, value, row,
                                                                       message, suffix):
    root, _, trial, _ = world
    bad = trial.copy()
    if column == "propensity":
        bad["propensity"] = 0.2
    bad[column] = bad[column].astype(float)
    bad.loc[row, column] = value
    path = tmp_path / f"t{suffix}"
    bad.to_csv(path, index=False) if suffix == ".csv" else bad.to_parquet(path, index=False)
    line = _fit_error(root, path, tmp_path)
    assert f"'{column}'" in line and message in line, line


def test_streamed_fit_names_the_same_row(world, tmp_path):
    root, _, trial, _ = world
    bad = trial.assign(cost=trial["cost"].astype(float))
    bad.loc[555, "cost"] = 1e308
    pq.write_table(pa.Table.from_pandas(bad, preserve_index=False), tmp_path / "t.parquet", row_group_size=100)
    assert "value 1e+308 at row 555" in _fit_error(root, tmp_path / "t.parquet", tmp_path, stream=True)


def test_evaluate_refuses_overflowing_values_too(world, tmp_path):
    _, policy, trial, _ = world
    bad = trial.assign(response=trial["response"].astype(float))
    bad.loc[9, "response"] = 1e308
    bad.to_parquet(tmp_path / "t.parquet", index=False)
    res = runner.invoke(app, ["evaluate", "--policy", str(policy), "--data", str(tmp_path / "t.parquet"),
                              "--out", str(tmp_path / "eval")])
    assert "value 1e+308 at row 9" in one_error_line(res)
    assert not (tmp_path / "eval").exists()


def test_huge_population_features_give_finite_clusters(world, tmp_path):
    """A finite feature near float32's maximum standardises beyond it; the transform stays finite."""
    _, policy_dir, _, pop = world
    policy = load_policy(policy_dir)
    z = policy.preprocessor.transform(np.full((4, len(policy.feature_names)), 3.4e38, dtype=np.float32))
    assert np.isfinite(z).all()
    users = pop.copy()
    users.loc[:9, "x0"] = np.float32(3.4e38)
    users.loc[10:19, "x0"] = np.float32(-3.4e38)
    users.to_parquet(tmp_path / "u.parquet", index=False)
    result = allocate_file(policy, tmp_path / "u.parquet", 30.0, tmp_path / "a.parquet")
    assert result.n_users == len(users) and result.spend <= 30.0


def test_preprocessing_is_unchanged_for_ordinary_values(rng):
    X = rng.normal(size=(500, 6)).astype(np.float32)
    pre = Preprocessor.fit(X)
    expected = ((X - pre.means) / pre.scales).astype(np.float32)
    assert np.array_equal(pre.transform(X), expected)


@pytest.mark.parametrize("shape", [(7, 1), (70_001, 17)])  # a row block and a one-column block beyond the first
def test_the_preprocessor_in_blocks_is_the_whole_matrix_arithmetic(rng, shape):
    X = (rng.normal(size=shape) * rng.exponential(size=shape[1]) * 1e4).astype(np.float32)
    X[rng.random(shape) < 0.05] = np.nan
    X[:, -1] = np.nan  # a column with no values at all
    pre = Preprocessor.fit(X)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        medians = np.nan_to_num(np.nanmedian(X.astype(np.float64), axis=0), nan=0.0)
    filled = np.where(np.isnan(X), medians, X).astype(np.float64)
    scales = filled.std(axis=0)
    for got, want in zip((pre.medians, pre.means, pre.scales),
                         (medians, filled.mean(axis=0), np.where(scales > 1e-12, scales, 1.0)), strict=True):
        assert np.array_equal(got, want)  # bit for bit
    z = np.clip((np.where(np.isnan(X), medians.astype(np.float32), X) - pre.means) / pre.scales, -Z_LIMIT, Z_LIMIT)
    assert np.array_equal(pre.transform(X), z.astype(np.float32))


def _csv_bytes(header: bytes, frame: pd.DataFrame) -> bytes:
    body = frame.to_csv(index=False, header=False).encode()
    return header + b"\n" + body


def test_duplicate_column_names_are_refused(world, tmp_path):
    root, policy, trial, pop = world
    cols = list(trial.columns)
    header = ",".join(cols + ["x3"]).encode()
    (tmp_path / "t.csv").write_bytes(_csv_bytes(header, trial.assign(extra=trial["x3"])))
    line = _fit_error(root, tmp_path / "t.csv", tmp_path)
    assert "duplicate column name 'x3'" in line
    header = ",".join(list(pop.columns) + ["user_id"]).encode()
    (tmp_path / "u.csv").write_bytes(_csv_bytes(header, pop.assign(again=pop["user_id"] + 1)))
    res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(tmp_path / "u.csv"),
                              "--budget", "5", "--out", str(tmp_path / "a.parquet")])
    assert "duplicate column name 'user_id'" in one_error_line(res)
    table = pa.Table.from_arrays([pa.array([1, 2]), pa.array([1.0, 2.0]), pa.array([3.0, 4.0])],
                                 names=["user_id", "x0", "x0"])
    pq.write_table(table, tmp_path / "u.parquet")
    res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(tmp_path / "u.parquet"),
                              "--budget", "5", "--out", str(tmp_path / "a.parquet")])
    assert "duplicate column name 'x0'" in one_error_line(res)


@pytest.mark.parametrize("header", [b"user_id,x0\xff,treatment", b"\xfe\xffuser_id", b"user_id,caf\xe9"])
def test_undecodable_column_names_are_refused(world, tmp_path, header):
    root, policy, trial, _ = world
    names = header.split(b",")
    frame = trial.iloc[:, : len(names)]
    (tmp_path / "t.csv").write_bytes(_csv_bytes(header, frame))
    assert "not valid UTF-8" in _fit_error(root, tmp_path / "t.csv", tmp_path)
    res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(tmp_path / "t.csv"),
                              "--budget", "5", "--out", str(tmp_path / "a.csv")])
    assert "not valid UTF-8" in one_error_line(res)


def test_a_utf8_bom_is_not_part_of_the_first_name(world, tmp_path):
    _, policy_dir, _, pop = world
    (tmp_path / "u.csv").write_bytes(b"\xef\xbb\xbf" + pop.to_csv(index=False).encode())
    result = allocate_file(load_policy(policy_dir), tmp_path / "u.csv", 10.0, tmp_path / "a.parquet")
    assert result.n_users == len(pop)


def test_invalid_utf8_in_a_text_id_is_refused(world, tmp_path):
    _, policy, _, pop = world
    text = pop.assign(user_id=[f"u{i}" for i in range(len(pop))]).to_csv(index=False).encode()
    (tmp_path / "u.csv").write_bytes(text.replace(b"u17,", b"u\xff17,"))
    res = runner.invoke(app, ["allocate", "--policy", str(policy), "--users", str(tmp_path / "u.csv"),
                              "--budget", "5", "--out", str(tmp_path / "a.parquet")])
    line = one_error_line(res)
    assert str(tmp_path / "u.csv") in line and "UTF" in line.upper()


@pytest.mark.parametrize("rename,message", [
    ({"response": "Response"}, "missing column 'response' (found 'Response'"),
    ({"treatment": "TREATMENT"}, "missing column 'treatment' (found 'TREATMENT'"),
    ({"user_id": "User_Id"}, "missing column 'user_id' (found 'User_Id'"),
    ({"x0": "Cost"}, "column 'Cost' is not the reserved column 'cost'"),
    ({"x0": " response"}, "column ' response' is not the reserved column 'response'"),
    ({"x0": "Propensity"}, "column 'Propensity' is not the reserved column 'propensity'"),
])
def test_reserved_names_in_another_case_are_refused(world, tmp_path, rename, message):
    root, _, trial, _ = world
    trial.rename(columns=rename).to_csv(tmp_path / "t.csv", index=False)
    assert message in _fit_error(root, tmp_path / "t.csv", tmp_path)


def test_a_leaked_label_copy_is_refused_in_the_streamed_fit(world, tmp_path):
    root, _, trial, _ = world
    trial.assign(Response=trial["response"]).to_parquet(tmp_path / "t.parquet", index=False)
    assert "'Response' is not the reserved column 'response'" in _fit_error(root, tmp_path / "t.parquet",
                                                                           tmp_path, stream=True)


def test_explicit_features_may_use_any_name(world, tmp_path):
    from budgetalloc.data.contract import load_trial

    _, _, trial, _ = world
    trial.rename(columns={"x0": "Cost"}).to_csv(tmp_path / "t.csv", index=False)
    loaded = load_trial(tmp_path / "t.csv", features=("Cost", "x1"))
    assert loaded.feature_names == ("Cost", "x1")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_trial_with_one_arm_says_only_one_arm(world, tmp_path, suffix):
    root, _, trial, _ = world
    one = trial.assign(treatment=0)
    path = tmp_path / f"t{suffix}"
    one.to_csv(path, index=False) if suffix == ".csv" else one.to_parquet(path, index=False)
    assert "only one arm" in _fit_error(root, path, tmp_path)
    if suffix == ".parquet":
        assert "only one arm" in _fit_error(root, path, tmp_path, stream=True)


@pytest.mark.parametrize("text,key", [
    ("seed: 1\nseed: 2\n", "'seed' (lines 1 and 2)"),
    ("train:\n  epochs: 3\n  hidden: 8\n  epochs: 5\n", "'epochs' (lines 2 and 4)"),
    ("train: {epochs: 3, epochs: 4}\n", "'epochs'"),
    ("program:\n  alpha: 0.1\nprogram:\n  alpha: 0.2\n", "'program' (lines 1 and 3)"),
])
def test_params_refuse_duplicate_keys(world, tmp_path, text, key):
    _, _, trial, _ = world
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ParamsError, match="duplicate key"):
        load_params(tmp_path / "p.yaml")
    trial.to_parquet(tmp_path / "t.parquet", index=False)
    res = runner.invoke(app, ["fit", "--data", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "pol"),
                              "--params", str(tmp_path / "p.yaml")])
    line = one_error_line(res)
    assert "duplicate key" in line and key in line and str(tmp_path / "p.yaml") in line


@pytest.mark.parametrize("raw", [b"seed: 1\n\xff\n", b"!!python/object/apply:os.system ['true']\n",
                                 b"seed: &a [*a]\n", b"- 1\n- 2\n"])
def test_params_that_are_not_plain_yaml_mappings_are_one_line(tmp_path, raw):
    (tmp_path / "p.yaml").write_bytes(raw)
    with pytest.raises(ParamsError) as info:
        load_params(tmp_path / "p.yaml")
    assert str(tmp_path / "p.yaml") in str(info.value) and "\n" not in str(info.value)
