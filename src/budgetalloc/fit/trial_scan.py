"""Pass 1 of the fit: every row's roles, the row source (a Parquet trial or arrays) checked by batch, samples kept.

:func:`row_roles` draws every row's roles from the row count alone, with the very
functions the in-memory fit splits and samples with (one byte a row): honest,
holdout, and membership of the preprocessor's, network's, student's and winsorize
bands' samples. :func:`scan_trial` reads the file once: each batch gets the trial
contract's row-wise checks (row numbers from the file's start); kept are an 8-byte
key per id, the arm counts and the sampled rows. Then the checks over all rows (ids
unique, arm 0 present, no arm empty). A file with several faults may report another
one first than the whole-file loader, never none.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetalloc.data.contract import (
    MAX_ARMS,
    PROPENSITY,
    RESERVED,
    Trial,
    TrialColumns,
    check_arm_counts,
    check_file,
    feature_columns,
    feature_matrix,
    is_parquet,
    trial_columns,
)
from budgetalloc.data.readers import check_unique_file_ids, id_keys, parquet_file
from budgetalloc.data.sampling import (
    PREPROCESS_SAMPLE,
    STUDENT_SAMPLE,
    TRAIN_SAMPLE,
    capped,
    seeded_sample,
    split_mask,
)
from budgetalloc.data.sources import Source, file_source, memory_source
from budgetalloc.errors import DataError
from budgetalloc.method.statistics import clip_sample_rows
from budgetalloc.params import Params

# Role bits, one byte per row.
HONEST, HOLDOUT, PREPROCESS, NETWORK, STUDENT, CLIP = 1, 2, 4, 8, 16, 32
HELD = PREPROCESS | NETWORK | STUDENT  # rows whose features pass 1 keeps


@dataclass(frozen=True)
class TrialRows:
    """A trial as the fit reads it: a :class:`~budgetalloc.data.sources.Source` (a Parquet file, or a
    validated :class:`~budgetalloc.data.contract.Trial` in memory) in batches of ``batch_rows``.

    Both kinds yield the same rows, so every pass gives the same result over either (a
    Trial's propensity is its own column, or each arm's share: the same weights).
    """

    source: Source
    n: int
    feature_names: tuple[str, ...]
    has_propensity: bool
    batch_rows: int

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def needs_id_keys(self) -> bool:
        """Pass 1 keeps every row's id key for :meth:`check_ids` (a Trial's ids were checked when it was built)."""
        return self.source.record is None

    def _batches(self, wanted: list[str]) -> Iterator:
        for batch in self.source.partitions()[0].batches(wanted, self.batch_rows):
            if isinstance(batch, Trial):
                yield from (batch.subset(slice(i, i + self.batch_rows)) for i in range(0, batch.n, self.batch_rows))
            else:
                yield batch

    def checked(self) -> Iterator[tuple[int, TrialColumns | Trial]]:
        """``(first row, columns)`` of every batch, through the contract's row-wise checks."""
        start = 0
        for batch in self._batches([*RESERVED, *self.feature_names]):
            cols = batch if isinstance(batch, Trial) else trial_columns(
                batch, features=self.feature_names, source=self.name, first_row=start)
            yield start, cols
            start += cols.treatment.shape[0]

    def features(self) -> Iterator[np.ndarray]:
        """The feature matrix of every batch, in row order (only the feature columns are read)."""
        for batch in self._batches(list(self.feature_names)):
            yield batch.X if isinstance(batch, Trial) else feature_matrix(batch, self.feature_names, self.name)

    def check_ids(self, keys: np.ndarray) -> None:
        """Ids unique over the whole file, from every row's key (:func:`check_unique_file_ids`)."""
        if self.needs_id_keys:
            check_unique_file_ids(self.source.files[0], keys, batch_rows=self.batch_rows)


def memory_trial(trial: Trial, batch_rows: int) -> TrialRows:
    """A validated in-memory trial as the fit's row source."""
    return TrialRows(memory_source(trial), trial.n, trial.feature_names, True, batch_rows)


def parquet_rows(path: str | Path) -> int | None:
    """Rows of a Parquet file from its metadata; ``None`` for another format."""
    path = Path(path)
    check_file(path)
    return parquet_file(path).metadata.num_rows if is_parquet(path) else None


def open_trial(path: str | Path, params: Params, *, batch_rows: int) -> TrialRows:
    """A Parquet trial as the fit's row source, with the contract's checks on its columns.

    Raises:
        DataError: not a readable Parquet file, no rows, or missing feature columns.
    """
    path = Path(path)
    n = parquet_rows(path)
    if n is None:
        raise DataError(f"{path}: the streamed fit reads Parquet files only (convert it, or fit in memory)")
    if n == 0:
        raise DataError(f"{path}: table has no rows")
    empty = parquet_file(path).schema_arrow.empty_table().to_pandas()
    names = feature_columns(empty, params.data.features, str(path))
    return TrialRows(file_source(path), n, names, PROPENSITY in empty.columns, batch_rows)


def honest_mask(n: int, params: Params) -> np.ndarray:
    """Which of ``n`` trial rows are honest: ``data.honest_fraction``, ``seed``."""
    return split_mask(n, fraction=params.data.honest_fraction, seed=params.seed)


def holdout_mask(n: int, params: Params) -> np.ndarray:
    """Which of ``n`` trial rows the student never sees: ``distill.holdout_fraction``, ``seed + 1``."""
    return split_mask(n, fraction=params.distill.holdout_fraction, seed=params.seed + 1)


def student_sample(rows: np.ndarray, params: Params) -> np.ndarray:
    """The rows the student learns from: a seeded sample of at most ``distill.max_rows`` of ``rows``."""
    return capped(rows, params.distill.max_rows, (params.seed, STUDENT_SAMPLE))


def network_rows(train_idx: np.ndarray, params: Params) -> np.ndarray:
    """The train rows the network learns from: a seeded sample of at most ``train.max_rows``."""
    return capped(train_idx, params.train.max_rows, (params.seed, TRAIN_SAMPLE))


def row_roles(n: int, params: Params) -> np.ndarray:
    """Every row's roles (bits), drawn from the row count as the in-memory fit draws them.

    Memory: one byte a row, plus the split's permutation (8 bytes a row) while it is drawn.
    """
    roles = np.zeros(n, dtype=np.uint8)
    honest = honest_mask(n, params)
    roles[honest] |= HONEST
    roles[network_rows(np.flatnonzero(~honest), params)] |= NETWORK
    honest_idx = np.flatnonzero(honest)
    del honest
    clip = clip_sample_rows(len(honest_idx), params.statistics, params.seed)
    roles[honest_idx if clip is None else honest_idx[clip]] |= CLIP
    del honest_idx
    holdout = holdout_mask(n, params)
    roles[holdout] |= HOLDOUT
    roles[student_sample(np.flatnonzero(~holdout), params)] |= STUDENT
    pre = seeded_sample(n, params.data.preprocess_sample, (params.seed, PREPROCESS_SAMPLE))
    roles[slice(None) if pre is None else pre] |= PREPROCESS
    return roles


@dataclass(frozen=True)
class TrialFacts:
    """What the fit needs of the whole trial (the in-memory ``Trial``'s scalars)."""

    n: int
    n_arms: int
    feature_names: tuple[str, ...]
    binary_response: bool
    arm_counts: np.ndarray  # (n_arms,) rows per arm
    missing: int  # missing feature values

    def ipw(self, treatment: np.ndarray, propensity: np.ndarray | None) -> np.ndarray:
        """Inverse-propensity weights, as ``Trial.ipw`` (default propensity: the arm's share)."""
        p = (self.arm_counts / self.n)[treatment] if propensity is None else propensity
        return 1.0 / (self.n_arms * p)


@dataclass
class Rows:
    """Rows kept in memory, in file order: roles, features and outcomes."""

    roles: np.ndarray  # uint8
    X: np.ndarray | None  # float32 (r, d), may hold NaN; None where only outcomes are kept
    treatment: np.ndarray  # int32
    response: np.ndarray  # float64
    cost: np.ndarray  # float64
    propensity: np.ndarray | None  # float64, None when the file has no such column

    @classmethod
    def empty(cls, roles: np.ndarray, d: int | None, with_propensity: bool) -> Rows:
        r = roles.shape[0]
        return cls(roles, None if d is None else np.empty((r, d), np.float32), np.empty(r, np.int32),
                   np.empty(r), np.empty(r), np.empty(r) if with_propensity else None)

    def fill(self, at: int, cols, keep: np.ndarray) -> int:
        """Copy the ``keep`` rows of a batch's columns to position ``at``; returns the next position."""
        end = at + int(np.count_nonzero(keep))
        if self.X is not None:
            self.X[at:end] = cols.X[keep]
        for name in ("treatment", "response", "cost", "propensity"):
            target = getattr(self, name)
            if target is not None:
                target[at:end] = getattr(cols, name)[keep]
        return end

    def having(self, role: int) -> np.ndarray:
        """Mask of the kept rows with ``role``."""
        return (self.roles & role) != 0


@dataclass
class Scan:
    """What pass 1 keeps."""

    facts: TrialFacts
    held: Rows  # the samples (of ``scan_trial``'s ``held_roles``): preprocessor, network, student
    clip: Rows  # the winsorize bands' sample (outcomes only)


def scan_trial(trial: TrialRows, roles: np.ndarray, held_roles: int = HELD) -> Scan:
    """Pass 1: check every batch, keep the samples (those of ``held_roles``); then the checks over all rows.

    Raises:
        DataError: the first contract violation, as one line naming file, column and value.
    """
    d = len(trial.feature_names)
    held = Rows.empty(roles[(roles & held_roles) != 0], d, trial.has_propensity)
    clip = Rows.empty(roles[(roles & CLIP) != 0], None, False)
    keys = np.empty(trial.n if trial.needs_id_keys else 0, dtype=np.uint64)
    counts = np.zeros(MAX_ARMS, dtype=np.int64)
    binary, missing, at_held, at_clip, end = True, 0, 0, 0, 0
    for start, cols in trial.checked():
        end = start + cols.treatment.shape[0]
        if end > trial.n:
            break
        if trial.needs_id_keys:
            keys[start:end] = id_keys(cols.user_id)
        counts += np.bincount(cols.treatment, minlength=MAX_ARMS)
        binary = binary and bool(np.isin(cols.response, (0.0, 1.0)).all())
        missing += int(np.isnan(cols.X).sum())
        r = roles[start:end]
        at_held = held.fill(at_held, cols, (r & held_roles) != 0)
        at_clip = clip.fill(at_clip, cols, (r & CLIP) != 0)
    if end != trial.n:
        raise DataError(f"{trial.name}: the file changed while it was read ({trial.n} rows in its metadata)")
    n_arms = check_arm_counts(counts, trial.name)
    trial.check_ids(keys)
    facts = TrialFacts(trial.n, n_arms, trial.feature_names, binary, counts[:n_arms], missing)
    return Scan(facts, held, clip)


