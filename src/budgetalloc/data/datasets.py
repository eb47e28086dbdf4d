"""Importers that map public uplift datasets into the trial contract.

Each (``criteo``, ``hillstrom``, ``mt-lift``) reads a LOCAL copy of a released CSV
(nothing is downloaded, ever) whose header must hold exactly the release's columns,
and writes a trial (Parquet, or CSV by suffix) that ``contract.load_trial`` accepts.
Invariants: the CSV is streamed into an atomic output, so an error leaves none; every
column is typed up front (a bad value is one :class:`DataError` naming it);
post-treatment columns are never features; no propensity column is written (all are
randomized trials). Why: docs/design.md; layouts, mappings, sources: docs/datasets.md.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from budgetalloc.data.contract import COST, RESPONSE, TREATMENT, USER_ID, check_column_names
from budgetalloc.errors import DataError
from budgetalloc.files import table_sinks

BLOCK_BYTES = 4 << 20  # Arrow reads up to 32 blocks ahead: at most ~128 MB in flight
ROW_GROUP_ROWS = 1 << 18
HILLSTROM_ARMS = {"No E-Mail": 0, "Mens E-Mail": 1, "Womens E-Mail": 2}
HILLSTROM_ZIP = {"Urban": "zip_urban", "Surburban": "zip_suburban", "Suburban": "zip_suburban",
                 "Rural": "zip_rural"}
HILLSTROM_CHANNEL = {"Phone": "channel_phone", "Web": "channel_web",
                     "Multichannel": "channel_multichannel"}
_HISTORY_RANK = re.compile(r"^\s*([1-7])\)")
_ARROW_COLUMN = re.compile(r"In CSV column #(\d+)")


@dataclass(frozen=True)
class ImportOptions:
    """Dataset-specific choices; ``None`` means the dataset's default."""

    response: str | None = None
    cost_per_email: float | None = None
    arm_costs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Layout:
    """A released file's columns and the types they are read with."""

    name: str
    types: dict[str, pa.DataType]
    responses: tuple[str, ...]  # allowed response columns, default first
    describe: str  # short layout description for error messages


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote."""

    dataset: str
    out: Path
    rows: int
    arm_rows: tuple[int, ...]
    arm_response: tuple[float, ...]  # mean response per arm
    arm_cost: tuple[float, ...]  # mean cost per arm
    response: str


def _floats(names) -> dict[str, pa.DataType]:
    return {name: pa.float64() for name in names}


def _layouts() -> dict[str, Layout]:
    criteo = _floats([f"f{i}" for i in range(12)] + ["treatment", "conversion", "visit", "exposure"])
    hill = _floats(["recency", "history", "mens", "womens", "newbie", "visit", "conversion", "spend"])
    hill.update({c: pa.string() for c in ("history_segment", "zip_code", "channel", "segment")})
    mt = _floats([f"f{i}" for i in range(99)] + ["treatment", "click", "conversion"])
    return {
        "criteo": Layout("criteo", criteo, ("conversion",),
                         "f0..f11, treatment, conversion, visit, exposure"),
        "hillstrom": Layout("hillstrom", hill, ("conversion", "visit", "spend"),
                            "recency, history_segment, history, mens, womens, zip_code, newbie, "
                            "channel, segment, visit, conversion, spend"),
        "mt-lift": Layout("mt-lift", mt, ("conversion", "click"),
                          "f0..f98, treatment, click, conversion"),
    }


LAYOUTS = _layouts()
DATASETS = tuple(LAYOUTS)


def parse_arm_costs(text: str) -> tuple[float, ...]:
    """Parse ``"0,1,2,3,4"`` into one finite cost >= 0 per arm, or a DataError."""
    try:
        costs = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise DataError(f"--arm-costs {text!r}: expected comma-separated numbers") from None
    if any(not math.isfinite(c) or c < 0 for c in costs):
        raise DataError(f"--arm-costs {text!r}: every cost must be a finite number >= 0")
    return costs


def resolve_options(dataset: str, options: ImportOptions) -> ImportOptions:
    """``options`` with every field ``dataset`` uses set; one that does not apply is an error."""
    if dataset not in LAYOUTS:
        raise DataError(f"unknown dataset '{dataset}' (expected one of: {', '.join(DATASETS)})")
    layout = LAYOUTS[dataset]
    response = options.response or layout.responses[0]
    if response not in layout.responses:
        raise DataError(f"{dataset}: --response must be one of {', '.join(layout.responses)}, "
                        f"got '{response}'")
    if options.cost_per_email is not None and dataset != "hillstrom":
        raise DataError(f"--cost-per-email applies only to hillstrom, not {dataset}")
    if options.arm_costs is not None and dataset != "mt-lift":
        raise DataError(f"--arm-costs applies only to mt-lift, not {dataset}")
    per_email = 1.0 if options.cost_per_email is None else float(options.cost_per_email)
    if not math.isfinite(per_email) or per_email < 0:
        raise DataError(f"--cost-per-email {per_email!r} must be a finite number >= 0")
    arm_costs = options.arm_costs if options.arm_costs is not None else (0.0, 1.0, 2.0, 3.0, 4.0)
    return ImportOptions(response=response, cost_per_email=per_email, arm_costs=tuple(arm_costs))


def check_header(names: list[str], layout: Layout, source: str) -> None:
    """Raise a one-line DataError unless ``names`` is exactly the layout's column set."""
    present = set(names)
    missing = [c for c in layout.types if c not in present]
    if missing:
        raise DataError(f"{source}: missing column '{missing[0]}' for the {layout.name} layout "
                        f"(expected {layout.describe})")
    extra = [c for c in names if c not in layout.types]
    if extra:
        raise DataError(f"{source}: unexpected column '{extra[0]}' for the {layout.name} layout "
                        f"(expected {layout.describe})")
    check_column_names(names, source)


def _arrow_detail(err: Exception, names: list[str] | None = None) -> str:
    """First line of an Arrow error, with ``CSV column #3`` replaced by the column's name."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    found = _ARROW_COLUMN.search(text)
    if names and found and int(found.group(1)) < len(names):
        text = f"column '{names[int(found.group(1))]}'" + text[found.end():]
    return text[:200]


def read_header(path: Path, *, max_bytes: int = 1 << 20) -> list[str]:
    """Column names on the first line of a CSV (``.gz`` decompressed by its suffix)."""
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            head = stream.read(max_bytes)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read file ({_arrow_detail(err)})") from None
    line = head.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r")
    return next(csv.reader([line]), [])


def read_batches(path: Path, layout: Layout, *, block_bytes: int = BLOCK_BYTES) -> Iterator[pa.RecordBatch]:
    """Check a released CSV's header now, then stream it in ``block_bytes`` blocks typed as
    ``layout.types`` (``.gz`` decompressed on the fly); a value that does not parse is a
    DataError naming its column when its block is read."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    names = read_header(path)
    check_header(names, layout, str(path))
    options = (pacsv.ReadOptions(block_size=block_bytes, use_threads=False),
               pacsv.ConvertOptions(column_types=layout.types))
    return _stream(path, layout.name, names, options)


def _stream(path: Path, name: str, names: list[str], options) -> Iterator[pa.RecordBatch]:
    try:
        yield from pacsv.open_csv(path, read_options=options[0], convert_options=options[1])
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable {name} CSV ({_arrow_detail(err, names)})") from None


def _column(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(name).to_numpy(zero_copy_only=False)


def _complete(values: np.ndarray, name: str, start: int, source: str) -> np.ndarray:
    """``values`` unchanged, or a DataError naming the first missing/infinite row."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{source}: column '{name}' has a missing or non-finite value at row "
                        f"{start + int(np.flatnonzero(bad)[0])}")
    return values


def _arms(values: np.ndarray, n_arms: int, start: int, source: str, hint: str = "") -> np.ndarray:
    """Treatment values as int64 arms in ``0..n_arms-1``, or a DataError."""
    values = _complete(values, TREATMENT, start, source)
    bad = (values != np.round(values)) | (values < 0) | (values > n_arms - 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: column '{TREATMENT}' has value {values[i]:g} at row {start + i} "
                        f"(expected an arm 0..{n_arms - 1}{hint})")
    return values.astype(np.int64)


def _categorical(values: np.ndarray, name: str, mapping: dict, start: int, source: str) -> list:
    """Each string mapped through ``mapping``; an unknown value is a DataError."""
    try:
        return [mapping[v] for v in values]
    except KeyError as err:
        i = int(np.flatnonzero(values == err.args[0])[0])
        expected = ", ".join(repr(k) for k in mapping)
        raise DataError(f"{source}: column '{name}' has unknown value {err.args[0]!r} at row "
                        f"{start + i} (expected {expected})") from None


def _history_rank(values: np.ndarray, start: int, source: str) -> np.ndarray:
    """Ordinal 1..7 of Hillstrom's ``history_segment`` labels ("3) $200 - $350")."""
    out = np.empty(len(values), dtype=np.float32)
    for i, label in enumerate(values):
        match = _HISTORY_RANK.match(label)
        if match is None:
            raise DataError(f"{source}: column 'history_segment' has unknown value {label!r} at row "
                            f"{start + i} (expected '1) $0 - $100' .. '7) $1,000 +')")
        out[i] = int(match.group(1))
    return out


def _trial_columns(start: int, features: dict, t: np.ndarray, response, cost) -> dict:
    cols = {USER_ID: np.arange(start, start + len(t), dtype=np.int64)}
    cols.update({k: np.asarray(v, dtype=np.float32) for k, v in features.items()})
    cols[TREATMENT] = t
    cols[RESPONSE] = np.asarray(response, dtype=np.float64)
    cols[COST] = np.asarray(cost, dtype=np.float64)
    return cols


def map_criteo(batch: pa.RecordBatch, start: int, opts: ImportOptions, source: str) -> dict:
    """Criteo block -> contract columns: response = conversion, cost = visit."""
    t = _arms(_column(batch, "treatment"), 2, start, source)
    features = {f"f{i}": _column(batch, f"f{i}") for i in range(12)}
    response = _complete(_column(batch, "conversion"), "conversion", start, source)
    cost = _complete(_column(batch, "visit"), "visit", start, source)
    if (cost < 0).any():
        raise DataError(f"{source}: column 'visit' has a negative value")
    return _trial_columns(start, features, t, response, cost)


def _one_hot(labels: list, names) -> dict[str, np.ndarray]:
    labels = np.asarray(labels, dtype=object)
    return {name: (labels == name).astype(np.float32) for name in dict.fromkeys(names)}


def map_hillstrom(batch: pa.RecordBatch, start: int, opts: ImportOptions, source: str) -> dict:
    """Hillstrom block -> contract columns: arms from ``segment``, constant e-mail cost."""
    arm = _categorical(_column(batch, "segment"), "segment", HILLSTROM_ARMS, start, source)
    t = np.asarray(arm, dtype=np.int64)
    features = {c: _column(batch, c) for c in ("recency", "history", "mens", "womens", "newbie")}
    features["history_segment"] = _history_rank(_column(batch, "history_segment"), start, source)
    zips = _categorical(_column(batch, "zip_code"), "zip_code", HILLSTROM_ZIP, start, source)
    channels = _categorical(_column(batch, "channel"), "channel", HILLSTROM_CHANNEL, start, source)
    features.update(_one_hot(zips, HILLSTROM_ZIP.values()))
    features.update(_one_hot(channels, HILLSTROM_CHANNEL.values()))
    response = _complete(_column(batch, opts.response), opts.response, start, source)
    cost = np.where(t > 0, opts.cost_per_email, 0.0)
    return _trial_columns(start, features, t, response, cost)


def map_mt_lift(batch: pa.RecordBatch, start: int, opts: ImportOptions, source: str) -> dict:
    """MT-LIFT block -> contract columns: cost = arm_costs[treatment] * conversion."""
    costs = np.asarray(opts.arm_costs, dtype=np.float64)
    t = _arms(_column(batch, "treatment"), len(costs), start, source, hint=", one per --arm-costs entry")
    features = {f"f{i}": _column(batch, f"f{i}") for i in range(99)}
    conversion = _complete(_column(batch, "conversion"), "conversion", start, source)
    response = _complete(_column(batch, opts.response), opts.response, start, source)
    return _trial_columns(start, features, t, response, costs[t] * conversion)


MAPPERS: dict[str, Callable[[pa.RecordBatch, int, ImportOptions, str], dict]] = {
    "criteo": map_criteo,
    "hillstrom": map_hillstrom,
    "mt-lift": map_mt_lift,
}


class _Tally:
    """Per-arm row, response and cost sums, accumulated block by block."""

    def __init__(self, n_arms: int) -> None:
        self.rows, self.response, self.cost = np.zeros((3, n_arms))

    def add(self, cols: dict) -> None:
        t, m = cols[TREATMENT], len(self.rows)
        self.rows += np.bincount(t, minlength=m)
        self.response += np.bincount(t, cols[RESPONSE], minlength=m)
        self.cost += np.bincount(t, cols[COST], minlength=m)

    def check(self, source: str) -> None:
        """Every arm must have rows (the contract needs them all)."""
        if self.rows.sum() == 0:
            raise DataError(f"{source}: table has no rows")
        empty = np.flatnonzero(self.rows == 0)
        if empty.size:
            raise DataError(f"{source}: arm {int(empty[0])} has no rows in column '{TREATMENT}'")


def import_dataset(dataset: str, src: str | Path, out: str | Path, options: ImportOptions | None = None,
                   *, block_bytes: int = BLOCK_BYTES, row_group_rows: int = ROW_GROUP_ROWS) -> ImportSummary:
    """Map a local public dataset file into a trial file, streaming and atomically.

    Args:
        dataset: ``criteo``, ``hillstrom`` or ``mt-lift``.
        src: the released CSV (optionally ``.gz``).
        out: trial file to write: Parquet, or CSV when the suffix is ``.csv``.
        options: response/cost choices (see :class:`ImportOptions`).
        block_bytes: CSV block size read at a time (Arrow reads up to 32 ahead).
        row_group_rows: Parquet row groups of this many rows.

    Returns:
        An :class:`ImportSummary`.

    Raises:
        DataError: layout mismatch or bad value, naming the file and column;
            ``out`` is then left untouched.
    """
    opts = resolve_options(dataset, options or ImportOptions())
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise DataError(f"{out}: output would overwrite the source file")
    n_arms = {"criteo": 2, "hillstrom": 3, "mt-lift": len(opts.arm_costs)}[dataset]
    mapper, tally, start = MAPPERS[dataset], _Tally(n_arms), 0
    batches = read_batches(src, LAYOUTS[dataset], block_bytes=block_bytes)  # checks the header now
    with table_sinks(out, rows=row_group_rows) as (sink,):
        for batch in batches:
            if batch.num_rows == 0:
                continue
            cols = mapper(batch, start, opts, str(src))
            tally.add(cols)
            sink.write(pa.table(cols))
            start += batch.num_rows
        tally.check(str(src))
    return ImportSummary(dataset, out, start, tuple(int(r) for r in tally.rows),
                         tuple(tally.response / tally.rows), tuple(tally.cost / tally.rows),
                         opts.response)
