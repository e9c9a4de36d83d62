"""The default nprobe: the smallest that reaches the target recall@10 against exact search,
measured on held-out vectors (stored vectors, each left out of its own search) by the measures
of index_builder/eval/measures.py, which `shardex eval` uses too."""
from __future__ import annotations

import io

import numpy as np
import ray

from index_builder.build.merge import open_merged
from index_builder.eval.measures import choose_nprobe, climb, merged_search, merged_truth
from index_builder.workdir import WorkDir
from shards.storage.faissio import faiss, nlist
from shards.storage.store import Store


def ground_truth(store: Store, wd: WorkDir, parts: list[int], metric: str, k: int):
    """(query vectors, their ids, exact top-k without themselves) from what each add task found."""
    q = np.load(io.BytesIO(store.read_bytes(wd.queries)))
    res = []
    for p in parts:
        g = np.load(io.BytesIO(store.read_bytes(wd.part_gt(p))))
        res.append((g["D"], g["I"]))
    return q["xq"], q["ids"], merged_truth(res, k, metric, own=q["ids"])


@ray.remote
def tune_task(store: Store, wd: WorkDir, parts: list[int], *, shards: int, metric: str, target: float, k: int,
              threads: int) -> dict:
    """The default nprobe of wd's merged shards, and the recall@k it reaches on tune's queries."""
    faiss().omp_set_num_threads(threads)
    index = [open_merged(store, wd, s) for s in range(shards)]
    xq, own, gt = ground_truth(store, wd, parts, metric, k)
    nl = nlist(index[0])
    rows = climb(merged_search(index, metric), xq, gt, k, nl, target, own)
    best = choose_nprobe(rows, target)
    return {"nprobe": best["nprobe"], "recall_at_10": best["recall"], "eval_queries": len(xq), "ladder": rows}
