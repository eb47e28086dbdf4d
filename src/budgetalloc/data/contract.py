"""The data contract: load and validate trial and population tables.

A trial (a randomized incentive experiment) has ``user_id``, numeric feature
columns, ``treatment`` (int arm, 0 = control), ``response``, ``cost`` and an
optional ``propensity``. A population to allocate is the same without the last
four. Both may be Parquet or CSV. Every violation raises :class:`DataError` with
one line naming the file and the column or value; nothing is coerced silently.

Missing feature values are allowed: :class:`Preprocessor` imputes them with the
training medians it stores (and the count is reported), then standardises. In every
check ``source`` names the file in messages and ``first_row`` is a batch's first row.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from budgetalloc.errors import DataError

USER_ID = "user_id"
TREATMENT = "treatment"
RESPONSE = "response"
COST = "cost"
PROPENSITY = "propensity"
TRIAL_COLUMNS = (TREATMENT, RESPONSE, COST)
RESERVED = (USER_ID, TREATMENT, RESPONSE, COST, PROPENSITY)
MAX_ARMS = 64
_F32_MAX = float(np.finfo(np.float32).max)
#: Largest |response| and cost accepted: squares stay finite in float32 (the network's loss).
VALUE_LIMIT = 1e15
#: Smallest propensity accepted: inverse-propensity weights stay below a million.
MIN_PROPENSITY = 1e-6
#: Standardised features are clipped to this many standard deviations (float32 stays finite).
Z_LIMIT = 1e6
_CANONICAL_INT = r"^(0|-?[1-9][0-9]{0,18})$"
CSV_SUFFIXES = (".csv", ".txt", "")


@dataclass(frozen=True)
class Trial:
    """A validated randomized trial as typed arrays."""

    user_id: np.ndarray
    X: np.ndarray  # float32 (n, d), may hold NaN
    treatment: np.ndarray  # int32 (n,)
    response: np.ndarray  # float64 (n,)
    cost: np.ndarray  # float64 (n,)
    propensity: np.ndarray  # float64 (n,), probability of the received arm
    feature_names: tuple[str, ...]
    n_arms: int
    arm_shares: tuple[float, ...]
    binary_response: bool
    source: str = "<memory>"

    @property
    def n(self) -> int:
        return int(self.treatment.shape[0])

    @property
    def ipw(self) -> np.ndarray:
        """Inverse-propensity weights normalised so uniform assignment gives 1."""
        return 1.0 / (self.n_arms * self.propensity)

    def subset(self, index: np.ndarray) -> Trial:
        """The rows at ``index`` (a bool mask or integer array) as a new Trial."""
        rows = ("user_id", "X", "treatment", "response", "cost", "propensity")
        return replace(self, **{name: getattr(self, name)[index] for name in rows})


@dataclass(frozen=True)
class Population:
    """A validated population to allocate."""

    user_id: np.ndarray
    X: np.ndarray  # float32 (n, d) in the policy's feature order, may hold NaN
    feature_names: tuple[str, ...]
    source: str = "<memory>"

    @property
    def n(self) -> int:
        return int(self.user_id.shape[0])


def check_file(path: Path) -> None:
    """The checks made before reading a table: it exists, is a file, is not empty."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def read_table(path: str | Path) -> pd.DataFrame:
    """A Parquet or CSV file (by magic bytes or suffix) as a DataFrame; DataError if it is
    missing, unreadable or has no rows."""
    path = Path(path)
    check_file(path)
    table = _read_arrow(path)
    if table.num_rows == 0:
        raise DataError(f"{path}: table has no rows")
    return table.to_pandas()


def _read_arrow(path: Path) -> pa.Table:
    parquet = is_parquet(path)
    if not parquet and path.suffix.lower() not in CSV_SUFFIXES:
        raise unsupported_format(path)
    try:
        if parquet:
            table = pq.read_table(path)
            check_column_names(table.schema.names, str(path))
            return table
        check_column_names(csv_column_names(path), str(path))
        table = pacsv.read_csv(path, convert_options=ids_as_text())
        return with_parsed_ids(table)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        raise unreadable(path, "Parquet" if parquet else "CSV", err) from None


def is_parquet(path: Path) -> bool:
    """Parquet by magic bytes or suffix (else CSV, by a suffix in ``CSV_SUFFIXES``)."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return magic == b"PAR1" or path.suffix.lower() in (".parquet", ".pq")


def unreadable(path: Path, kind: str, err: Exception) -> DataError:
    """The readers' one error for a file that is not a readable ``kind`` (Parquet, CSV) file."""
    detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return DataError(f"{path}: not a readable {kind} file ({detail})")


def unsupported_format(path: Path) -> DataError:
    """The readers' one error for a file neither Parquet nor CSV."""
    return DataError(f"{path}: unsupported format '{path.suffix.lower()}' (expected .parquet or .csv)")


def csv_column_names(path: Path) -> list[str]:
    """A CSV file's column names, as pyarrow reads its header, checked to be UTF-8.

    pyarrow would replace an undecodable byte silently (a name no one typed).
    """
    with open(path, "rb") as fh:
        header = fh.read(1 << 20).split(b"\n", 1)[0]
    try:
        header.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: the header is not valid UTF-8 (byte {header[err.start:err.start + 1]!r} at "
                        f"offset {err.start}); save the file as UTF-8") from None
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 20),
                            convert_options=ids_as_text())
    try:
        return list(reader.schema.names)
    finally:
        reader.close()


def ids_as_text() -> pacsv.ConvertOptions:
    """CSV conversion options that read ``user_id`` as text (for :func:`parse_text_ids`)."""
    return pacsv.ConvertOptions(column_types={USER_ID: pa.string()})


def check_column_names(names: list[str], source: str) -> None:
    """Column names are unique (a repeated name would make a column ambiguous)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataError(f"{source}: duplicate column name {name!r} (columns {seen[name] + 1} and {i + 1})")
        seen[name] = i


def parse_text_ids(ids: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Ids read as text (CSV): int64 if every id is the canonical text of an int64, else the text.

    Canonical means what ``str(int(text))`` gives back, so ``007``, ``+5``, ``1e3`` or
    ids beyond the int64 range stay text and come out exactly as they went in.
    """
    if len(ids) == 0 or not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
        return ids
    if not pc.all(pc.match_substring_regex(ids, _CANONICAL_INT)).as_py():
        return ids
    try:
        return pc.cast(ids, pa.int64())
    except pa.ArrowInvalid:  # 19 digits beyond the int64 range
        return ids


def with_parsed_ids(table: pa.Table) -> pa.Table:
    """``table`` with its text ``user_id`` column parsed by :func:`parse_text_ids`."""
    if USER_ID not in table.schema.names:
        return table
    i = table.schema.get_field_index(USER_ID)
    return table.set_column(i, USER_ID, parse_text_ids(table.column(i)))


def _case_variant(name: str, columns) -> str | None:
    """A column that differs from the reserved ``name`` only in case or spaces, if any."""
    return next((c for c in columns if isinstance(c, str) and c != name and c.strip().lower() == name), None)


def _require(df: pd.DataFrame, names, source: str) -> None:
    """Every reserved column of ``names`` is present, or an error naming the first missing one."""
    for name in names:
        if name not in df.columns:
            variant = _case_variant(name, df.columns)
            hint = f" (found {variant!r}: names are case-sensitive)" if variant is not None else ""
            raise DataError(f"{source}: missing column '{name}'{hint}")


def feature_columns(df: pd.DataFrame, features: tuple[str, ...] | None, source: str) -> tuple[str, ...]:
    """The feature columns: ``features`` if given, else every non-reserved column."""
    if features is None:
        for reserved in RESERVED:
            variant = _case_variant(reserved, df.columns)
            if variant is not None:
                raise DataError(f"{source}: column {variant!r} is not the reserved column '{reserved}' (names are "
                                "case-sensitive) and would be used as a feature; rename it, or list the "
                                "features in data.features")
        names = tuple(c for c in df.columns if c not in RESERVED)
    else:
        names = tuple(features)
        missing = [c for c in names if c not in df.columns]
        if missing:
            raise DataError(f"{source}: missing feature column '{missing[0]}'")
    if not names:
        raise DataError(f"{source}: no feature columns")
    return names


def feature_matrix(df: pd.DataFrame, names: tuple[str, ...], source: str) -> np.ndarray:
    """The ``names`` columns as a ``(len(df), len(names))`` float32 matrix (missing values stay
    NaN); DataError for a non-numeric column (naming its first bad value), an infinite
    value, or one beyond float32 range."""
    out = np.empty((len(df), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        col = _null_as_float(df[name])
        if col.dtype == bool:
            col = col.astype(np.float64)
        if not pd.api.types.is_numeric_dtype(col.dtype):
            bad = _first_non_numeric(col)
            raise DataError(f"{source}: feature column '{name}' is not numeric (value {_show(bad)})")
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isinf(values).any():
            raise DataError(f"{source}: feature column '{name}' has infinite values")
        if (np.abs(values) > _F32_MAX).any():
            raise DataError(f"{source}: feature column '{name}' has values beyond float32 range")
        out[:, j] = values
    return out


def _null_as_float(col: pd.Series) -> pd.Series:
    """A column with no values at all (CSV readers type it as null) as float NaN."""
    return col.astype(np.float64) if col.isna().all() else col


def _show(value) -> str:
    """repr of a cell value without numpy's type wrappers."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _first_non_numeric(col: pd.Series):
    coerced = pd.to_numeric(col, errors="coerce")
    bad = col[coerced.isna() & col.notna()]
    return bad.iloc[0] if len(bad) else col.iloc[0]


def user_ids(df: pd.DataFrame, source: str, first_row: int = 0) -> np.ndarray:
    """The ``user_id`` column, checked present, complete, unique and of a type that round-trips.

    Returns:
        The ids as integers of the column's own width (``int8`` .. ``uint64``, so
        they are written back exactly), else as ``str`` objects.

    Raises:
        DataError: the column is missing, has missing or empty values, is of a
            type that would not come out as it went in (floats, booleans, dates,
            bytes), or repeats an id (naming the first repeat in row order).
    """
    _require(df, (USER_ID,), source)
    ids = df[USER_ID]
    missing = ids.isna().to_numpy()
    if missing.any():
        row = first_row + int(np.flatnonzero(missing)[0])
        raise DataError(f"{source}: column '{USER_ID}' has missing values (row {row})")
    values = _id_values(ids, source)
    if values.dtype == object:
        empty = np.flatnonzero(values == "")
        if empty.size:
            raise DataError(f"{source}: column '{USER_ID}' has an empty id at row {first_row + int(empty[0])}")
    dup = ids.duplicated().to_numpy()
    if dup.any():
        raise DataError(f"{source}: duplicate {USER_ID} {_show(values[dup][0])}")
    return values


def _id_values(ids: pd.Series, source: str) -> np.ndarray:
    """The ids as a numpy array of their own integer width, or of ``str`` objects."""
    if isinstance(ids.dtype, pd.CategoricalDtype):
        ids = ids.astype(object)
    if pd.api.types.is_integer_dtype(ids.dtype) and not pd.api.types.is_extension_array_dtype(ids.dtype):
        return ids.to_numpy()
    if pd.api.types.is_integer_dtype(ids.dtype):
        return ids.to_numpy(dtype=ids.dtype.numpy_dtype)
    kind = pd.api.types.infer_dtype(ids, skipna=False)
    if kind == "string":
        return ids.to_numpy(dtype=object)
    what = {"floating": "floating-point numbers", "boolean": "booleans", "bytes": "bytes",
            "mixed-integer": "a mix of numbers and text", "integer": "integers wider than 64 bits"}.get(
        kind, str(ids.dtype) if kind != "mixed" else "a mix of types")
    raise DataError(f"{source}: column '{USER_ID}' holds {what}; ids must be integers (of any width up to "
                    "64 bits) or text, which come out exactly as they went in")


def _treatment(df: pd.DataFrame, source: str) -> np.ndarray:
    """The ``treatment`` column as int32 arms, checked row by row."""
    col = df[TREATMENT]
    if col.isna().any():
        raise DataError(f"{source}: column '{TREATMENT}' has missing values")
    if not pd.api.types.is_numeric_dtype(col.dtype) or col.dtype == bool:
        raise DataError(f"{source}: column '{TREATMENT}' must be integer (value {_show(_first_non_numeric(col))})")
    values = col.to_numpy(dtype=np.float64)
    frac = ~np.isfinite(values) | (values != np.round(values))
    if frac.any():
        raise DataError(f"{source}: column '{TREATMENT}' must be integer (value {_show(values[frac][0])})")
    if (values < 0).any():
        raise DataError(f"{source}: column '{TREATMENT}' has negative arm {int(values.min())}")
    if (values > MAX_ARMS - 1).any():
        raise DataError(f"{source}: column '{TREATMENT}' has arm {_show(values.max())}, more than {MAX_ARMS} arms")
    return values.astype(np.int32)


def check_arm_counts(counts: np.ndarray, source: str, n_arms: int | None = None) -> int:
    """The checks over all rows of a trial, from its rows per arm ``counts``: control rows exist and
    no arm below ``n_arms`` (default: the highest present + 1) is empty. Returns the arms."""
    n_arms = int(np.flatnonzero(counts)[-1]) + 1 if n_arms is None else n_arms
    if counts[0] == 0:
        raise DataError(f"{source}: no control rows (arm 0) in column '{TREATMENT}'")
    if n_arms == 1:
        raise DataError(f"{source}: only one arm (every row has treatment 0): a trial needs the control "
                        "and at least one treated arm")
    empty = np.flatnonzero(counts[:n_arms] == 0)
    if empty.size:
        raise DataError(f"{source}: arm {int(empty[0])} has no rows in column '{TREATMENT}'")
    return n_arms


def _numeric_target(df: pd.DataFrame, name: str, source: str, first_row: int = 0) -> np.ndarray:
    col = _null_as_float(df[name])
    if not pd.api.types.is_numeric_dtype(col.dtype):
        raise DataError(f"{source}: column '{name}' is not numeric (value {_show(_first_non_numeric(col))})")
    values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(values).any():
        row = first_row + int(np.flatnonzero(np.isnan(values))[0])
        raise DataError(f"{source}: column '{name}' has NaN at row {row}")
    if np.isinf(values).any():
        row = first_row + int(np.flatnonzero(np.isinf(values))[0])
        raise DataError(f"{source}: column '{name}' has infinite values (row {row})")
    if name != PROPENSITY:
        big = np.abs(values) > VALUE_LIMIT
        if big.any():
            row = int(np.flatnonzero(big)[0])
            raise DataError(f"{source}: column '{name}' value {values[row]:.6g} at row {first_row + row} is beyond "
                            f"{VALUE_LIMIT:.0e}, more than the fit computes with in float32 (rescale the column)")
    return values


def _propensity_column(df: pd.DataFrame, source: str, first_row: int = 0) -> np.ndarray | None:
    """The ``propensity`` column checked in [MIN_PROPENSITY, 1], or None when the table has none."""
    if PROPENSITY not in df.columns:
        return None
    p = _numeric_target(df, PROPENSITY, source, first_row)
    bad = (p <= 0) | (p > 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: column '{PROPENSITY}' value {_show(p[row])} outside (0, 1] (row {first_row + row})")
    tiny = p < MIN_PROPENSITY
    if tiny.any():
        row = int(np.flatnonzero(tiny)[0])
        raise DataError(f"{source}: column '{PROPENSITY}' value {p[row]:.6g} at row {first_row + row} is below "
                        f"{MIN_PROPENSITY:g}: its weight 1/(arms * propensity) would overflow the weighted fit")
    return p


class TrialColumns(NamedTuple):
    """A trial's columns after the checks that hold row by row (any batch of a file)."""

    user_id: np.ndarray
    treatment: np.ndarray  # int32
    response: np.ndarray  # float64
    cost: np.ndarray  # float64
    X: np.ndarray  # float32 (n, d)
    feature_names: tuple[str, ...]
    propensity: np.ndarray | None  # None when the table has no propensity column


def trial_columns(df: pd.DataFrame, *, features: tuple[str, ...] | None = None, source: str = "<memory>",
                  first_row: int = 0, whole: bool = False) -> TrialColumns:
    """The trial contract's checks that hold row by row, so they apply to each batch of a file
    (``whole``: ``df`` is the whole table, check its arms too).

    A reader of batches checks the rest over all rows: ids unique across batches,
    :func:`check_arm_counts`, :func:`arm_propensity`.
    """
    _require(df, TRIAL_COLUMNS, source)
    ids = user_ids(df, source, first_row)
    t = _treatment(df, source)
    if whole:
        check_arm_counts(np.bincount(t), source)
    response = _numeric_target(df, RESPONSE, source, first_row)
    cost = _numeric_target(df, COST, source, first_row)
    if (cost < 0).any():
        row = int(np.flatnonzero(cost < 0)[0])
        raise DataError(f"{source}: column '{COST}' has negative value {_show(cost[row])} (row {first_row + row})")
    names = feature_columns(df, features, source)
    X = feature_matrix(df, names, source)
    return TrialColumns(ids, t, response, cost, X, names, _propensity_column(df, source, first_row))


def arm_propensity(treatment: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The propensity of a trial without the column: each row's arm's share of all rows."""
    return (counts / treatment.shape[0])[treatment]


def cell_error(name: str, value, source: str) -> DataError | None:
    """The contract's error for one bad cell of column ``name`` (None if it passes): a reader's wording."""
    frame = pd.DataFrame({name: pd.Series([value], dtype=object)})
    try:
        if name == TREATMENT:
            _treatment(frame, source)
        elif name in (RESPONSE, COST, PROPENSITY):
            _numeric_target(frame, name, source)
        else:
            feature_matrix(frame, (name,), source)
    except DataError as bad:
        return bad
    return None


def trial_from_frame(
    df: pd.DataFrame, *, features: tuple[str, ...] | None = None, source: str = "<memory>"
) -> Trial:
    """Validate a trial DataFrame against the contract (``features``: default every non-reserved
    column); DataError on the first violation, naming the column and value."""
    if len(df) == 0:
        raise DataError(f"{source}: table has no rows")
    cols = trial_columns(df, features=features, source=source, whole=True)
    counts = np.bincount(cols.treatment)
    if cols.propensity is None:
        cols = cols._replace(propensity=arm_propensity(cols.treatment, counts))
    shares = tuple(float(s) for s in counts / cols.treatment.shape[0])
    return Trial(**cols._asdict(), n_arms=len(counts), arm_shares=shares,
                 binary_response=bool(np.isin(cols.response, (0.0, 1.0)).all()), source=source)


def load_trial(path: str | Path, *, features: tuple[str, ...] | None = None) -> Trial:
    """Load and validate a trial file (Parquet or CSV). See :func:`trial_from_frame`."""
    return trial_from_frame(read_table(path), features=features, source=str(path))


def population_from_frame(
    df: pd.DataFrame, feature_names: tuple[str, ...], *, source: str = "<memory>", first_row: int = 0
) -> Population:
    """Validate a population table (extra columns are ignored) into a :class:`Population` whose
    ``X`` follows ``feature_names``, the policy's features in its order."""
    if len(df) == 0:
        raise DataError(f"{source}: table has no rows")
    ids = user_ids(df, source, first_row)
    names = feature_columns(df, tuple(feature_names), source)
    return Population(user_id=ids, X=feature_matrix(df, names, source), feature_names=names, source=source)


def load_population(path: str | Path, feature_names: tuple[str, ...]) -> Population:
    """Load and validate a population file. See :func:`population_from_frame`."""
    return population_from_frame(read_table(path), feature_names, source=str(path))


#: The preprocessor works on blocks of this many columns (fit) and rows (transform), so its
#: float64 temporaries are a block's, not the matrix's; every value is the same.
PREPROCESS_COLUMNS = 8
PREPROCESS_ROWS = 65_536


@dataclass(frozen=True)
class Preprocessor:
    """Median imputation then standardisation, fitted on training rows."""

    medians: np.ndarray
    means: np.ndarray
    scales: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> Preprocessor:
        """Learn medians, means and scales from ``X`` (NaN allowed; all-NaN columns get 0).

        Column by column (a block of ``PREPROCESS_COLUMNS`` at a time): each column's
        median, mean and standard deviation are the whole matrix's reductions.
        """
        blocks = [_column_moments(X[:, j:j + PREPROCESS_COLUMNS]) for j in range(0, X.shape[1], PREPROCESS_COLUMNS)]
        medians, means, scales = (np.concatenate(part) for part in zip(*blocks, strict=True))
        return cls(medians=medians, means=means, scales=np.where(scales > 1e-12, scales, 1.0))

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Impute NaN with the stored medians and standardise; float32 out (row blocks, each row on its own)."""
        out = np.empty(X.shape, dtype=np.float32)
        for i in range(0, X.shape[0], PREPROCESS_ROWS):
            block = X[i:i + PREPROCESS_ROWS]
            z = np.where(np.isnan(block), self.medians.astype(block.dtype), block) - self.means  # float64
            z /= self.scales
            np.clip(z, -Z_LIMIT, Z_LIMIT, out=z)  # the identity but for absurd outliers: float32 stays finite
            out[i:i + PREPROCESS_ROWS] = z
        return out

    def to_json(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("medians", "means", "scales")}

    @classmethod
    def from_json(cls, raw: dict) -> Preprocessor:
        return cls(**{k: np.asarray(raw[k], dtype=np.float64) for k in ("medians", "means", "scales")})


def _column_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Medians (0 where a column is all missing), means and standard deviations of the columns, in float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        medians = np.nanmedian(X.astype(np.float64), axis=0)
    medians = np.where(np.isnan(medians), 0.0, medians)
    filled = np.where(np.isnan(X), medians, X)  # float64
    return medians, filled.mean(axis=0), filled.std(axis=0)


def arm_summary(trial: Trial) -> pd.DataFrame:
    """Rows, share, mean response and mean cost per arm."""
    counts = np.bincount(trial.treatment, minlength=trial.n_arms)
    resp = np.bincount(trial.treatment, weights=trial.response, minlength=trial.n_arms)
    cost = np.bincount(trial.treatment, weights=trial.cost, minlength=trial.n_arms)
    return pd.DataFrame(
        {
            "arm": np.arange(trial.n_arms),
            "rows": counts,
            "share": counts / trial.n,
            "mean_response": resp / counts,
            "mean_cost": cost / counts,
        }
    )
