"""--sharding ivf with grouped lists (index_builder/train/groups.py): balanced groups of centroids, lists
renumbered without changing any answer, and a query reaching fewer shards than in k-means' order."""
from __future__ import annotations

import numpy as np
import pytest

from index_builder.shard_math import ivf_ranges
from index_builder.train.groups import (
    balanced_assign,
    group_centroids,
    group_lists,
    grouped_order,
    kept_ranges,
    renumber_lists,
)
from index_builder.train.quantizer import make_index
from shards.search.shard_selection import shard_mask
from shards.storage.faissio import coarse_search, faiss, ivf, probed_lists, set_nprobe
from shards.storage.manifest import ShardingInfo

from helpers import clustered

# (distances [n, S], weights, cap, groups): nearest first, none past cap; one no group has room for goes
# to the lightest group
ASSIGN = [
    ([[0, 1], [0, 1], [1, 0]], [1, 1, 1], 2, [0, 0, 1]),
    ([[0, 1], [0, 1], [0, 1]], [1, 1, 1], 2, [0, 0, 1]),       # the third has no room in its nearest
    ([[0, 5], [1, 9], [2, 3]], [1, 1, 1], 1, [0, -1, 1]),      # -1: over cap everywhere, to the lightest
    ([[0, 1], [0, 1]], [5, 1], 2, [1, 0]),                     # the heavy one fits nowhere: lightest
]


@pytest.mark.parametrize("D,w,cap,want", ASSIGN)
def test_balanced_assignment(D, w, cap, want):
    g = balanced_assign(np.array(D, dtype=float), np.array(w, dtype=float), cap)
    if -1 in want:  # the one left over went to a group, and loads differ by at most its weight
        assert (g >= 0).all() and g[0] == 0
    else:
        assert g.tolist() == want


@pytest.mark.parametrize("n,S", [(64, 1), (64, 4), (64, 64), (200, 7)])
def test_groups_cover_every_group_with_balanced_weight(n, S):
    rng = np.random.default_rng(n + S)
    c = rng.normal(size=(n, 16)).astype(np.float32)
    w = rng.integers(50, 150, size=n).astype(float)
    g = group_centroids(c, w, S)
    assert g.shape == (n,) and set(g.tolist()) == set(range(S))
    if S < n:
        load = np.bincount(g, weights=w, minlength=S)
        assert load.max() <= w.sum() / S * 1.05 + w.max()
    order, ranges = grouped_order(g, S)
    assert sorted(order.tolist()) == list(range(n)) and ranges[0][0] == 0 and ranges[-1][1] == n
    for s, (a, b) in enumerate(ranges):
        assert (g[order[a:b]] == s).all()


def test_groups_refuse_more_groups_than_centroids():
    with pytest.raises(ValueError, match="5 groups of 4 centroids"):
        group_centroids(np.zeros((4, 8), np.float32), np.ones(4), 5)


FACTORIES = ["IVF64,Flat", "IVF64,PQ8", "IVF64,PQ8x4", "OPQ8,IVF64,PQ8", "IVF64_HNSW16,Flat", "IVF64,SQ8",
             "PCA16,IVF64,Flat"]


@pytest.fixture(scope="module")
def data():
    x = clustered(12_000, 32, seed=5)
    return x[:10_000], x[10_000:10_300]


@pytest.mark.parametrize("factory", FACTORIES)
def test_renumbered_lists_give_the_same_answers(data, factory):
    """The codes and residuals do not move with a list's number: every answer is the same, distances too,
    and each vector lands in the new number of its old list. (An HNSW coarse quantizer is rebuilt in
    another insertion order, so its approximate search may differ: it is searched exhaustively here.)"""
    xb, xq = data
    a = make_index(factory, xb.shape[1], "l2")
    a.train(xb[:5000])
    b = faiss().clone_index(a)
    ranges = group_lists(b, xb[:5000], 4)
    assert len(ranges) == 4 and ranges[-1][1] == 64
    new_of = np.empty(64, np.int64)
    for j, old in enumerate(_order(a, b)):
        new_of[old] = j
    every = 64 / 3      # an HNSW quantizer's efSearch: all 64 lists
    np.testing.assert_array_equal(new_of[coarse_search(a, xq, 3, every)[1]], coarse_search(b, xq, 3, every)[1])
    for ix in (a, b):
        set_nprobe(ix, 8)
        q = faiss().downcast_index(ivf(ix).quantizer)
        if hasattr(q, "hnsw"):
            q.hnsw.efSearch = 256   # the add's assignment and the search: exhaustive
        ix.add_with_ids(xb, np.arange(len(xb)))
    Da, Ia = a.search(xq, 10)
    Db, Ib = b.search(xq, 10)
    np.testing.assert_array_equal(Ia, Ib)
    np.testing.assert_allclose(Da, Db, rtol=1e-5, atol=1e-4)


def _order(a, b) -> np.ndarray:
    """For each new list of b, the list of a with the same centroid."""
    ca = ivf(a).quantizer.reconstruct_n(0, 64)
    cb = ivf(b).quantizer.reconstruct_n(0, 64)
    return np.array([int(np.argmin(((ca - c) ** 2).sum(1))) for c in cb])


def test_renumbering_a_filled_index_is_refused(data):
    xb, _ = data
    ix = make_index("IVF16,Flat", 32, "l2")
    ix.train(xb[:2000])
    ix.add_with_ids(xb[:10], np.arange(10))
    with pytest.raises(ValueError, match="renumber before the add"):
        renumber_lists(ix, np.arange(16))


def test_grouped_lists_reach_fewer_shards_than_kmeans_order(data):
    """The point of grouping: at the same nprobe a query's probed lists lie in fewer shards' ranges."""
    xb, xq = data
    plain = make_index("IVF128,Flat", 32, "l2")
    plain.train(xb)
    grouped = faiss().clone_index(plain)
    ranges = group_lists(grouped, xb, 8)
    _, I = ivf(plain).quantizer.search(xb, 1)
    cut = ivf_ranges(np.bincount(I.ravel(), minlength=128), 8)
    for nprobe in (4, 16):
        before = shard_mask(probed_lists(plain, xq, nprobe), cut).sum(1).mean()
        after = shard_mask(probed_lists(grouped, xq, nprobe), ranges).sum(1).mean()
        assert after < 0.75 * before, (nprobe, before, after)


R = [[0, 3], [3, 8]]
KEPT = [
    (None, 2, {"ranges": R}, R),                                                     # a trained quantizer's groups
    (None, 2, {}, None),                                                             # kmeans order: cut by vectors
    (ShardingInfo(mode="ivf", shards=2, ranges=R, order="grouped"), 2, {}, R),       # kept: its version's
    (ShardingInfo(mode="ivf", shards=2, ranges=R, order="grouped"), 3, {}, None),    # another shard count
    (ShardingInfo(mode="ivf", shards=2, ranges=R, order="kmeans"), 2, {}, None),
    (ShardingInfo(mode="ivf", shards=2, ranges=R), 2, {}, None),                     # a version from before
]


@pytest.mark.parametrize("live,shards,tr,want", KEPT)
def test_which_ranges_grouped_lists_keep(live, shards, tr, want):
    assert kept_ranges(live, shards, tr) == want
