"""A trial file's seeded fit and test parts, written as it is read in batches.

The test part is the rows ``sampling.split_mask`` marks for the row count
(``data.test_fraction``, ``seed + 2``: independent of the honest split, ``seed``,
and the student's holdout, ``seed + 1``). The trial is read once (a CSV is counted
first); each batch gets the contract's row-wise checks and its rows go to both parts'
temporaries; then the checks over all rows (ids unique, arms, every arm in both parts)
and the renames: on any error nothing is written. Every column is kept, with the type
the whole-file reader gives it; ids come out as they went in. Memory: 8 bytes a row
(id keys) and a byte (the split), plus a batch and each part's pending row group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from budgetalloc.data.contract import (
    MAX_ARMS,
    PROPENSITY,
    TRIAL_COLUMNS,
    USER_ID,
    check_arm_counts,
    check_file,
    trial_columns,
)
from budgetalloc.data.readers import (
    STREAM_BATCH_ROWS,
    IdsNotUniform,
    NarrowType,
    check_unique_file_ids,
    id_keys,
)
from budgetalloc.data.sampling import split_mask
from budgetalloc.data.sources import Source, file_source
from budgetalloc.errors import DataError, ParamsError
from budgetalloc.files import check_distinct, table_sinks
from budgetalloc.params import Params

TEST_SEED_OFFSET = 2
#: Rows per row group of the parts: a quarter of pyarrow's default, so that the rows
#: pending in both parts' sinks stay small; parts below it are ``write_table``'s bytes.
PART_ROW_GROUP = 1 << 18


def split_trial_file(trial: Path, fit: Path, test: Path, params: Params, *,
                     batch_rows: int = STREAM_BATCH_ROWS) -> tuple[int, int]:
    """Validate ``trial``, write its fit and test parts (Parquet, or CSV by suffix); their rows.

    Raises:
        DataError: the first contract violation, or a part without an arm (nothing is written).
    """
    if params.data.test_fraction <= 0:
        raise ParamsError("data.test_fraction must be > 0: the evaluate stage needs a test split")
    check_file(trial)
    check_distinct(fit, trial=trial, test=test)
    check_distinct(test, trial=trial)
    source = file_source(trial)
    columns = source.columns
    features = params.data.features
    numeric = set(columns) - {USER_ID} if features is None else {*TRIAL_COLUMNS, PROPENSITY, *features}
    source = source.whole_file_types(frozenset(numeric))
    while True:
        try:
            return _split(source, columns, (fit, test), params, batch_rows)
        except (IdsNotUniform, NarrowType) as retry:  # read again with the ids as text, or a wider type
            source = source.again(retry)


def _split(source: Source, columns: list[str], parts: tuple[Path, Path], params: Params,
           batch_rows: int) -> tuple[int, int]:
    n = source.n
    if n == 0:
        raise DataError(f"{source.name}: table has no rows")
    in_test = split_mask(n, fraction=params.data.test_fraction, seed=params.seed + TEST_SEED_OFFSET)
    keys = np.empty(n, dtype=np.uint64)
    counts = np.zeros((2, MAX_ARMS), dtype=np.int64)  # rows per arm: fit part, test part
    end, metadata = 0, None
    with table_sinks(*parts, rows=PART_ROW_GROUP) as sinks:
        for table in source.partitions()[0].batches(columns, batch_rows, arrow=True):
            start, end = end, end + table.num_rows
            if end > n:
                break
            cols = trial_columns(table.to_pandas(), features=params.data.features,
                                 source=source.name, first_row=start)
            keys[start:end] = id_keys(cols.user_id)
            metadata = metadata or pandas_metadata(table.schema)
            rows_of = (~in_test[start:end], in_test[start:end])
            for sink, count, rows in zip(sinks, counts, rows_of, strict=True):
                count += np.bincount(cols.treatment[rows], minlength=MAX_ARMS)
                sink.write(table.filter(pa.array(rows)).replace_schema_metadata(metadata))
        if end != n:
            raise DataError(f"{source.name}: the file changed while it was read ({n} rows before)")
        n_arms = check_arm_counts(counts.sum(axis=0), source.name)
        check_unique_file_ids(source.files[0], keys, batch_rows=batch_rows,
                              ids_as_text=source.ids_as_text)
        for path, count in zip(parts, counts, strict=True):
            if not count.any():
                raise DataError(f"{path}: table has no rows")
            check_arm_counts(count, str(path), n_arms=n_arms)
    return int(counts[0].sum()), int(counts[1].sum())


def pandas_metadata(schema: pa.Schema) -> dict:
    """The pandas metadata ``DataFrame.to_parquet`` would store for a table of ``schema``."""
    return pa.Table.from_pandas(schema.empty_table().to_pandas(), preserve_index=False).schema.metadata
