"""shards/search/topk.py: merging per-shard top-k lists, against brute force and real flat shards."""
from __future__ import annotations

import numpy as np
import pytest

from shards.search.topk import merge_topk

FLT_MAX = float(np.finfo(np.float32).max)


def _shard_results(rng, nq, sizes, k_s, metric, id_base=1000):
    """Per-shard (D, I) as a faiss index returns them: sorted best first, padded to k_s with -1."""
    out, start = [], 0
    worst = -FLT_MAX if metric == "ip" else FLT_MAX
    for size in sizes:
        D = np.full((nq, k_s), worst, dtype=np.float32)
        I = np.full((nq, k_s), -1, dtype=np.int64)
        m = min(size, k_s)
        for q in range(nq):
            d = rng.standard_normal(size).astype(np.float32)
            ids = id_base + start + rng.permutation(size)
            o = np.argsort(-d if metric == "ip" else d, kind="stable")[:m]
            D[q, :m], I[q, :m] = d[o], ids[o]
        out.append((D, I))
        start += size
    return out


def _brute_topk(results, k, metric):
    D = np.concatenate([d for d, _ in results], axis=1)
    I = np.concatenate([i for _, i in results], axis=1)
    worst = -FLT_MAX if metric == "ip" else FLT_MAX
    outD = np.full((D.shape[0], k), worst, dtype=np.float32)
    outI = np.full((D.shape[0], k), -1, dtype=np.int64)
    for q in range(D.shape[0]):
        ok = I[q] >= 0
        d, i = D[q, ok], I[q, ok]
        o = np.argsort(-d if metric == "ip" else d, kind="stable")[:k]
        outD[q, :len(o)], outI[q, :len(o)] = d[o], i[o]
    return outD, outI


# (shard sizes, k per shard, k)
TOPK_ROWS = [
    ([50], 10, 10),
    ([50, 50], 10, 10),
    ([30, 20, 40], 5, 5),
    ([100, 100, 100, 100, 100], 10, 1),
    ([100, 100], 20, 10),       # shards asked for more than k
    ([3, 4], 10, 10),           # fewer results than k in all: -1 padding
    ([0, 6], 10, 10),           # an empty shard
    ([0, 0], 5, 5),             # nothing at all
    ([2, 50, 1], 8, 8),
    ([7], 7, 10),               # one shard, shorter than k
]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("sizes,k_s,k", TOPK_ROWS)
def test_merge_topk_matches_brute_force(sizes, k_s, k, metric):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(len(sizes) * 100 + k)
    res = _shard_results(rng, 6, sizes, k_s, metric)
    D, I = merge_topk(res, k, metric)
    wantD, wantI = _brute_topk(res, k, metric)
    assert D.shape == I.shape == (6, k)
    assert np.array_equal(I, wantI)
    assert np.allclose(D, wantD)
    found = min(sum(sizes), k)
    assert (I[:, found:] == -1).all() and (I[:, :found] >= 0).all()
    # best first, in the metric's direction
    valid = D[:, :found]
    assert (np.diff(valid, axis=1) <= 0).all() if metric == "ip" else (np.diff(valid, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("sizes,k", [([40, 25, 35], 10), ([3, 4], 10), ([0, 9], 5), ([1, 1, 1, 1], 3)])
def test_merge_topk_of_real_flat_shards_is_the_monolithic_topk(sizes, k, metric):
    """Invariant 4 on tiny exact shards: merged shard results == one index over everything."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(sum(sizes))
    d, n = 16, sum(sizes)
    x = rng.standard_normal((n, d)).astype(np.float32)
    xq = rng.standard_normal((5, d)).astype(np.float32)
    ids = rng.permutation(10 * n + 10)[:n].astype(np.int64) + 7
    mt = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2

    def index(a, b):
        ix = faiss.IndexIDMap(faiss.IndexFlat(d, mt))
        ix.add_with_ids(x[a:b], ids[a:b])
        return ix

    bounds = np.cumsum([0, *sizes])
    shards = [index(a, b).search(xq, k) for a, b in zip(bounds[:-1], bounds[1:])]
    D, I = merge_topk(shards, k, metric)
    wantD, wantI = index(0, n).search(xq, k)
    assert np.array_equal(I, wantI)
    assert np.allclose(D, wantD, rtol=1e-5, atol=1e-5)
