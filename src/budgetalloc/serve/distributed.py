"""Partition-parallel allocation on Dask (``dask.distributed``), under one global budget.

The same passes run on a ``LocalCluster`` (default: 2 worker processes, one thread
each) or on an existing Dask cluster given its scheduler address. Its result is
the exact allocation :func:`budgetalloc.serve.streaming.allocate_file` writes for the
same file (the same bytes, for Parquet output), because the budget stays global:

1. **Plan.** Partitions are contiguous ranges of the Parquet file's row groups
   (one per row group by default; ``partitions=N`` merges them into ``N`` ranges
   of about equal rows). CSV has no row groups: it takes the single-process path.
2. **Classify** (a task per partition, in parallel): validate, standardise,
   classify with the student (exactly pass 1 of the streaming allocator) and
   write the partition's ids and clusters to ``pass1-NNNNN.parquet``; return the
   partition's cluster sizes.
3. **Check ids** (one task): one sort of 64-bit keys over every partition finds
   duplicate ids across partitions, with the data contract's message.
4. **Solve once** for the summed sizes. Partition ``p`` starts each
   cluster's running offset at the sizes of partitions ``0..p-1`` (prefix sums),
   so every partition assigns arms alone and the result is the file-order one.
5. **Assign** (a task per partition, in parallel): arms for the partition's users,
   written atomically to ``part-NNNNN.parquet``; returns its rows and spend.
6. **Assemble**: the total spend is checked against the budget, the
   parts are copied in order into a temporary sibling of the output, which is
   renamed into place; the parts are removed.

Failures. Every task writes its file atomically and is retried (``RETRIES``
times) on its own when it fails for any reason other than a
:class:`~budgetalloc.errors.BudgetallocError` (bad data fail the same way again);
the other partitions' results stand and are not recomputed. Each result carries
the task's run count, so a caller sees which partitions were retried.

:func:`allocate_partitions` takes the executor as a ``run`` function, so the same
passes run under :func:`dask_runner` here and as Prefect tasks in
``flows/dask_allocation.py``; the library never imports Prefect.

Where files live. The partition files go in a hidden directory beside the
output; with a remote cluster the input and the output's directory must be on a
filesystem every worker sees (NFS, a mounted bucket), as they must for any
partition-parallel Dask job reading local paths.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, is_dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from budgetalloc.data.contract import USER_ID, check_file
from budgetalloc.data.readers import STREAM_BATCH_ROWS, is_parquet, parquet_file, parquet_frames
from budgetalloc.errors import BudgetallocError, DataError
from budgetalloc.files import (
    atomic_path,
    claim_temp,
    make_parents,
    naming,
    remove_created,
    remove_stale,
)
from budgetalloc.policy import Policy, load_policy
from budgetalloc.serve.allocate import check_budget, check_spend, program_for, unspent_budget
from budgetalloc.serve.streaming import (
    ClusterPass,
    StreamedAllocation,
    check_unique_ids,
    cluster_pass,
    compiled_rows,
    frame_sink,
    is_csv_name,
    write_arms,
)

RETRIES = 2
RETRY_DELAY_SECONDS = 1
DEFAULT_WORKERS = 2
FAIL_ONCE_ENV = "BUDGETALLOC_FAIL_ONCE"  # test hook, see injected_failure


# -- plan ----------------------------------------------------------------------------------


def partition_plan(path: Path, partitions: int | None = None) -> list[list[int]]:
    """Contiguous ranges of non-empty row groups, about equal in rows.

    Args:
        path: a Parquet file.
        partitions: how many ranges (default: one per row group; at most that many).

    Returns:
        Row-group indices per partition, in file order.
    """
    meta = parquet_file(path).metadata
    groups = [i for i in range(meta.num_row_groups) if meta.row_group(i).num_rows > 0]
    if not groups:
        raise DataError(f"{path}: table has no rows")
    n = min(partitions or len(groups), len(groups))
    rows = np.array([meta.row_group(i).num_rows for i in groups], dtype=np.float64)
    middle = np.cumsum(rows) - rows / 2  # a group belongs to the range its middle row falls in
    owner = np.minimum((middle * n / rows.sum()).astype(np.int64), n - 1)
    return [[g for g, o in zip(groups, owner) if o == p] for p in range(n) if (owner == p).any()]


def partition_offsets(sizes: np.ndarray) -> np.ndarray:
    """(P, K) users of each cluster in the partitions before each one (exclusive prefix sums)."""
    return np.cumsum(sizes, axis=0) - sizes


# -- tasks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classified:
    """A classify task's result."""

    index: int
    sizes: np.ndarray  # (K,) users per cluster in the partition
    run_count: int = 1


@dataclass(frozen=True)
class Assigned:
    """An assign task's result."""

    index: int
    rows: int
    spend: float
    run_count: int = 1


def injected_failure(step: str, index: int) -> None:
    """Test hook: fail once where ``$BUDGETALLOC_FAIL_ONCE`` = ``"step:index:marker-file"`` says.

    The marker file is created (exclusively) by the failing attempt, so the retry
    passes. Unset, as in normal use, this does nothing.
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


def pass1_path(workdir: Path, index: int) -> Path:
    return workdir / f"pass1-{index:05d}.parquet"


def part_path(workdir: Path, index: int) -> Path:
    return workdir / f"part-{index:05d}.parquet"


def _kept_table(kept: ClusterPass) -> pa.Table:
    ids = kept.ids
    column = (np.concatenate(ids) if isinstance(ids[0], np.ndarray)
              else pa.chunked_array(ids, type=pa.large_string()))
    return pa.table({USER_ID: column, "cluster": np.concatenate(kept.clusters)})


def _kept_batches(path: Path, rows: int) -> ClusterPass:
    table = pq.read_table(path)
    kept = ClusterPass()
    for batch in table.to_batches(max_chunksize=rows):
        ids = batch.column(USER_ID)
        kept.ids.append(ids.to_numpy() if pa.types.is_integer(ids.type) else ids)
        kept.clusters.append(batch.column("cluster").to_numpy())
    return kept


def classify_partition(policy_dir: str, users: str, index: int, row_groups: list[int], rows: int,
                       workdir: str) -> Classified:
    """Pass 1 over one partition: validated, classified; ids and clusters written to disk."""
    policy = load_policy(policy_dir)
    frames = parquet_frames(Path(users), [USER_ID, *policy.feature_names], batch_rows=rows,
                            row_groups=row_groups)
    kept = cluster_pass(policy, frames, source=users, rows=rows)
    injected_failure("classify", index)
    with atomic_path(pass1_path(Path(workdir), index)) as tmp:
        pq.write_table(_kept_table(kept), tmp)
    return Classified(index=index, sizes=kept.sizes)


def check_partition_ids(workdir: str, n_partitions: int, source: str) -> None:
    """Duplicate ids across all partitions (the contract's message for the first one in file order)."""
    chunks = []
    for index in range(n_partitions):
        ids = pq.read_table(pass1_path(Path(workdir), index), columns=[USER_ID]).column(USER_ID)
        chunks.append(ids.to_numpy() if pa.types.is_integer(ids.type) else ids.combine_chunks())
    check_unique_ids(chunks, source)


def assign_partition(policy_dir: str, index: int, counts: np.ndarray, offsets: np.ndarray,
                     rows: int, workdir: str) -> Assigned:
    """Pass 2 over one partition: arms from the global counts and this partition's offsets."""
    policy = load_policy(policy_dir)
    kept = _kept_batches(pass1_path(Path(workdir), index), rows)
    with atomic_path(part_path(Path(workdir), index)) as tmp, frame_sink(tmp, as_csv=False) as write:
        written = write_arms(policy, kept, counts, write, offsets=offsets.astype(np.int64))
        injected_failure("assign", index)
    return Assigned(index=index, rows=written.rows, spend=written.spend)


# -- flow ----------------------------------------------------------------------------------


def assemble_parts(workdir: Path, n_partitions: int, out: Path) -> None:
    """Copy the parts in order into ``out`` (atomically; Parquet, or CSV by suffix)."""
    with atomic_path(out) as tmp, frame_sink(tmp, as_csv=is_csv_name(out)) as write:
        for index in range(n_partitions):
            for batch in pq.ParquetFile(part_path(workdir, index)).iter_batches():
                write(pa.Table.from_batches([batch]))


@contextmanager
def parts_directory(out: Path) -> Iterator[Path]:
    """A hidden working directory beside ``out`` for the partition files, removed afterwards.

    Working directories a killed earlier run left are removed first; those of a
    run still writing the same output are locked by it and kept
    (:func:`budgetalloc.files.remove_stale`).
    """
    with naming(out):
        created = make_parents(out)
        remove_stale(out, (".parts",))
        workdir, fd = claim_temp(out, ".parts", directory=True)
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        os.close(fd)
        if not out.exists():
            remove_created(created)


#: ``run(fn, args_per_task)``: ``fn(*args)`` for each argument tuple (in parallel), the
#: results in the order given, each with its run count; the first failure in that order is raised.
Runner = Callable[[Callable, list[tuple]], list]


def check_partition_input(users: str | Path, budget, partitions: int | None) -> tuple[float, Path]:
    """The budget and the users path, checked for the partitioned path (Parquet, ``partitions >= 1``)."""
    budget = check_budget(budget)
    users = Path(users)
    check_file(users)
    if not is_parquet(users):
        raise DataError(f"{users}: the Dask path partitions Parquet row groups; "
                        "convert the file to Parquet or allocate it without --dask-address")
    if partitions is not None and partitions < 1:
        raise BudgetallocError(f"partitions must be >= 1, got {partitions}")
    return budget, users


def allocate_partitions(policy_dir: str, users: str, budget: float, out: str, *, run: Runner,
                        partitions: int | None = None, batch_size: int | None = None) -> StreamedAllocation:
    """Allocate a Parquet population partition by partition under one global budget.

    Args:
        policy_dir: policy directory (read by every worker).
        users: population Parquet file; its row groups are the partitions.
        budget: total budget in cost units.
        out: allocation file (Parquet, or CSV by suffix).
        run: the executor (:data:`Runner`): :func:`dask_runner`, or Prefect tasks in the flows.
        partitions: number of partitions (default: one per row group).
        batch_size: rows per batch inside a partition (default ``STREAM_BATCH_ROWS``).

    Returns:
        A :class:`~budgetalloc.serve.streaming.StreamedAllocation` with per-partition run counts.
    """
    started = time.perf_counter()
    policy: Policy = load_policy(policy_dir)
    budget, users_path, out_path = check_budget(budget), Path(users), Path(out)
    plan = partition_plan(users_path, partitions)
    rows = compiled_rows(batch_size or STREAM_BATCH_ROWS)
    seconds = {}
    with parts_directory(out_path) as workdir:
        classified = run(classify_partition, [(policy_dir, users, i, groups, rows, str(workdir))
                                              for i, groups in enumerate(plan)])
        run(check_partition_ids, [(str(workdir), len(plan), users)])
        seconds["classify_and_check"] = round(time.perf_counter() - started, 3)
        sizes = np.stack([c.sizes for c in classified])
        solution = program_for(policy).solve(sizes.sum(axis=0), budget)
        offsets = partition_offsets(sizes)
        assigned = run(assign_partition, [(policy_dir, i, solution.counts, offsets[i], rows, str(workdir))
                                          for i in range(len(plan))])
        spend = float(sum(a.spend for a in assigned))
        check_spend(spend, budget)
        seconds["solve_and_assign"] = round(time.perf_counter() - started - seconds["classify_and_check"], 3)
        assemble_parts(workdir, len(plan), out_path)
    seconds["total"] = round(time.perf_counter() - started, 3)
    total = sizes.sum(axis=0)
    return StreamedAllocation(
        path=out_path, n_users=int(total.sum()), cluster_sizes=total, solution=solution, budget=budget,
        unspent=unspent_budget(policy, total, budget), spend=spend, batch_rows=rows, seconds=seconds,
        run_counts={"classify": tuple(c.run_count for c in classified),
                    "assign": tuple(a.run_count for a in assigned)},
    )


# -- entry point ---------------------------------------------------------------------------


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
                    raise  # bad data fail again the same way
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


def allocate_distributed(policy_dir: str | Path, users: str | Path, budget, out: str | Path, *,
                         address: str | None = None, partitions: int | None = None,
                         batch_size: int | None = None, n_workers: int = DEFAULT_WORKERS,
                         processes: bool = True, quiet: bool = False) -> StreamedAllocation:
    """Run :func:`allocate_partitions` on Dask: an existing cluster, or a new LocalCluster.

    Args:
        policy_dir: policy directory.
        users: population Parquet file.
        budget: total budget in cost units.
        out: allocation file to write (Parquet, or CSV by suffix).
        address: a Dask scheduler address (``tcp://host:8786``); ``None`` or
            ``"local"`` starts a LocalCluster for this run.
        partitions: number of partitions (default: one per row group).
        batch_size: rows per batch inside a partition.
        n_workers: LocalCluster workers.
        processes: LocalCluster workers as processes (default) or threads.
        quiet: for one-shot command-line use: no Dask log lines on the console
            (:func:`quiet_console`).

    Returns:
        The :class:`~budgetalloc.serve.streaming.StreamedAllocation`.

    Raises:
        DataError: the file breaks the contract, or is not Parquet.
        BudgetallocError: a bad budget or partition count.
    """
    budget, users = check_partition_input(users, budget, partitions)
    with quiet_console() if quiet else nullcontext(), \
            dask_client(address, n_workers=n_workers, processes=processes) as client:
        return allocate_partitions(str(policy_dir), str(users), budget, str(out), run=dask_runner(client),
                                   partitions=partitions, batch_size=batch_size)
