"""The default nprobe: the smallest that reaches the target recall@10 against exact search,
measured on held-out vectors (stored vectors, each left out of its own search) by the measures
of index_builder/eval/measures.py, which `shardex eval` uses too.

With refine stores, the default is a pair (nprobe, refine factor): for each factor of REFINE_FACTORS
(0: codes only) the smallest nprobe reaching the target, then the pair whose batched search of the
tune's queries took the least time (cheapest)."""
from __future__ import annotations

import io

import numpy as np
import ray

from index_builder.build.merge import open_merged
from index_builder.config import env_count
from index_builder.eval.measures import (
    NEAR_BEST,
    REFINE_FACTORS,
    choose_nprobe,
    climb,
    drop_own,
    reaches,
    recall_at_k,
    timed,
)
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
from shards.storage.manifest import FieldsInfo
from shards.storage.refine import RefineStore
from shards.storage.store import Store

FOLD = 64  # units' exact answers merged at a time
# Merged shards holding this many bytes together are tuned by one task, in a worker Ray keeps warm: an
# actor per shard costs a process start each, which is most of a small build's tune. Above it, one actor
# per shard, so that no process holds them all. $SHARDEX_TUNE_LOCAL_BYTES moves it (tests, benchmarks).
LOCAL_BYTES = 1 << 30
COST_SECS = 0.1                        # each (nprobe, factor) pair's search is timed over at least this long


def truth(store: Store, wd: WorkDir, units: list[str], metric: str, k: int):
    """(query vectors, their ids, exact top-k without themselves) from what each add task found,
    folded FOLD units at a time: memory holds the queries' running top-k, not every unit's."""
    q = np.load(io.BytesIO(store.read_bytes(wd.queries)))
    best, own = [], None if "real" in q.files else q["ids"]  # real queries are not stored vectors to leave out
    for a in range(0, len(units), FOLD):
        res = [np.load(io.BytesIO(store.read_bytes(wd.unit_gt(u)))) for u in units[a:a + FOLD]]
        best = [merge_topk(best + [(g["D"], g["I"]) for g in res], k + 1, metric)]
    return q["xq"], own, drop_own(*best[0], own, k)[1]  # own None: the first k of the k + 1


truth_task = ray.remote(**TASK_RETRIES)(truth)


def search_shard(index, xq: np.ndarray, k: int, nprobe: int | None, refine: RefineStore | None = None,
                 factor: int = 0, metric: str = "ip"):
    """One shard's top-k at nprobe; with a factor, its k x factor best reranked from its refine store."""
    set_nprobe(index, nprobe)
    if not factor or refine is None:
        return index.search(xq, k)
    return refine.rerank(xq, index.search(xq, k * factor)[1], k, metric)


def refine_stores(store: Store, refine: list[list[FieldsInfo]] | None) -> list | None:
    """Each shard's refine store from its files (named by their path), or None without any. Their gather
    tasks hashed them as they wrote them: they are not read once more here to be hashed again."""
    return [RefineStore(store, [(f.file, f) for f in fs], f"shard {s}", checked=False) for s, fs in enumerate(refine)] \
        if refine else None


@ray.remote(max_restarts=-1, max_task_retries=3)  # a lost node's shard reloads elsewhere
class TuneShard:
    """One merged shard, held by its own actor for the tune's searches: no process holds them all."""

    def __init__(self, store: Store, wd: WorkDir, s: int, threads: int, metric: str,
                 refine: list[FieldsInfo] | None = None):
        faiss().omp_set_num_threads(threads)
        self.index, self.metric = open_merged(store, wd, s), metric
        self.refine = refine_stores(store, [refine])[0] if refine else None

    def nlist(self) -> int | None:
        return nlist(self.index)

    def search(self, xq: np.ndarray, k: int, nprobe: int | None, factor: int = 0):
        return search_shard(self.index, xq, k, nprobe, self.refine, factor, self.metric)

    def search_lists(self, xq: np.ndarray, k: int, coarse: tuple, factor: int = 0):
        return lists_refined(self.index, xq, k, coarse, self.refine, factor, self.metric)


def lists_refined(index, xq, k: int, coarse: tuple, refine: RefineStore | None, factor: int, metric: str):
    """search_preassigned's top-k, or with a factor its k x factor best reranked from the refine store."""
    if not factor or refine is None:
        return search_preassigned(index, xq, k, coarse)
    return refine.rerank(xq, search_preassigned(index, xq, k * factor, coarse)[1], k, metric)


def tuned(search_all, nl: int | None, xq, own, gt, *, metric: str, target: float, k: int, ranked=None,
          factors: tuple = (0,)) -> dict:
    """Climb the nprobe ladder over the shards' merged top-k, for each refine factor of factors.
    search_all(xq, k, nprobe, factor): every shard's (D, I). ranked: (trained index, list ranges,
    search_lists(xq, k, coarse, factor) -> every shard's (D, I) in those lists) under --sharding ivf:
    the ranked routing is tuned too (ranked_routing), at the chosen factor."""
    def merged(R):
        return lambda xq, k, p: merge_topk(search_all(xq, k, p, R), k, metric)

    tries = []
    for R in factors:
        rows = climb(merged(R), xq, gt, k, nl, target, own)
        tries.append({**choose_nprobe(rows, target), "refine": R, "ladder": rows})
    if len(tries) > 1:  # the cost of each factor's pair, timed alike
        kk = k + (own is not None)
        for t in tries:
            _, runs, secs = timed(lambda t=t: merged(t["refine"])(xq, kk, t["nprobe"]), COST_SECS, 2)
            t["us_per_query"] = round(secs / runs / len(xq) * 1e6, 2)
    best = cheapest(tries, target)
    R = best["refine"]
    out = {"nprobe": best["nprobe"], "recall_at_10": best["recall"], "eval_queries": len(xq),
           "ladder": best["ladder"], "route_gap": None, "tuned_on": "held-out" if own is not None else "queries",
           "refine_factor": R if len(factors) > 1 else None,
           "refine_tries": [{k_: t[k_] for k_ in ("refine", "nprobe", "recall", "us_per_query") if k_ in t}
                            for t in tries] if len(factors) > 1 else None}
    if ranked is not None and best["nprobe"] and best["recall"] >= target:
        trained, ranges, lists = ranked
        got = ranked_routing(trained, ranges, lambda xq, k, c: lists(xq, k, c, R), xq, own, gt, metric=metric,
                             target=target, k=k, p0=best["nprobe"], nl=nl)
        out["routes"], out["exact_touched"] = got["rows"], got["exact_touched"]
        if got["best"]:
            b = got["best"]
            out.update(nprobe=b["nprobe"], recall_at_10=b["recall"], route_gap=b["gap"], touched=b["touched"])
    return out


def cheapest(tries: list[dict], target: float) -> dict:
    """The try (recall, recall_se, us_per_query) that reaches the target (measures.reaches) at the least
    cost; when none does, the cheapest within NEAR_BEST of the best recall."""
    ok = [t for t in tries if reaches(t, target)]
    if not ok:
        top = max(t["recall"] for t in tries)
        ok = [t for t in tries if t["recall"] >= top - NEAR_BEST]
    return min(ok, key=lambda t: t.get("us_per_query", 0.0))


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
              threads: int, ranges: list | None = None, refine: list | None = None) -> dict:
    """tune() for shards small enough to hold together: all of them in this one task, as one index
    when they can be (union; not with refine stores: each shard reranks its own candidates)."""
    faiss().omp_set_num_threads(threads)
    xq, own, gt = truth(store, wd, units, metric, k)
    ix = [open_merged(store, wd, s) for s in range(shards)]
    nl, rs = nlist(ix[0]), refine_stores(store, refine)
    one = union(ix) if rs is None else None
    ix, rs = ([one], [None]) if one is not None else (ix, rs or [None] * len(ix))
    ranked = (read_index(store, wd.trained), ranges,
              lambda xq, k, c, R: [lists_refined(i, xq, k, c, r, R, metric) for i, r in zip(ix, rs)]
              ) if ranges and len(ranges) > 1 else None
    return tuned(lambda xq, k, p, R: [search_shard(i, xq, k, p, r, R, metric) for i, r in zip(ix, rs)], nl, xq, own,
                 gt, metric=metric, target=target, k=k, ranked=ranked, factors=REFINE_FACTORS if refine else (0,))


def tune(store: Store, wd: WorkDir, units: list[str], *, shards: int, metric: str, target: float, k: int,
         cpus: int, node: int, shard_bytes: int, ranges: list | None = None, refine: list | None = None) -> dict:
    """The default nprobe of wd's merged shards, and the recall@k it reaches on tune's queries, the
    top-k merged as the router merges it. cpus, node: the cluster's CPUs and its largest node's;
    shard_bytes: the merged shards' together. Up to LOCAL_BYTES, one task searches them all on a
    node's CPUs. Above, each shard is searched by its own actor; they reserve half the cluster
    together, so that truth_task finds room beside them, and run more threads than they reserve
    (the cluster's CPUs over the shards): truth is done before any search. ranges: --sharding ivf's list
    ranges, when the ranked routing is tuned as well; refine: each shard's refine files, when the refine
    factor is tuned as well."""
    common = {"metric": metric, "target": target, "k": k}
    if shard_bytes <= env_count("SHARDEX_TUNE_LOCAL_BYTES", LOCAL_BYTES):
        return ray_get(tune_task.options(num_cpus=node).remote(store, wd, units, shards=shards, threads=node,
                                                               ranges=ranges, refine=refine, **common))
    each, threads = max(0.01, min(1.0, cpus / 2 / shards)), max(1, min(node, cpus // shards))
    actors = [TuneShard.options(num_cpus=each).remote(store, wd, s, threads, metric, refine[s] if refine else None)
              for s in range(shards)]
    try:
        xq, own, gt = ray_get(truth_task.options(num_cpus=0.5).remote(store, wd, units, metric, k))
        nl = ray_get(actors[0].nlist.remote())
        ranked = (read_index(store, wd.trained), ranges,
                  lambda xq, k, c, R: ray_get([a.search_lists.remote(xq, k, c, R) for a in actors])
                  ) if ranges and len(ranges) > 1 else None
        return tuned(lambda xq, k, p, R: ray_get([a.search.remote(xq, k, p, R) for a in actors]), nl, xq, own, gt,
                     ranked=ranked, factors=REFINE_FACTORS if refine else (0,), **common)
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
