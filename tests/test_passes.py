"""Allocate and evaluate: the same bytes over every row source, batch size and executor."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from budgetalloc.data.contract import load_population, load_trial
from budgetalloc.data.sources import file_source, memory_source
from budgetalloc.files import write_table
from budgetalloc.params import SimulateParams
from budgetalloc.policy import load_policy
from budgetalloc.serve.allocate import allocate
from budgetalloc.serve.evaluate import evaluate, source_outcomes
from budgetalloc.serve.executor import dask_runner, inline
from budgetalloc.studies.simulate import simulate_population, simulate_trial

BUDGET = 400.0
REPORTS = ("metrics.json", "curve.json", "curve.png")
SOURCES = ("memory", "parquet", "csv", "dataset")


@pytest.fixture(scope="module")
def policy(tiny_fitted):
    return load_policy(tiny_fitted[0])


@pytest.fixture(scope="module")
def client():
    """A threaded LocalCluster (workers share this process's environment)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


@pytest.fixture(autouse=True)
def small_csv_blocks(monkeypatch):
    """64 KB CSV blocks, so that a CSV source has many blocks."""
    from budgetalloc.data import readers

    monkeypatch.setattr(readers, "CSV_BLOCK_BYTES", 1 << 16)


def write_source(frame, kind: str, directory, load):
    """The frame as a source of ``kind`` (in memory: validated by ``load`` from a Parquet file)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if kind == "csv":
        frame.to_csv(directory / "rows.csv", index=False)
        return file_source(directory / "rows.csv")
    if kind == "dataset":  # three parts of unequal size, row groups inside
        (directory / "rows").mkdir()
        cuts = [0, len(frame) // 5, len(frame) // 2, len(frame)]
        for i, (a, b) in enumerate(itertools.pairwise(cuts)):
            pq.write_table(table.slice(a, b - a), directory / "rows" / f"part-{i}.parquet", row_group_size=1700)
        return file_source(directory / "rows")
    pq.write_table(table, directory / "rows.parquet", row_group_size=2500)
    return memory_source(load(directory / "rows.parquet")) if kind == "memory" else file_source(
        directory / "rows.parquet")


def executor(name, client, policy_dir):
    """``(run, ref, partitions)`` for :func:`allocate` and :func:`evaluate`."""
    return (inline, None, None) if name == "inline" else (dask_runner(client), str(policy_dir), 3)


@pytest.fixture(scope="module")
def population():
    """12,000 users with 5% missing features."""
    return simulate_population(SimulateParams(missing_rate=0.05), seed=5, n_users=12_000).frame


@pytest.fixture(scope="module")
def trial():
    """A 20,000-row held-out trial with 5% missing features and a logged propensity."""
    frame = simulate_trial(SimulateParams(n_users=20_000, missing_rate=0.05), seed=21).frame
    frame["propensity"] = np.where(frame["treatment"] == 0, 0.45, 0.11) + 0.01 * (frame["user_id"] % 3)
    return frame


@pytest.fixture(scope="module")
def allocation_reference(policy, population, tmp_path_factory):
    """Today's in-memory bytes: the whole population validated, then written by ``write_table``."""
    directory = tmp_path_factory.mktemp("reference")
    source = write_source(population, "memory", directory, lambda p: load_population(p, policy.feature_names))
    frame = allocate(policy, source, BUDGET).frame
    for suffix in ("parquet", "csv"):
        write_table(frame, directory / f"ref.{suffix}")
    return directory


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("run", ["inline", "dask"])
@pytest.mark.parametrize("batch_size", [1000, 262_144])
@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_allocate_writes_the_same_bytes_from_every_source(policy, tiny_fitted, population, allocation_reference,
                                                          client, tmp_path, kind, run, batch_size, suffix):
    source = write_source(population, kind, tmp_path, lambda p: load_population(p, policy.feature_names))
    fn, ref, partitions = executor(run, client, tiny_fitted[0])
    out = tmp_path / f"out.{suffix}"
    result = allocate(policy, source, BUDGET, out, batch_size=batch_size, run=fn, ref=ref, partitions=partitions)
    assert out.read_bytes() == (allocation_reference / f"ref.{suffix}").read_bytes()
    assert result.n_users == len(population) and result.expected_cost <= BUDGET
    assert result.spend == pytest.approx(result.frame["expected_cost"].sum(), rel=1e-12)
    np.testing.assert_array_equal(result.users_per_arm, np.bincount(result.frame["treatment"],
                                                                    minlength=policy.n_arms))
    assert len(result.run_counts["classify"]) == (1 if run == "inline" or kind in ("csv", "memory") else 3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == [out.name]


@pytest.fixture(scope="module")
def evaluation_reference(policy, trial, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    source = write_source(trial, "memory", directory, lambda p: load_trial(p, features=policy.feature_names))
    return evaluate(policy, source, directory / "ref"), directory / "ref"


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("run", ["inline", "dask"])
@pytest.mark.parametrize("batch_size", [1000, 262_144])
def test_evaluate_writes_the_same_reports_from_every_source(policy, tiny_fitted, trial, evaluation_reference,
                                                            client, tmp_path, kind, run, batch_size):
    expected, reference = evaluation_reference
    source = write_source(trial, kind, tmp_path, lambda p: load_trial(p, features=policy.feature_names))
    fn, ref, partitions = executor(run, client, tiny_fitted[0])
    got = evaluate(policy, source, tmp_path / "out", batch_size=batch_size, run=fn, ref=ref, partitions=partitions)
    assert got == expected  # every float exactly
    for name in REPORTS:
        assert (tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("propensity", [False, True])
def test_evaluate_keeps_compact_outcomes_equal_to_the_trial(policy, trial, tmp_path, propensity):
    frame = trial if propensity else trial.drop(columns="propensity")
    loaded = load_trial(write_source(frame, "parquet", tmp_path, None).files[0], features=policy.feature_names)
    clusters, outcomes = source_outcomes(policy, file_source(tmp_path / "rows.parquet"), batch_size=1000)
    assert clusters.dtype == np.int16 and outcomes.treatment.dtype == np.int8
    for name in ("treatment", "response", "cost", "propensity"):
        np.testing.assert_array_equal(getattr(outcomes, name), getattr(loaded, name), err_msg=name)
    assert outcomes.n_arms == loaded.n_arms and outcomes.n == len(frame)


def test_partitions_are_contiguous_balanced_ranges_of_row_groups(tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"a": np.arange(6000)}), tmp_path / "d" / "p0.parquet", row_group_size=1000)
    pq.write_table(pa.table({"a": np.arange(4000)}), tmp_path / "d" / "p1.parquet", row_group_size=1000)
    source = file_source(tmp_path / "d")
    assert source.n == 10_000 and source.columns == ["a"]
    every = source.partitions(0)
    assert len(every) == 10 and [p.first_row for p in every] == list(range(0, 10_000, 1000))
    three = source.partitions(3)  # a range may span two files
    assert [p.first_row for p in three] == [0, 3000, 7000]
    assert [[(f.name, g) for f, g in p.pieces] for p in three] == [
        [("p0.parquet", (0, 1, 2))], [("p0.parquet", (3, 4, 5)), ("p1.parquet", (0,))],
        [("p1.parquet", (1, 2, 3))]]
    assert len(source.partitions(50)) == 10 and len(source.partitions()) == 1
