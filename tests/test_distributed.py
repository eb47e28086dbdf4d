"""The Dask path on real LocalClusters (library and Prefect flow): the single-process bytes, retries."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from budgetalloc.errors import BudgetallocError, DataError
from budgetalloc.params import SimulateParams
from budgetalloc.policy import load_policy
from budgetalloc.serve.allocate import allocate_distributed, allocate_file
from budgetalloc.serve.executor import FAIL_ONCE_ENV
from budgetalloc.studies.simulate import simulate_population

BUDGET = 400.0
ROW_GROUP = 1500


@pytest.fixture(scope="module", autouse=True)
def stop_prefect_server():
    """Stop the ephemeral Prefect API these tests start, while pytest's streams are still open.

    Under a test harness (``PREFECT_API_URL`` set) the flows use its server: left alone.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    harnessed = bool(PREFECT_API_URL.value())
    yield
    server = SubprocessASGIServer._instances.get(None)
    if not harnessed and server is not None:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # send the runs' logs while the server is up
        server.stop()


@pytest.fixture(scope="module")
def population(tiny_fitted, tmp_path_factory):
    """9,000 users in six row groups: six partitions by default."""
    frame = simulate_population(SimulateParams(), seed=7, n_users=9000).frame
    path = tmp_path_factory.mktemp("dask") / "users.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=ROW_GROUP)
    return path


@pytest.fixture(scope="module")
def single(tiny_fitted, population, tmp_path_factory):
    """The single-process streaming allocation of the same file."""
    out = tmp_path_factory.mktemp("single") / "single.parquet"
    allocate_file(load_policy(tiny_fitted[0]), population, BUDGET, out, batch_size=1024)
    return out


@pytest.fixture(scope="module")
def threaded_cluster():
    """An existing cluster to connect to by address (threads: it shares this process's environment)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_local_cluster_of_processes_gives_the_single_process_bytes(tiny_fitted, population, single,
                                                                   tmp_path):
    out = tmp_path / "dask.parquet"
    result = allocate_distributed(tiny_fitted[0], population, BUDGET, out, batch_size=1024)
    assert out.read_bytes() == single.read_bytes()
    assert result.n_users == 9000 and result.run_counts["classify"] == (1,) * 6
    assert [p.name for p in tmp_path.iterdir()] == ["dask.parquet"]  # no temporaries left


def test_failed_partition_is_retried_alone(tiny_fitted, population, single, threaded_cluster,
                                           tmp_path, monkeypatch):
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"classify:2:{marker}")
    out = tmp_path / "dask.parquet"
    result = allocate_distributed(tiny_fitted[0], population, BUDGET, out, address=threaded_cluster,
                                  partitions=4, batch_size=1024)
    assert marker.exists()
    assert result.run_counts == {"classify": (1, 1, 2, 1)}
    assert out.read_bytes() == single.read_bytes()


def test_prefect_flow_retries_a_failed_partition_alone(tiny_fitted, population, single, threaded_cluster,
                                                       tmp_path, monkeypatch):
    from flows.dask_allocation import allocate_distributed as allocate_in_prefect

    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"classify:1:{marker}")
    out = tmp_path / "prefect.parquet"
    result = allocate_in_prefect(tiny_fitted[0], population, BUDGET, out, address=threaded_cluster,
                                 partitions=3, batch_size=1024)
    assert marker.exists()
    assert result.run_counts == {"classify": (1, 2, 1)}
    assert out.read_bytes() == single.read_bytes()


def test_bad_data_fail_once_with_the_single_process_message(tiny_fitted, threaded_cluster, tmp_path):
    frame = simulate_population(SimulateParams(), seed=8, n_users=6000).frame
    frame.loc[4000, "user_id"] = frame.loc[100, "user_id"]
    src = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), src, row_group_size=ROW_GROUP)
    with pytest.raises(DataError) as expected:
        allocate_file(load_policy(tiny_fitted[0]), src, BUDGET, tmp_path / "single.parquet")
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError) as err:
        allocate_distributed(tiny_fitted[0], src, BUDGET, out, address=threaded_cluster)
    assert str(err.value) == str(expected.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_csv_and_bad_partition_counts_are_refused(tiny_fitted, tmp_path, population):
    csv = tmp_path / "users.csv"
    csv.write_text("user_id,x0\n1,0.5\n")
    with pytest.raises(DataError, match="Parquet"):
        allocate_distributed(tiny_fitted[0], csv, BUDGET, tmp_path / "out.parquet")
    with pytest.raises(BudgetallocError, match="partitions"):
        allocate_distributed(tiny_fitted[0], population, BUDGET, tmp_path / "out.parquet", partitions=0)


def test_cli_runs_the_flow_on_a_cluster_address(tiny_fitted, population, single, threaded_cluster, tmp_path):
    from typer.testing import CliRunner

    from budgetalloc.cli.app import app

    out = tmp_path / "cli.parquet"
    res = CliRunner().invoke(app, ["allocate", "--policy", str(tiny_fitted[0]), "--users", str(population),
                                   "--budget", str(BUDGET), "--out", str(out),
                                   "--dask-address", threaded_cluster, "--partitions", "3"])
    assert res.exit_code == 0, res.output
    assert "allocated 9000 users" in res.output
    assert out.read_bytes() == single.read_bytes()
