"""Fixed-size row blocks: results that do not depend on how the input was batched.

A sum of floating-point numbers depends on its order, a seeded random draw on how
many numbers were drawn before it, and a compiled forward pass (XLA) on the shape
it runs at. So the fit computes everything that must come out the same, whether the
rows arrive as one in-memory array or as Parquet batches of any size, over blocks of
a fixed number of rows counted from the first row: the cluster statistics' sums and
bootstrap draws (:mod:`budgetalloc.method.statistics`), the k-means moments and
``partial_fit`` batches (:mod:`budgetalloc.method.clustering`), and the forward passes of
the streamed fit (:mod:`budgetalloc.fit.fit_stream`), which pad their last block to the
shape the in-memory call compiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

Rows = tuple[np.ndarray, ...]  # equal-length arrays, one row each


class Rebatcher:
    """Rows pushed in chunks of any size come out in blocks of exactly ``size`` rows.

    Holds at most ``size - 1`` rows between calls (views of the chunks pushed,
    copied only when a block spans two chunks).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending: list[Rows] = []
        self._held = 0

    def push(self, *arrays: np.ndarray) -> Iterator[Rows]:
        """The complete blocks that ``arrays`` (a chunk of rows) finishes, in row order."""
        n, start = len(arrays[0]), 0
        if self._held:
            take = min(self.size - self._held, n)
            self._pending.append(tuple(a[:take] for a in arrays))
            self._held += take
            start = take
            if self._held < self.size:
                return
            yield _joined(self._pending)
            self._pending, self._held = [], 0
        while n - start >= self.size:
            yield tuple(a[start : start + self.size] for a in arrays)
            start += self.size
        if start < n:
            self._pending, self._held = [tuple(a[start:] for a in arrays)], n - start

    def flush(self) -> Rows | None:
        """The last, shorter block (``None`` when nothing is held)."""
        if not self._held:
            return None
        block = _joined(self._pending)
        self._pending, self._held = [], 0
        return block


def _joined(parts: list[Rows]) -> Rows:
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(column) for column in zip(*parts))


def fixed_blocks(chunks: Iterable[Rows], size: int) -> Iterator[Rows]:
    """Regroup chunks of rows into blocks of exactly ``size`` rows; the last may be shorter."""
    rebatcher = Rebatcher(size)
    for chunk in chunks:
        yield from rebatcher.push(*chunk)
    last = rebatcher.flush()
    if last is not None:
        yield last


def padded(X: np.ndarray, rows: int) -> np.ndarray:
    """``X`` with zero rows appended up to ``rows`` rows (as the in-memory inference pads)."""
    if X.shape[0] >= rows:
        return X
    return np.concatenate([X, np.zeros((rows - X.shape[0], *X.shape[1:]), X.dtype)])
