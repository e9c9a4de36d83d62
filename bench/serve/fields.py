"""Attaching stored fields to k=10 hits: each shard's own fields files (shards/storage/fields.py) against
a lookup over every docs file of the version (shards/storage/docstore.py, what every request did
before), on the same version, as the corpus comes in 10 and in 1,000 files.

The corpus: n clustered vectors (precomputed, so the build is quick) with a ~200-character title,
written in F Parquet files; encode makes one docs part per file. For each F the same queries are
searched once (hits fixed) and their fields attached one query at a time by both paths, in this
process (backend "local": the read itself, no RPC). Writes bench/results/serve_fields.json.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/fields.py [--n 50000] [--files 10 1000]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import OUT, loadavg, machine, save

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def write_corpus(src: str, n: int, d: int, files: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    from helpers import clustered, vector_table

    x = clustered(n, d, 0)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    if not os.path.exists(os.path.join(src, f"part-{files - 1:05d}.parquet")):
        os.makedirs(src, exist_ok=True)
        words = np.array(["index", "shard", "vector", "query", "merge", "list", "probe", "field", "row", "file"])
        rng = np.random.default_rng(1)
        title = [f"doc {i}: " + " ".join(words[rng.integers(0, 10, 30)]) for i in ids]
        t = vector_table(ids, x, title=title)
        b = np.linspace(0, n, files + 1).astype(int)
        for f, (a, c) in enumerate(zip(b[:-1], b[1:])):
            pq.write_table(t.slice(a, c - a), os.path.join(src, f"part-{f:05d}.parquet"))
    return ids, x


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps calls."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return float(np.median(out))


def one_size(n: int, d: int, files: int, shards: int, queries: int, k: int) -> dict:
    from index_builder.config import BuildConfig
    from index_builder.pipeline import build
    from shards.search.fanout import shard_fields
    from shards.search.router import Router

    src, root = os.path.join(OUT, f"fields-{n}-f{files}"), os.path.join(OUT, f"fields-{n}-f{files}-index")
    ids, x = write_corpus(src, n, d, files)
    t = time.perf_counter()
    if not os.path.exists(os.path.join(root, "CURRENT")):
        build(BuildConfig(source=src, index_root=root, vector_column="vector", factory="IVF64,Flat",
                          shards=shards, fields=["title"], part_rows=max(1000, n // files)))
    built_s = time.perf_counter() - t
    r = Router(root, backend="local")
    try:
        m = r.manifest
        outs = [r.search_outcome(x[q:q + 1], k) for q in range(queries)]
        def per_shard(o):
            return r.view.attach(o.D, o.I, ["title"], r._loop.run(shard_fields(r.view, o, ["title"], r.client.fields)))

        shard_ms = [timed(lambda o=o: per_shard(o), 3) for o in outs]
        docs_ms = [timed(lambda o=o: r.view.attach(o.D, o.I, ["title"]), 3) for o in outs]
        same = all(per_shard(o) == r.view.attach(o.D, o.I, ["title"]) for o in outs[:20])
    finally:
        r.close()
    return {"files": files, "docs_files": len(m.docs.files), "fields_files": sum(len(s.fields) for s in m.shards),
            "build_s": round(built_s, 1), "fields_stage_s": m.timings.get("fields"), "same_hits": same,
            **stats("per_shard", shard_ms), **stats("all_docs", docs_ms)}


def stats(name: str, ms: list[float]) -> dict:
    return {f"{name}_ms": round(float(np.median(ms)), 3), f"{name}_p99_ms": round(float(np.percentile(ms, 99)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--files", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("-k", type=int, default=10)
    a = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    before = loadavg()
    rows = []
    for f in a.files:
        rows.append(one_size(a.n, a.d, f, a.shards, a.queries, a.k))
        print(rows[-1], flush=True)
    lo, hi = rows[0], rows[-1]
    res = {"machine": machine(), "n": a.n, "d": a.d, "shards": a.shards, "k": a.k, "queries": a.queries,
           "sizes": rows,
           "per_shard_growth": round(hi["per_shard_ms"] / lo["per_shard_ms"], 3),
           "all_docs_growth": round(hi["all_docs_ms"] / lo["all_docs_ms"], 3),
           f"all_docs_over_per_shard_at_{hi['files']}": round(hi["all_docs_ms"] / hi["per_shard_ms"], 2),
           "loadavg_before": before, "loadavg_after": loadavg()}
    print({k: v for k, v in res.items() if k != "sizes"}, flush=True)
    save("serve_fields", res)


if __name__ == "__main__":
    main()
