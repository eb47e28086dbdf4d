"""The data contract: every violation is a one-line DataError naming file and column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetalloc.data.contract import (
    Preprocessor,
    arm_summary,
    load_population,
    load_trial,
    trial_from_frame,
)
from budgetalloc.errors import DataError


def good_frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "user_id": np.arange(n),
            "f1": rng.normal(size=n),
            "f2": rng.normal(size=n),
            "treatment": np.arange(n) % 3,
            "response": (rng.random(n) < 0.3).astype(float),
            "cost": np.where(np.arange(n) % 3 > 0, 1.0, 0.0),
        }
    )


def test_good_trial_roundtrip(tmp_path):
    df = good_frame()
    for suffix in (".parquet", ".csv"):
        path = tmp_path / f"t{suffix}"
        df.to_parquet(path) if suffix == ".parquet" else df.to_csv(path, index=False)
        trial = load_trial(path)
        assert trial.feature_names == ("f1", "f2")
        assert trial.n_arms == 3 and trial.n == 40
        assert trial.binary_response
        np.testing.assert_allclose(trial.propensity, np.array(trial.arm_shares)[trial.treatment])
        np.testing.assert_allclose(trial.X[:, 0], df["f1"].to_numpy(np.float32))


def test_features_param_selects_columns():
    trial = trial_from_frame(good_frame(), features=("f2",))
    assert trial.feature_names == ("f2",)
    with pytest.raises(DataError, match="missing feature column 'nope'"):
        trial_from_frame(good_frame(), features=("nope",))


def _mutations():
    def drop(col):
        return lambda df: df.drop(columns=[col])

    def setval(col, value, row=0):
        def f(df):
            df = df.copy()
            if isinstance(value, str) or df[col].dtype.kind in "iub" and isinstance(value, float):
                df[col] = df[col].astype(object)
            df.loc[row, col] = value
            return df

        return f

    return [
        ("missing treatment", drop("treatment"), "missing column 'treatment'"),
        ("missing response", drop("response"), "missing column 'response'"),
        ("missing cost", drop("cost"), "missing column 'cost'"),
        ("missing user_id", drop("user_id"), "missing column 'user_id'"),
        ("float treatment", setval("treatment", 1.5), "'treatment' must be integer"),
        ("string treatment", lambda df: df.assign(treatment=df.treatment.astype(str)), "'treatment' must be integer"),
        ("negative treatment", setval("treatment", -1), "negative arm -1"),
        ("empty arm", lambda df: df.assign(treatment=df.treatment.replace(1, 2)), "arm 1 has no rows"),
        ("no control", lambda df: df.assign(treatment=df.treatment + 1), "no control rows"),
        ("negative cost", setval("cost", -2.0, 1), "negative value -2.0"),
        ("nan cost", setval("cost", np.nan, 1), "'cost' has NaN at row 1"),
        ("nan response", setval("response", np.nan, 3), "'response' has NaN at row 3"),
        ("text feature", lambda df: df.assign(f1=["abc"] + [str(v) for v in df.f1[1:]]),
         "feature column 'f1' is not numeric \\(value 'abc'\\)"),
        ("inf feature", setval("f2", np.inf), "feature column 'f2' has infinite values"),
        ("duplicate id", setval("user_id", 5, 0), "duplicate user_id 5"),
        ("propensity zero", lambda df: df.assign(propensity=0.0), "outside \\(0, 1\\]"),
        ("propensity > 1", lambda df: df.assign(propensity=1.5), "outside \\(0, 1\\]"),
        ("no features", lambda df: df.drop(columns=["f1", "f2"]), "no feature columns"),
    ]


@pytest.mark.parametrize("name,mutate,message", _mutations(), ids=[m[0] for m in _mutations()])
def test_each_violation_is_one_named_line(tmp_path, name, mutate, message):
    path = tmp_path / "trial.parquet"
    mutate(good_frame()).to_parquet(path)
    with pytest.raises(DataError, match=message) as info:
        load_trial(path)
    text = str(info.value)
    assert "\n" not in text
    assert str(path) in text


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "file not found"),
        (b"", "file is empty"),
        (b"PAR1garbagegarbage", "not a readable Parquet file"),
        (b"user_id,treatment\n", "table has no rows"),
    ],
)
def test_file_level_errors(tmp_path, content, message):
    path = tmp_path / ("x.parquet" if content and content.startswith(b"PAR1") else "x.csv")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_trial(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "x.xlsx"
    path.write_bytes(b"hello")
    with pytest.raises(DataError, match="unsupported format"):
        load_trial(path)


def test_missing_features_are_allowed_and_imputed():
    df = good_frame()
    df.loc[[1, 2, 3], "f1"] = np.nan
    trial = trial_from_frame(df)
    assert np.isnan(trial.X).sum() == 3
    pre = Preprocessor.fit(trial.X)
    Z = pre.transform(trial.X)
    assert not np.isnan(Z).any()
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-5)
    assert Preprocessor.from_json(pre.to_json()).transform(trial.X).tobytes() == Z.tobytes()


def test_population_extra_columns_and_missing_feature(tmp_path):
    df = good_frame().drop(columns=["treatment", "response", "cost"]).assign(extra="x")
    path = tmp_path / "pop.csv"
    df.to_csv(path, index=False)
    pop = load_population(path, ("f2", "f1"))
    np.testing.assert_allclose(pop.X[:, 0], df["f2"].to_numpy(np.float32))
    with pytest.raises(DataError, match=r"pop.csv: missing feature column 'f3'"):
        load_population(path, ("f1", "f3"))


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_arm_is_a_data_error(value):
    df = good_frame().astype({"treatment": float})
    df.loc[3, "treatment"] = value
    with pytest.raises(DataError, match=r"gen: column 'treatment' must be integer \(value -?inf\)"):
        trial_from_frame(df, source="gen")


def test_arm_summary_matches_groupby():
    df = good_frame()
    summary = arm_summary(trial_from_frame(df))
    expected = df.groupby("treatment")[["response", "cost"]].mean()
    np.testing.assert_allclose(summary["mean_response"], expected["response"])
    np.testing.assert_allclose(summary["mean_cost"], expected["cost"])


cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.text(max_size=3),
    st.none(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    column=st.sampled_from(["user_id", "f1", "treatment", "response", "cost"]),
    row=st.integers(0, 39),
    value=cells,
)
def test_malformed_tables_raise_dataerror_or_load_cleanly(column, row, value):
    """Any single corrupted cell gives a valid Trial or a one-line DataError, never another error."""
    df = good_frame()
    df[column] = df[column].astype(object)
    df.loc[row, column] = value
    try:
        df[column] = pd.to_numeric(df[column])
    except (ValueError, TypeError):
        pass
    try:
        trial = trial_from_frame(df, source="gen.parquet")
    except DataError as err:
        assert "\n" not in str(err) and str(err).startswith("gen.parquet: ")
        return
    assert np.isfinite(trial.response).all() and (trial.cost >= 0).all()
    assert (trial.treatment >= 0).all() and np.isfinite(np.nan_to_num(trial.X, nan=0.0)).all()
