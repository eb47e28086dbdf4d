"""Public dataset importers: layouts, mappings, streaming, and one-line failures."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from budgetalloc.data.contract import load_trial
from budgetalloc.data.datasets import ImportOptions, import_dataset
from budgetalloc.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
HILLSTROM = FIXTURES / "hillstrom_sample.csv"
runner = CliRunner()


def criteo_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Rows in CRITEO-UPLIFT v2.1's column layout (f0..f11, treatment, conversion, visit, exposure)."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({f"f{i}": rng.normal(10.0, 3.0, n).round(6) for i in range(12)})
    df["treatment"] = (rng.random(n) < 0.85).astype(int)
    df.loc[:1, "treatment"] = [0, 1]
    df["conversion"] = (rng.random(n) < 0.1).astype(int)
    df["visit"] = np.maximum(df["conversion"], (rng.random(n) < 0.3).astype(int))
    df["exposure"] = df["treatment"] * (rng.random(n) < 0.5)
    return df


def mt_lift_frame(n: int = 300, seed: int = 1) -> pd.DataFrame:
    """Rows in MT-LIFT's layout: f0..f98, treatment 0..4, click, conversion."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({f"f{i}": rng.normal(size=n).round(5) for i in range(99)})
    df["treatment"] = np.arange(n) % 5
    df["click"] = (rng.random(n) < 0.4).astype(int)
    df["conversion"] = df["click"] * (rng.random(n) < 0.5)
    return df[["click", "conversion", "treatment"] + [f"f{i}" for i in range(99)]]


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as fh:
            df.to_csv(fh, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def run_import(app, *args) -> object:
    return runner.invoke(app, ["data", "import", *map(str, args)])


def test_criteo_gz_import_maps_conversion_and_visit(app, tmp_path):
    raw = criteo_frame()
    src = write_csv(raw, tmp_path / "criteo-uplift-v2.1.csv.gz")
    out = tmp_path / "criteo.parquet"
    res = run_import(app, "criteo", src, "--out", out)
    assert res.exit_code == 0, res.output
    trial = load_trial(out)
    assert trial.n == len(raw) and trial.n_arms == 2
    assert trial.feature_names == tuple(f"f{i}" for i in range(12))  # exposure/visit are not features
    np.testing.assert_array_equal(trial.user_id, np.arange(len(raw)))
    np.testing.assert_array_equal(trial.treatment, raw["treatment"])
    np.testing.assert_array_equal(trial.response, raw["conversion"])
    np.testing.assert_array_equal(trial.cost, raw["visit"])
    np.testing.assert_allclose(trial.X[7], raw.iloc[7, :12].to_numpy(float), rtol=1e-6)
    share = raw["treatment"].mean()
    assert trial.propensity[1] == pytest.approx(share) and trial.propensity[0] == pytest.approx(1 - share)


def test_streaming_in_small_blocks_gives_the_same_table(tmp_path):
    src = write_csv(criteo_frame(n=3000, seed=4), tmp_path / "c.csv")
    one = import_dataset("criteo", src, tmp_path / "one.parquet")
    many = import_dataset("criteo", src, tmp_path / "many.parquet", block_bytes=8 << 10,
                          row_group_rows=500)
    assert one.rows == many.rows == 3000 and one.arm_rows == many.arm_rows
    a, b = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "many.parquet")
    assert pq_row_groups(tmp_path / "many.parquet") > 1
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_output_format_follows_the_out_suffix(app, tmp_path, suffix):
    import pyarrow.parquet as pq

    out = tmp_path / f"criteo{suffix}"
    res = run_import(app, "criteo", write_csv(criteo_frame(n=50), tmp_path / "c.csv"), "--out", out)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out) if suffix == ".csv" else pq.read_table(out).to_pandas()
    assert out.read_bytes()[:4] != b"PAR1" if suffix == ".csv" else out.read_bytes()[:4] == b"PAR1"
    assert len(df) == 50 and df["user_id"].tolist() == list(range(50))


def pq_row_groups(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).num_row_groups


def test_hillstrom_arms_features_and_cost(app, tmp_path):
    out = tmp_path / "h.parquet"
    res = run_import(app, "hillstrom", HILLSTROM, "--out", out, "--cost-per-email", "0.25")
    assert res.exit_code == 0, res.output
    trial = load_trial(out)
    df = pd.read_parquet(out)
    assert trial.n == 12 and trial.n_arms == 3
    # segments: Womens, No, Womens, Mens, ... ; Mens=1, Womens=2, No E-Mail=0
    assert trial.treatment[:4].tolist() == [2, 0, 2, 1]
    assert trial.cost[:4].tolist() == [0.25, 0.0, 0.25, 0.25]
    assert trial.response.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1]
    assert df["history_segment"].tolist()[:3] == [2, 3, 2] and df["history_segment"][7] == 7
    assert df.loc[0, ["zip_suburban", "zip_urban", "zip_rural"]].tolist() == [1, 0, 0]
    assert df.loc[7, ["channel_multichannel", "channel_phone", "channel_web"]].tolist() == [1, 0, 0]
    assert not {"segment", "visit", "conversion", "spend", "zip_code", "channel"} & set(df.columns)
    assert df["history"][7] == pytest.approx(1003.21)


def test_hillstrom_spend_response_and_default_cost(app, tmp_path):
    out = tmp_path / "h.csv"
    res = run_import(app, "hillstrom", HILLSTROM, "--out", out, "--response", "spend")
    assert res.exit_code == 0, res.output
    trial = load_trial(out)
    assert trial.response[7] == pytest.approx(132.5) and not trial.binary_response
    assert set(trial.cost[trial.treatment > 0]) == {1.0} and set(trial.cost[trial.treatment == 0]) == {0.0}


def test_mt_lift_arms_and_cost_on_conversion(app, tmp_path):
    raw = mt_lift_frame()
    src = write_csv(raw, tmp_path / "train.csv")
    out = tmp_path / "mt.parquet"
    res = run_import(app, "mt-lift", src, "--out", out, "--arm-costs", "0,0.5,1,2,4")
    assert res.exit_code == 0, res.output
    trial = load_trial(out)
    assert trial.n_arms == 5 and trial.feature_names == tuple(f"f{i}" for i in range(99))
    np.testing.assert_array_equal(trial.response, raw["conversion"])
    costs = np.array([0, 0.5, 1, 2, 4])
    np.testing.assert_allclose(trial.cost, costs[raw["treatment"]] * raw["conversion"])
    row = int(np.flatnonzero((raw["treatment"] == 4) & (raw["conversion"] == 1))[0])
    assert trial.cost[row] == 4.0
    click = run_import(app, "mt-lift", src, "--out", tmp_path / "c.parquet", "--response", "click")
    assert click.exit_code == 0, click.output
    np.testing.assert_array_equal(load_trial(tmp_path / "c.parquet").response, raw["click"])


def _drop(df, col):
    return df.drop(columns=[col])


def _rename(df, col):
    return df.rename(columns={col: col + "s"})


def _extra(df, col):
    return df.assign(**{col: 1})


@pytest.mark.parametrize(
    ("dataset", "make", "edit", "col", "named"),
    [
        ("criteo", criteo_frame, _drop, "conversion", "conversion"),
        ("criteo", criteo_frame, _rename, "visit", "visit"),
        ("criteo", criteo_frame, _extra, "user_id", "user_id"),
        ("mt-lift", mt_lift_frame, _drop, "f42", "f42"),
        ("mt-lift", mt_lift_frame, _rename, "treatment", "treatment"),
        ("hillstrom", lambda: pd.read_csv(HILLSTROM), _drop, "segment", "segment"),
        ("hillstrom", lambda: pd.read_csv(HILLSTROM), _rename, "zip_code", "zip_code"),
    ],
)
def test_layout_mismatch_exits_2_naming_the_column(app, tmp_path, dataset, make, edit, col, named):
    src = write_csv(edit(make(), col), tmp_path / "bad.csv")
    out = tmp_path / "out.parquet"
    res = run_import(app, dataset, src, "--out", out)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"'{named}'" in lines[0] and str(src) in lines[0], lines
    assert "Traceback" not in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize(
    ("dataset", "mutate", "needle"),
    [
        ("criteo", lambda df: df.assign(f3=df["f3"].astype(object).where(df.index != 250, "abc")), "f3"),
        ("criteo", lambda df: df.assign(treatment=df["treatment"].where(df.index != 5, 2)), "treatment"),
        ("criteo", lambda df: df.assign(conversion=df["conversion"].astype(float).where(df.index != 9)),
         "conversion"),
        ("hillstrom", lambda df: df.assign(segment=df["segment"].where(df.index != 3, "SMS")), "segment"),
        ("hillstrom", lambda df: df.assign(channel=df["channel"].where(df.index != 3, "Fax")), "channel"),
        ("mt-lift", lambda df: df.assign(treatment=df["treatment"].where(df.index != 7, 5)), "treatment"),
    ],
)
def test_bad_values_exit_2_with_no_output(app, tmp_path, dataset, mutate, needle):
    base = {"criteo": criteo_frame, "hillstrom": lambda: pd.read_csv(HILLSTROM), "mt-lift": mt_lift_frame}
    src = write_csv(mutate(base[dataset]()), tmp_path / "bad.csv")
    out = tmp_path / "out.parquet"
    res = run_import(app, dataset, src, "--out", out)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_error_after_first_block_leaves_no_output(tmp_path):
    raw = criteo_frame(n=3000)
    raw.loc[2900, "treatment"] = 7
    src = write_csv(raw, tmp_path / "c.csv")
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError, match="row 2900"):
        import_dataset("criteo", src, out, block_bytes=8 << 10)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["criteo", "--arm-costs", "0,1"], "--arm-costs"),
        (["hillstrom", "--response", "clicks"], "--response"),
        (["mt-lift", "--arm-costs", "0,x"], "--arm-costs"),
        (["imdb"], "unknown dataset"),
    ],
)
def test_bad_options_exit_2(app, tmp_path, args, needle):
    src = write_csv(criteo_frame(n=20), tmp_path / "c.csv")
    out = tmp_path / "o.parquet"
    res = run_import(app, args[0], src, "--out", out, *args[1:])
    assert res.exit_code == 2 and needle in res.output and not out.exists(), res.output


def test_missing_source_file_exits_2(app, tmp_path):
    res = run_import(app, "criteo", tmp_path / "nope.csv.gz", "--out", tmp_path / "o.parquet")
    assert res.exit_code == 2 and "file not found" in res.output


def test_library_defaults(tmp_path):
    src = write_csv(mt_lift_frame(n=50), tmp_path / "t.csv")
    summary = import_dataset("mt-lift", src, tmp_path / "o.parquet", ImportOptions())
    assert summary.response == "conversion" and summary.rows == 50 and summary.arm_rows == (10,) * 5
    assert summary.arm_cost[0] == 0.0


def test_layout_error_creates_no_output_folder(tmp_path):
    src = write_csv(criteo_frame(n=20).drop(columns=["exposure"]), tmp_path / "c.csv")
    with pytest.raises(DataError, match="'exposure'"):
        import_dataset("criteo", src, tmp_path / "new" / "out.parquet")
    assert not (tmp_path / "new").exists()
