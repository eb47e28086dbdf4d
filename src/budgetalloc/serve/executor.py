"""Executors: how a pass is mapped over a source's partitions.

``run(fn, args_per_task)`` calls ``fn(*args)`` once per tuple and returns the results
in the order given; the first failure in that order is raised. :func:`inline` is a
plain map; :func:`dask_runner` submits every task to a ``distributed.Client`` at once
and retries a failed task alone (``RETRIES`` times) unless it failed with a
:class:`~budgetalloc.errors.BudgetallocError` (bad data fail the same way again); each
result carries its run count. Prefect's tasks are another executor, in ``flows/``:
the library never imports Prefect.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import is_dataclass, replace

from budgetalloc.errors import BudgetallocError

RETRIES = 2
RETRY_DELAY_SECONDS = 1
DEFAULT_WORKERS = 2
FAIL_ONCE_ENV = "BUDGETALLOC_FAIL_ONCE"  # test hook, see injected_failure

Runner = Callable[[Callable, list[tuple]], list]


def inline(fn: Callable, args_per_task: list[tuple]) -> list:
    """The executor of one process: a plain map."""
    return [fn(*args) for args in args_per_task]


def injected_failure(step: str, index: int) -> None:
    """Test hook: fail once where ``$BUDGETALLOC_FAIL_ONCE`` = ``"step:index:marker-file"`` says.

    The failing attempt creates the marker file (exclusively), so the retry passes.
    """
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    want_step, want_index, marker = spec.split(":", 2)
    if want_step != step or int(want_index) != index:
        return
    try:
        with open(marker, "x"):
            pass
    except FileExistsError:
        return
    raise RuntimeError(f"injected failure: {step} of partition {index}")


def dask_runner(client) -> Runner:
    """A :data:`Runner` on a ``distributed.Client``: tasks submitted at once, failures retried alone."""

    def run(fn: Callable, args_per_task: list[tuple]) -> list:
        futures = [client.submit(fn, *args, pure=False) for args in args_per_task]
        results = []
        for args, future in zip(args_per_task, futures):
            runs = 1
            while True:
                try:
                    result = future.result()
                    break
                except BudgetallocError:
                    raise
                except Exception:  # any other failure may be transient
                    if runs > RETRIES:
                        raise
                    runs += 1
                    time.sleep(RETRY_DELAY_SECONDS)
                    future = client.submit(fn, *args, pure=False)
            results.append(replace(result, run_count=runs) if is_dataclass(result) else result)
        return results

    return run


@contextmanager
def dask_client(address: str | None, *, n_workers: int = DEFAULT_WORKERS, processes: bool = True) -> Iterator:
    """A client of the cluster at ``address``, or of a new ``LocalCluster`` (``None`` or ``"local"``)."""
    from distributed import Client, LocalCluster

    if address not in (None, "local"):
        with Client(address) as client:
            yield client
        return
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=processes,
                      silence_logs=logging.ERROR, dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


@contextmanager
def quiet_console(loggers: tuple = (None, "distributed")) -> Iterator[None]:
    """No Dask log lines on the console while the passes run (the CLI prints its own)."""
    handlers = [h for name in loggers for h in logging.getLogger(name).handlers]
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)
