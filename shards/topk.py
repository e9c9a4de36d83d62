"""Exact top-k merge of per-shard results (faiss's ResultHeap), in the metric's direction."""
from __future__ import annotations

import numpy as np

from .faissio import faiss, keep_max


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str):
    """[(D, I) per shard] -> (D, I) of the k best per query; -1 ids pad missing results."""
    nq = results[0][0].shape[0]
    heap = faiss().ResultHeap(nq, k, keep_max=keep_max(metric))
    for D, I in results:
        heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    hits = [len(np.intersect1d(a[:k][a[:k] >= 0], b[:k])) for a, b in zip(I, gt)]
    return float(np.mean(hits) / k)
