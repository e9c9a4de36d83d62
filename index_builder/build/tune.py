"""The default nprobe: the smallest that reaches the target recall@10 against exact search,
measured on held-out vectors (eval.py: stored vectors, each left out of its own search)."""
from __future__ import annotations

import io

import numpy as np
import ray

from shards.storage.faissio import faiss, nlist
from shards.storage.store import Store
from shards.search.topk import merge_topk

from index_builder.eval.evaluate import drop_own, nprobe_ladder, sweep

K = 10
EVAL_QUERIES = 200

__all__ = ["K", "EVAL_QUERIES", "nprobe_ladder", "tune_task"]


PLATEAU = 0.002   # a doubling of nprobe that adds less recall than this, twice running, ends the ladder
NEAR_BEST = 0.005  # without the target, the default is the smallest nprobe this close to the best recall


def choose_nprobe(rows: list[dict], target: float) -> dict:
    """The smallest nprobe reaching the target; if none does (PQ's compression caps recall), the
    smallest within NEAR_BEST of the best recall measured."""
    hit = next((r for r in rows if r["recall"] >= target), None)
    if hit:
        return hit
    top = max(r["recall"] for r in rows)
    return next(r for r in rows if r["recall"] >= top - NEAR_BEST)


def plateaued(rows: list[dict]) -> bool:
    r = [x["recall"] for x in rows]
    return len(r) >= 3 and r[-1] - r[-2] < PLATEAU and r[-2] - r[-3] < PLATEAU


def ground_truth(store: Store, work: str, parts: list[int], metric: str):
    """(query vectors, their ids, exact top-K without themselves) from what each add task found."""
    from index_builder.build.add import part_dir
    from index_builder.train.quantizer import queries_rel

    q = np.load(io.BytesIO(store.read_bytes(queries_rel(work))))
    res = []
    for p in parts:
        g = np.load(io.BytesIO(store.read_bytes(f"{part_dir(work, p)}/gt.npz")))
        res.append((g["D"], g["I"]))
    D, I = merge_topk(res, K + 1, metric)
    return q["xq"], q["ids"], drop_own(D, I, q["ids"], K)[1]


@ray.remote
def tune_task(store: Store, work: str, S: int, parts: list[int], metric: str, target: float,
              threads: int) -> dict:
    from index_builder.build.merge import open_merged

    faiss().omp_set_num_threads(threads)
    shards = [open_merged(store, work, s) for s in range(S)]
    xq, own, gt = ground_truth(store, work, parts, metric)
    nl = nlist(shards[0])
    rows = []
    for p in nprobe_ladder(nl) if nl else [None]:
        rows += sweep(shards, xq, gt, K, [p], metric, own)
        if rows[-1]["recall"] >= target or plateaued(rows):
            break
    best = choose_nprobe(rows, target)
    return {"nprobe": best["nprobe"], "recall_at_10": best["recall"], "eval_queries": len(xq), "ladder": rows}
