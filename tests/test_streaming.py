"""Allocation from files in batches: ids, bounded memory, and the in-memory path's errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import peak_bytes

from budgetalloc.data.contract import load_population
from budgetalloc.data.readers import check_unique_ids, rebatch
from budgetalloc.errors import BudgetallocError, DataError
from budgetalloc.params import SimulateParams
from budgetalloc.policy import load_policy
from budgetalloc.serve.allocate import allocate_file, allocate_population
from budgetalloc.studies.simulate import simulate_population

BUDGET = 400.0


@pytest.fixture(scope="module")
def policy(tiny_fitted):
    return load_policy(tiny_fitted[0])


@pytest.fixture(scope="module")
def frame(tiny_fitted):
    """12,000 users with 5% missing features (the in-memory path imputes them too)."""
    return simulate_population(SimulateParams(missing_rate=0.05), seed=5, n_users=12_000).frame


@pytest.fixture(autouse=True)
def small_csv_blocks(monkeypatch):
    """64 KB CSV blocks, so that a 12,000-row file has many and "late" means a later block."""
    from budgetalloc.data import readers

    monkeypatch.setattr(readers, "CSV_BLOCK_BYTES", 1 << 16)


def write_parquet(df: pd.DataFrame, path, *, row_group: int = 2500):
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group)
    return path


def in_memory(policy, path, budget=BUDGET):
    return allocate_population(policy, load_population(path, policy.feature_names), budget)


def only_output(tmp_path, name):
    """The output's directory holds nothing but the named file (no temporaries)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))) == [name]


def test_text_ids_and_ids_that_turn_to_text_in_a_late_csv_block(policy, frame, tmp_path):
    df = frame.copy()
    df["user_id"] = df["user_id"].astype(str)
    df.loc[len(df) - 3, "user_id"] = "u-late"  # every earlier CSV block reads as integers
    src = tmp_path / "users.csv"
    df.to_csv(src, index=False)
    ref = in_memory(policy, src)
    result = allocate_file(policy, src, BUDGET, tmp_path / "out.parquet", batch_size=1024)
    got = result.frame
    pd.testing.assert_frame_equal(got, ref.frame)
    assert got["user_id"].iloc[-3] == "u-late" and got["user_id"].iloc[0] == str(df["user_id"].iloc[0])


def test_memory_stays_bounded_for_a_file_much_larger_than_a_batch(policy, tmp_path):
    n, batch, row_group = 200_000, 4096, 16_384
    pop = simulate_population(SimulateParams(), seed=9, n_users=n)
    src = write_parquet(pop.frame, tmp_path / "big.parquet", row_group=20_000)
    del pop
    features_bytes = n * 4 * len(policy.feature_names)  # the float32 feature matrix alone

    def stream(name):
        allocate_file(policy, src, BUDGET, tmp_path / name, batch_size=batch, row_group_rows=row_group)

    stream("warm.parquet")  # compile outside the measurement
    streamed = peak_bytes(lambda: stream("out.parquet"))
    whole = peak_bytes(lambda: in_memory(policy, src))
    assert pq.read_table(tmp_path / "out.parquet").num_rows == n
    # What grows with the file is an int64 id, an int16 cluster and an int64 sort key
    # per user (18 bytes); everything else is a batch, a page or a row group.
    assert streamed < 18 * n + 6 * 2**20, (streamed, features_bytes)
    assert streamed < features_bytes / 2 and streamed < whole / 5, (streamed, features_bytes, whole)


@pytest.mark.parametrize("as_text", [False, True])
def test_duplicate_ids_in_different_batches_give_the_in_memory_message(policy, frame, tmp_path, as_text):
    df = frame.copy()
    if as_text:
        df["user_id"] = "u" + df["user_id"].astype(str)
    df.loc[9000, "user_id"] = df.loc[20, "user_id"]
    df.loc[11000, "user_id"] = df.loc[5, "user_id"]
    src = write_parquet(df, tmp_path / "users.parquet")
    with pytest.raises(DataError) as expected:
        in_memory(policy, src)
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError) as err:
        allocate_file(policy, src, BUDGET, out, batch_size=1024)
    assert str(err.value) == str(expected.value)
    assert repr(df.loc[20, "user_id"].item() if not as_text else df.loc[20, "user_id"]) in str(err.value)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_hash_collisions_are_not_duplicates(monkeypatch):
    from budgetalloc.data import readers

    monkeypatch.setattr(readers, "id_keys", lambda ids: np.zeros(len(ids), dtype=np.uint64))
    text = pa.array(["a", "b", "c"], type=pa.large_string())

    def check(chunks):
        check_unique_ids(np.zeros(sum(len(c) for c in chunks), np.uint64), lambda: chunks, "src")

    check([text, pa.array(["d"], type=pa.large_string())])  # every key equal, no id repeated
    with pytest.raises(DataError, match="duplicate user_id 'b'"):
        check([text, pa.array(["b"], type=pa.large_string())])


def late_bad_value(frame, source):
    df = frame.copy()
    if source == "parquet":
        df.loc[11_500, "x3"] = np.inf
        return df, "feature column 'x3' has infinite values"
    df["x3"] = df["x3"].fillna(0.0).astype(object)  # else the in-memory reader names a blank cell
    df.loc[11_500, "x3"] = "abc"
    return df, "feature column 'x3' is not numeric (value 'abc')"


@pytest.mark.parametrize("source", ["parquet", "csv"])
def test_a_bad_value_in_a_late_batch_is_one_line_naming_file_and_column(policy, frame, tmp_path, source):
    df, message = late_bad_value(frame, source)
    src = tmp_path / f"users.{source}"
    write_parquet(df, src) if source == "parquet" else df.to_csv(src, index=False)
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError) as err:
        allocate_file(policy, src, BUDGET, out, batch_size=1024)
    assert str(err.value) == f"{src}: {message}" and "\n" not in str(err.value)
    with pytest.raises(DataError) as expected:
        in_memory(policy, src)
    assert str(err.value) == str(expected.value)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


@pytest.mark.parametrize("damage", ["missing_feature", "missing_ids", "null_id_late", "no_rows"])
def test_contract_errors_match_the_in_memory_path(policy, frame, tmp_path, damage):
    df = frame.copy()
    if damage == "missing_feature":
        df = df.drop(columns="x7")
    elif damage == "missing_ids":
        df = df.drop(columns="user_id")
    elif damage == "null_id_late":
        df["user_id"] = df["user_id"].astype("Int64")
        df.loc[10_000, "user_id"] = pd.NA
    else:
        df = df.iloc[:0]
    src = write_parquet(df, tmp_path / "users.parquet")
    with pytest.raises(DataError) as expected:
        in_memory(policy, src)
    with pytest.raises(DataError) as err:
        allocate_file(policy, src, BUDGET, tmp_path / "out.parquet", batch_size=1024)
    assert str(err.value) == str(expected.value)


def test_bad_budget_and_missing_file_are_one_line_errors(policy, tmp_path):
    with pytest.raises(BudgetallocError, match="must be a finite number"):
        allocate_file(policy, tmp_path / "none.parquet", -1, tmp_path / "out.parquet")
    with pytest.raises(DataError, match="file not found"):
        allocate_file(policy, tmp_path / "none.parquet", 1.0, tmp_path / "out.parquet")


def test_rebatch_cuts_exact_sizes_across_record_batches():
    batches = [pa.record_batch({"a": np.arange(s, s + n)}) for s, n in ((0, 3), (3, 7), (10, 1), (11, 6))]
    tables = list(rebatch(batches, 5))
    assert [t.num_rows for t in tables] == [5, 5, 5, 2]
    assert np.concatenate([t.column("a").to_numpy() for t in tables]).tolist() == list(range(17))


def test_cli_streams_and_refuses_partitions_without_dask(tiny_fitted, frame, tmp_path):
    from typer.testing import CliRunner

    from budgetalloc.cli.app import app

    src = write_parquet(frame, tmp_path / "users.parquet")
    args = ["allocate", "--policy", str(tiny_fitted[0]), "--users", str(src), "--budget", str(BUDGET)]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out.csv")])
    assert res.exit_code == 0, res.output
    assert f"allocated {len(frame)} users" in res.output and "users per arm: 0:" in res.output
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "no.parquet"), "--partitions", "2"])
    assert res.exit_code == 2 and "--dask-address" in res.output
    assert not (tmp_path / "no.parquet").exists()
