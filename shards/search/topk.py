"""Exact top-k of per-shard results, with faiss's ResultHeap as the router merges shards' answers,
for searches of every shard in one process. Measures against brute force (exact_knn, recall) are
the builder's: index_builder/eval/measures.py."""
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
