"""k-means on the projected hidden representation (stage 2).

``z = (h - mean) @ P`` with ``P`` the task metric (``cluster.metric: task``) or
per-unit standardisation; ``z`` is partitioned into ``K`` groups by ``KMeans`` on
a seeded sample (in memory) or ``MiniBatchKMeans.partial_fit`` over batches
(streaming: memory bounded by one batch). Rows are assigned to the nearest
centroid, vectorised in float32.

Invariant: moments are summed over blocks of ``MOMENT_BLOCK`` rows, ``partial_fit``
gets blocks of exactly ``batch_size`` rows and samples are positions drawn from
the row count, so the streamed fit gives the in-memory fit's clusters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_limits

from budgetalloc.data.blocks import fixed_blocks
from budgetalloc.data.sampling import seeded_sample
from budgetalloc.params import ClusterParams

ASSIGN_BATCH = 65_536
STREAM_PASSES = 3  # passes of MiniBatchKMeans over a streamed source
MOMENT_BLOCK = 8192  # rows per block of the moments' sums: a fixed summation order
TASK_METRIC_SAMPLE = 5000  # rows the task metric is averaged over


@dataclass(frozen=True)
class ClusterModel:
    """Centroids in the projected embedding space, with the projection."""

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


def _blocks(batches, size: int):
    """The rows of an iterable of ``(b, H)`` batches in blocks of exactly ``size`` (the last shorter)."""
    return (block for (block,) in fixed_blocks(((batch,) for batch in batches), size))


def effective_k(requested: int, n_rows: int, n_arms: int, *, rows_per_cell: int = 30) -> int:
    """``min(requested, n_rows // (n_arms * rows_per_cell))``, at least 2: the K the rows support."""
    return int(max(2, min(requested, n_rows // (n_arms * rows_per_cell))))


def roi_scores(response: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Each row's best predicted incremental ROI over the coupon arms: ``max_j (r_j - r_0) / (c_j - c_0)``
    of ``(n, M)`` predictions, float64 (a cost increment below 1e-9 counts as 1e-9)."""
    gain = response[:, 1:] - response[:, :1]
    spend = np.maximum(cost[:, 1:] - cost[:, :1], 1e-9)
    return (gain / spend).max(axis=1)


def roi_bin_edges(labels: np.ndarray, scores: np.ndarray, *, k: int, bins: int) -> np.ndarray:
    """``(k, bins - 1)`` per cluster, the scores that cut its rows into ``bins`` equal parts
    (``inf`` for a cluster without rows: all of its rows go to the first part)."""
    order = np.lexsort((scores, labels))
    counts = np.bincount(labels, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    edges = np.full((k, bins - 1), np.inf)
    present = counts > 0
    for j in range(1, bins):
        at = starts[present] + (counts[present] * j) // bins
        edges[present, j - 1] = scores[order[at]]
    return edges


def roi_cells(labels: np.ndarray, scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Cell ``label * bins + part`` of each row: its cluster, and the part its score falls in."""
    bins = edges.shape[1] + 1
    part = (scores[:, None] >= edges[labels]).sum(axis=1)
    return (labels.astype(np.int64) * bins + part).astype(np.int32)


def fit_clusters(emb: np.ndarray, *, k: int, params: ClusterParams, seed: int,
                 projection: np.ndarray | None = None, metric=None) -> ClusterModel:
    """:func:`fit_clusters_batches` on in-memory embeddings ``(n, H)``, one batch."""
    return fit_clusters_batches(lambda: iter((emb,)), n_rows=emb.shape[0], k=k, params=params, seed=seed,
                                projection=projection, metric=metric)


def fit_clusters_batches(batches, *, n_rows: int, k: int, params: ClusterParams, seed: int,
                         projection: np.ndarray | None = None, metric=None) -> ClusterModel:
    """Fit k-means on embeddings that come in batches; the result does not depend on the batching.

    One pass gathers the moments (and, up to ``streaming_threshold`` rows, a seeded
    sample of ``fit_sample`` rows for ``KMeans``); above the threshold,
    ``STREAM_PASSES`` passes of ``MiniBatchKMeans.partial_fit`` follow.

    Args:
        batches: a zero-argument callable returning a fresh iterator of ``(b, H)``
            arrays, ``n_rows`` rows in all, in the same order every time.
        n_rows: rows the batches hold.
        k: number of clusters (see :func:`effective_k`).
        params: the ``cluster`` section.
        seed: seeds the samples and the k-means initialisation.
        projection: ``(H, R)`` metric projection; ``None`` standardises each unit.
        metric: instead of ``projection``, a function from the embeddings of a seeded
            sample of ``TASK_METRIC_SAMPLE`` rows to the projection (the task metric).
    """
    streaming = n_rows > params.streaming_threshold
    sample = None if streaming else _Gather(seeded_sample(n_rows, params.fit_sample, seed))
    metric_rows = None if metric is None else _Gather(seeded_sample(n_rows, TASK_METRIC_SAMPLE, seed))
    n, total, total_sq = 0, -0.0, -0.0  # -0.0 + x == x for every float x, -0.0 included
    for block in _blocks(batches(), MOMENT_BLOCK):
        b = block.astype(np.float64)
        n += b.shape[0]
        total, total_sq = total + b.sum(axis=0), total_sq + (b * b).sum(axis=0)
        for part in (sample, metric_rows):
            if part is not None:
                part.update(block)
    if metric is not None:
        projection = metric(metric_rows.rows())
    mean = total / n
    if projection is None:
        scale = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
        projection = np.diag(1.0 / np.where(scale > 1e-6, scale, 1.0))
    mean, proj = mean.astype(np.float32), np.asarray(projection, dtype=np.float32)
    if streaming:
        return _partial_fit_passes(batches, mean, proj, k=k, params=params, seed=seed)
    km = KMeans(n_clusters=k, n_init=params.n_init, max_iter=params.max_iter, random_state=seed)
    with threadpool_limits(1):  # k-means sums its centres per thread: one thread, the same bytes on any core count
        km.fit(((sample.rows() - mean) @ proj).astype(np.float32))
    return ClusterModel(_ordered(km.cluster_centers_), mean, proj, float(km.inertia_))


def _partial_fit_passes(batches, mean, proj, *, k: int, params: ClusterParams, seed: int) -> ClusterModel:
    """``STREAM_PASSES`` passes of ``partial_fit`` on blocks of exactly ``batch_size`` rows."""
    km = MiniBatchKMeans(n_clusters=k, batch_size=params.batch_size, random_state=seed, n_init=params.n_init)
    pending: list[np.ndarray] = []
    with threadpool_limits(1):  # as in KMeans: the same bytes on any core count
        for _ in range(STREAM_PASSES):
            for block in _blocks(batches(), params.batch_size):
                pending.append(((block - mean) @ proj).astype(np.float32))
                if sum(p.shape[0] for p in pending) >= k:  # a first call needs k rows: small blocks are pooled
                    km.partial_fit(np.concatenate(pending))
                    pending = []
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
    """Soft cluster memberships ``softmax(-d^2 / (temperature * R))`` for distillation."""
    z = model.standardise(emb)
    d2 = (z * z).sum(axis=1, keepdims=True) - 2.0 * z @ model.centers.T + (model.centers**2).sum(axis=1)
    logits = -d2 / (temperature * z.shape[1])
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


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
