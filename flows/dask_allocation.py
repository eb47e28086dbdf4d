"""The partitioned allocation as a Prefect flow on Dask (prefect-dask's task runner).

The passes are the library's (:func:`budgetalloc.serve.allocate.allocate`); here the
classify pass of each partition is a Prefect task, retried on its own (``RETRIES``
times) unless it failed with a :class:`~budgetalloc.errors.BudgetallocError`, and its
result carries Prefect's run count. The rows are those of every other executor.

One Prefect API for all workers: :func:`shared_prefect_api` starts the ephemeral
server once in the calling process and hands its address to the workers through
Prefect's settings context, which travels with every task.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from budgetalloc.data.sources import Partition
from budgetalloc.errors import BudgetallocError
from budgetalloc.policy import load_policy
from budgetalloc.serve import allocate as A
from budgetalloc.serve import executor as D
from budgetalloc.serve.allocate import Allocation, Classified

_TASK = {"retries": D.RETRIES, "retry_delay_seconds": D.RETRY_DELAY_SECONDS, "cache_policy": NO_CACHE}


def _worth_retrying(task, task_run, state) -> bool:
    """Retry anything but a project error (bad data fail again the same way)."""
    try:
        state.result()
    except BudgetallocError:
        return False
    except Exception:  # noqa: BLE001 - any other failure may be transient
        return True
    return True


def _run_count() -> int:
    from prefect.runtime import task_run

    return int(task_run.run_count or 1)


@task(**_TASK, retry_condition_fn=_worth_retrying, task_run_name="classify-{index}")
def classify_partition(policy_dir: str, part: Partition, rows: int, index: int) -> Classified:
    """The classify pass over one partition (:func:`budgetalloc.serve.allocate.classify_partition`)."""
    return replace(A.classify_partition(policy_dir, part, rows, index), run_count=_run_count())


def prefect_runner(fn: Callable, args_per_task: list[tuple]) -> list:
    """An executor (:data:`~budgetalloc.serve.executor.Runner`) as Prefect tasks of the current flow."""
    assert fn is A.classify_partition, fn
    futures = [classify_partition.submit(*args) for args in args_per_task]
    return [future.result() for future in futures]  # file order: the first failure in it is raised


@flow(name="allocate-partitions")
def allocate_partitions(policy_dir: str, users: str, budget: float, out: str,
                        partitions: int | None = None, batch_size: int | None = None) -> Allocation:
    """Allocate a Parquet population partition by partition under one global budget, as Prefect tasks."""
    source = A.partitioned_source(users, partitions)
    return A.allocate(load_policy(policy_dir), source, budget, out, batch_size=batch_size, run=prefect_runner,
                      ref=policy_dir, partitions=partitions or 0)


@contextmanager
def shared_prefect_api(*, stop: bool = False) -> Iterator[None]:
    """Make the calling process and every Dask worker report to one Prefect API.

    With ``PREFECT_API_URL`` set (a server, or a test harness) nothing changes.
    Otherwise the ephemeral server Prefect would start anyway is started here, and
    its address is put in the settings that travel with each task to the workers;
    it keeps running for later flows of this process unless ``stop``.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process-wide instance Prefect's own client would use
    started = not server.running
    server.start()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        if stop and started:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
            server.stop()


_QUIET_ENV = {"PREFECT_LOGGING_LEVEL": "CRITICAL", "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
              "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@contextmanager
def quiet_console() -> Iterator[None]:
    """No Prefect or Dask log lines on the console while the flow runs.

    The console handlers of this process are raised to CRITICAL, and processes
    started meanwhile (Dask workers, the ephemeral Prefect server) inherit
    CRITICAL logging levels.
    """
    saved = {name: os.environ.get(name) for name in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    try:
        with D.quiet_console((None, "prefect", "distributed")):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def dask_task_runner(address: str | None, *, n_workers: int = D.DEFAULT_WORKERS, processes: bool = True):
    """Prefect's Dask runner: on the cluster at ``address``, or on a new ``LocalCluster``."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1,
                                          "processes": processes, "silence_logs": logging.ERROR,
                                          "dashboard_address": None})


def allocate_distributed(policy_dir: str | Path, users: str | Path, budget, out: str | Path, *,
                         address: str | None = None, partitions: int | None = None,
                         batch_size: int | None = None, n_workers: int = D.DEFAULT_WORKERS,
                         processes: bool = True, quiet: bool = False) -> Allocation:
    """Run :func:`allocate_partitions` on Dask through Prefect: an existing cluster, or a new LocalCluster.

    The arguments are those of :func:`budgetalloc.serve.allocate.allocate_distributed`;
    ``quiet`` also stops an ephemeral Prefect server this call started.
    """
    A.partitioned_source(users, partitions)  # a one-line error before any cluster starts
    runner = dask_task_runner(None if address in (None, "local") else address,
                              n_workers=n_workers, processes=processes)
    with quiet_console() if quiet else nullcontext(), shared_prefect_api(stop=quiet):
        return allocate_partitions.with_options(task_runner=runner)(
            str(policy_dir), str(users), budget, str(out), partitions=partitions, batch_size=batch_size)
