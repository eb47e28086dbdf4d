"""Hostile ids: every integer width at its edges, ids beyond int64, and awkward text come out of
`allocate` (and go through `fit` and `evaluate`) exactly as they went in, byte for byte, or are
refused with a clear reason."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from test_reliability import one_error_line
from typer.testing import CliRunner

from budgetalloc.cli.app import app
from budgetalloc.data.contract import load_trial, read_table
from budgetalloc.policy import load_policy
from budgetalloc.serve.allocate import allocate_file

runner = CliRunner()
WIDTHS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def edge_ids(dtype: str, n: int) -> np.ndarray:
    """``n`` distinct ids of ``dtype``: both ends of its range, zero, and values around them."""
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    edges = [lo, lo + 1, hi - 1, hi, 0, 1] + ([2**63, 2**63 - 1, 2**63 + 1] if dtype == "uint64" else [])
    if dtype == "int64":
        edges += [-(2**53) - 1, 2**53 + 1]  # not exact as float64
    edges = list(dict.fromkeys(edges))
    rest = [v for v in range(lo, hi + 1 if hi - lo < 10_000 else lo + 10_000) if v not in edges]
    if hi - lo >= 10_000:
        rest = [v for v in range(hi - 2 - 10_000, hi - 2) if v not in edges]
    values = (edges + rest)[:n]
    assert len(values) == n
    return np.array(values, dtype=dtype)


TEXT_IDS = ["007", "7", "+7", " 7", "7 ", "1e3", "1.50", "-0", "00", "0x1F", "NA", "null", "nan", "None",
            "a,b", 'say "hi"', "line\nbreak", "tab\there", "ünïcödé", "😀", "18446744073709551616",
            "-9223372036854775809", "9223372036854775808", "'quoted'", "#hash", "=SUM(A1)"]


@pytest.fixture(scope="module")
def setting(tiny_fitted, tmp_path_factory):
    policy_dir, pop, _ = tiny_fitted
    return load_policy(policy_dir), policy_dir, pop.frame.iloc[:200].reset_index(drop=True)


def _arrow_ids(path) -> pa.ChunkedArray:
    if str(path).endswith(".csv"):
        opts = pacsv.ConvertOptions(column_types={"user_id": pa.string()}, strings_can_be_null=False)
        return pacsv.read_csv(path, convert_options=opts).column("user_id")
    return pq.read_table(path, columns=["user_id"]).column("user_id")


@pytest.mark.parametrize("dtype", WIDTHS)
def test_parquet_ids_of_every_width_round_trip_exactly(setting, tmp_path, dtype):
    policy, _, frame = setting
    users = frame.assign(user_id=edge_ids(dtype, len(frame)))
    pq.write_table(pa.Table.from_pandas(users, preserve_index=False), tmp_path / "u.parquet")
    for out in (tmp_path / "a.parquet", tmp_path / "a.csv"):
        allocate_file(policy, tmp_path / "u.parquet", 40.0, out, batch_size=64)
        got = _arrow_ids(out)
        if out.suffix == ".parquet":
            assert got.type == pa.from_numpy_dtype(np.dtype(dtype))
            assert got.equals(pq.read_table(tmp_path / "u.parquet").column("user_id"))
        else:  # the decimal text of every id, exactly
            assert got.to_pylist() == [str(int(v)) for v in users["user_id"]]


def test_uint64_ids_above_int64_are_not_made_negative_by_the_cli(setting, tmp_path):
    _, policy_dir, frame = setting
    ids = np.arange(len(frame), dtype=np.uint64) + np.uint64(2**64 - 1 - len(frame))
    frame.assign(user_id=ids).to_parquet(tmp_path / "u.parquet", index=False)
    res = runner.invoke(app, ["allocate", "--policy", str(policy_dir), "--users", str(tmp_path / "u.parquet"),
                              "--budget", "30", "--out", str(tmp_path / "a.parquet")])
    assert res.exit_code == 0, res.output
    out = pq.read_table(tmp_path / "a.parquet").column("user_id")
    assert out.type == pa.uint64() and out.to_pylist() == [int(v) for v in ids]
    assert min(out.to_pylist()) >= 2**63


def _csv_with_ids(frame: pd.DataFrame, ids: list[str], path) -> None:
    users = frame.iloc[: len(ids)].drop(columns="user_id").reset_index(drop=True)
    users.insert(0, "user_id", pd.Series(ids, dtype=object))
    users.to_csv(path, index=False)


@pytest.mark.parametrize("kind", ["beyond_int64", "text", "leading_zeros"])
def test_csv_ids_round_trip_as_their_text(setting, tmp_path, kind):
    policy, _, frame = setting
    ids = {
        "beyond_int64": [str(2**64 - 1), str(2**63), str(-(2**63)), str(2**63 - 1), "0", "1"],
        "text": TEXT_IDS,
        "leading_zeros": ["007", "7", "0007", "07"],  # four different ids, not one repeated
    }[kind]
    _csv_with_ids(frame, ids, tmp_path / "u.csv")
    assert _arrow_ids(tmp_path / "u.csv").to_pylist() == ids
    for out in (tmp_path / "a.csv", tmp_path / "a.parquet"):
        allocate_file(policy, tmp_path / "u.csv", 10.0, out, batch_size=64)
        got = _arrow_ids(out)
        assert got.to_pylist() == ids, out
        if out.suffix == ".parquet":
            assert pa.types.is_string(got.type) or pa.types.is_large_string(got.type)


def test_csv_ids_change_type_in_a_later_batch(setting, tmp_path):
    """The first batch all canonical integers, a later one text: the whole column is text, as in memory."""
    policy, _, frame = setting
    ids = [str(i) for i in range(150)] + ["007"] + [str(2**64 - 1 - i) for i in range(49)]
    _csv_with_ids(frame, ids, tmp_path / "u.csv")
    allocate_file(policy, tmp_path / "u.csv", 10.0, tmp_path / "a.csv", batch_size=64)
    assert _arrow_ids(tmp_path / "a.csv").to_pylist() == ids
    assert read_table(tmp_path / "u.csv")["user_id"].tolist() == ids


def test_canonical_csv_ids_stay_int64(setting, tmp_path):
    policy, _, frame = setting
    ids = [str(v) for v in (-(2**63), 2**63 - 1, 0, -1, 42)]
    _csv_with_ids(frame, ids, tmp_path / "u.csv")
    allocate_file(policy, tmp_path / "u.csv", 10.0, tmp_path / "a.parquet", batch_size=64)
    got = _arrow_ids(tmp_path / "a.parquet")
    assert got.type == pa.int64() and [str(v) for v in got.to_pylist()] == ids


def test_fit_and_evaluate_accept_uint64_ids_beyond_int64(tmp_path, tiny_fitted):
    from budgetalloc.studies.simulate import SimulateParams, simulate_trial

    _, _, _ = tiny_fitted
    trial = simulate_trial(SimulateParams(n_users=2000), seed=5).frame
    trial["user_id"] = np.arange(len(trial), dtype=np.uint64) + np.uint64(2**63)
    trial.to_parquet(tmp_path / "t.parquet", index=False)
    loaded = load_trial(tmp_path / "t.parquet")
    assert loaded.user_id.dtype == np.uint64 and int(loaded.user_id.min()) == 2**63
    dup = trial.assign(user_id=trial["user_id"].where(trial.index != 5, trial["user_id"].iloc[9]))
    dup.to_parquet(tmp_path / "d.parquet", index=False)
    with pytest.raises(Exception, match=f"duplicate user_id {2**63 + 9}"):
        load_trial(tmp_path / "d.parquet")


@pytest.mark.parametrize("case,message", [
    ("float", "floating-point numbers"),
    ("bool", "booleans"),
    ("bytes", "bytes"),
    ("empty", "empty id at row 3"),
    ("null", "missing values (row 4)"),
])
def test_ids_that_cannot_round_trip_are_refused_with_a_reason(setting, tmp_path, case, message):
    _, policy_dir, frame = setting
    users = frame.iloc[:10].copy()
    if case == "float":
        users["user_id"] = users["user_id"].astype(float) + 0.5
    elif case == "bool":
        users["user_id"] = [True] + [False] * 9
    elif case == "bytes":
        users["user_id"] = [f"u{i}".encode() for i in range(10)]
    elif case == "empty":
        users["user_id"] = [f"u{i}" if i != 3 else "" for i in range(10)]
    else:
        users["user_id"] = pd.array([1, 2, 3, 4, None, 6, 7, 8, 9, 10], dtype="Int64")
    pq.write_table(pa.Table.from_pandas(users, preserve_index=False), tmp_path / "u.parquet")
    res = runner.invoke(app, ["allocate", "--policy", str(policy_dir), "--users", str(tmp_path / "u.parquet"),
                              "--budget", "5", "--out", str(tmp_path / "a.parquet")])
    line = one_error_line(res)
    assert message in line and "user_id" in line, line
    assert not (tmp_path / "a.parquet").exists()


def test_csv_ids_beyond_int64_are_no_false_duplicates(setting, tmp_path):
    """2^64-1 and 2^64-2 were once both read as the float 1.8446744073709552e19."""
    _, policy_dir, frame = setting
    _csv_with_ids(frame, [str(2**64 - 1), str(2**64 - 2), "3"], tmp_path / "u.csv")
    res = runner.invoke(app, ["allocate", "--policy", str(policy_dir), "--users", str(tmp_path / "u.csv"),
                              "--budget", "5", "--out", str(tmp_path / "a.csv")])
    assert res.exit_code == 0, res.output
    assert _arrow_ids(tmp_path / "a.csv").to_pylist() == [str(2**64 - 1), str(2**64 - 2), "3"]
    _csv_with_ids(frame, [str(2**64 - 1), "5", str(2**64 - 1)], tmp_path / "d.csv")
    res = runner.invoke(app, ["allocate", "--policy", str(policy_dir), "--users", str(tmp_path / "d.csv"),
                              "--budget", "5", "--out", str(tmp_path / "d_out.csv")])
    assert f"duplicate user_id '{2**64 - 1}'" in one_error_line(res)


@pytest.mark.slow
def test_the_dask_path_writes_the_same_ids(setting, tmp_path):
    """Partitions keep the ids' width too: the partition-parallel file is the single-process file."""
    from distributed import LocalCluster

    from budgetalloc.serve.allocate import allocate_distributed

    policy, policy_dir, frame = setting
    text = np.array([f"{t}-{i}" for i, t in enumerate(TEXT_IDS * 8)][: len(frame)], dtype=object)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        for name, ids in (("uint64", edge_ids("uint64", len(frame))), ("text", text)):
            users = frame.assign(user_id=ids)
            src, single, dask = (tmp_path / f"{name}-{k}.parquet" for k in ("u", "single", "dask"))
            pq.write_table(pa.Table.from_pandas(users, preserve_index=False), src, row_group_size=50)
            allocate_file(policy, src, 40.0, single, batch_size=64)
            allocate_distributed(policy_dir, src, 40.0, dask, address=cluster.scheduler_address, batch_size=64,
                                 quiet=True)
            assert dask.read_bytes() == single.read_bytes(), name
            assert _arrow_ids(dask).to_pylist() == list(users["user_id"]), name
