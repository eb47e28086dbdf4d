"""Reading population and trial files in fixed-size batches, never the whole table.

Parquet through ``ParquetFile.iter_batches`` (a read buffer per column), CSV through
pyarrow's streaming reader, regrouped into batches of exactly ``batch_rows`` rows (the
last may be shorter), as frames or Arrow tables. Absent columns are left out for the
data contract to name; read errors are one line naming the file; names must be unique
and UTF-8. CSV types follow the first block's inference (integer or empty columns as
float64), or are given; ``user_id`` is read as text and parsed as the contract parses
it. A later block that a given type cannot hold raises :class:`NarrowType`, one whose
ids parse to another type :class:`IdsNotUniform`: the caller reads again. Why: docs/scale.md.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from budgetalloc.data.contract import (
    CSV_SUFFIXES,
    USER_ID,
    cell_error,
    check_column_names,
    check_file,
    csv_column_names,
    ids_as_text,
    is_parquet,
    parse_text_ids,
    unreadable,
    unsupported_format,
    user_ids,
)
from budgetalloc.errors import DataError

CSV_BLOCK_BYTES = 8 << 20
READ_BUFFER_BYTES = 1 << 20
_CSV_ERROR = re.compile(r"In CSV column #(\d+).*invalid value '(.*)'")
STREAM_BATCH_ROWS = 65_536  #: rows per batch by default (docs/scale.md)


#: The types pyarrow's CSV inference tries, in order: a column gets the first one that holds
#: every value of the file. The first four are the numeric ones of the contract.
CSV_KINDS = (pa.null(), pa.int64(), pa.bool_(), pa.float64(), pa.date32(), pa.time32("s"), pa.timestamp("s"),
             pa.timestamp("ns"), pa.string(), pa.binary())
NUMERIC_KINDS = CSV_KINDS[:4]


class IdsNotUniform(Exception):
    """A later CSV block's user_id does not parse as the first block's type."""


class NarrowType(Exception):
    """A later CSV block has a value that the column's given type cannot hold.

    ``error`` is what the reader reports otherwise (the contract's message for the value).
    """

    def __init__(self, column: str, error: Exception) -> None:
        super().__init__(column)
        self.column, self.error = column, error


def wider_kind(kind: pa.DataType) -> pa.DataType | None:
    """The next of ``CSV_KINDS`` after ``kind`` (text after a type pyarrow infers beyond them; none after binary)."""
    rest = CSV_KINDS[CSV_KINDS.index(kind) + 1:] if kind in CSV_KINDS else CSV_KINDS[-2:]
    return rest[0] if rest else None


def parquet_file(path: Path, *, buffered: bool = False) -> pq.ParquetFile:
    """Open a Parquet file, with one-line errors; ``buffered`` reads column chunks piecewise."""
    try:
        if buffered:
            source = pq.ParquetFile(path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
        else:
            source = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise unreadable(path, "Parquet", err) from None
    check_column_names(source.schema_arrow.names, str(path))
    return source


def parquet_frames(path: Path, wanted: Iterable[str], *, batch_rows: int,
                   row_groups: list[int] | None = None, arrow: bool = False) -> Iterator[pd.DataFrame]:
    """Batches of exactly ``batch_rows`` rows (the last may be shorter) of the wanted columns.

    Columns that are absent are left out, so that the contract's own check names them.
    """
    source = parquet_file(path, buffered=True)
    columns = [c for c in wanted if c in source.schema_arrow.names]
    try:
        for batch in source.iter_batches(batch_size=batch_rows, columns=columns,
                                         row_groups=row_groups):
            yield pa.Table.from_batches([batch]) if arrow else batch.to_pandas()
    except (pa.ArrowException, OSError) as err:
        raise unreadable(path, "Parquet", err) from None
    finally:
        pa.default_memory_pool().release_unused()  # the pool keeps what a pass freed (about 180 MB at 40 columns)


def csv_header(path: Path) -> pa.Schema:
    """Column names (checked unique and UTF-8) and the types pyarrow infers from the first block."""
    try:
        check_column_names(csv_column_names(path), str(path))
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                convert_options=ids_as_text())
    except (pa.ArrowException, OSError) as err:
        raise unreadable(path, "CSV", err) from None
    schema = reader.schema
    reader.close()
    return schema


def _csv_types(schema: pa.Schema, wanted: list[str]) -> dict[str, pa.DataType]:
    """First-block types, widened where a later block could need a wider one; ids are read as text."""
    types = {}
    for name in wanted:
        inferred = schema.field(name).type
        if name == USER_ID:
            types[name] = pa.string()
        elif pa.types.is_integer(inferred) or pa.types.is_null(inferred):
            types[name] = pa.float64()
        else:
            types[name] = inferred
    return types


def _csv_failure(path: Path, schema: pa.Schema, err: pa.ArrowInvalid,
                 given: dict[str, pa.DataType] | None) -> Exception:
    """The contract's error for a value a later block could not convert (:class:`NarrowType` for a given type)."""
    match = _CSV_ERROR.search(str(err))
    if match is None or int(match.group(1)) >= len(schema.names):
        return unreadable(path, "CSV", err)
    name, value = schema.names[int(match.group(1))], match.group(2)
    if name == USER_ID:  # read as text: only bytes that are not UTF-8 fail
        return DataError(f"{path}: column '{USER_ID}' has a value that is not valid UTF-8 ({value!r})")
    # the contract words the message (the in-memory reader would have read the column as text)
    error = cell_error(name, value, str(path)) or unreadable(path, "CSV", err)
    return NarrowType(name, error) if given is not None and name in given else error


def csv_frames(path: Path, wanted: Iterable[str], *, batch_rows: int, ids_as_text: bool = False,
               types: dict[str, pa.DataType] | None = None, arrow: bool = False) -> Iterator[pd.DataFrame]:
    """Batches of exactly ``batch_rows`` rows (the last may be shorter) of a CSV file; ``types`` as given."""
    schema = csv_header(path)
    columns = [c for c in wanted if c in schema.names]
    column_types = _csv_types(schema, columns) if types is None else {**types, USER_ID: pa.string()}
    convert = pacsv.ConvertOptions(include_columns=columns, column_types=column_types)
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                convert_options=convert)
        id_type = None
        for table in rebatch(reader, batch_rows):
            if USER_ID in table.schema.names and not ids_as_text:
                table = _with_batch_ids(table, id_type)
                id_type = table.schema.field(USER_ID).type
            yield table if arrow else table.to_pandas()
    except pa.ArrowInvalid as err:
        raise _csv_failure(path, schema, err, types) from None
    except (pa.ArrowException, OSError) as err:
        raise unreadable(path, "CSV", err) from None
    finally:
        pa.default_memory_pool().release_unused()


def _with_batch_ids(table: pa.Table, expected: pa.DataType | None) -> pa.Table:
    """A batch's text ids parsed as :func:`budgetalloc.data.contract.parse_text_ids` does for the whole column.

    Raises:
        IdsNotUniform: the batch's ids parse to another type than the first batch's
            (the whole column then has to be read as text, as the in-memory reader does).
    """
    i = table.schema.get_field_index(USER_ID)
    ids = parse_text_ids(table.column(i))
    if expected is not None and ids.type != expected:
        raise IdsNotUniform()
    return table.set_column(i, USER_ID, ids)


def rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Regroup record batches into tables of exactly ``rows`` rows; the last may be shorter."""
    pending, held = [], 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        while held >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def table_frames(path: Path, wanted: Iterable[str], *, batch_rows: int, ids_as_text: bool = False,
                 types: dict[str, pa.DataType] | None = None, arrow: bool = False) -> Iterator[pd.DataFrame]:
    """The wanted columns of a Parquet or CSV file (those it has) in batches of ``batch_rows``.

    ``types`` (CSV only) are the column types to read with; ``arrow`` yields Arrow tables.
    """
    check_file(path)
    wanted = list(wanted)
    if is_parquet(path):
        return parquet_frames(path, wanted, batch_rows=batch_rows, arrow=arrow)
    if path.suffix.lower() in CSV_SUFFIXES:
        return csv_frames(path, wanted, batch_rows=batch_rows, ids_as_text=ids_as_text, types=types, arrow=arrow)
    raise unsupported_format(path)


def ids_as_numpy(ids) -> np.ndarray:
    """Ids as :func:`budgetalloc.data.contract.population_from_frame` returns them (integers or object str)."""
    return ids if isinstance(ids, np.ndarray) else ids.to_numpy(zero_copy_only=False)


def id_keys(ids) -> np.ndarray:
    """A 64-bit key per id: the id itself (any integer width), or a (fixed-key, deterministic) hash of its text.

    Within one file every id has one type, so equal keys mean equal ids (or, for
    text, a hash collision that the exact comparison then tells apart).
    """
    if isinstance(ids, np.ndarray) and ids.dtype == np.int64:
        return ids.view(np.uint64)
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        return ids.astype(np.int64 if ids.dtype.kind == "i" else np.uint64).view(np.uint64)
    return pd.util.hash_array(ids_as_numpy(ids).astype(object))


def check_unique_ids(keys: np.ndarray, id_batches, source: str) -> None:
    """The contract's duplicate-id error for the first repeat, given every row's 64-bit key (:func:`id_keys`).

    ``keys`` is sorted in place. Only when some key repeats are the ids compared
    exactly: ``id_batches()`` gives the ids again, batch by batch in row order, and
    those whose keys repeat (equal ids, or a text hash collision) go through the
    contract's own check.
    """
    keys.sort()
    repeated = np.unique(keys[1:][keys[1:] == keys[:-1]])
    if repeated.size:
        suspects = [ids_as_numpy(ids)[np.isin(id_keys(ids), repeated)] for ids in id_batches()]
        user_ids(pd.DataFrame({USER_ID: np.concatenate(suspects)}), source)


def check_unique_file_ids(path: Path, keys: np.ndarray, *, batch_rows: int, ids_as_text: bool = False) -> None:
    """:func:`check_unique_ids` of a file, whose ``user_id`` column is read again only on a repeated key."""
    def ids():
        for frame in table_frames(path, [USER_ID], batch_rows=batch_rows, ids_as_text=ids_as_text):
            yield user_ids(frame, str(path))

    check_unique_ids(keys, ids, str(path))
