"""k-means in torch, for the IVF coarse quantizer on a CUDA GPU when faiss-gpu is not installed.

It follows faiss's Clustering where that matters for the index: the first k points of a
random permutation as initial centroids, at most MAX_POINTS_PER_CENTROID points per
centroid (a larger sample is subsampled), spherical centroids for inner product (faiss's
IndexIVF default), and empty clusters refilled by splitting a big one in two. The
centroids then go into the faiss quantizer, so search and add never see torch.

Memory is bounded: distances are computed for a block of points at a time, the block
sized to the device's free memory, and the sample stays in host memory (pinned) and is
streamed block by block when it does not fit beside them. An out-of-memory error halves
the block and redoes the pass instead of failing the build.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_POINTS_PER_CENTROID = 256   # faiss's ClusteringParameters default: more points add nothing
SPLIT_EPS = 1.0 / 1024          # relative perturbation when an empty cluster takes half of a big one
BLOCK_BYTES_CPU = 64 << 20      # distance block on the CPU
MIN_BLOCK = 256


@dataclass
class KMeansResult:
    centroids: np.ndarray        # float32 [k, d]
    objective: float             # at the last assignment, as faiss reports it: sum of squared L2 distances
                                 # to the nearest centroid (of the best inner products for ip)
    iterations: int
    points: int                  # after subsampling
    block: int                   # points per distance block in the last pass
    device: str


def kmeans(x: np.ndarray, k: int, niter: int = 10, metric: str = "l2", spherical: bool | None = None,
           seed: int = 1234, device: str = "cpu", max_points_per_centroid: int = MAX_POINTS_PER_CENTROID
           ) -> KMeansResult:
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means: {n} training points for {k} centroids; need at least {k}")
    spherical = (metric == "ip") if spherical is None else spherical
    rng = np.random.default_rng(seed)
    if n > k * max_points_per_centroid:
        x = x[np.sort(rng.choice(n, k * max_points_per_centroid, replace=False))]
        n = len(x)
    dev = torch.device(device)
    X, on_device = _place(torch, x, dev)
    C = torch.from_numpy(x[rng.permutation(n)[:k]].copy()).to(dev)
    if spherical:
        C = _normalize(torch, C)
    block = _block_size(torch, dev, k, d, on_device)
    gen = np.random.default_rng(seed + 1)
    obj = math.nan
    for _ in range(niter):
        while True:
            try:
                sums, counts, obj = _assign_pass(torch, X, C, block, metric, dev)
                break
            except torch.cuda.OutOfMemoryError:
                if block <= MIN_BLOCK:
                    raise
                block //= 2
                torch.cuda.empty_cache()
        C = _update(torch, C, sums, counts, gen)
        if spherical:
            C = _normalize(torch, C)
    return KMeansResult(C.float().cpu().numpy(), float(obj), niter, n, block, str(dev))


def _place(torch, x: np.ndarray, dev):
    """The sample on the device when it fits in half its free memory; else pinned host memory."""
    t = torch.from_numpy(x)
    if dev.type != "cuda":
        return t, True
    free, _ = torch.cuda.mem_get_info(dev)
    if x.nbytes < free // 2:
        return t.to(dev), True
    return t.pin_memory(), False


def _block_size(torch, dev, k: int, d: int, on_device: bool) -> int:
    """Points per block: their distances to k centroids (and, streamed, the points) in a quarter
    of the free device memory."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = free // 4
    else:
        budget = BLOCK_BYTES_CPU
    per_point = 4 * (k + (0 if on_device else d)) * 2
    return max(MIN_BLOCK, int(budget // per_point))


def _assign_pass(torch, X, C, block: int, metric: str, dev):
    """One pass over the points: per-centroid sums and counts of the points nearest to it."""
    k, d = C.shape
    sums = torch.zeros((k, d), dtype=torch.float64, device=dev)
    counts = torch.zeros(k, dtype=torch.float64, device=dev)
    cn = (C * C).sum(1)
    obj = 0.0
    for a in range(0, X.shape[0], block):
        xb = X[a:a + block].to(dev, non_blocking=True)
        ip = xb @ C.T
        if metric == "ip":
            best, idx = ip.max(1)
            obj += float(best.double().sum())
        else:
            dist = cn[None, :] - 2 * ip              # ||x||^2 left out: it does not change the argmin
            best, idx = dist.min(1)
            obj += float((best + (xb * xb).sum(1)).clamp_min(0).double().sum())
        sums.index_add_(0, idx, xb.double())
        counts += torch.bincount(idx, minlength=k).double()
        del ip, xb
    return sums, counts, obj


def _update(torch, C, sums, counts, gen: np.random.Generator):
    """New centroids: the means; an empty cluster takes a copy of a big cluster's centroid, both
    nudged apart, and half of its points (as faiss's split_clusters does)."""
    nonempty = counts > 0
    newC = C.clone()
    newC[nonempty] = (sums[nonempty] / counts[nonempty, None]).to(C.dtype)
    empty = torch.nonzero(~nonempty).flatten().tolist()
    if empty:
        cnt = counts.cpu().numpy().copy()
        n, k = cnt.sum(), len(cnt)
        for ci in empty:
            cj = int(np.argmax(cnt))
            while n > k:  # pick cj with probability (size - 1) / (n - k), as faiss does
                j = int(gen.integers(k))
                if gen.random() * (n - k) < cnt[j] - 1:
                    cj = j
                    break
            newC[ci] = newC[cj]
            sign = torch.ones(C.shape[1], device=C.device, dtype=C.dtype)
            sign[::2] = -1
            newC[ci] *= 1 + SPLIT_EPS * sign
            newC[cj] *= 1 - SPLIT_EPS * sign
            cnt[ci] = cnt[cj] / 2
            cnt[cj] -= cnt[ci]
    return newC


def _normalize(torch, C):
    return C / C.norm(dim=1, keepdim=True).clamp_min(1e-20)
