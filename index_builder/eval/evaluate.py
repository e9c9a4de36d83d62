"""shardex eval: recall@k against exact search, QPS and latency, per nprobe; JSON and a PNG plot.

Ground truth is brute force over the stored vectors (the embeddings parts the manifest
lists), one part in memory at a time. Queries are given (--queries: .npy vectors, a
Parquet file with a vector or text column, or a text file of one query a line, encoded
with the index's own encoder), or sampled from the stored vectors and held out: each
sampled query is searched with its own id removed from both the exact and the index's
answers (leave-one-out), so a query never finds itself.

QPS is the throughput of one batch of every query through every shard in this process
(threads: --threads, default all cores), the batch repeated for measures.MIN_SECS so the rate
is steady; latency is one query at a time, shards in turn,
the merge included (no network: what a shard adds to a router's round trip). Under
--sharding ivf the shards a query needs (shard_selection.shards_for_lists) are counted too.
An index without lists (Flat; HNSW, PQ, SQ) has no nprobe: it is one row, labelled "exact
(brute force)" for Flat, with no target to reach (measures.search_kind).

The measures themselves (exact top-k, recall, the sweep) are measures.py's; the build's tune
stage uses them to store the default nprobe: the smallest that reaches --target-recall on
held-out vectors.
"""
from __future__ import annotations

import io
import json
import os
import platform

import numpy as np

from index_builder.config import EvalConfig
from index_builder.encode.parts import read_vectors
from index_builder.eval.measures import (
    REFINE_FACTORS,
    fastest_reaching,
    merged_search,
    merged_truth,
    nprobe_ladder,
    part_topk,
    search_kind,
    shards_per_query,
    smallest_reaching,
    sweep,
)
from index_builder.eval.queries import load_queries
from shards.errors import ConfigError, StorageError
from shards.search.searcher import ShardSearcher
from shards.storage.faissio import faiss, load_shard, nlist, read_verified
from shards.storage.manifest import Manifest, current_version, load_manifest, vdir
from shards.storage.store import Store

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


def stored_truth(store: Store, emb_rels: list[str], xq: np.ndarray, k: int, metric: str,
                 own: np.ndarray | None) -> np.ndarray:
    """The true top-k ids over every stored vector (without the held-out queries' own), one part in
    memory at a time."""
    kk = k + (own is not None)
    return merged_truth([part_topk(xq, *read_vectors(store, rel), kk, metric) for rel in emb_rels], k, metric, own)


# ---------------------------------------------------------------- shardex eval

def evaluate(cfg: EvalConfig) -> dict:
    from shards.raytools import log  # progress on stderr, as every stage logs it (a Ray job's logs show it)

    store = Store(cfg.index_root, cfg.s3_endpoint)
    version = cfg.version or current_version(store)
    m = _with_vectors(store, version)
    threads = cfg.threads or os.cpu_count() or 1
    faiss().omp_set_num_threads(threads)
    # a segmented shard (delta segments, a dead set) is searched as serving searches it, and so is one
    # with a refine store (its rerank)
    shards = [ShardSearcher(store, m, f) if f.segmented or m.index.refine else load_shard(store, m, f)
              for f in m.shards]
    log(f"eval: {version}: {len(shards)} shard(s), {m.ntotal:,} vectors loaded; {threads} thread(s)")
    metric, k = m.index.metric, cfg.k
    xq, own, source = _queries(cfg, store, m)
    log(f"eval: exact top-{k} of {len(xq):,} queries over {len(m.vectors)} stored part(s)")
    gt = stored_truth(store, m.vectors, xq, k, metric, own)
    top = getattr(shards[0], "index", shards[0])
    nl, kind, rows = nlist(top), search_kind(top), []
    for R in _factors(cfg, m):
        def said(r, R=R):
            r["refine"] = R
            log(f"eval: {label(r, kind, m.index.factory)}: recall@{k} {r['recall']:.4f}, {r['qps']:,.0f} QPS")
        rows += sweep(merged_search(shards, metric, R), xq, gt, k, _nprobes(cfg, nl, m.index.factory), own,
                      latency_queries=min(cfg.latency_queries, len(xq)), progress=said)
    if m.sharding.mode == "ivf" and m.sharding.ranges:  # the shards each query needs, as the router routes it
        trained = read_verified(store, m.dir_of(m.trained), m.trained)
        for r in rows:
            if r["nprobe"]:
                r["shards_per_query"] = shards_per_query(trained, m.sharding.ranges, xq, r["nprobe"])
    best = smallest_reaching([r for r in rows if not r["refine"]], cfg.target_recall)
    fast = fastest_reaching(rows, cfg.target_recall)
    report = {"index_root": cfg.index_root, "version": version, "factory": m.index.factory, "metric": metric,
            "nlist": nl, "shards": len(m.shards), "sharding": m.sharding.mode, "vectors": m.ntotal, "k": k,
            "queries": {"source": source, "count": len(xq), "held_out": own is not None},
            "threads": threads, "search": kind, "target_recall": cfg.target_recall,
            "nprobe_reaching_target": best["nprobe"] if best and kind == "ivf" else None,
            "published_nprobe": m.search.nprobe, "results": rows, "refine": m.index.refine,
            "published_refine": m.search.refine_factor, "fastest_reaching_target": fast,
            "lists": m.index.lists.model_dump() if m.index.lists else None,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": _loadavg()}}
    if cfg.retune:
        from index_builder.eval.retune import retune

        new = retune(store, m, report)
        report["retuned"] = {"version": new.version, "nprobe": new.search.nprobe,
                             "refine": new.search.refine_factor, "recall_at_10": new.search.recall_at_10}
        log(f"eval: published {new.version} (CURRENT) with nprobe {new.search.nprobe}"
            + (f", refine x{new.search.refine_factor}" if new.index.refine else ""))
    return report


def _factors(cfg: EvalConfig, m: Manifest) -> list:
    """The refine factors to sweep: --refine, else every one of REFINE_FACTORS with a refine store; [0]
    (the codes alone) without one."""
    if cfg.refine and max(cfg.refine) > 0 and not m.index.refine:
        raise ConfigError(f"refine: {m.version} keeps no refine store to rerank from; leave --refine out, or "
                          f"build with --refine fp32")
    return cfg.refine or (list(REFINE_FACTORS) if m.index.refine else [0])


def _nprobes(cfg: EvalConfig, nl: int | None, factory: str) -> list:
    """The nprobes to sweep: --nprobe, else the ladder up to nlist; [None], one row, without lists."""
    if nl:
        return cfg.nprobe or nprobe_ladder(nl)
    if cfg.nprobe:
        raise ConfigError(f"nprobe: {factory} has no inverted lists to probe; leave --nprobe out "
                          f"(eval measures it once)")
    return [None]


def label(row: dict, kind: str, factory: str) -> str:
    """What a row is, in the table, the log and the plot: its nprobe, or the one setting there is, and
    its refine factor when it reranks."""
    x = f", refine x{row['refine']}" if row.get("refine") else ""
    if kind == "ivf":
        return f"nprobe {row['nprobe']}{x}"
    return ("exact (brute force)" if kind == "exact" else f"{factory} (no nprobe)") + x


def _with_vectors(store: Store, version: str) -> Manifest:
    """The version's manifest, once its stored vectors (the exact search's input) are known to be there."""
    m = load_manifest(store, version)
    if not m.vectors:
        raise StorageError(f"{store.uri(vdir(version))}: the manifest lists no stored vectors (built before "
                           f"shardex recorded them), so there is no exact search to compare with")
    missing = [r for r in m.vectors if not store.exists(r)]
    if missing:
        raise StorageError(f"{store.uri(missing[0])}: a stored vector part of this version is gone "
                           f"({len(missing)} missing); eval needs them for exact search")
    return m


def _queries(cfg: EvalConfig, store: Store, m: Manifest) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(xq, the held-out ids or None, where they come from): the given queries, or stored vectors."""
    if cfg.queries:
        return load_queries(cfg.queries, m.encoder, cfg.s3_endpoint), None, cfg.queries
    xq, own = sample_queries(store, m.vectors, min(cfg.num_queries, m.ntotal), cfg.seed)
    return xq, own, f"{len(xq)} stored vectors, each left out of its own search"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def plot(report: dict) -> bytes:
    """figure(report) as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def figure(report: dict):
    """Recall@k against QPS: one point per nprobe with the target's line, or, for an index without
    lists, its one point, labelled (exact search, or the factory), with no target to reach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, kind = report["results"], report["search"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    factors = sorted({r.get("refine") or 0 for r in rows})
    for R in factors:  # one line per refine factor, its points labelled by nprobe
        mine = [r for r in rows if (r.get("refine") or 0) == R]
        ax.plot([r["qps"] for r in mine], [r["recall"] for r in mine], "o-" if kind == "ivf" else "o",
                label=(f"refine x{R}" if R else "codes only") if len(factors) > 1 else None)
        for r in mine:
            ax.annotate(str(r["nprobe"]) if len(factors) > 1 else label(r, kind, report["factory"]),
                        (r["qps"], r["recall"]), fontsize=6, xytext=(3, -8), textcoords="offset points")
    if kind == "ivf":
        ax.axhline(report["target_recall"], ls=":", c="grey", label=f"target {report['target_recall']}")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"queries per second ({report['threads']} threads, in process)")
    ax.set_ylabel(f"recall@{report['k']} vs exact search")
    ax.set_title(f"{report['factory']}, {report['vectors']:,} vectors, {report['shards']} shard(s) "
                 f"({report['sharding']})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_report(report: dict, out: str | None, s3_endpoint: str | None = None) -> tuple[str, str]:
    """eval.json and eval.png under out (default ./shardex-eval-<version>); returns their URIs."""
    store = Store(out or f"shardex-eval-{report['version']}", s3_endpoint)
    store.write_text("eval.json", json.dumps(report, indent=2))
    store.write_bytes("eval.png", plot(report))
    return store.uri("eval.json"), store.uri("eval.png")


def lists_line(li: dict) -> str:
    """The IVF lists' sizes in a line: imbalance (1 = even), the largest against the mean, the cap."""
    cap = ("" if li.get("cap") is None else "; k-means' lists, uncapped" if not li["cap"] else
           f"; capped at {li['cap']:g}x the mean at training, {li['split']} split")
    big = f", {li['largest'] / li['mean']:.1f}x the mean {li['mean']:,.1f}" if li.get("mean") else ""
    return f"lists        imbalance {li['imbalance']:.3f}, largest {li['largest']:,}{big}{cap}"


def lines(report: dict) -> list[str]:
    q, kind, rows = report["queries"], report["search"], report["results"]
    names = [(str(r["nprobe"]) if kind == "ivf" else label(r, kind, report["factory"]).split(", refine")[0])
             + (f" x{r['refine']}" if report.get("refine") else "") for r in rows]
    w = max(8, *map(len, names))
    out = [f"version      {report['version']}: {report['factory']}, {report['vectors']:,} vectors, "
           f"{report['shards']} shard(s) ({report['sharding']})",
           f"queries      {q['count']:,}: {q['source']}",
           f"{('nprobe' if kind == 'ivf' else 'search') + (' xrefine' if report.get('refine') else ''):>{w}} "
           f"{'recall@' + str(report['k']):>10} {'QPS':>10} "
           f"{'p50 ms':>8} {'p99 ms':>8}" + ("  shards/query" if any("shards_per_query" in r for r in rows) else "")]
    for n, r in zip(names, rows, strict=True):
        lat = r.get("latency_ms", {})
        out.append(f"{n:>{w}} {r['recall']:>10.4f} {r['qps']:>10,.0f} {lat.get('p50', 0):>8.2f} "
                   f"{lat.get('p99', 0):>8.2f}" + (f"  {r['shards_per_query']:>12.2f}" if "shards_per_query" in r
                                                   else ""))
    if report.get("lists"):
        out.append(lists_line(report["lists"]))
    if kind == "exact":  # the same search as the truth: what it misses are ties (measures.recall_at_k)
        out.append("exact        a flat scan is exact search: recall under 1.0 is neighbours tied at the "
                   "k-th distance (duplicates)")
    if report.get("retuned"):
        r = report["retuned"]
        out.append(f"retuned      {r['version']} is CURRENT: nprobe {r['nprobe']}"
                   + (f", refine x{r['refine']}" if r["refine"] is not None else "")
                   + f", recall@10 {r['recall_at_10']:.4f} on these queries")
    if kind == "ivf":
        t = report["nprobe_reaching_target"]
        out.append(f"target       recall@{report['k']} >= {report['target_recall']}: "
                   + (f"nprobe {t}" if t else "not reached by any nprobe tried")
                   + (" without refine" if report.get("refine") else "")
                   + f" (published default: nprobe {report['published_nprobe']}"
                   + (f", refine x{report['published_refine']}" if report.get("refine") else "") + ")")
        f = report.get("fastest_reaching_target")
        if report.get("refine") and f:
            out.append(f"fastest      nprobe {f['nprobe']}, refine x{f['refine']}: recall@{report['k']} "
                       f"{f['recall']:.4f} at {f['qps']:,.0f} QPS")
    return out

