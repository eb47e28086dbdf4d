"""Seeded row samples and splits, shared by the in-memory and the streamed fit.

Both fits choose rows by position from the row count alone, so the streamed fit,
which knows the count from the Parquet metadata before reading a row, picks the
very rows the in-memory fit picks. Samples use their own seed streams
(``(seed, tag)``), so adding one never moves another.
"""

from __future__ import annotations

import numpy as np

# Seed-stream tags of the samples (the splits keep their historical seed, seed + 1).
TRAIN_SAMPLE, STUDENT_SAMPLE, PREPROCESS_SAMPLE, CLIP_SAMPLE = 1, 2, 3, 4


def split_mask(n: int, *, fraction: float, seed: int) -> np.ndarray:
    """A seeded bool mask marking ``round(n * fraction)`` of ``n`` rows: the first ones of a seeded
    permutation (8 bytes a row while it is cut)."""
    perm = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[perm[: round(n * fraction)]] = True
    return mask


def seeded_sample(n: int, size: int, seed) -> np.ndarray | None:
    """Sorted positions of a seeded sample of ``size`` of ``n`` rows; ``None`` when ``n <= size`` (all rows).

    Args:
        n: rows to choose from.
        size: the cap.
        seed: an int or a tuple of ints (a seed stream).
    """
    if n <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def capped(rows: np.ndarray, cap: int, seed) -> np.ndarray:
    """``rows`` (sorted positions), or a seeded sample of ``cap`` of them (sorted)."""
    chosen = seeded_sample(len(rows), cap, seed)
    return rows if chosen is None else rows[chosen]
