"""Balanced IVF lists: no list much larger than the mean, so that no probe costs many times another.

k-means on real embeddings leaves lists many times the mean size (faiss #1311), and a query that
probes one pays for all of it: the largest lists set the tail latency. After training, the largest
list (by the training sample) is split in two by 2-means of its points and the smallest list is
given up to make room: its points go to their next nearest centroid, and its number takes the
second half. This repeats until the largest list holds at most `ratio` times the mean, or
MAX_SPLITS; then the index's codec is trained again on the new lists (its residuals moved).

Assignment stays nearest-centroid, so search needs nothing new: a split list's vectors are found
by the same probes. Pure numpy and faiss on the sample; nothing here reads the corpus.
"""
from __future__ import annotations

import numpy as np

from shards.storage.faissio import faiss, ivf, pretransform

MAX_SPLITS_SHARE = 0.25  # at most this share of the lists is split: the rest of the work is the codec's
PASSES = 3               # full reassignments: a split list's halves draw points from its neighbours
POINTS_PER_LIST = 256    # sample points per list measured, as faiss's k-means takes at most


def sizes_of(a: np.ndarray, nlist: int) -> np.ndarray:
    return np.bincount(a, minlength=nlist)


def nearest(x: np.ndarray, c: np.ndarray, ip: bool) -> np.ndarray:
    """The nearest centroid of each row of x (largest inner product for ip)."""
    f = faiss()
    q = f.IndexFlatIP(c.shape[1]) if ip else f.IndexFlatL2(c.shape[1])
    q.add(np.ascontiguousarray(c, dtype=np.float32))
    return q.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1].ravel()


def two_means(x: np.ndarray, spherical: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [2, d], label of each row): the list's points cut in two."""
    km = faiss().Kmeans(x.shape[1], 2, niter=10, seed=seed, spherical=spherical, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids, km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1].ravel()


def split_pass(x: np.ndarray, c: np.ndarray, a: np.ndarray, cap: float, budget: int, ip: bool,
               spherical: bool, seed: int) -> int:
    """Split lists above cap into the room of the smallest ones, in place (c, a), at most budget
    times; a list of two points or fewer is never split. Returns the splits done."""
    sizes = sizes_of(a, len(c))
    done = 0
    while done < budget:
        big = int(np.argmax(sizes))
        if sizes[big] <= cap or sizes[big] < 3:
            break
        order = np.argsort(sizes, kind="stable")
        small = int(order[0] if order[0] != big else order[1])
        freed = np.flatnonzero(a == small)
        if len(freed):
            keep = np.delete(np.arange(len(c)), small)
            a[freed] = keep[nearest(x[freed], c[keep], ip)]
        members = np.flatnonzero(a == big)
        halves, lab = two_means(x[members], spherical, seed + done)
        c[big], c[small] = halves
        a[members[lab == 1]] = small
        sizes = sizes_of(a, len(c))
        done += 1
    return done


def balance_lists(index, xt: np.ndarray, ratio: float, seed: int = 1234) -> dict:
    """Cap a trained IVF index's lists at ratio x the mean (by the sample xt) and retrain its codec on
    them (see the module). Returns the record: splits, and the sample's imbalance and largest list
    before and after. ratio 0 (or no IVF) leaves the index as it is."""
    from index_builder.reindex.drift import imbalance

    iv = ivf(index)
    if iv is None or not ratio:
        return {}
    if iv.ntotal:
        raise ValueError("balance_lists: the index holds vectors; balance before the add")
    ip = iv.metric_type == faiss().METRIC_INNER_PRODUCT
    x = pretransform(index, xt)
    if len(x) > POINTS_PER_LIST * iv.nlist:  # each full assignment costs a k-means iteration of these
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), POINTS_PER_LIST * iv.nlist, replace=False))]
    c = iv.quantizer.reconstruct_n(0, iv.nlist).copy()
    a = nearest(x, c, ip)
    before = sizes_of(a, len(c))
    cap = ratio * len(x) / len(c)
    splits, budget = 0, max(1, int(MAX_SPLITS_SHARE * len(c)))
    for p in range(PASSES):
        n = split_pass(x, c, a, cap, budget - splits, ip, bool(iv.cp.spherical), seed + 7919 * p)
        splits += n
        a = nearest(x, c, ip)           # the halves draw neighbours' points: sizes as search sees them
        if not n or sizes_of(a, len(c)).max() <= cap:
            break
    after = sizes_of(a, len(c))
    if splits:
        _retrain_codec(index, iv, c, xt)
    return {"ratio": ratio, "splits": splits,
            "sample_imbalance": [imbalance(before), imbalance(after)],
            "sample_largest": [int(before.max()), int(after.max())]}


def _retrain_codec(index, iv, c: np.ndarray, xt: np.ndarray) -> None:
    """The new centroids into the quantizer, then faiss trains the rest again: it keeps a quantizer
    that holds nlist centroids, and a pre-transform already trained."""
    iv.quantizer.reset()
    iv.quantizer.add(np.ascontiguousarray(c, dtype=np.float32))
    iv.is_trained = False
    index.is_trained = False
    index.train(xt)
