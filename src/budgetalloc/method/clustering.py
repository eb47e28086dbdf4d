"""k-means on the projected hidden representation (stage 2).

``z = (h - mean) @ P`` with ``P`` the task metric (``cluster.metric: task``,
:func:`budgetalloc.models.representation.task_metric`) or per-unit
standardisation (``standardised``); ``z`` is partitioned into ``K`` groups by
``KMeans`` on a seeded sample (in memory) or ``MiniBatchKMeans.partial_fit``
over batches (streaming, memory bounded by one batch), and every row is
assigned by a vectorised nearest-centroid search in float32.

Invariant: moments are summed over blocks of ``MOMENT_BLOCK`` rows, ``partial_fit``
gets blocks of exactly ``batch_size`` rows from the first row, and samples are
positions drawn from the row count, so a streamed fit gives the in-memory fit's
clusters (:mod:`budgetalloc.data.blocks`). Why: ``docs/design.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_limits

from budgetalloc.data.blocks import Rebatcher
from budgetalloc.data.sampling import seeded_sample
from budgetalloc.params import ClusterParams

ASSIGN_BATCH = 65_536
STREAM_PASSES = 3  # passes of MiniBatchKMeans over a streamed source
MOMENT_BLOCK = 8192  # rows per block of the moments' sums: a fixed summation order
TASK_METRIC_SAMPLE = 5000  # rows the task metric is averaged over


@dataclass(frozen=True)
class ClusterModel:
    """Centroids in standardised embedding space, with the standardiser."""

    centers: np.ndarray  # float32 (K, R)
    mean: np.ndarray  # float32 (H,)
    projection: np.ndarray  # float32 (H, R)
    inertia: float

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])

    def standardise(self, emb: np.ndarray) -> np.ndarray:
        """Centred, projected embeddings: the space the centroids live in."""
        return ((emb - self.mean) @ self.projection).astype(np.float32)


class _Moments:
    """Running sums for a streaming mean and variance (float64), block by block.

    Rows are summed in blocks of ``MOMENT_BLOCK`` rows counted from the first, so
    the sums do not depend on how the rows were batched.
    """

    def __init__(self) -> None:
        self.n = 0
        self.total: np.ndarray | None = None
        self.total_sq: np.ndarray | None = None
        self._blocks = Rebatcher(MOMENT_BLOCK)

    def update(self, batch: np.ndarray) -> None:
        for (block,) in self._blocks.push(batch):
            self._add(block)

    def _add(self, block: np.ndarray) -> None:
        b = block.astype(np.float64)
        s, sq = b.sum(axis=0), (b * b).sum(axis=0)
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.n += b.shape[0]

    def mean_projection(self, projection: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The mean, and ``projection`` or else the per-unit standardising diagonal."""
        last = self._blocks.flush()
        if last is not None:
            self._add(last[0])
        mean = self.total / self.n
        if projection is not None:
            return mean.astype(np.float32), np.asarray(projection, dtype=np.float32)
        var = np.maximum(self.total_sq / self.n - mean * mean, 0.0)
        scale = np.sqrt(var)
        inv = 1.0 / np.where(scale > 1e-6, scale, 1.0)
        return mean.astype(np.float32), np.diag(inv).astype(np.float32)


class _Gather:
    """The rows at sorted ``positions`` (``None``: every row) of a stream of batches."""

    def __init__(self, positions: np.ndarray | None) -> None:
        self.positions, self.parts, self.offset = positions, [], 0

    def update(self, batch: np.ndarray) -> None:
        end = self.offset + batch.shape[0]
        if self.positions is None:
            self.parts.append(np.array(batch))
        else:
            lo, hi = np.searchsorted(self.positions, [self.offset, end])
            self.parts.append(batch[self.positions[lo:hi] - self.offset])
        self.offset = end

    def rows(self) -> np.ndarray:
        return self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)


def effective_k(requested: int, n_rows: int, n_arms: int, *, rows_per_cell: int = 30) -> int:
    """The K the data support: at least ``rows_per_cell`` rows per (cluster, arm) on average.

    Args:
        requested: ``cluster.k`` from params.
        n_rows: rows that will estimate the cluster statistics.
        n_arms: arms in the trial.
        rows_per_cell: average rows wanted per (cluster, arm) cell.

    Returns:
        ``min(requested, n_rows // (n_arms * rows_per_cell))``, and at least 2.
    """
    return int(max(2, min(requested, n_rows // (n_arms * rows_per_cell))))


def fit_clusters(emb: np.ndarray, *, k: int, params: ClusterParams, seed: int,
                 projection: np.ndarray | None = None, metric=None) -> ClusterModel:
    """Fit k-means on in-memory embeddings (streams above ``streaming_threshold`` rows).

    Args:
        emb: (n, H) embeddings of the training users.
        k: number of clusters (see :func:`effective_k`).
        params: the ``cluster`` section.
        seed: random seed (sampling and k-means initialisation).
        projection: (H, R) metric projection; ``None`` standardises each unit.
        metric: see :func:`fit_clusters_batches`.

    Returns:
        The fitted :class:`ClusterModel`.
    """
    return fit_clusters_batches(lambda: iter((emb,)), n_rows=emb.shape[0], k=k, params=params, seed=seed,
                                projection=projection, metric=metric)


def fit_clusters_batches(batches, *, n_rows: int, k: int, params: ClusterParams, seed: int,
                         projection: np.ndarray | None = None, metric=None) -> ClusterModel:
    """Fit k-means on embeddings that come in batches, as :func:`fit_clusters` on their rows.

    Up to ``streaming_threshold`` rows: one pass gathers the moments and a seeded
    sample of ``fit_sample`` rows, on which ``KMeans`` is fitted (memory: the
    sample). Above: one pass for the moments, then ``MiniBatchKMeans.partial_fit``
    (:func:`fit_clusters_streaming`; memory: one batch).

    Args:
        batches: a zero-argument callable returning a fresh iterator of (b, H)
            arrays, ``n_rows`` rows in all, in the same order every time.
        n_rows: rows the batches hold.
        k: number of clusters.
        params: the ``cluster`` section.
        seed: random seed (samples and k-means initialisation).
        projection: (H, R) metric projection; ``None`` standardises each unit
            (unless ``metric`` is given).
        metric: a function from the embeddings of a seeded sample of at most
            ``TASK_METRIC_SAMPLE`` rows (gathered in the first pass) to the
            projection, for a metric that needs the network (the task metric).

    Returns:
        The fitted :class:`ClusterModel`.
    """
    streaming = n_rows > params.streaming_threshold
    moments = _Moments()
    sample = None if streaming else _Gather(seeded_sample(n_rows, params.fit_sample, seed))
    metric_rows = None if metric is None else _Gather(seeded_sample(n_rows, TASK_METRIC_SAMPLE, seed))
    for batch in batches():
        for part in (moments, sample, metric_rows):
            if part is not None:
                part.update(batch)
    if metric is not None:
        projection = metric(metric_rows.rows())
    mean, proj = moments.mean_projection(projection)
    if streaming:
        return _partial_fit_passes(batches, mean, proj, k=k, params=params, seed=seed)
    z = ((sample.rows() - mean) @ proj).astype(np.float32)
    km = KMeans(n_clusters=k, n_init=params.n_init, max_iter=params.max_iter, random_state=seed)
    with threadpool_limits(1):  # k-means sums its centres per thread: one thread, the same bytes on any core count
        km.fit(z)
    return ClusterModel(_ordered(km.cluster_centers_), mean, proj, float(km.inertia_))


def fit_clusters_streaming(batches, *, k: int, params: ClusterParams, seed: int,
                           projection: np.ndarray | None = None) -> ClusterModel:
    """Fit MiniBatchKMeans over a re-iterable source of embedding batches.

    Args:
        batches: a zero-argument callable returning a fresh iterator of (b, H)
            arrays each time (two passes are made: moments, then partial_fit).
        k: number of clusters.
        params: the ``cluster`` section.
        seed: random seed.
        projection: (H, R) metric projection; ``None`` standardises each unit.

    Returns:
        The fitted :class:`ClusterModel` (inertia as MiniBatchKMeans reports it).
    """
    moments = _Moments()
    for batch in batches():
        moments.update(batch)
    mean, proj = moments.mean_projection(projection)
    return _partial_fit_passes(batches, mean, proj, k=k, params=params, seed=seed)


def _partial_fit_passes(batches, mean, proj, *, k: int, params: ClusterParams, seed: int) -> ClusterModel:
    """``STREAM_PASSES`` passes of ``partial_fit`` on blocks of exactly ``batch_size`` rows per pass."""
    km = MiniBatchKMeans(n_clusters=k, batch_size=params.batch_size, random_state=seed, n_init=params.n_init)
    pending: list[np.ndarray] = []

    def feed(block: np.ndarray) -> None:
        nonlocal pending
        pending.append(((block - mean) @ proj).astype(np.float32))
        # partial_fit needs at least k rows in its first call; small blocks are pooled.
        if sum(p.shape[0] for p in pending) >= k:
            km.partial_fit(np.concatenate(pending))
            pending = []

    with threadpool_limits(1):  # as in fit_clusters: the same bytes on any core count
        for _ in range(STREAM_PASSES):
            blocks = Rebatcher(params.batch_size)
            for batch in batches():
                for (block,) in blocks.push(batch):
                    feed(block)
            last = blocks.flush()
            if last is not None:
                feed(last[0])
        if pending:
            km.partial_fit(np.concatenate(pending))
    return ClusterModel(_ordered(km.cluster_centers_), mean, proj, float(km.inertia_))


def _ordered(centers: np.ndarray) -> np.ndarray:
    """Centroids in a canonical order (lexicographic), so ids do not depend on init order."""
    c = np.asarray(centers, dtype=np.float32)
    return c[np.lexsort(c.T[::-1])]


def assign_clusters(model: ClusterModel, emb: np.ndarray, *, batch_size: int = ASSIGN_BATCH) -> np.ndarray:
    """Nearest-centroid cluster id per row, int32."""
    centers = model.centers
    c_sq = (centers * centers).sum(axis=1)
    out = np.empty(emb.shape[0], dtype=np.int32)
    for start in range(0, emb.shape[0], batch_size):
        z = model.standardise(emb[start : start + batch_size])
        out[start : start + z.shape[0]] = np.argmin(c_sq[None, :] - 2.0 * z @ centers.T, axis=1)
    return out


def centroid_soft_targets(model: ClusterModel, emb: np.ndarray, *, temperature: float) -> np.ndarray:
    """Soft cluster memberships ``softmax(-d^2 / (temperature * H))`` for distillation."""
    z = model.standardise(emb)
    d2 = (z * z).sum(axis=1, keepdims=True) - 2.0 * z @ model.centers.T + (model.centers**2).sum(axis=1)
    logits = -d2 / (temperature * z.shape[1])
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def cluster_sizes(labels: np.ndarray, k: int) -> np.ndarray:
    """Users per cluster (int64, length ``k``)."""
    return np.bincount(labels, minlength=k).astype(np.int64)


def save_clusters(model: ClusterModel, directory: str | Path) -> None:
    """Write ``clusters.npz`` (no pickle) and ``clusters.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "clusters.npz", centers=model.centers, mean=model.mean, projection=model.projection)
    (directory / "clusters.json").write_text(json.dumps({"k": model.k, "inertia": model.inertia}, indent=2) + "\n")


def load_clusters(directory: str | Path) -> ClusterModel:
    """Read what :func:`save_clusters` wrote."""
    directory = Path(directory)
    with np.load(directory / "clusters.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("centers", "mean", "projection")}
    meta = json.loads((directory / "clusters.json").read_text())
    return ClusterModel(**arrays, inertia=float(meta["inertia"]))

