"""Allocation, written once as passes over a row source (:mod:`budgetalloc.data.sources`).

classify each partition (validate, standardise, one student forward pass; an
executor maps it) -> sum the cluster sizes -> check ids unique -> solve the
program once -> assign arms in source order with a running offset per cluster
-> write through one table sink (in memory, Parquet or CSV, atomically).
Invariants: the rows and their bytes do not depend on the source kind, the
batch size, the partitioning or the executor; ids come out exactly as they went
in; the budget is checked once; the written rows' expected spend never exceeds it.
Design notes: ``docs/scale.md``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from budgetalloc.data.contract import USER_ID, Population, population_from_frame
from budgetalloc.data.readers import (
    STREAM_BATCH_ROWS,
    IdsNotUniform,
    check_unique_ids,
    id_keys,
    ids_as_numpy,
)
from budgetalloc.data.sources import Partition, Source, file_source, memory_source
from budgetalloc.errors import BudgetallocError, DataError
from budgetalloc.files import OUTPUT_ROW_GROUP, is_csv_path, table_sinks
from budgetalloc.method.program import AllocationProgram, ProgramSolution
from budgetalloc.models.distill import predict_clusters
from budgetalloc.models.nn import inference_batch_size
from budgetalloc.policy import Policy, load_policy
from budgetalloc.serve.executor import Runner, injected_failure, inline

_INT16_MAX = np.iinfo(np.int16).max


@dataclass(frozen=True)
class Allocation:
    """Arms for a population with the program solution behind them; the rows in ``frame`` or at ``path``."""

    solution: ProgramSolution
    budget: float
    unspent: float  # budget the policy could not usefully spend
    cluster_sizes: np.ndarray  # (K,) int64 users per cluster
    spend: float  # sum of the rows' expected_cost
    path: Path | None = None
    held: pd.DataFrame | None = None
    run_counts: dict = field(default_factory=dict)  # runs per partition of each mapped pass

    @property
    def frame(self) -> pd.DataFrame:
        """The rows (read back from ``path`` when written: small populations only)."""
        if self.held is not None:
            return self.held
        return pd.read_csv(self.path) if is_csv_path(self.path) else pq.read_table(self.path).to_pandas()

    @property
    def n_users(self) -> int:
        return int(self.cluster_sizes.sum())

    @property
    def expected_cost(self) -> float:
        return float(self.solution.expected_cost)

    @property
    def expected_response(self) -> float:
        return float(self.solution.expected_response)

    @property
    def users_per_arm(self) -> np.ndarray:
        """(M,) users given each arm (the program's counts: the written rows follow them)."""
        return self.solution.counts.sum(axis=0)


def check_budget(budget) -> float:
    """A total budget as a finite float >= 0, or a one-line error."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise BudgetallocError(f"budget {budget!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise BudgetallocError(f"budget {budget!r} must be a finite number >= 0")
    return value


def pass_rows(policy: Policy, source: Source, batch_size: int | None = None) -> int:
    """Rows per read batch and compiled student call of a pass over ``source``: ``batch_size``,
    else the policy's ``allocate.batch_size`` in memory or ``STREAM_BATCH_ROWS`` from a file."""
    rows = batch_size or (STREAM_BATCH_ROWS if source.record is None else policy.params.allocate.batch_size)
    return inference_batch_size(rows, rows)  # rounded up to whole inference chunks


def classify(policy: Policy, X: np.ndarray, rows: int) -> np.ndarray:
    """Cluster id per row: impute, standardise, one student forward pass of ``rows``-row calls."""
    return predict_clusters(policy.student, policy.preprocessor.transform(X), batch_size=rows)


def program_for(policy: Policy) -> AllocationProgram:
    """The policy's integer program (built once, re-solved per population/budget)."""
    s = policy.statistics
    return AllocationProgram(s.response, s.cost, s.response_scenarios, s.cost_scenarios,
                             params=policy.params.program)


def arms_in_file_order(clusters: np.ndarray, counts: np.ndarray, offsets: np.ndarray | None = None):
    """Arms for users in file order given the (K, M) counts and the (K,) users of each cluster before them.

    Returns ``(arms, new_offsets)``.
    """
    k = counts.shape[0]
    offsets = np.zeros(k, dtype=np.int64) if offsets is None else offsets
    order = np.argsort(clusters, kind="stable")
    sizes = np.bincount(clusters, minlength=k)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(clusters.shape[0], dtype=np.int64)
    rank[order] = np.arange(clusters.shape[0]) - np.repeat(starts, sizes)
    rank += offsets[clusters]
    bounds = np.cumsum(counts, axis=1)
    arms = (bounds[clusters] <= rank[:, None]).sum(axis=1).astype(np.int32)
    return np.minimum(arms, counts.shape[1] - 1), offsets + sizes


def allocation_frame(policy: Policy, user_id, clusters, arms) -> pd.DataFrame:
    """The output table for one batch of users."""
    s = policy.statistics
    return pd.DataFrame({USER_ID: user_id, "cluster": clusters.astype(np.int32), "treatment": arms.astype(np.int32),
                         "expected_response": s.response[clusters, arms], "expected_cost": s.cost[clusters, arms]})


def unspent_budget(policy: Policy, n_users: np.ndarray, budget: float) -> float:
    """Budget beyond what the best-response arm of every cluster would spend."""
    s = policy.statistics
    best = np.argmax(s.response, axis=1)
    cap = float((n_users * s.cost[np.arange(len(best)), best]).sum())
    return max(0.0, budget - cap) if budget > 0 else 0.0


def check_spend(spend: float, budget: float) -> None:
    """The last check of every allocation: the written rows' expected spend is within budget."""
    if spend > budget * (1 + 1e-12) + 1e-9:
        raise BudgetallocError(f"internal check failed: expected spend {spend:.6g} exceeds budget {budget:.6g}")


# -- the classify pass ----------------------------------------------------------------------


@dataclass(frozen=True)
class Classified:
    """A partition's ids (integers of their own width, or an Arrow string array) and clusters, per batch."""

    ids: list
    clusters: list
    sizes: np.ndarray  # (K,) int64
    run_count: int = 1


def as_policy(policy: Policy | str | Path) -> Policy:
    """The policy itself, or the one saved at a path (what a worker process is handed)."""
    return policy if isinstance(policy, Policy) else load_policy(policy)


def classify_partition(policy: Policy | str, part: Partition, rows: int, index: int = 0) -> Classified:
    """Validate, standardise and classify every batch of a population partition; keep ids and clusters."""
    policy = as_policy(policy)
    dtype = np.int16 if policy.k <= _INT16_MAX else np.int32
    ids, clusters, first = [], [], part.first_row
    for batch in part.batches([USER_ID, *policy.feature_names], rows):
        if isinstance(batch, pd.DataFrame):
            batch = population_from_frame(batch, policy.feature_names, source=part.name, first_row=first)
            # a copy: ids from to_pandas can be a view keeping the batch's Arrow memory alive
            kept = (batch.user_id.copy() if batch.user_id.dtype.kind in "iu"
                    else pa.array(batch.user_id, type=pa.large_string()))
        else:
            kept = batch.user_id
        first += batch.n
        ids.append(kept)
        clusters.append(classify(policy, batch.X, rows).astype(dtype))
    injected_failure("classify", index)
    sizes = sum((np.bincount(c, minlength=policy.k) for c in clusters), np.zeros(policy.k, dtype=np.int64))
    return Classified(ids=ids, clusters=clusters, sizes=sizes)


def classify_source(policy: Policy, source: Source, rows: int, *, run: Runner = inline, ref=None,
                    partitions: int | None = None, fn=classify_partition) -> list:
    """``fn`` over every partition by the executor ``run``, and the source read; a CSV whose ids change
    type is read again as text. ``ref`` is what the tasks get for the policy (its directory, for workers).
    """
    try:
        return run(fn, [(ref or policy, p, rows, i) for i, p in enumerate(source.partitions(partitions))]), source
    except IdsNotUniform:
        return classify_source(policy, source.text_ids(), rows, run=run, ref=ref, partitions=partitions, fn=fn)


# -- the operation ---------------------------------------------------------------------------


def allocate(policy: Policy, source: Source, budget, out: str | Path | None = None, *,
             batch_size: int | None = None, run: Runner = inline, ref=None, partitions: int | None = None,
             row_group_rows: int = OUTPUT_ROW_GROUP) -> Allocation:
    """Allocate every user of ``source`` under the total ``budget``; rows held (``out`` None) or written.

    Args:
        policy: a fitted policy (``ref``: its directory, handed to the executor's tasks instead).
        source: the population.
        budget: total budget in cost units (>= 0).
        out: allocation file (Parquet, or CSV by suffix), written atomically once checked.
        batch_size: rows per read batch and compiled student call (rounded to the compiled shape).
        run: the executor of the classify pass; ``partitions`` how it is cut (see :meth:`Source.partitions`).

    Raises:
        DataError: the source breaks the contract (nothing is written).
        BudgetallocError: a bad budget, or the final spend check fails.
    """
    budget = check_budget(budget)
    rows = pass_rows(policy, source, batch_size)
    parts, _ = classify_source(policy, source, rows, run=run, ref=ref, partitions=partitions)
    sizes = sum((p.sizes for p in parts), np.zeros(policy.k, dtype=np.int64))
    if not sizes.sum():
        raise DataError(f"{source.name}: table has no rows")
    ids = [c for p in parts for c in p.ids]
    check_unique_ids(np.concatenate([id_keys(c) for c in ids]), lambda: ids, source.name)
    solution = program_for(policy).solve(sizes, budget)
    spend, offsets = 0.0, None
    with table_sinks(out, rows=row_group_rows) as (sink,):
        for part in parts:  # offsets run on across partitions: the prefix sums of their sizes
            for ids, clusters in zip(part.ids, part.clusters):
                clusters = clusters.astype(np.int32)
                arms, offsets = arms_in_file_order(clusters, solution.counts, offsets)
                frame = allocation_frame(policy, ids_as_numpy(ids), clusters, arms)
                spend += float(frame["expected_cost"].sum())
                sink.write(frame)
        check_spend(spend, budget)
    return Allocation(solution=solution, budget=budget, unspent=unspent_budget(policy, sizes, budget),
                      cluster_sizes=sizes, spend=spend, path=None if out is None else Path(out),
                      held=sink.frame, run_counts={"classify": tuple(p.run_count for p in parts)})


def allocate_population(policy: Policy, population: Population, budget: float, *,
                        batch_size: int | None = None) -> Allocation:
    """Allocate a validated population in memory; the rows are in ``.frame``."""
    return allocate(policy, memory_source(population), budget, batch_size=batch_size)


def allocate_file(policy: Policy, users_path: str | Path, budget, out_path: str | Path, *,
                  batch_size: int | None = None, row_group_rows: int = OUTPUT_ROW_GROUP) -> Allocation:
    """Allocate a population file (or a folder of Parquet parts) in batches; write the rows atomically."""
    return allocate(policy, file_source(users_path), budget, out_path, batch_size=batch_size,
                    row_group_rows=row_group_rows)


def allocate_distributed(policy_dir: str | Path, users: str | Path, budget, out: str | Path, *,
                         address: str | None = None, partitions: int | None = None,
                         batch_size: int | None = None, n_workers: int | None = None,
                         processes: bool = True, quiet: bool = False) -> Allocation:
    """:func:`allocate` with the classify pass on Dask: the cluster at ``address``, or a new LocalCluster.

    Partitions are ranges of Parquet row groups (``partitions``, default one per row group).
    """
    from budgetalloc.serve.executor import DEFAULT_WORKERS, dask_client, dask_runner, quiet_console

    source = partitioned_source(users, partitions)
    with quiet_console() if quiet else nullcontext(), \
            dask_client(address, n_workers=n_workers or DEFAULT_WORKERS, processes=processes) as client:
        return allocate(load_policy(policy_dir), source, budget, out, batch_size=batch_size,
                        run=dask_runner(client), ref=str(policy_dir), partitions=partitions or 0)


def partitioned_source(users: str | Path, partitions: int | None) -> Source:
    """The population for the partitioned path: Parquet (a file or a folder of parts), ``partitions >= 1``."""
    source = file_source(users)
    if not source.is_parquet:
        raise DataError(f"{users}: the Dask path partitions Parquet row groups; "
                        "convert the file to Parquet or allocate it without --dask-address")
    if partitions is not None and partitions < 1:
        raise BudgetallocError(f"partitions must be >= 1, got {partitions}")
    return source
