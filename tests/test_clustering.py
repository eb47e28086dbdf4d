"""k-means on embeddings: recovers separated groups, streaming agrees, stable ids."""

from __future__ import annotations

import numpy as np
import pytest

from budgetalloc.method.clustering import (
    assign_clusters,
    centroid_soft_targets,
    effective_k,
    fit_clusters,
    fit_clusters_batches,
    load_clusters,
    roi_bin_edges,
    roi_cells,
    roi_scores,
    save_clusters,
)
from budgetalloc.params import ClusterParams


def blobs(n=6000, k=5, h=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=6.0, size=(k, h))
    truth = rng.integers(0, k, n)
    return (centers[truth] + rng.normal(size=(n, h))).astype(np.float32), truth


def _purity(labels, truth):
    return sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(truth)


def test_recovers_separated_blobs_and_is_deterministic():
    emb, truth = blobs()
    params = ClusterParams(k=5, n_init=2)
    a = fit_clusters(emb, k=5, params=params, seed=0)
    b = fit_clusters(emb, k=5, params=params, seed=0)
    np.testing.assert_array_equal(a.centers, b.centers)
    labels = assign_clusters(a, emb, batch_size=777)
    assert _purity(labels, truth) > 0.99
    assert len(np.unique(labels)) == 5


def test_streaming_matches_in_memory():
    emb, truth = blobs(n=8000)
    params = ClusterParams(k=5, batch_size=500)
    model = fit_clusters_batches(lambda: (emb[i : i + 1000] for i in range(0, len(emb), 1000)),
                                 n_rows=len(emb), k=5, params=params, seed=0)
    assert _purity(assign_clusters(model, emb), truth) > 0.99
    streamed = ClusterParams(k=5, streaming_threshold=100, batch_size=500)
    forced = fit_clusters(emb, k=5, params=streamed, seed=0)
    assert _purity(assign_clusters(forced, emb), truth) > 0.99
    batched = fit_clusters_batches(lambda: (emb[i : i + 777] for i in range(0, len(emb), 777)),
                                   n_rows=len(emb), k=5, params=streamed, seed=0)
    np.testing.assert_array_equal(batched.centers, forced.centers)  # the batching changes no bit


def test_soft_targets_are_distributions_peaking_at_assignment():
    emb, _ = blobs(n=500)
    model = fit_clusters(emb, k=5, params=ClusterParams(k=5), seed=0)
    soft = centroid_soft_targets(model, emb, temperature=0.1)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(soft.argmax(axis=1), assign_clusters(model, emb))


def test_save_load_roundtrip(tmp_path):
    emb, _ = blobs(n=500)
    model = fit_clusters(emb, k=4, params=ClusterParams(k=4), seed=0)
    save_clusters(model, tmp_path)
    back = load_clusters(tmp_path)
    np.testing.assert_array_equal(assign_clusters(back, emb), assign_clusters(model, emb))


@pytest.mark.parametrize("n,expected", [(100, 2), (3000, 20), (10**7, 64)])
def test_effective_k_adapts_to_data(n, expected):
    assert effective_k(64, n, 5) == expected


def test_roi_scores_take_each_rows_best_coupon_arm_per_unit_of_incremental_cost():
    response = np.array([[0.1, 0.3, 0.4], [0.2, 0.2, 0.5]])
    cost = np.array([[0.0, 1.0, 4.0], [0.0, 2.0, 1.0]])
    np.testing.assert_allclose(roi_scores(response, cost), [0.2, 0.3])  # max(0.2, 0.075), max(0, 0.3)


def test_roi_cells_cut_every_cluster_into_equal_parts_ordered_by_score():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 10_000)
    scores = rng.normal(size=10_000) + labels  # clusters at different score levels
    edges = roi_bin_edges(labels, scores, k=6, bins=4)  # cluster 5 has no rows
    assert edges.shape == (6, 3) and np.isinf(edges[5]).all()
    assert (np.diff(edges[:5], axis=1) > 0).all()
    cells = roi_cells(labels, scores, edges)
    np.testing.assert_array_equal(cells // 4, labels)  # a cell never mixes clusters
    for c in range(5):
        part = cells[labels == c] % 4
        counts = np.bincount(part, minlength=4)
        assert counts.max() - counts.min() <= 1  # equal parts, to a row
        lo = [scores[labels == c][part == j].min() for j in range(4)]
        hi = [scores[labels == c][part == j].max() for j in range(4)]
        assert all(hi[j] < lo[j + 1] for j in range(3))  # ordered by score, not overlapping
    np.testing.assert_array_equal(roi_cells(labels, scores, edges[:, :0]), labels)  # one part: the clusters
