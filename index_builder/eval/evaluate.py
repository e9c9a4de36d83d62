"""shardex eval: recall@k against exact search, QPS and latency, per nprobe; JSON and a PNG plot.

Ground truth is brute force over the stored vectors (the embeddings parts the manifest
lists), one part in memory at a time. Queries are given (--queries: .npy vectors, a
Parquet file with a vector or text column, or a text file of one query a line, encoded
with the index's own encoder), or sampled from the stored vectors and held out: each
sampled query is searched with its own id removed from both the exact and the index's
answers (leave-one-out), so a query never finds itself.

QPS is the throughput of one batch of every query through every shard in this process
(threads: --threads, default all cores); latency is one query at a time, shards in turn,
the merge included (no network: what a shard adds to a router's round trip). Under
--sharding ivf the shards a query needs (routing.shards_for_lists) are counted too.

The build's tune stage uses the same functions to store the default nprobe: the
smallest that reaches --target-recall on held-out vectors.
"""
from __future__ import annotations

import io
import json
import os
import platform
import time

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from shards.config import load_yaml
from shards.errors import ConfigError, StorageError
from shards.storage.faissio import faiss, load_shard, nlist, probed_lists, read_index, set_nprobe
from shards.storage.manifest import Manifest, current_version, load_manifest, vdir
from shards.search.shard_selection import shards_for_lists
from shards.storage.store import Store
from shards.search.topk import exact_knn, merge_topk

from index_builder.encode.parts import read_vectors


class EvalConfig(BaseModel):
    """`shardex eval`'s options; YAML keys for `python -m jobs.eval --config X.yaml` are the same names."""
    model_config = ConfigDict(extra="forbid")

    index_root: str
    version: str | None = None          # default: CURRENT
    queries: str | None = None          # .npy, .parquet (vector or text column) or a text file; default: sampled
    k: int = 10
    nprobe: list[int] | None = None     # default: 1, 2, 4, ... nlist
    num_queries: int = 1000             # sampled queries (without --queries)
    latency_queries: int = 200          # of them, searched one at a time for latency
    target_recall: float = 0.95
    out: str | None = None              # default: ./shardex-eval-<version>
    threads: int | None = None          # default: all cores
    seed: int = 0
    s3_endpoint: str | None = None

    @field_validator("nprobe", mode="before")
    @classmethod
    def _list(cls, v):
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        if isinstance(v, int):
            v = [v]
        return v

    @field_validator("nprobe")
    @classmethod
    def _nprobes(cls, v):
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"give positive nprobe values like 1,4,16, got {v}")
        return sorted(set(v)) if v else v

    @field_validator("k", "num_queries", "threads")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("latency_queries")
    @classmethod
    def _nonneg(cls, v):
        if v < 0:
            raise ValueError(f"must be at least 0, got {v}")
        return v

    @field_validator("target_recall")
    @classmethod
    def _recall(cls, v):
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "EvalConfig":
        return load_yaml(cls, path, **overrides)


# ---------------------------------------------------------------- queries and ground truth

def sample_queries(store: Store, emb_rels: list[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(xq, their ids): n stored vectors, the parts picked at random, one part read at a time."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(emb_rels), size=n)
    xs, ids = [], []
    for p in np.unique(picks):
        i, x = read_vectors(store, emb_rels[p])
        take = rng.choice(len(x), size=min(len(x), int((picks == p).sum())), replace=False)
        xs.append(x[take])
        ids.append(i[take])
    return np.concatenate(xs), np.concatenate(ids)


def exact_topk(store: Store, emb_rels: list[str], xq: np.ndarray, k: int, metric: str):
    """Brute force over every stored vector, one part in memory at a time."""
    res = []
    for rel in emb_rels:
        ids, x = read_vectors(store, rel)
        D, I = exact_knn(xq, x, min(k, len(x)), metric)
        res.append((D, np.where(I >= 0, ids[np.maximum(I, 0)], -1)))
    return merge_topk(res, k, metric)


def drop_own(D: np.ndarray, I: np.ndarray, own: np.ndarray | None, k: int):
    """The top-k of each row without the query's own id (leave-one-out); rows come with k+1 columns."""
    if own is None:
        return D[:, :k], I[:, :k]
    keep = I != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]   # kept entries first, in rank order
    D2, I2 = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    gone = ~np.take_along_axis(keep, order, 1)
    return np.where(gone, np.nan, D2), np.where(gone, -1, I2)


def recall(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean fraction of each query's true top-k (its valid ids: a tiny index may hold fewer than k
    others) found in the returned top-k."""
    hits = [len(np.intersect1d(a[:k][a[:k] >= 0], b[:k][b[:k] >= 0])) / max(1, int((b[:k] >= 0).sum()))
            for a, b in zip(I, gt)]
    return float(np.mean(hits))


def search_all(shards: list, xq: np.ndarray, k: int, nprobe: int | None, metric: str):
    """Every shard, then the exact top-k merge: what the router answers."""
    for s in shards:
        set_nprobe(s, nprobe)
    return merge_topk([s.search(xq, k) for s in shards], k, metric)


def nprobe_ladder(nl: int) -> list[int]:
    """1, 2, 4, ... up to nlist."""
    out, p = [], 1
    while p < nl:
        out.append(p)
        p *= 2
    return out + [nl]


# ---------------------------------------------------------------- the sweep

def sweep(shards: list, xq: np.ndarray, gt: np.ndarray, k: int, nprobes: list, metric: str,
          own: np.ndarray | None = None, latency_queries: int = 0, stop_at: float | None = None,
          route=None, progress=None) -> list[dict]:
    """Per nprobe: recall@k (and, when asked, QPS, latency and shards per query). own: the held-out
    query ids to leave out; stop_at: stop at the first nprobe reaching that recall; route:
    (trained index, ranges) under ivf sharding, to count the shards each query needs; progress: called
    with each row as it is measured."""
    kk = k + (own is not None)
    rows = []
    for p in nprobes:
        t0 = time.perf_counter()
        D, I = search_all(shards, xq, kk, p, metric)
        secs = time.perf_counter() - t0
        _, I = drop_own(D, I, own, k)
        row = {"nprobe": p, "recall": round(recall(I, gt, k), 4), "qps": round(len(xq) / secs, 1)}
        if latency_queries:
            row["latency_ms"] = _latency(shards, xq[:latency_queries], kk, p, metric)
        if route is not None and p:
            trained, ranges = route
            asked = shards_for_lists(probed_lists(trained, xq, p), ranges)
            row["shards_per_query"] = round(float(np.mean([len(a) for a in asked])), 3)
        rows.append(row)
        if progress:
            progress(row)
        if stop_at is not None and row["recall"] >= stop_at:
            break
    return rows


def _latency(shards, xq, k, nprobe, metric) -> dict:
    t = []
    for q in range(len(xq)):
        t0 = time.perf_counter()
        search_all(shards, xq[q:q + 1], k, nprobe, metric)
        t.append((time.perf_counter() - t0) * 1000)
    return {f"p{q}": round(float(np.percentile(t, q)), 3) for q in (50, 95, 99)}


def smallest_reaching(rows: list[dict], target: float) -> dict | None:
    return next((r for r in rows if r["recall"] >= target), None)


# ---------------------------------------------------------------- shardex eval

def load_queries(path: str, m: Manifest, s3_endpoint: str | None) -> np.ndarray:
    """Given queries: vectors (.npy, or a Parquet vector column) or texts, encoded by the index's encoder."""
    if path.endswith(".npy"):
        xq = np.load(path)
    elif path.endswith(".parquet"):
        t = Store(os.path.dirname(path) or ".", s3_endpoint).read_table(os.path.basename(path))
        if "vector" in t.column_names:
            col = t.column("vector").combine_chunks()
            xq = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
        elif "text" in t.column_names:
            return _encode(t.column("text").to_pylist(), m, path)
        else:
            raise ConfigError(f"queries: {path} has neither a 'vector' nor a 'text' column")
    else:
        with open(path) as f:
            return _encode([line.strip() for line in f if line.strip()], m, path)
    xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
    if xq.shape[1] != m.encoder.dim:
        raise ConfigError(f"queries: {path} holds vectors of dimension {xq.shape[1]}, the index has {m.encoder.dim}")
    return xq


def _encode(texts: list[str], m: Manifest, path: str) -> np.ndarray:
    if not texts:
        raise ConfigError(f"queries: {path} holds no queries")
    if m.encoder.name == "precomputed":
        raise ConfigError(f"queries: {path} holds text, but this index was built from precomputed vectors "
                          f"with no encoder; give a .npy file of query vectors")
    from shards.encoder import Encoder

    return Encoder.for_index(m.encoder).encode_queries(texts)


def evaluate(cfg: EvalConfig) -> dict:
    from shards.raytools import log  # progress on stderr, as every stage logs it (a Ray job's logs show it)

    store = Store(cfg.index_root, cfg.s3_endpoint)
    version = cfg.version or current_version(store)
    m = load_manifest(store, version)
    if not m.vectors:
        raise StorageError(f"{store.uri(vdir(version))}: the manifest lists no stored vectors (built before "
                           f"shardex recorded them), so there is no exact search to compare with")
    missing = [r for r in m.vectors if not store.exists(r)]
    if missing:
        raise StorageError(f"{store.uri(missing[0])}: a stored vector part of this version is gone "
                           f"({len(missing)} missing); eval needs them for exact search")
    threads = cfg.threads or os.cpu_count() or 1
    faiss().omp_set_num_threads(threads)
    shards = [load_shard(store, version, f) for f in m.shards]
    log(f"eval: {version}: {len(shards)} shard(s), {m.ntotal:,} vectors loaded; {threads} thread(s)")
    metric, k = m.index.metric, cfg.k
    if cfg.queries:
        xq, own, source = load_queries(cfg.queries, m, cfg.s3_endpoint), None, cfg.queries
    else:
        xq, own = sample_queries(store, m.vectors, min(cfg.num_queries, m.ntotal), cfg.seed)
        source = f"{len(xq)} stored vectors, each left out of its own search"
    log(f"eval: exact top-{k} of {len(xq):,} queries over {len(m.vectors)} stored part(s)")
    _, gt = exact_topk(store, m.vectors, xq, k + (own is not None), metric)
    _, gt = drop_own(np.zeros(gt.shape, np.float32), gt, own, k)
    nl = nlist(shards[0])
    nprobes = cfg.nprobe or (nprobe_ladder(nl) if nl else [None])
    route = None
    if m.sharding.mode == "ivf" and m.sharding.ranges:
        route = (read_index(store, f"{vdir(version)}/trained.index"), m.sharding.ranges)
    rows = sweep(shards, xq, gt, k, nprobes, metric, own, min(cfg.latency_queries, len(xq)), route=route,
                 progress=lambda r: log(f"eval: nprobe {r['nprobe']}: recall@{k} {r['recall']:.4f}, "
                                        f"{r['qps']:,.0f} QPS"))
    best = smallest_reaching(rows, cfg.target_recall)
    return {"index_root": cfg.index_root, "version": version, "factory": m.index.factory, "metric": metric,
            "nlist": nl, "shards": len(m.shards), "sharding": m.sharding.mode, "vectors": m.ntotal, "k": k,
            "queries": {"source": source, "count": len(xq), "held_out": own is not None},
            "threads": threads, "target_recall": cfg.target_recall,
            "nprobe_reaching_target": best["nprobe"] if best else None,
            "published_nprobe": m.search.nprobe, "results": rows,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": _loadavg()}}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def plot(report: dict) -> bytes:
    """Recall@k against QPS, one point per nprobe, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([r["qps"] for r in rows], [r["recall"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"nprobe {r['nprobe']}", (r["qps"], r["recall"]), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    ax.axhline(report["target_recall"], ls=":", c="grey", label=f"target {report['target_recall']}")
    ax.set_xscale("log")
    ax.set_xlabel(f"queries per second ({report['threads']} threads, in process)")
    ax.set_ylabel(f"recall@{report['k']} vs exact search")
    ax.set_title(f"{report['factory']}, {report['vectors']:,} vectors, {report['shards']} shard(s) "
                 f"({report['sharding']})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict, out: str | None, s3_endpoint: str | None = None) -> tuple[str, str]:
    """eval.json and eval.png under out (default ./shardex-eval-<version>); returns their URIs."""
    store = Store(out or f"shardex-eval-{report['version']}", s3_endpoint)
    store.write_text("eval.json", json.dumps(report, indent=2))
    store.write_bytes("eval.png", plot(report))
    return store.uri("eval.json"), store.uri("eval.png")


def lines(report: dict) -> list[str]:
    q = report["queries"]
    out = [f"version      {report['version']}: {report['factory']}, {report['vectors']:,} vectors, "
           f"{report['shards']} shard(s) ({report['sharding']})",
           f"queries      {q['count']:,}: {q['source']}",
           f"{'nprobe':>8} {'recall@' + str(report['k']):>10} {'QPS':>10} {'p50 ms':>8} {'p99 ms':>8}"
           + ("  shards/query" if any("shards_per_query" in r for r in report["results"]) else "")]
    for r in report["results"]:
        lat = r.get("latency_ms", {})
        out.append(f"{str(r['nprobe']):>8} {r['recall']:>10.4f} {r['qps']:>10,.0f} {lat.get('p50', 0):>8.2f} "
                   f"{lat.get('p99', 0):>8.2f}" + (f"  {r['shards_per_query']:>12.2f}" if "shards_per_query" in r
                                                   else ""))
    t = report["nprobe_reaching_target"]
    out.append(f"target       recall@{report['k']} >= {report['target_recall']}: "
               + (f"nprobe {t}" if t else "not reached by any nprobe tried")
               + f" (published default: nprobe {report['published_nprobe']})")
    return out

