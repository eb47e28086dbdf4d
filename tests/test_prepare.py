"""The streamed ``prepare`` split: the same parts as the whole-table split, in bounded memory.

The reference is the whole-file reader and ``split_mask`` (what ``prepare`` did before it
read in batches); batches here are a few dozen rows and CSV blocks a few kilobytes, so
every check that spans batches or blocks is exercised.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from budgetalloc.data import readers
from budgetalloc.data.contract import load_trial, read_table, trial_from_frame
from budgetalloc.data.sampling import split_mask
from budgetalloc.data.split import TEST_SEED_OFFSET, split_trial_file
from budgetalloc.errors import DataError
from budgetalloc.files import write_table
from budgetalloc.params import params_from_dict
from budgetalloc.stages import prepare, stage_app
from budgetalloc.studies.simulate import SimulateParams, simulate_trial

ROOT = Path(__file__).resolve().parents[1]
BATCH = 48


def params(**data):
    return params_from_dict({"seed": 5, "data": {"test_fraction": 0.25, **data}})


def trial_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    return simulate_trial(SimulateParams(n_users=n, n_features=10), seed=seed).frame


def whole_split(path: Path, p) -> list[pd.DataFrame]:
    """The parts as the whole-table split wrote them: read whole, validated, ``split_mask``, ``write_table``."""
    df = read_table(path)
    trial_from_frame(df, features=p.data.features, source=str(path))
    test = split_mask(len(df), fraction=p.data.test_fraction, seed=p.seed + TEST_SEED_OFFSET)
    return [df[rows].reset_index(drop=True) for rows in (~test, test)]


def ids_in(path: Path) -> pa.DataType:
    """The ids' type in a trial file: a Parquet file's own; a CSV's int64 where every id is canonical, else text."""
    if path.suffix == ".parquet":
        return pq.read_schema(path).field("user_id").type
    return pa.int64() if read_table(path)["user_id"].dtype == np.int64 else pa.string()


def split(path: Path, tmp: Path, p, batch_rows: int = BATCH) -> tuple[Path, Path]:
    fit, test = tmp / "out" / "fit.parquet", tmp / "out" / "test.parquet"
    split_trial_file(path, fit, test, p, batch_rows=batch_rows)
    return fit, test


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_blocks(monkeypatch):
    """CSV blocks of 2 KiB: types first inferred from a block that later blocks do not fit."""
    monkeypatch.setattr(readers, "CSV_BLOCK_BYTES", 2048)


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _parquet(frame: pd.DataFrame, path: Path, **types) -> Path:
    table = pa.Table.from_pandas(frame, preserve_index=not isinstance(frame.index, pd.RangeIndex))
    for name, kind in types.items():
        table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(kind))
    pq.write_table(table, path, row_group_size=100)
    return path


def _mixed_ids(df):
    df = df.copy()
    df["user_id"] = [str(i) if i < 200 else f"0{i}" for i in range(len(df))]  # "0200" is not canonical
    return df


def _widening(df):
    """Columns whose whole-file type is not the first block's: int -> float, empty -> int, 0/1 -> bool, int -> text."""
    n = len(df)
    return df.assign(x0=[*range(n - 3), 2.5, 1, 1], x1=pd.array([None] * (n - 50) + list(range(50)), dtype="Int64"),
                     flag=[*(np.arange(n - 2) % 2), "true", 0], segment=[*(np.arange(n - 1) % 5), "north"])


CASES = {
    "csv int ids": (lambda df, p: _csv(df, p / "t.csv"), {}),
    "csv text ids": (lambda df, p: _csv(df.assign(user_id="u" + df["user_id"].astype(str)), p / "t.csv"), {}),
    "csv mixed ids (read again as text)": (lambda df, p: _csv(_mixed_ids(df), p / "t.csv"), {}),
    "csv types wider in a later block": (lambda df, p: _csv(_widening(df), p / "t.csv"),
                                         {"features": ["x0", "x1", "x2", "flag"]}),
    "parquet uint64 ids": (lambda df, p: _parquet(df.assign(user_id=df["user_id"].astype(np.uint64) + 2**63),
                                                  p / "t.parquet"), {}),
    "parquet int16 ids, an index column": (lambda df, p: _parquet(df.set_axis(np.arange(len(df)) * 2), p / "t.parquet",
                                                                  user_id=pa.int16()), {}),
    "parquet text ids, missing features": (
        lambda df, p: _parquet(df.assign(user_id="id-" + df["user_id"].astype(str),
                                         x2=df["x2"].where(df.index % 9 != 0)), p / "t.parquet"), {}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_streamed_split_is_the_whole_table_split(case, tmp_path, small_blocks):
    make, data = CASES[case]
    source = make(trial_frame(), tmp_path)
    p = params(**data)
    fit, test = split(source, tmp_path, p)
    for got, want in zip((fit, test), whole_split(source, p), strict=True):
        table = pq.read_table(got)
        pd.testing.assert_frame_equal(table.to_pandas(), want)  # values, dtypes, columns in order
        assert table.schema.field("user_id").type == ids_in(source)  # ids as they went in: width, text
        assert "__index_level_0__" not in table.schema.names


def test_each_column_keeps_its_whole_file_type(tmp_path, small_blocks):
    source = _csv(_widening(trial_frame()), tmp_path / "t.csv")
    fit, _ = split(source, tmp_path, params(features=["x0", "x1", "x2", "flag"]))
    types = pq.read_schema(fit)
    assert [str(types.field(c).type) for c in ("x0", "x1", "flag", "segment", "treatment")] == [
        "double", "int64", "bool", "string", "int64"]


def test_the_parts_of_a_plain_trial_are_the_bytes_write_table_wrote(tmp_path):
    source = _csv(trial_frame(), tmp_path / "t.csv")
    p = params()
    for got, want in zip(split(source, tmp_path, p), whole_split(source, p), strict=True):
        write_table(want, tmp_path / "want.parquet")
        assert sha(got) == sha(tmp_path / "want.parquet")


def test_the_test_part_is_the_split_mask(tmp_path):
    df = trial_frame(n=1000)
    p = params()
    fit, test = split(_csv(df, tmp_path / "t.csv"), tmp_path, p, batch_rows=77)
    mask = split_mask(1000, fraction=0.25, seed=p.seed + TEST_SEED_OFFSET)
    assert pq.read_table(test).column("user_id").to_pylist() == df["user_id"][mask].tolist()
    assert pq.read_table(fit).column("user_id").to_pylist() == df["user_id"][~mask].tolist()


def _message(call) -> str:
    with pytest.raises(DataError) as err:
        call()
    return str(err.value)


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or [p.name for p in out.iterdir()] == ["fit.parquet"]  # the earlier one, kept


def _breaks(df, n):
    """Faults in a later batch: (frame, suffix)."""
    dup = df.copy()
    dup.loc[n - 7, "user_id"] = dup.loc[3, "user_id"]
    cost = df.copy()
    cost.loc[n - 100, "cost"] = -1.0
    text = df.astype({"x1": object})
    text.loc[n - 5, "x1"] = "abc"
    return {"a duplicate id across batches": (dup, ".csv"), "a negative cost": (cost, ".parquet"),
            "a non-numeric feature in a later CSV block": (text, ".csv")}


@pytest.mark.parametrize("fault", ["a duplicate id across batches", "a negative cost",
                                   "a non-numeric feature in a later CSV block"])
def test_a_fault_in_a_later_batch_is_the_whole_file_message_and_writes_nothing(fault, tmp_path, small_blocks):
    frame, suffix = _breaks(trial_frame(), 600)[fault]
    source = tmp_path / f"t{suffix}"
    frame.to_csv(source, index=False) if suffix == ".csv" else _parquet(frame, source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "fit.parquet").write_bytes(b"earlier")
    expected = _message(lambda: load_trial(source))
    assert _message(lambda: split(source, tmp_path, params())) == expected
    _assert_nothing_written(out)
    assert (out / "fit.parquet").read_bytes() == b"earlier"


def _one_row_of_arm(arm: int, in_test: bool, p, n: int = 600) -> pd.DataFrame:
    """A trial where ``arm`` has a single row, placed in the test part (or the fit part)."""
    df = trial_frame(n)
    df.loc[df["treatment"] == arm, "treatment"] = 0
    mask = split_mask(n, fraction=p.data.test_fraction, seed=p.seed + TEST_SEED_OFFSET)
    df.loc[int(np.flatnonzero(mask == in_test)[-1]), "treatment"] = arm
    return df


@pytest.mark.parametrize("arm", [1, 4])  # an arm below the highest, and the highest
@pytest.mark.parametrize("in_test", [True, False])
def test_every_arm_must_have_rows_in_both_parts(arm, in_test, tmp_path):
    p = params()
    source = _csv(_one_row_of_arm(arm, in_test, p), tmp_path / "t.csv")
    lacking = tmp_path / "out" / ("fit.parquet" if in_test else "test.parquet")
    assert _message(lambda: split(source, tmp_path, p)) == f"{lacking}: arm {arm} has no rows in column 'treatment'"
    assert not (tmp_path / "out").exists()


def test_the_stage_says_one_line_and_exits_2(tmp_path):
    frame, _ = _breaks(trial_frame(), 600)["a duplicate id across batches"]
    source = _csv(frame, tmp_path / "t.csv")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    res = CliRunner().invoke(stage_app(prepare.main), [
        "--trial", str(source), "--fit", str(tmp_path / "f.parquet"), "--test", str(tmp_path / "t.parquet"),
        "--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip() == f"error: {source}: duplicate user_id {frame.loc[3, 'user_id']}"


def test_the_raw_trial_is_never_an_output(tmp_path):
    source = _csv(trial_frame(), tmp_path / "t.csv")
    before = sha(source)
    with pytest.raises(Exception, match="is also given as --trial"):
        split_trial_file(source, source, tmp_path / "test.parquet", params())
    assert sha(source) == before


MEMORY = """
import json, resource, sys
from pathlib import Path
from budgetalloc.data import split
from budgetalloc.params import params_from_dict
split.PART_ROW_GROUP = 8192
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d = Path(sys.argv[1])
split.split_trial_file(d / "t.parquet", d / "fit.parquet", d / "test.parquet",
                       params_from_dict({"data": {"test_fraction": 0.2}}), batch_rows=16384)
print(json.dumps({"growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


def test_memory_does_not_grow_with_the_table(tmp_path):
    """A 1M x 16 table (about 160 MiB in memory): the split holds its keys and a few batches, not the table."""
    rng = np.random.default_rng(0)
    n = 1_000_000
    cols = {"user_id": np.arange(n), **{f"x{j}": rng.normal(size=n) for j in range(16)},
            "treatment": rng.integers(0, 3, n), "response": rng.integers(0, 2, n).astype(float), "cost": np.ones(n)}
    table = pa.table(cols)
    pq.write_table(table, tmp_path / "t.parquet")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path)], capture_output=True, text=True, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = json.loads(out.stdout.splitlines()[-1])["growth_kib"] * 1024
    assert pq.read_metadata(tmp_path / "fit.parquet").num_rows == 800_000
    assert growth < table.nbytes / 4, (growth, table.nbytes)
