"""Streaming allocation: a population file of any size, in memory that does not grow with its width.

:func:`allocate_file` gives exactly the rows of
:func:`budgetalloc.serve.allocate.allocate_population` on the same file (same frame,
same order, same solver counts) without ever holding the feature matrix:

1. **Pass 1 (the file).** Parquet is read with ``ParquetFile.iter_batches`` and
   CSV with pyarrow's streaming reader, ``batch_rows`` rows at a time
   (:mod:`budgetalloc.data.readers`). Each batch
   is validated by the contract's own function
   (:func:`budgetalloc.data.contract.population_from_frame`: missing columns, ids, types,
   infinities), imputed and standardised, and classified by the student in one
   compiled call of a fixed shape (the last batch is padded), so nothing
   recompiles per batch. What is kept per user is its id (an integer of the
   file's own width, so it is written back exactly, or the text in an Arrow
   string array) and its cluster (int16 when ``K`` allows): 10 bytes a
   user instead of the ``4 d`` of its features.
2. **Ids are unique across batches.** One sort of a compact 64-bit key per user
   (the id itself, or a hash of a text id); only users whose keys repeat are
   compared exactly, and the message is the contract's, naming the first duplicate in
   file order.
3. **The program is solved once** for the file's cluster sizes.
4. **Pass 2 (memory only).** Users take arms in file order with a running offset
   per cluster (:func:`budgetalloc.serve.allocate.arms_in_file_order`); the output rows
   are appended to a temporary sibling of the output (``ParquetWriter`` in row
   groups of pyarrow's default size, so the bytes are those the in-memory path
   writes; or pandas ``to_csv`` for ``.csv``), the total expected spend is checked
   against the budget, and only then is the file renamed into place.

Why keep ids and clusters rather than read the file again in pass 2: recomputing
the clusters means repeating all of pass 1 (read, validate, standardise,
classify: 80% of the 17 s a 10M x 40 file takes), while what is kept is 18 bytes
a user at most (10M users: 80 MB of ids, 20 MB of clusters, and an 80 MB sort key
during the duplicate check). Measurements are in ``docs/scale.md``.

CSV column types are the readers' (see :mod:`budgetalloc.data.readers`); if a later
block's ``user_id`` is not of the first block's type, pass 1 restarts with the ids
read as text.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from budgetalloc.data.contract import USER_ID, population_from_frame, user_ids
from budgetalloc.data.readers import (
    STREAM_BATCH_ROWS,
    IdsNotUniform,
    id_keys,
    ids_as_numpy,
    population_frames,
    repeated_keys,
)
from budgetalloc.errors import DataError
from budgetalloc.files import atomic_path
from budgetalloc.method.program import ProgramSolution
from budgetalloc.models.distill import fixed_shape_clusters
from budgetalloc.models.nn import inference_batch_size
from budgetalloc.policy import Policy
from budgetalloc.serve.allocate import (
    SolutionTotals,
    allocation_frame,
    arms_in_file_order,
    check_budget,
    check_spend,
    program_for,
    unspent_budget,
)

OUTPUT_ROW_GROUP = 1 << 20  # pyarrow's default row group: the in-memory writer's too
_INT16_MAX = np.iinfo(np.int16).max


# -- pass 1: clusters ----------------------------------------------------------------------


def compiled_rows(batch_size: int) -> int:
    """Rows per compiled student call (and per read batch) for a requested batch size."""
    return inference_batch_size(batch_size, batch_size)


def _compact_ids(ids: np.ndarray):
    """Integer ids copied (their own width); text ids as an Arrow string array (no Python object per id).

    The copy matters: the ids ``to_pandas`` hands out can be a view that keeps the
    whole batch's Arrow memory alive (measured: 2.1 GB held after 10M users).
    """
    return ids.copy() if ids.dtype.kind in "iu" else pa.array(ids, type=pa.large_string())


@dataclass
class ClusterPass:
    """What pass 1 keeps: each batch's ids and clusters, and the cluster sizes."""

    ids: list = field(default_factory=list)  # per batch: int64 ndarray or pa.LargeStringArray
    clusters: list = field(default_factory=list)  # per batch: int16 or int32 ndarray
    sizes: np.ndarray | None = None  # (K,) int64


def cluster_pass(policy: Policy, frames: Iterable[pd.DataFrame], *, source: str,
                 rows: int) -> ClusterPass:
    """Validate, standardise and classify every batch; keep ids and clusters.

    Args:
        policy: the fitted policy.
        frames: population batches of at most ``rows`` rows.
        source: file name for error messages.
        rows: the compiled batch shape.

    Returns:
        The :class:`ClusterPass` (no rows raises :class:`DataError`).
    """
    kept = ClusterPass(sizes=np.zeros(policy.k, dtype=np.int64))
    dtype = np.int16 if policy.k <= _INT16_MAX else np.int32
    first_row = 0
    for frame in frames:
        population = population_from_frame(frame, policy.feature_names, source=source, first_row=first_row)
        first_row += len(frame)
        X = policy.preprocessor.transform(population.X)
        clusters = fixed_shape_clusters(policy.student, X, rows)
        kept.sizes += np.bincount(clusters, minlength=policy.k)
        kept.ids.append(_compact_ids(population.user_id))
        kept.clusters.append(clusters.astype(dtype))
    if not kept.clusters:
        raise DataError(f"{source}: table has no rows")
    return kept


def file_cluster_pass(policy: Policy, path: Path, *, rows: int) -> ClusterPass:
    """:func:`cluster_pass` over a file; a CSV whose ids change type is re-read with text ids."""
    try:
        frames = population_frames(path, policy.feature_names, batch_rows=rows)
        return cluster_pass(policy, frames, source=str(path), rows=rows)
    except IdsNotUniform:
        frames = population_frames(path, policy.feature_names, batch_rows=rows, ids_as_text=True)
        return cluster_pass(policy, frames, source=str(path), rows=rows)


# -- duplicate ids -------------------------------------------------------------------------


def check_unique_ids(chunks: list, source: str) -> None:
    """Raise the contract's duplicate-id error for the first repeated id in file order, if any.

    Memory: one 64-bit key per user, sorted in place (the keys are rebuilt, in
    file order, only when some repeat).

    Args:
        chunks: per batch, the ids (int64 ndarray or Arrow string array), in file order.
        source: file name for the message.
    """
    repeated = repeated_keys(np.concatenate([id_keys(c) for c in chunks]))
    if repeated.size == 0:
        return
    suspects = []  # equal keys: equal ids, or (text ids) a hash collision
    for ids in chunks:
        hits = np.isin(id_keys(ids), repeated)
        if hits.any():
            suspects.append(ids_as_numpy(ids)[hits])
    user_ids(pd.DataFrame({USER_ID: np.concatenate(suspects)}), source)



# -- pass 2: arms and output ---------------------------------------------------------------


def is_csv_name(path: Path) -> bool:
    """Outputs are CSV by suffix, Parquet otherwise (as :func:`budgetalloc.files.write_table`)."""
    return path.suffix.lower() == ".csv"


class _ParquetSink:
    """Frames appended to one Parquet file in row groups of ``row_group_rows`` rows.

    pyarrow's ``write_table`` cuts row groups of ``OUTPUT_ROW_GROUP`` rows too, so
    with that size the file is the very bytes the in-memory path writes for the
    same rows; the price is one row group of output held (1M rows: 34 MB).
    """

    def __init__(self, path: Path, row_group_rows: int) -> None:
        self.path, self.writer, self.pending, self.held = path, None, [], 0
        self.row_group_rows = row_group_rows

    def write(self, rows: pd.DataFrame | pa.Table) -> None:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pandas(rows, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.pending.append(table)
        self.held += table.num_rows
        if self.held >= self.row_group_rows:
            self.flush(final=False)

    def flush(self, *, final: bool) -> None:
        if not self.pending:
            return
        # One contiguous array per column, as write_table gets it: the writer's page
        # and dictionary decisions follow the input's chunks, and so would the bytes.
        table = pa.concat_tables(self.pending).combine_chunks()
        whole = table.num_rows if final else table.num_rows - table.num_rows % self.row_group_rows
        if whole:
            self.writer.write_table(table.slice(0, whole), row_group_size=self.row_group_rows)
        rest = table.slice(whole)
        self.pending, self.held = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self, *, complete: bool) -> None:
        if self.writer is not None:
            if complete:
                self.flush(final=True)
            self.writer.close()


class _CsvSink:
    """Frames appended to one CSV file by pandas (the bytes ``DataFrame.to_csv`` writes)."""

    def __init__(self, path: Path) -> None:
        self.path, self.handle = path, None

    def write(self, rows: pd.DataFrame | pa.Table) -> None:
        frame = rows.to_pandas() if isinstance(rows, pa.Table) else rows
        first = self.handle is None
        if first:
            self.handle = open(self.path, "w", newline="")  # noqa: SIM115 - closed in close()
        frame.to_csv(self.handle, header=first, index=False)

    def close(self, *, complete: bool) -> None:
        if self.handle is not None:
            self.handle.close()


@contextmanager
def frame_sink(path: Path, *, as_csv: bool, row_group_rows: int = OUTPUT_ROW_GROUP) -> Iterator:
    """A function appending rows (frames or Arrow tables) to ``path``, Parquet or CSV."""
    sink = _CsvSink(path) if as_csv else _ParquetSink(path, row_group_rows)
    complete = False
    try:
        yield sink.write
        complete = True
    finally:
        sink.close(complete=complete)


@dataclass(frozen=True)
class WrittenRows:
    """Totals of the rows a pass 2 wrote."""

    rows: int
    spend: float  # sum of expected_cost over the rows
    offsets: np.ndarray  # (K,) users of each cluster assigned so far


def write_arms(policy: Policy, kept: ClusterPass, counts: np.ndarray, write, *,
               offsets: np.ndarray | None = None) -> WrittenRows:
    """Assign arms in file order (running offsets) and hand each batch's rows to ``write``."""
    spend, rows = 0.0, 0
    for ids, clusters in zip(kept.ids, kept.clusters):
        clusters = clusters.astype(np.int32)
        arms, offsets = arms_in_file_order(clusters, counts, offsets)
        frame = allocation_frame(policy, ids_as_numpy(ids), clusters, arms)
        write(frame)
        spend += float(frame["expected_cost"].sum())
        rows += len(frame)
    return WrittenRows(rows=rows, spend=spend, offsets=offsets)


@dataclass(frozen=True)
class StreamedAllocation(SolutionTotals):
    """An allocation written to ``path``: its totals; the rows stay on disk."""

    path: Path
    n_users: int
    cluster_sizes: np.ndarray  # (K,) users per cluster
    solution: ProgramSolution
    budget: float
    unspent: float  # budget the policy could not usefully spend
    spend: float  # sum of the written rows' expected_cost
    batch_rows: int
    seconds: dict  # wall time per step
    run_counts: dict = field(default_factory=dict)  # Dask path: runs per task and partition

    @property
    def frame(self) -> pd.DataFrame:
        """The written rows, read back from ``path`` (whole file in memory: small populations only)."""
        if is_csv_name(self.path):
            return pd.read_csv(self.path)
        return pq.read_table(self.path).to_pandas()


def allocate_file(policy: Policy, users_path: str | Path, budget, out_path: str | Path, *,
                  batch_size: int | None = None,
                  row_group_rows: int = OUTPUT_ROW_GROUP) -> StreamedAllocation:
    """Allocate a population file under a total budget, streaming it; write the rows atomically.

    Args:
        policy: a fitted policy.
        users_path: population file (Parquet or CSV).
        budget: total budget in cost units (>= 0).
        out_path: allocation file to write (Parquet, or CSV by suffix); it appears
            only when complete and checked.
        batch_size: rows per batch (default ``STREAM_BATCH_ROWS``); rounded up to
            the student's compiled shape (a multiple of 4096 above 4096).
        row_group_rows: output rows per Parquet row group, held in memory until
            written; the default is pyarrow's, which makes the file byte-identical
            to the in-memory path's.

    Returns:
        A :class:`StreamedAllocation`; the file holds exactly the rows
        :func:`budgetalloc.serve.allocate.allocate_population` returns for the same file.

    Raises:
        DataError: the file breaks the contract (nothing is written).
        BudgetallocError: a bad budget, or the final spend check fails.
    """
    budget = check_budget(budget)
    users_path, out_path = Path(users_path), Path(out_path)
    rows = compiled_rows(batch_size or STREAM_BATCH_ROWS)
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 3)

    kept = file_cluster_pass(policy, users_path, rows=rows)
    seconds = {"read_and_classify": lap()}
    check_unique_ids(kept.ids, str(users_path))
    seconds["unique_ids"] = lap()
    solution = program_for(policy).solve(kept.sizes, budget)
    seconds["solve"] = lap()
    with atomic_path(out_path) as tmp, frame_sink(tmp, as_csv=is_csv_name(out_path),
                                                      row_group_rows=row_group_rows) as write:
        written = write_arms(policy, kept, solution.counts, write)
        check_spend(written.spend, budget)
    seconds["assign_and_write"] = lap()
    return StreamedAllocation(path=out_path, n_users=written.rows, cluster_sizes=kept.sizes,
                              solution=solution, budget=budget,
                              unspent=unspent_budget(policy, kept.sizes, budget),
                              spend=written.spend, batch_rows=rows, seconds=seconds)
