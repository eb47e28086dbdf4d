"""The fit over its sources: a streamed file gives the arrays' policy bit for bit, in bounded memory, contract errors.

(The statistics accumulated over chunks against one shot: tests/test_statistics.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_PARAMS, peak_bytes
from typer.testing import CliRunner

from budgetalloc.cli.app import app
from budgetalloc.commands import fit_path
from budgetalloc.data.contract import load_trial, trial_from_frame
from budgetalloc.errors import DataError, ParamsError
from budgetalloc.fit.fit_stream import fit_policy, fit_policy_file
from budgetalloc.fit.pipeline import agreement_text, roi_parts
from budgetalloc.fit.trial_scan import (
    CLIP,
    HOLDOUT,
    HONEST,
    NETWORK,
    PREPROCESS,
    STUDENT,
    holdout_mask,
    honest_mask,
    network_rows,
    row_roles,
    student_sample,
)
from budgetalloc.method.statistics import clip_sample_rows
from budgetalloc.params import SimulateParams, params_from_dict
from budgetalloc.policy import load_policy, save_policy
from budgetalloc.studies.simulate import simulate_trial

runner = CliRunner()


def write_parquet(df: pd.DataFrame, path: Path, *, row_group: int) -> Path:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group)
    return path


def policy_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_policy(streamed: Path, in_memory: Path) -> None:
    """Every file identical but the summary (its fit_path) and the manifest (the summary's hash)."""
    a, b = policy_files(streamed), policy_files(in_memory)
    assert a.keys() == b.keys()
    for name in a:
        if name not in ("summary.json", "manifest.json"):
            assert a[name] == b[name], name
    sa, sb = json.loads(a["summary.json"]), json.loads(b["summary.json"])
    assert (sa.pop("fit_path"), sb.pop("fit_path")) == ("streamed", "in memory")
    assert sa == sb


def test_roles_are_the_seeded_splits_and_samples():
    params = params_from_dict({**TINY_PARAMS, "train": {"max_rows": 1000}, "distill": {"max_rows": 1500},
                               "data": {"preprocess_sample": 2000}, "statistics": {"clip_sample": 700}})
    n = 5000
    roles = row_roles(n, params)
    honest, holdout = honest_mask(n, params), holdout_mask(n, params)
    train_idx, honest_idx = np.flatnonzero(~honest), np.flatnonzero(honest)
    student_idx, holdout_idx = student_sample(np.flatnonzero(~holdout), params), np.flatnonzero(holdout)

    def having(bit):
        return np.flatnonzero(roles & bit)

    np.testing.assert_array_equal(having(HONEST), honest_idx)
    np.testing.assert_array_equal(having(NETWORK), network_rows(train_idx, params))
    np.testing.assert_array_equal(having(HOLDOUT), holdout_idx)
    np.testing.assert_array_equal(having(STUDENT), student_idx)
    np.testing.assert_array_equal(having(CLIP), honest_idx[clip_sample_rows(len(honest_idx), params.statistics,
                                                                             params.seed)])
    assert len(having(NETWORK)) == 1000 and len(having(STUDENT)) == 1500 and len(having(PREPROCESS)) == 2000


def test_streamed_fit_is_the_in_memory_policy_bit_for_bit(tiny_fitted, tmp_path):
    """The tiny fixture's trial as Parquet, row groups and batches that align with nothing."""
    directory, _, params = tiny_fitted
    world = simulate_trial(SimulateParams(n_users=12_000), seed=1)  # the fixture's trial
    src = write_parquet(world.frame, tmp_path / "trial.parquet", row_group=2500)
    save_policy(fit_policy_file(src, params, batch_rows=1000), tmp_path / "streamed")
    assert_same_policy(tmp_path / "streamed", directory)


def test_the_cells_are_estimated_on_every_fit_row_or_on_the_honest_rows_only(tiny_fitted):
    """``statistics.rows``: the default estimates the cells on every fit row; ``honest`` on the
    rows the network never learned from. The partition is the same fit either way."""
    directory, _, params = tiny_fitted
    every = load_policy(directory)
    assert every.params.statistics.rows == "all"
    assert every.summary["student_cluster_agreement"] == every.summary["student_agreement"]  # no ROI cells here
    assert agreement_text(every.summary) == f"{every.summary['student_agreement']:.4f}"
    assert int(every.statistics.counts.sum()) == every.summary["rows"] == 12_000
    world = simulate_trial(SimulateParams(n_users=12_000), seed=1)  # the fixture's trial
    honest_params = params.model_copy(update={"statistics": params.statistics.model_copy(update={"rows": "honest"})})
    honest = fit_policy(trial_from_frame(world.frame, source="trial"), honest_params)
    assert int(honest.statistics.counts.sum()) == honest.summary["honest_rows"]
    assert 0.15 * 12_000 < honest.summary["honest_rows"] < 0.25 * 12_000  # data.honest_fraction: 0.2
    assert honest.summary["cluster_sizes"] == every.summary["cluster_sizes"]
    assert not np.array_equal(honest.statistics.response, every.statistics.response)


def test_roi_bins_cut_each_cluster_by_predicted_roi_and_stream_bit_for_bit(tmp_path):
    """``cluster.roi_bins: 2``: twice the cells, the upper one of each cluster holds its users of higher
    predicted ROI (so its estimated incremental ROI is mostly higher), and the streamed fit is the
    in-memory policy. ``train.decay_rows`` below the network's rows scales the decay, with a note."""
    raw = {**TINY_PARAMS, "cluster": {**TINY_PARAMS["cluster"], "roi_bins": 2, "roi_min_rows": 0},
           "train": {**TINY_PARAMS["train"], "decay_rows": 2000}}
    params = params_from_dict(raw)
    world = simulate_trial(SimulateParams(n_users=12_000), seed=1)
    policy = fit_policy(trial_from_frame(world.frame, source="trial"), params)
    save_policy(policy, tmp_path / "memory")
    assert policy.k == 2 * 12 and policy.student.n_clusters == 24
    sizes = np.array(policy.summary["cluster_sizes"]).reshape(12, 2)
    assert (sizes.min(axis=1) > 0.15 * sizes.sum(axis=1)).all()  # the student keeps both halves (tiny: 0.21 at least)
    stats = policy.statistics
    roi = ((stats.response[:, 1:] - stats.response[:, :1]) / stats.cost[:, 1:]).max(axis=1).reshape(12, 2)
    assert np.mean(roi[:, 1] > roi[:, 0]) >= 0.75
    assert any("train.weight_decay scaled to" in n for n in policy.summary["notes"])
    cells, clusters = policy.summary["student_agreement"], policy.summary["student_cluster_agreement"]
    assert 0 < cells < clusters <= 1  # a student that confuses two parts of one cluster still finds the cluster
    assert agreement_text(policy.summary) == f"{cells:.4f} (clusters {clusters:.4f})"
    src = write_parquet(world.frame, tmp_path / "trial.parquet", row_group=2500)
    save_policy(fit_policy_file(src, params, batch_rows=1000), tmp_path / "streamed")
    assert_same_policy(tmp_path / "streamed", tmp_path / "memory")


def test_roi_bins_refuse_soft_targets():
    with pytest.raises(ParamsError, match="distill.soft_temperature 0.5 needs cluster.roi_bins 1"):
        params_from_dict({"distill": {"soft_temperature": 0.5}})  # roi_bins: 2 by default


@pytest.mark.parametrize("rows,arms,parts", [(160_000, 5, 1), (639_999, 5, 1), (640_000, 5, 2), (800_000, 5, 2),
                                             (800_000, 10, 1)])
def test_the_clusters_are_cut_only_where_the_rows_keep_roi_min_rows_per_cell_and_arm(rows, arms, parts):
    params = params_from_dict({})  # K 64, 2 parts, 1000 rows
    assert roi_parts(n_rows=rows, n_arms=arms, params=params) == parts
    assert roi_parts(n_rows=rows, n_arms=arms, params=params_from_dict({"cluster": {"roi_min_rows": 0}})) == 2


def test_streamed_fit_through_the_cli_with_every_cap_and_option_below_the_data(tmp_path):
    """Capped samples, soft targets, MiniBatchKMeans, median of means, a propensity column, missing values."""
    raw = {**TINY_PARAMS,
           "train": {**TINY_PARAMS["train"], "max_rows": 1500},
           "distill": {**TINY_PARAMS["distill"], "max_rows": 2500, "soft_temperature": 0.5},
           "cluster": {**TINY_PARAMS["cluster"], "streaming_threshold": 1000, "batch_size": 700, "roi_bins": 1},
           "statistics": {"n_scenarios": 5, "estimator": "median_of_means", "clip_sample": 500}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    df = simulate_trial(SimulateParams(n_users=6000, missing_rate=0.02), seed=4).frame
    df["propensity"] = 0.2
    src = write_parquet(df, tmp_path / "trial.parquet", row_group=1700)
    res = runner.invoke(app, ["fit", "--data", str(src), "--out", str(tmp_path / "streamed"),
                              "--params", str(tmp_path / "params.yaml"), "--stream"])
    assert res.exit_code == 0, res.output
    assert "streamed in batches" in res.output
    save_policy(fit_policy(load_trial(src), params_from_dict(raw)), tmp_path / "memory")
    assert_same_policy(tmp_path / "streamed", tmp_path / "memory")
    notes = json.loads((tmp_path / "streamed" / "summary.json").read_text())["notes"]
    assert any("imputed" in n for n in notes) and any("train.max_rows" in n for n in notes)


def test_memory_stays_bounded_for_a_trial_much_larger_than_a_batch_and_the_caps(tmp_path):
    n, batch, cap = 200_000, 4096, 3000
    world = simulate_trial(SimulateParams(n_users=n, n_features=40), seed=6)
    src = write_parquet(world.frame, tmp_path / "big.parquet", row_group=20_000)
    # every compiled shape is the big file's (blocks of 16,384 rows, samples of `cap`)
    warm = write_parquet(world.frame.iloc[:40_000], tmp_path / "warm.parquet", row_group=20_000)
    del world
    params = params_from_dict({**TINY_PARAMS,
                               "train": {**TINY_PARAMS["train"], "max_rows": cap, "epochs": 2},
                               "distill": {**TINY_PARAMS["distill"], "max_rows": cap, "epochs": 2},
                               "data": {"preprocess_sample": cap}, "statistics": {"n_scenarios": 5, "clip_sample": cap},
                               "cluster": {"k": 12, "n_init": 1, "fit_sample": cap}})
    features_bytes = n * 40 * 4  # the float32 feature matrix alone
    fit_policy_file(warm, params, batch_rows=batch)  # compile outside the measurement
    streamed = peak_bytes(lambda: fit_policy_file(src, params, batch_rows=batch))
    # What grows with the file is a role byte and an 8-byte id key per row; the rest is
    # a batch, a block of the statistics, or a sample of at most `cap` rows.
    assert streamed < 9 * n + 24 * 2**20, streamed
    assert streamed < features_bytes, (streamed, features_bytes)


@pytest.fixture(scope="module")
def late_frame():
    return simulate_trial(SimulateParams(n_users=3000), seed=2).frame


DAMAGES = {
    "negative cost": (lambda df: df.assign(cost=df["cost"].where(df.index != 2990, -1.0)),
                      "column 'cost' has negative value -1.0"),
    "NaN response": (lambda df: df.assign(response=df["response"].where(df.index != 2991, np.nan)),
                     "column 'response' has NaN at row 2991"),
    "fractional arm": (lambda df: df.assign(treatment=df["treatment"].astype(float).where(df.index != 2992, 1.5)),
                       "column 'treatment' must be integer (value 1.5)"),
    "duplicate id": (lambda df: df.assign(user_id=df["user_id"].where(df.index != 2993, df["user_id"].iloc[7])),
                     "duplicate user_id"),
    "empty arm": (lambda df: df.assign(treatment=df["treatment"].where(df["treatment"] != 3, 4)),
                  "arm 3 has no rows in column 'treatment'"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_bad_value_in_a_late_batch_is_the_contracts_one_line_and_no_policy(late_frame, tmp_path, damage):
    spoil, expected = DAMAGES[damage]
    src = write_parquet(spoil(late_frame), tmp_path / "bad.parquet", row_group=1000)
    with pytest.raises(DataError) as whole:
        load_trial(src)
    with pytest.raises(DataError) as streamed:
        fit_policy_file(src, params_from_dict(TINY_PARAMS), batch_rows=500)
    assert str(streamed.value) == str(whole.value) and expected in str(streamed.value)
    assert str(streamed.value).startswith(str(src))
    res = runner.invoke(app, ["fit", "--data", str(src), "--out", str(tmp_path / "policy"), "--stream"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert [line for line in res.output.splitlines() if "error" in line] == [f"error: {streamed.value}"]
    assert not (tmp_path / "policy").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]


def test_fit_path_streams_large_parquet_only(late_frame, tmp_path):
    src = write_parquet(late_frame, tmp_path / "t.parquet", row_group=1000)
    csv = tmp_path / "t.csv"
    late_frame.to_csv(csv, index=False)
    default, small = params_from_dict({}), params_from_dict({"data": {"stream_rows": 2999}})
    assert fit_path(src, default, None) == "in memory" and fit_path(src, small, None) == "streamed"
    assert fit_path(src, default, True) == "streamed" and fit_path(src, small, False) == "in memory"
    assert fit_path(csv, small, None) == "in memory"
    with pytest.raises(DataError, match="t.csv: the streamed fit reads Parquet files only"):
        fit_path(csv, default, True)
