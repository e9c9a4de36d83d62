"""The measures of an index against exact search: ground truth, recall@k, the nprobe sweep, the
default nprobe. tune (the published default), `shardex eval` and the benchmarks all use these.

Ground truth is brute force (exact_knn), one block of vectors at a time, so it can be taken part
by part and merged (merge_topk, the router's exact merge). Held-out queries are stored vectors:
each is searched for k+1 and its own id is dropped (drop_own), from the truth and the answers.

QPS is timed as faiss's benchmarks time it: a search is repeated until MIN_SECS have passed (at
least once), and the rate is every query searched over the whole time (timed): one batch of a
small index takes milliseconds, too short for one clock reading to be a rate worth plotting.
"""
from __future__ import annotations

import time

import numpy as np

from shards.search.topk import merge_topk
from shards.storage.faissio import faiss, ivf, keep_max, probed_lists, set_nprobe

K = 10              # tune measures recall@K: what the published default nprobe is chosen by
EVAL_QUERIES = 200  # held-out vectors tune measures it on
PLATEAU = 0.002     # a doubling of nprobe that adds no more recall than this, twice running, ends the ladder
NEAR_BEST = 0.005   # without the target, the default is the smallest nprobe this close to the best recall
BLOCK_BYTES = 64 << 20  # the largest query x block distance matrix exact_knn holds
MIN_SECS = 0.2      # each QPS is measured over at least this long (timed)
REFINE_FACTORS = (0, 2, 4, 8, 16, 32)  # k x factor candidates a shard reranks from its refine store; 0: none
# A setting published or re-tuned reaches the target by the lower end of a one-sided 95% bound on its mean
# recall (z x its standard error over the queries): at the mean alone, other queries like them fall under
# the target about half the time (bench/README.md, two-tier search).
RECALL_Z = 1.645


# ---------------------------------------------------------------- ground truth

def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str):
    """(D, I) of the k nearest rows of xb to each query, by brute force: rows of I index xb, -1 pads
    where xb has fewer than k rows. One matrix product per block of xb, turned in place into a key
    that is smaller for nearer rows, then the k smallest keys of each row (smallest): faster than
    faiss's IndexFlat for the few hundred queries of tune and eval (bench/README.md)."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nq, n = len(xq), len(xb)
    heap = faiss().ResultHeap(nq, k, keep_max=keep_max(metric))
    qn = (xq * xq).sum(1)[:, None]
    bs = max(k, BLOCK_BYTES // (4 * max(nq, 1)))
    for a in range(0, n, bs):
        x = np.asarray(xb[a:a + bs], dtype=np.float32)
        key = xq @ x.T
        if metric == "ip":
            np.negative(key, out=key)
        else:  # |x|^2 - 2 q.x: |q|^2 is the same along a row, added back to the k kept
            key *= -2
            key += (x * x).sum(1)[None, :]
        I = smallest(key, min(k, len(x)))
        D = np.take_along_axis(key, I, 1)
        D = -D if metric == "ip" else np.maximum(D + qn, 0)
        heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I + a, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I


STRIDE = 64  # smallest() takes its threshold from every STRIDE-th column


def smallest(key: np.ndarray, k: int) -> np.ndarray:
    """Column numbers of the k smallest values of each row of key, in no order. The k-th smallest
    of every STRIDE-th column is no smaller than the row's own k-th smallest, so the row's k smallest
    all lie at or under it: only those few candidates (about STRIDE x k) are sorted, where
    argpartition would move the whole row (most of exact_knn's time after the matrix product)."""
    nq, n = key.shape
    if k >= n:
        return np.tile(np.arange(n), (nq, 1))
    if n < 4 * STRIDE * k:
        return np.argpartition(key, k - 1, axis=1)[:, :k]
    th = np.partition(key[:, ::STRIDE], k - 1, axis=1)[:, k - 1:k]
    r, c = np.nonzero(key <= th)
    if np.bincount(r, minlength=nq).min() < k:  # NaNs compare false: let argpartition place them
        return np.argpartition(key, k - 1, axis=1)[:, :k]
    o = np.lexsort((key[r, c], r))
    r, c = r[o], c[o]
    rank = np.arange(len(r)) - np.searchsorted(r, r)
    return c[rank < k].reshape(nq, k)


def part_topk(xq: np.ndarray, ids: np.ndarray, x: np.ndarray, k: int, metric: str):
    """(D, I) of the exact top-k among one part's vectors, by id, always k columns: where the part
    holds fewer, the worst distance and id -1 pad (which no merge keeps over a real result)."""
    D, I = exact_knn(xq, x, min(k, len(x)), metric)
    pad = k - D.shape[1]
    worst = -np.inf if metric == "ip" else np.inf
    D = np.pad(D, ((0, 0), (0, pad)), constant_values=worst)
    I = np.pad(np.where(I >= 0, ids[np.maximum(I, 0)], -1), ((0, 0), (0, pad)), constant_values=-1)
    return D, I


def merged_truth(parts: list[tuple[np.ndarray, np.ndarray]], k: int, metric: str, own: np.ndarray | None = None):
    """The true top-k ids of each query from the parts' exact answers (k+1 columns each when own,
    the held-out queries' ids, is given: they are dropped)."""
    D, I = merge_topk(parts, k + (own is not None), metric)
    return drop_own(D, I, own, k)[1]


def drop_own(D: np.ndarray, I: np.ndarray, own: np.ndarray | None, k: int):
    """The top-k of each row without the query's own id (leave-one-out); rows come with k+1 columns."""
    if own is None:
        return D[:, :k], I[:, :k]
    keep = I != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]   # kept entries first, in rank order
    D2, I2 = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    gone = ~np.take_along_axis(keep, order, 1)
    return np.where(gone, np.nan, D2), np.where(gone, -1, I2)


def recall_at_k(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean fraction of each query's true top-k found in the returned top-k. Only ids count (-1 pads,
    in the answer or the truth, never do), and a query's share is of its true ids: an index that
    holds fewer than k others can still be found whole.

    Ties count against: where the k-th and (k+1)-th true neighbours are at the same distance (the
    same text twice gives the same vector twice), exact search keeps one of them and the index may
    keep the other, so even a Flat index can score a little under 1.0 (0.997 on 1,000 of the demo's
    docstrings, every miss such a tie). That is left in, not papered over: it is what a user
    comparing id lists would see."""
    return float(np.mean(recall_hits(I, gt, k)))


def recall_hits(I: np.ndarray, gt: np.ndarray, k: int) -> np.ndarray:
    """Each query's share of its true top-k found (recall_at_k is their mean)."""
    return np.array([len(np.intersect1d(a[:k][a[:k] >= 0], b[:k][b[:k] >= 0])) / max(1, int((b[:k] >= 0).sum()))
                     for a, b in zip(I, gt, strict=True)])


def reaches(row: dict, target: float) -> bool:
    """Whether a measured row reaches the target recall with confidence: mean - RECALL_Z x its standard error."""
    return row["recall"] - RECALL_Z * row.get("recall_se", 0.0) >= target


# ---------------------------------------------------------------- the sweep

def merged_search(shards: list, metric: str, refine: int | None = None):
    """search(xq, k, nprobe) -> (D, I): every shard in this process, then the exact top-k merge,
    which is what the router answers. shards: faiss indexes, or ShardSearchers (a segmented
    shard is searched through its segments and dead set; refine: their rerank factor, 0 none)."""
    def one(s, xq, k, nprobe):
        if hasattr(s, "seg"):
            return s.search(xq, k, nprobe, refine=refine)
        set_nprobe(s, nprobe)
        return s.search(xq, k)

    def search(xq, k, nprobe):
        return merge_topk([one(s, xq, k, nprobe) for s in shards], k, metric)
    return search


def search_kind(index) -> str:
    """"ivf": lists to probe, an nprobe to sweep; "exact": a flat scan, brute force as the truth
    is; "fixed": another index without lists (HNSW, PQ, SQ, a pre-transform before Flat), one
    setting to measure. shardex wraps a list-less index in an IDMap (train.quantizer.make_index)."""
    if ivf(index) is not None:
        return "ivf"
    f = faiss()
    inner = f.downcast_index(index)
    if isinstance(inner, (f.IndexIDMap, f.IndexIDMap2)):
        inner = f.downcast_index(inner.index)
    return "exact" if isinstance(inner, f.IndexFlat) else "fixed"


def nprobe_ladder(nl: int) -> list[int]:
    """1, 2, 4, ... up to nlist."""
    out, p = [], 1
    while p < nl:
        out.append(p)
        p *= 2
    return out + [nl]


def sweep(search, xq: np.ndarray, gt: np.ndarray, k: int, nprobes: list, own: np.ndarray | None = None,
          reps: int = 1, latency_queries: int = 0, progress=None, min_secs: float = MIN_SECS) -> list[dict]:
    """Per nprobe: recall@k and the QPS of the whole batch (timed: repeated for min_secs, at least
    reps times), and when asked the latency of latency_queries searched one at a time.
    search(xq, k, nprobe) -> (D, I); own: the held-out query ids to leave out; progress: called
    with each row as it is measured."""
    kk = k + (own is not None)
    rows = []
    for p in nprobes:
        (D, I), runs, secs = timed(lambda p=p: search(xq, kk, p), min_secs, reps)
        _, I = drop_own(D, I, own, k)
        hits = recall_hits(I, gt, k)
        row = {"nprobe": p, "recall": round(float(hits.mean()), 4),
               "recall_se": round(float(hits.std() / np.sqrt(max(1, len(hits)))), 5),
               "qps": round(len(xq) * runs / secs, 1), "runs": runs}
        if latency_queries:
            row["latency_ms"] = latency(search, xq[:latency_queries], kk, p)
        rows.append(row)
        if progress:
            progress(row)
    return rows


def timed(run, min_secs: float = MIN_SECS, min_runs: int = 1, clock=time.perf_counter):
    """(run()'s last result, how many times it ran, the seconds they took): run() again and again
    until min_secs have passed and it ran at least min_runs times (faiss's benchmarks do the same),
    so a rate over the whole is steady even when one run is shorter than the clock's noise."""
    runs, t0 = 0, clock()
    while True:
        out = run()
        runs += 1
        secs = clock() - t0
        if runs >= min_runs and secs >= min_secs:
            return out, runs, max(secs, 1e-9)


def latency(search, xq: np.ndarray, k: int, nprobe) -> dict:
    """p50, p95 and p99 milliseconds of one query at a time."""
    t = []
    for q in range(len(xq)):
        t0 = time.perf_counter()
        search(xq[q:q + 1], k, nprobe)
        t.append((time.perf_counter() - t0) * 1000)
    return {f"p{q}": round(float(np.percentile(t, q)), 3) for q in (50, 95, 99)}


def shards_per_query(trained, ranges: list, xq: np.ndarray, nprobe: int) -> float:
    """Under --sharding ivf: how many shards a query probing nprobe lists needs, on average."""
    from shards.search.shard_selection import shards_for_lists

    asked = shards_for_lists(probed_lists(trained, xq, nprobe), ranges)
    return round(float(np.mean([len(a) for a in asked])), 3)


# ---------------------------------------------------------------- the default nprobe

def climb(search, xq: np.ndarray, gt: np.ndarray, k: int, nl: int | None, target: float,
          own: np.ndarray | None = None) -> list[dict]:
    """Sweep up the ladder (one step, [None], for an index without lists) until an nprobe reaches
    the target or recall plateaus."""
    rows = []
    for p in nprobe_ladder(nl) if nl else [None]:
        rows += sweep(search, xq, gt, k, [p], own, min_secs=0)  # recall decides; one run's QPS will do
        if reaches(rows[-1], target) or plateaued(rows):
            break
    return rows


def plateaued(rows: list[dict]) -> bool:
    """Two doublings running added at most PLATEAU each (recalls are rounded to 4 places: so are the
    gains). Each step costs about as much as all the steps below it, so a step saved is half a climb."""
    r = [x["recall"] for x in rows]
    return len(r) >= 3 and round(r[-1] - r[-2], 4) <= PLATEAU and round(r[-2] - r[-3], 4) <= PLATEAU


def smallest_reaching(rows: list[dict], target: float) -> dict | None:
    return next((r for r in rows if r["recall"] >= target), None)


def fastest_reaching(rows: list[dict], target: float) -> dict | None:
    """The row (of a sweep) reaching the target at the highest QPS, or None."""
    ok = [r for r in rows if reaches(r, target)]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def choose_nprobe(rows: list[dict], target: float) -> dict:
    """The smallest nprobe reaching the target (with confidence: reaches); if none does (PQ's compression
    caps recall), the smallest within NEAR_BEST of the best recall measured."""
    hit = next((r for r in rows if reaches(r, target)), None)
    if hit:
        return hit
    top = max(r["recall"] for r in rows)
    return next(r for r in rows if r["recall"] >= top - NEAR_BEST)
