"""The default nprobe: the smallest that reaches the target recall@10 against exact search."""
from __future__ import annotations

import numpy as np
import ray

from shards.faissio import faiss, metric_type, nlist, set_nprobe
from shards.store import Store
from shards.topk import merge_topk, recall_at_k

from .encode import read_vectors

K = 10
EVAL_QUERIES = 200


def exact_topk(store: Store, emb_rels: list[str], xq: np.ndarray, k: int, metric: str):
    """Brute force over every stored vector, one part in memory at a time."""
    res = []
    for rel in emb_rels:
        ids, x = read_vectors(store, rel)
        flat = faiss().IndexFlat(x.shape[1], metric_type(metric))
        flat.add(x)
        D, I = flat.search(xq, min(k, len(x)))
        res.append((D, np.where(I >= 0, ids[np.maximum(I, 0)], -1)))
    return merge_topk(res, k, metric)


def query_sample(store: Store, emb_rels: list[str], n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(emb_rels), size=n)
    xs = []
    for p in np.unique(picks):
        _, x = read_vectors(store, emb_rels[p])
        xs.append(x[rng.choice(len(x), size=min(len(x), int((picks == p).sum())), replace=False)])
    return np.concatenate(xs)


def nprobe_ladder(nl: int) -> list[int]:
    """1, 2, 4, ... up to nlist."""
    out, p = [], 1
    while p < nl:
        out.append(p)
        p *= 2
    return out + [nl]


@ray.remote
def tune_task(store: Store, work: str, S: int, emb_rels: list[str], metric: str, target: float,
              seed: int, threads: int) -> dict:
    from .merge import open_merged

    faiss().omp_set_num_threads(threads)
    shards = [open_merged(store, work, s) for s in range(S)]
    xq = query_sample(store, emb_rels, EVAL_QUERIES, seed)
    _, gt = exact_topk(store, emb_rels, xq, K, metric)
    nl = nlist(shards[0])
    best = None
    for p in nprobe_ladder(nl) if nl else [None]:
        for s in shards:
            set_nprobe(s, p)
        _, I = merge_topk([s.search(xq, K) for s in shards], K, metric)
        best = {"nprobe": p, "recall_at_10": round(recall_at_k(I, gt, K), 4), "eval_queries": len(xq)}
        if best["recall_at_10"] >= target:
            break
    return best
