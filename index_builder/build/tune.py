"""The default nprobe: the smallest that reaches the target recall@10 against exact search,
measured on held-out vectors (stored vectors, each left out of its own search) by the measures
of index_builder/eval/measures.py, which `shardex eval` uses too."""
from __future__ import annotations

import io

import numpy as np
import ray

from index_builder.build.merge import open_merged
from index_builder.eval.measures import choose_nprobe, climb, drop_own
from index_builder.workdir import WorkDir
from shards.raytools import ray_get
from shards.search.topk import merge_topk
from shards.storage.faissio import faiss, nlist, set_nprobe
from shards.storage.store import Store

FOLD = 64  # units' exact answers merged at a time


@ray.remote
def truth_task(store: Store, wd: WorkDir, units: list[str], metric: str, k: int):
    """(query vectors, their ids, exact top-k without themselves) from what each add task found,
    folded FOLD units at a time: memory holds the queries' running top-k, not every unit's."""
    q = np.load(io.BytesIO(store.read_bytes(wd.queries)))
    best, own = [], q["ids"]
    for a in range(0, len(units), FOLD):
        res = [np.load(io.BytesIO(store.read_bytes(wd.unit_gt(u)))) for u in units[a:a + FOLD]]
        best = [merge_topk(best + [(g["D"], g["I"]) for g in res], k + 1, metric)]
    return q["xq"], own, drop_own(*best[0], own, k)[1]


@ray.remote
class TuneShard:
    """One merged shard, held by its own actor for the tune's searches: no process holds them all."""

    def __init__(self, store: Store, wd: WorkDir, s: int, threads: int):
        faiss().omp_set_num_threads(threads)
        self.index = open_merged(store, wd, s)

    def nlist(self) -> int | None:
        return nlist(self.index)

    def search(self, xq: np.ndarray, k: int, nprobe: int | None):
        set_nprobe(self.index, nprobe)
        return self.index.search(xq, k)


def tune(store: Store, wd: WorkDir, units: list[str], *, shards: int, metric: str, target: float, k: int,
         cpus: float) -> dict:
    """The default nprobe of wd's merged shards, and the recall@k it reaches on tune's queries. Each
    shard is searched by its own actor (cpus: what all of them may take together), and the top-k
    merged here as the router merges it."""
    each = max(0.01, min(1.0, cpus / shards))
    actors = [TuneShard.options(num_cpus=each).remote(store, wd, s, max(1, int(each))) for s in range(shards)]
    try:
        xq, own, gt = ray_get(truth_task.options(num_cpus=0.5).remote(store, wd, units, metric, k))
        nl = ray_get(actors[0].nlist.remote())

        def search(xq, k, nprobe):
            return merge_topk(ray_get([a.search.remote(xq, k, nprobe) for a in actors]), k, metric)

        rows = climb(search, xq, gt, k, nl, target, own)
    finally:
        for a in actors:
            ray.kill(a)
    best = choose_nprobe(rows, target)
    return {"nprobe": best["nprobe"], "recall_at_10": best["recall"], "eval_queries": len(xq), "ladder": rows}


def recall_warning(tuned: dict, target: float) -> str | None:
    """The published nprobe's recall when it is under the target: more probing did not reach it
    (the ladder plateaued, or every list was probed), so the codes or the lists are too coarse."""
    r = tuned.get("recall_at_10")
    if r is None or r >= target:
        return None
    at = f"nprobe={tuned['nprobe']}" if tuned.get("nprobe") else "exact scan of the codes"
    return (f"recall: {r:.3f} recall@10 at {at} is under --target-recall {target}, and probing more lists "
            f"does not reach it; give finer codes (a larger --memory-budget, or --factory with a bigger PQ{{M}}, "
            f"SQ8 or Flat) or a lower --target-recall")
