"""Row sources: where a pass over users or trial rows reads them.

A source has a ``name``, ``n``, its ``columns`` and ``partitions()``: picklable,
contiguous pieces in file order, each giving batches of at most ``batch_rows`` rows.
Kinds: a validated record in memory (one batch), a Parquet or CSV file (read by
:mod:`budgetalloc.data.readers`), a folder of Parquet parts (in name order).
Invariants: the rows, their order and their ids do not depend on the kind, the
partitioning or the batch size; ``first_row`` counts from the source's start; a CSV
may be read with the types pyarrow's whole-file reader gives it (:meth:`Source.again`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from budgetalloc.data.contract import USER_ID, check_file, csv_column_names, is_parquet
from budgetalloc.data.readers import (
    NUMERIC_KINDS,
    IdsNotUniform,
    NarrowType,
    csv_header,
    parquet_file,
    parquet_frames,
    table_frames,
    wider_kind,
)
from budgetalloc.errors import DataError

ColumnTypes = tuple[tuple[str, pa.DataType], ...]


@dataclass(frozen=True)
class Partition:
    """Contiguous rows of a source: ``pieces`` (file, row groups or ``None``: all), or a record in memory."""

    name: str
    first_row: int
    pieces: tuple = ()
    record: object = None  # a validated Population or Trial (in memory)
    ids_as_text: bool = False
    types: ColumnTypes | None = None  # CSV: the types to read with (None: the readers' own)

    def batches(self, wanted: list[str], batch_rows: int, *, arrow: bool = False) -> Iterator:
        """Frames (``arrow``: Arrow tables) of the wanted columns (those present), or the in-memory record whole."""
        if self.record is not None:
            yield self.record
            return
        for path, groups in self.pieces:
            if groups is None:
                yield from table_frames(path, wanted, batch_rows=batch_rows, ids_as_text=self.ids_as_text,
                                        types=None if self.types is None else dict(self.types), arrow=arrow)
            else:
                yield from parquet_frames(path, wanted, batch_rows=batch_rows, row_groups=list(groups), arrow=arrow)


@dataclass(frozen=True)
class Source:
    """Rows in memory (``record``), in one file (``files`` of one) or in a folder of Parquet parts."""

    name: str
    files: tuple[Path, ...] = ()
    record: object = None
    ids_as_text: bool = False  # CSV: read the ids as text (a later block changed their type)
    types: ColumnTypes | None = None  # CSV: each column's type (None: the readers' own)
    numeric: frozenset[str] = frozenset()  # CSV columns the contract needs numeric (with ``types``)

    @property
    def n(self) -> int:
        if self.record is not None:
            return self.record.n
        if self.is_parquet:
            return sum(parquet_file(f).metadata.num_rows for f in self.files)
        return sum(len(b) for p in self.partitions() for b in p.batches([USER_ID], 1 << 16, arrow=True))

    @property
    def columns(self) -> list[str]:
        """The columns a whole-file read's frame has (a Parquet file's pandas index columns are not among them)."""
        if self.record is not None:
            return ["user_id", *self.record.feature_names]
        if not self.is_parquet:
            return csv_column_names(self.files[0])
        schema = parquet_file(self.files[0]).schema_arrow
        index = (schema.pandas_metadata or {}).get("index_columns", [])
        return [c for c in schema.names if c not in index]

    def whole_file_types(self, numeric: frozenset[str]) -> Source:
        """CSV: read each column with the type pyarrow's whole-file reader gives it (Parquet: as it is).

        The first block's inferred types to start with; :meth:`again` widens a column
        that a later block does not fit. ``numeric`` columns start as float64 where the
        first block is not numeric, so that the first bad value is the one reported.
        """
        if self.record is not None or self.is_parquet:
            return self
        schema = csv_header(self.files[0])
        types = tuple((name, kind if name not in numeric or kind in NUMERIC_KINDS else pa.float64())
                      for name, kind in zip(schema.names, schema.types))
        return replace(self, types=types, numeric=numeric)

    def again(self, error: IdsNotUniform | NarrowType) -> Source:
        """The source to read again after ``error``: ids as text, or the column's type one kind wider.

        Raises:
            DataError: a numeric column's value that no numeric type holds (``error.error``).
        """
        if isinstance(error, IdsNotUniform):
            return self.text_ids()
        types = dict(self.types)
        wider = wider_kind(types[error.column])
        if wider is None or error.column in self.numeric and wider not in NUMERIC_KINDS:
            raise error.error
        types[error.column] = wider
        return replace(self, types=tuple(types.items()))

    @property
    def is_parquet(self) -> bool:
        for f in self.files:
            check_file(f)
        return all(is_parquet(f) for f in self.files)

    def text_ids(self) -> Source:
        return replace(self, ids_as_text=True)

    def partitions(self, count: int | None = None) -> list[Partition]:
        """One partition (``count`` None), or up to ``count`` ranges of row groups about equal in rows.

        ``count`` 0 means one partition per row group. CSV is always one partition.
        """
        if self.record is not None:
            return [Partition(self.name, 0, record=self.record)]
        if count is None or not self.is_parquet:
            return [Partition(self.name, 0, tuple((f, None) for f in self.files), ids_as_text=self.ids_as_text,
                              types=self.types)]
        groups = [(f, g, m.row_group(g).num_rows) for f in self.files
                  for m in [parquet_file(f).metadata] for g in range(m.num_row_groups) if m.row_group(g).num_rows]
        if not groups:
            raise DataError(f"{self.name}: table has no rows")
        n = min(count or len(groups), len(groups))
        rows = np.array([g[2] for g in groups], dtype=np.float64)
        middle = np.cumsum(rows) - rows / 2  # a group belongs to the range its middle row falls in
        owner = np.minimum((middle * n / rows.sum()).astype(np.int64), n - 1)
        parts, first = [], 0
        for p in range(n):
            mine = [g for g, o in zip(groups, owner) if o == p]
            if mine:
                files = list(dict.fromkeys(g[0] for g in mine))
                pieces = tuple((f, tuple(g[1] for g in mine if g[0] == f)) for f in files)
                parts.append(Partition(self.name, first, pieces))
                first += sum(g[2] for g in mine)
        return parts


def memory_source(record, name: str = "<memory>") -> Source:
    """A validated Population or Trial in memory: one partition, one batch."""
    return Source(name=getattr(record, "source", name), record=record)


def file_source(path: str | Path) -> Source:
    """A Parquet or CSV file, or a folder of Parquet parts (``*.parquet``, in name order; none: not a file)."""
    path = Path(path)
    files = tuple(sorted(path.glob("*.parquet"))) if path.is_dir() else ()
    if files:
        return Source(name=str(path), files=files)
    return Source(name=str(path), files=(path,))  # checked when read
