"""The default nprobe: the smallest that reaches the target recall@10 against exact search,
measured on held-out vectors (eval.py: stored vectors, each left out of its own search)."""
from __future__ import annotations

import ray

from shards.faissio import faiss, nlist
from shards.store import Store

from .eval import drop_own, exact_topk, nprobe_ladder, sample_queries, smallest_reaching, sweep

K = 10
EVAL_QUERIES = 200

__all__ = ["K", "EVAL_QUERIES", "nprobe_ladder", "tune_task"]


@ray.remote
def tune_task(store: Store, work: str, S: int, emb_rels: list[str], metric: str, target: float,
              seed: int, threads: int) -> dict:
    from .merge import open_merged

    faiss().omp_set_num_threads(threads)
    shards = [open_merged(store, work, s) for s in range(S)]
    xq, own = sample_queries(store, emb_rels, EVAL_QUERIES, seed)
    D, gt = exact_topk(store, emb_rels, xq, K + 1, metric)
    _, gt = drop_own(D, gt, own, K)
    nl = nlist(shards[0])
    rows = sweep(shards, xq, gt, K, nprobe_ladder(nl) if nl else [None], metric, own, stop_at=target)
    best = smallest_reaching(rows, target) or rows[-1]
    return {"nprobe": best["nprobe"], "recall_at_10": best["recall"], "eval_queries": len(xq)}
