"""--sharding ivf: the IVF lists grouped into compact regions of the space, one per serving shard.

k-means leaves list numbers in no order, so a query's nearest lists lie in every range of them and
ivf routing prunes nothing. Here the trained centroids are clustered into S groups of balanced
weight (vectors, estimated from the training sample's list sizes), and the quantizer's lists are
renumbered so that each group is a contiguous range: shard s then owns a region, and a query goes
only to the shards its probed lists live in. The codes do not change: a list's centroid keeps its
residuals, only its number moves.
"""
from __future__ import annotations

import numpy as np

from shards.storage.faissio import faiss, ivf

SLACK = 0.05  # a group may hold this much more than its share of the weight
ITERS = 8     # rounds of balanced assignment and re-centring


def balanced_assign(D: np.ndarray, w: np.ndarray, cap: float) -> np.ndarray:
    """D [n, S] distances from each item to each group centre, w [n] weights: the group of each item,
    greedily by distance (nearest pairs first), no group past cap. An item no group has room for
    (one heavier than what is left anywhere) goes to the lightest group."""
    n, S = D.shape
    g = np.full(n, -1, dtype=np.int64)
    load = np.zeros(S)
    for p in np.argsort(D, axis=None, kind="stable"):
        i, s = divmod(int(p), S)
        if g[i] < 0 and load[s] + w[i] <= cap:
            g[i], load[s] = s, load[s] + w[i]
    for i in np.flatnonzero(g < 0):
        s = int(np.argmin(load))
        g[i], load[s] = s, load[s] + w[i]
    return g


def group_centroids(c: np.ndarray, w: np.ndarray, S: int, seed: int = 1234) -> np.ndarray:
    """The group in [0, S) of each centroid c [nlist, d], weights w [nlist]: balanced k-means. Every
    group gets at least one centroid and about 1/S of the weight (within SLACK where lists allow)."""
    c = np.ascontiguousarray(c, dtype=np.float32)
    n = len(c)
    if not 1 <= S <= n:
        raise ValueError(f"{S} groups of {n} centroids")
    w = np.asarray(w, dtype=np.float64) + 1e-3 * max(float(np.mean(w)), 1.0)  # empty lists still count a little
    if S == 1:
        return np.zeros(n, dtype=np.int64)
    f = faiss()
    km = f.Kmeans(c.shape[1], S, niter=20, seed=seed, verbose=False)
    km.train(c, weights=w.astype(np.float32))
    centres = km.centroids.astype(np.float64)
    cap = w.sum() / S * (1 + SLACK)
    cc = (c.astype(np.float64) ** 2).sum(1)[:, None]
    for _ in range(ITERS):
        D = cc - 2 * c @ centres.T + (centres ** 2).sum(1)[None, :]
        g = balanced_assign(D, w, cap)
        centres = np.stack([np.average(c[g == s], axis=0, weights=w[g == s]) for s in range(S)])
    empty = [s for s in range(S) if not (g == s).any()]
    for s in empty:  # S <= n: take the lightest centroid of the group with the most of them
        big = int(np.bincount(g, minlength=S).argmax())
        i = np.flatnonzero(g == big)
        g[i[np.argmin(w[i])]] = s
    return g


def grouped_order(g: np.ndarray, S: int) -> tuple[np.ndarray, list[list[int]]]:
    """(order, ranges): new list j is old list order[j], groups in turn; ranges[s] = [a, b) of group s."""
    order = np.argsort(g, kind="stable")
    b = np.concatenate([[0], np.cumsum(np.bincount(g, minlength=S))])
    return order, [[int(b[s]), int(b[s + 1])] for s in range(S)]


def renumber_lists(index, order: np.ndarray) -> None:
    """Renumber the lists of a trained, empty IVF index: new list j takes old list order[j]'s centroid.
    Tables that depend on the list order (IVFPQ's precomputed terms) are rebuilt."""
    iv = ivf(index)
    if iv.ntotal:
        raise ValueError("renumber_lists: the index holds vectors; renumber before the add")
    q = iv.quantizer
    c = q.reconstruct_n(0, q.ntotal)
    q.reset()
    q.add(np.ascontiguousarray(c[order]))
    iv = faiss().downcast_index(iv)  # extract_index_ivf hands back the base class
    if hasattr(iv, "precompute_table"):
        iv.precompute_table()


def sample_list_sizes(index, xt: np.ndarray) -> np.ndarray:
    """Vectors per list among xt (the training sample, in the index's input space)."""
    from shards.storage.faissio import pretransform

    iv = ivf(index)
    _, I = iv.quantizer.search(np.ascontiguousarray(pretransform(index, xt)), 1)
    return np.bincount(I.ravel(), minlength=iv.nlist)


def group_lists(index, xt: np.ndarray, S: int, seed: int = 1234) -> list[list[int]]:
    """Group a trained IVF index's lists into S regions and renumber them so (see the module): returns
    each group's list range [a, b), the shards' ranges."""
    iv = ivf(index)
    c = iv.quantizer.reconstruct_n(0, iv.nlist)
    g = group_centroids(c, sample_list_sizes(index, xt), S, seed)
    order, ranges = grouped_order(g, S)
    renumber_lists(index, order)
    return ranges


def kept_ranges(live, shards: int, tr: dict) -> list[list[int]] | None:
    """The list ranges of grouped lists, or None to cut them by vectors (shard_math.ivf_ranges): the train
    record's (tr), or for a kept quantizer its version's (live: ShardingInfo), when they are grouped
    for the same shard count."""
    if live is not None:
        return live.ranges if live.order == "grouped" and live.shards == shards else None
    return tr.get("ranges")
