"""The default nprobe: the smallest that reaches the target recall@10 against exact search,
measured on held-out vectors (stored vectors, each left out of its own search) by the measures
of index_builder/eval/measures.py, which `shardex eval` uses too."""
from __future__ import annotations

import io

import numpy as np
import ray

from index_builder.build.merge import open_merged
from index_builder.config import env_count
from index_builder.eval.measures import choose_nprobe, climb, drop_own, recall_at_k
from index_builder.workdir import WorkDir
from shards.raytools import TASK_RETRIES, ray_get
from shards.search.shard_selection import gap_mask, scanned, shard_gaps, shard_mask
from shards.search.topk import merge_topk
from shards.storage.faissio import (
    coarse_search,
    faiss,
    ivf,
    nlist,
    read_index,
    search_preassigned,
    set_nprobe,
    set_ntotal,
)
from shards.storage.store import Store

FOLD = 64  # units' exact answers merged at a time
# Merged shards holding this many bytes together are tuned by one task, in a worker Ray keeps warm: an
# actor per shard costs a process start each, which is most of a small build's tune. Above it, one actor
# per shard, so that no process holds them all. $SHARDEX_TUNE_LOCAL_BYTES moves it (tests, benchmarks).
LOCAL_BYTES = 1 << 30


def truth(store: Store, wd: WorkDir, units: list[str], metric: str, k: int):
    """(query vectors, their ids, exact top-k without themselves) from what each add task found,
    folded FOLD units at a time: memory holds the queries' running top-k, not every unit's."""
    q = np.load(io.BytesIO(store.read_bytes(wd.queries)))
    best, own = [], q["ids"]
    for a in range(0, len(units), FOLD):
        res = [np.load(io.BytesIO(store.read_bytes(wd.unit_gt(u)))) for u in units[a:a + FOLD]]
        best = [merge_topk(best + [(g["D"], g["I"]) for g in res], k + 1, metric)]
    return q["xq"], own, drop_own(*best[0], own, k)[1]


truth_task = ray.remote(**TASK_RETRIES)(truth)


def search_shard(index, xq: np.ndarray, k: int, nprobe: int | None):
    set_nprobe(index, nprobe)
    return index.search(xq, k)


@ray.remote(max_restarts=-1, max_task_retries=3)  # a lost node's shard reloads elsewhere
class TuneShard:
    """One merged shard, held by its own actor for the tune's searches: no process holds them all."""

    def __init__(self, store: Store, wd: WorkDir, s: int, threads: int):
        faiss().omp_set_num_threads(threads)
        self.index = open_merged(store, wd, s)

    def nlist(self) -> int | None:
        return nlist(self.index)

    def search(self, xq: np.ndarray, k: int, nprobe: int | None):
        return search_shard(self.index, xq, k, nprobe)

    def search_lists(self, xq: np.ndarray, k: int, coarse: tuple):
        return search_preassigned(self.index, xq, k, coarse)


def tuned(search_all, nl: int | None, xq, own, gt, *, metric: str, target: float, k: int, ranked=None) -> dict:
    """Climb the nprobe ladder over the shards' merged top-k. search_all(xq, k, nprobe): every
    shard's (D, I). ranked: (trained index, list ranges, search_lists(xq, k, coarse) -> every shard's
    (D, I) in those lists) under --sharding ivf: the ranked routing is tuned too (ranked_routing)."""
    rows = climb(lambda xq, k, p: merge_topk(search_all(xq, k, p), k, metric), xq, gt, k, nl, target, own)
    best = choose_nprobe(rows, target)
    out = {"nprobe": best["nprobe"], "recall_at_10": best["recall"], "eval_queries": len(xq), "ladder": rows,
           "route_gap": None}
    if ranked is not None and best["nprobe"] and best["recall"] >= target:
        got = ranked_routing(*ranked, xq, own, gt, metric=metric, target=target, k=k, p0=best["nprobe"], nl=nl)
        out["routes"], out["exact_touched"] = got["rows"], got["exact_touched"]
        if got["best"]:
            b = got["best"]
            out.update(nprobe=b["nprobe"], recall_at_10=b["recall"], route_gap=b["gap"], touched=b["touched"])
    return out


GAP_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)  # of the gaps from a query's nearest list to each other shard's
NPROBE_STEPS = (1, 2, 4)                               # multiples of the exact-routing nprobe tried


def ranked_routing(trained, ranges, search_lists, xq, own, gt, *, metric: str, target: float, k: int, p0: int,
                   nl: int) -> dict:
    """The ranked routing (shard_selection.gap_mask) asking the fewest shards while recall@k stays at the
    target: for nprobe p0 (the smallest reaching it asking every shard a query probes) and larger, the
    smallest gap that reaches it. {"rows": each try, "best": the chosen one, or None when none asks fewer
    shards than routing to every probed list at p0}."""
    ip, kk, rows = metric == "ip", k + (own is not None), []
    exact = float(shard_mask(coarse_search(trained, xq, p0)[1], ranges).sum(1).mean())
    for p in sorted({min(nl, p0 * m) for m in NPROBE_STEPS}):
        Dq, Iq = coarse_search(trained, xq, p)
        for g in [float(x) for x in np.unique(np.quantile(_gaps(Dq, Iq, ranges, ip), GAP_QUANTILES))]:
            m = gap_mask(Dq, Iq, ranges, g, ip)
            D, I = merge_topk(search_lists(xq, kk, (Dq, scanned(Iq, m, ranges))), kk, metric)
            r = recall_at_k(drop_own(D, I, own, k)[1], gt, k)
            rows.append({"nprobe": p, "gap": round(g, 6), "recall": round(r, 4),
                         "touched": round(float(m.sum(1).mean()), 3)})
            if r >= target:
                break
    ok = [r for r in rows if r["recall"] >= target and r["touched"] < exact]
    return {"rows": rows, "exact_touched": round(exact, 3),
            "best": min(ok, key=lambda r: (r["touched"], r["nprobe"])) if ok else None}


def _gaps(Dq, Iq, ranges, ip: bool) -> np.ndarray:
    """The gaps worth trying: every query's, to each other shard its probe reaches."""
    g = shard_gaps(Dq, Iq, ranges, ip)
    g = g[np.isfinite(g) & (g > 0)]
    return g if len(g) else np.zeros(1)


def union(ix: list):
    """The shards as one IVF index, the others' lists moved into the first's, when every one is an
    IVF index with plain lists in RAM (not packed for fast-scan, not on disk); else None. Searching
    it returns what searching each and merging returns, with one coarse search and one distance
    table per probed list instead of one per shard."""
    f, ivs = faiss(), [ivf(i) for i in ix]
    if any(v is None or not isinstance(f.downcast_InvertedLists(v.invlists), f.ArrayInvertedLists) for v in ivs):
        return None
    for v in ivs[1:]:
        ivs[0].merge_from(v, 0)
    set_ntotal(ix[0], ivs[0].ntotal)
    return ix[0]


@ray.remote(**TASK_RETRIES)
def tune_task(store: Store, wd: WorkDir, units: list[str], *, shards: int, metric: str, target: float, k: int,
              threads: int, ranges: list | None = None) -> dict:
    """tune() for shards small enough to hold together: all of them in this one task, as one index
    when they can be (union)."""
    faiss().omp_set_num_threads(threads)
    xq, own, gt = truth(store, wd, units, metric, k)
    ix = [open_merged(store, wd, s) for s in range(shards)]
    nl, one = nlist(ix[0]), union(ix)
    ix = [one] if one is not None else ix
    ranked = (read_index(store, wd.trained), ranges, lambda xq, k, c: [search_preassigned(i, xq, k, c) for i in ix]
              ) if ranges and len(ranges) > 1 else None
    return tuned(lambda xq, k, p: [search_shard(i, xq, k, p) for i in ix], nl, xq, own, gt,
                 metric=metric, target=target, k=k, ranked=ranked)


def tune(store: Store, wd: WorkDir, units: list[str], *, shards: int, metric: str, target: float, k: int,
         cpus: int, node: int, shard_bytes: int, ranges: list | None = None) -> dict:
    """The default nprobe of wd's merged shards, and the recall@k it reaches on tune's queries, the
    top-k merged as the router merges it. cpus, node: the cluster's CPUs and its largest node's;
    shard_bytes: the merged shards' together. Up to LOCAL_BYTES, one task searches them all on a
    node's CPUs. Above, each shard is searched by its own actor; they reserve half the cluster
    together, so that truth_task finds room beside them, and run more threads than they reserve
    (the cluster's CPUs over the shards): truth is done before any search. ranges: --sharding ivf's list
    ranges, when the ranked routing is tuned as well."""
    common = {"metric": metric, "target": target, "k": k}
    if shard_bytes <= env_count("SHARDEX_TUNE_LOCAL_BYTES", LOCAL_BYTES):
        return ray_get(tune_task.options(num_cpus=node).remote(store, wd, units, shards=shards, threads=node,
                                                               ranges=ranges, **common))
    each, threads = max(0.01, min(1.0, cpus / 2 / shards)), max(1, min(node, cpus // shards))
    actors = [TuneShard.options(num_cpus=each).remote(store, wd, s, threads) for s in range(shards)]
    try:
        xq, own, gt = ray_get(truth_task.options(num_cpus=0.5).remote(store, wd, units, metric, k))
        nl = ray_get(actors[0].nlist.remote())
        ranked = (read_index(store, wd.trained), ranges,
                  lambda xq, k, c: ray_get([a.search_lists.remote(xq, k, c) for a in actors])
                  ) if ranges and len(ranges) > 1 else None
        return tuned(lambda xq, k, p: ray_get([a.search.remote(xq, k, p) for a in actors]), nl, xq, own, gt,
                     ranked=ranked, **common)
    finally:
        for a in actors:
            ray.kill(a)


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
