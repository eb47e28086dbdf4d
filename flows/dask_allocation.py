"""The partition-parallel allocation as a Prefect flow on Dask (prefect-dask's task runner).

The passes are the library's (:mod:`budgetalloc.serve.distributed`); here each
partition's step is a Prefect task, retried on its own (``RETRIES`` times) unless it
failed with a :class:`~budgetalloc.errors.BudgetallocError`, and its result carries
Prefect's run count. The result is the exact allocation the library's Dask path and
:func:`budgetalloc.serve.streaming.allocate_file` write for the same file.

One Prefect API for all workers. Without ``PREFECT_API_URL``, Prefect starts an
ephemeral API server in each process that reports a run; Dask worker processes
would each start their own. :func:`shared_prefect_api` starts the ephemeral server
once in the calling process and hands its address to the workers through Prefect's
settings context, which travels with every task.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from budgetalloc.errors import BudgetallocError
from budgetalloc.serve import distributed as D
from budgetalloc.serve.streaming import StreamedAllocation

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
def classify_partition(policy_dir: str, users: str, index: int, row_groups: list[int], rows: int,
                       workdir: str) -> D.Classified:
    """Pass 1 over one partition (:func:`budgetalloc.serve.distributed.classify_partition`)."""
    result = D.classify_partition(policy_dir, users, index, row_groups, rows, workdir)
    return replace(result, run_count=_run_count())


@task(**_TASK, retry_condition_fn=_worth_retrying, task_run_name="check-ids")
def check_partition_ids(workdir: str, n_partitions: int, source: str) -> None:
    """Duplicate ids across all partitions (:func:`budgetalloc.serve.distributed.check_partition_ids`)."""
    D.check_partition_ids(workdir, n_partitions, source)


@task(**_TASK, retry_condition_fn=_worth_retrying, task_run_name="assign-{index}")
def assign_partition(policy_dir: str, index: int, counts: np.ndarray, offsets: np.ndarray,
                     rows: int, workdir: str) -> D.Assigned:
    """Pass 2 over one partition (:func:`budgetalloc.serve.distributed.assign_partition`)."""
    result = D.assign_partition(policy_dir, index, counts, offsets, rows, workdir)
    return replace(result, run_count=_run_count())


_TASKS = {D.classify_partition: classify_partition, D.check_partition_ids: check_partition_ids,
          D.assign_partition: assign_partition}


def prefect_runner(fn: Callable, args_per_task: list[tuple]) -> list:
    """The library's :data:`~budgetalloc.serve.distributed.Runner` as Prefect tasks of the current flow."""
    futures = [_TASKS[fn].submit(*args) for args in args_per_task]
    return [future.result() for future in futures]  # file order: the first failure in it is raised


@flow(name="allocate-partitions")
def allocate_partitions(policy_dir: str, users: str, budget: float, out: str,
                        partitions: int | None = None, batch_size: int | None = None) -> StreamedAllocation:
    """Allocate a Parquet population partition by partition under one global budget, as Prefect tasks."""
    return D.allocate_partitions(policy_dir, users, budget, out, run=prefect_runner, partitions=partitions,
                                 batch_size=batch_size)


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
                         processes: bool = True, quiet: bool = False) -> StreamedAllocation:
    """Run :func:`allocate_partitions` on Dask through Prefect: an existing cluster, or a new LocalCluster.

    The arguments are those of :func:`budgetalloc.serve.distributed.allocate_distributed`;
    ``quiet`` also stops an ephemeral Prefect server this call started.
    """
    budget, users = D.check_partition_input(users, budget, partitions)
    runner = dask_task_runner(None if address in (None, "local") else address,
                              n_workers=n_workers, processes=processes)
    with quiet_console() if quiet else nullcontext(), shared_prefect_api(stop=quiet):
        return allocate_partitions.with_options(task_runner=runner)(
            str(policy_dir), str(users), budget, str(out), partitions=partitions, batch_size=batch_size)
