"""HTTP latency of single text queries under a bounded loop of 8 concurrent clients on loopback.

The index is the stdlib-docstring corpus (titles and bodies), built once with the bundled
encoder. `shardex serve`'s app runs on local Ray on this machine; 8 client threads each send
--requests single-query POST /search requests (k=10, stored fields attached) back to back,
with the docstring titles as queries. Reported: p50/p99/max latency and requests/s.

For reference, in the same run: the same queries one at a time through the Python API in this
process (Router, backend="local": encode, search, attach fields), with no HTTP and no
concurrency. Writes bench/results/serve_http_latency.json and .png.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/http_latency.py [--docs 2000]
"""
from __future__ import annotations

import argparse
import os
import socket
import threading
import time

import numpy as np
from common import OUT, core_pingpong_ns, loadavg, machine, save

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def text_index(docs: int) -> tuple[str, list[str]]:
    import pyarrow.dataset as ds

    from index_builder.config import BuildConfig
    from index_builder.demo.textcorpus import write_corpus
    from index_builder.pipeline import build

    src, root = os.path.join(OUT, f"text-{docs}"), os.path.join(OUT, f"text-index-{docs}-s2")
    if not os.path.exists(os.path.join(src, "part-1.parquet")):
        write_corpus(src, limit=docs, files=2)
    if not os.path.exists(os.path.join(root, "CURRENT")):
        build(BuildConfig(source=src, index_root=root, fields=["title", "text"], shards=2, part_rows=1000))
    titles = ds.dataset(src).to_table(columns=["title"]).column(0).to_pylist()
    return root, titles


def percentiles(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 2), "mean_ms": round(float(a.mean()), 2)}


def http_loop(base: str, queries: list[str], clients: int, per_client: int):
    """(client-side latencies ms, the router's own took_ms, seconds, non-200 answers)."""
    import requests

    lat, took, errors, lock = [], [], [0], threading.Lock()

    def client(c: int):
        s = requests.Session()
        for i in range(per_client):
            q = queries[(c * per_client + i) % len(queries)]
            t = time.perf_counter()
            r = s.post(base + "/search", json={"queries": [q], "k": 10}, timeout=60)
            dt = (time.perf_counter() - t) * 1000
            with lock:
                lat.append(dt)
                errors[0] += r.status_code != 200
                if r.status_code == 200:
                    took.append(r.json()["took_ms"])

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return lat, took, time.perf_counter() - t0, errors[0]


def router_stats(base: str) -> dict:
    import requests

    return requests.get(base + "/stats", timeout=10).json()


def per_request(before: dict, after: dict) -> dict:
    """The router's counters over the loop: mean ms per request encoding, searching (server batch wait
    included) and reading fields, and requests per server batch and per shard fan-out."""
    d = {k: after[k] - before[k] for k in ("requests", "batches", "fanouts", "encode_s", "search_s", "fields_s")}
    n = max(d["requests"], 1)
    return {"requests": d["requests"], **{f"{k[:-2]}_ms": round(1000 * d[k] / n, 2)
                                          for k in ("encode_s", "search_s", "fields_s")},
            "requests_per_batch": round(n / max(d["batches"], 1), 2),
            "requests_per_fanout": round(n / max(d["fanouts"], 1), 2)}


def plot(res: dict, lat_http: list[float], lat_local: list[float], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for lat, name in ((lat_local, "Python API, 1 at a time, in process"),
                      (lat_http, f"HTTP, {res['clients']} concurrent clients")):
        a = np.sort(lat)
        ax.plot(a, np.arange(1, len(a) + 1) / len(a), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency of one text query (ms)")
    ax.set_ylabel("fraction of requests")
    ax.legend(fontsize=8)
    h = res["http"]
    ax.set_title(f"{res['documents']:,} docstrings, {res['machine']}: HTTP p50 {h['p50_ms']} ms, "
                 f"p99 {h['p99_ms']} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100, help="per client")
    ap.add_argument("--local", type=int, default=200, help="queries through the Python API for reference")
    a = ap.parse_args()
    load_before = loadavg()

    import ray
    from ray import serve

    from shards.config import ServeConfig
    from shards.search.router import Router
    from shards.serve import lifecycle as sv

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    root, titles = text_index(a.docs)
    rng = np.random.default_rng(0)
    queries = [titles[i] for i in rng.permutation(len(titles))]

    local = Router(root, backend="local")
    local.search(queries[:5], k=10)                   # load the encoder, warm up
    lat_local = []
    for q in queries[:a.local]:
        t = time.perf_counter()
        local.search([q], k=10)
        lat_local.append((time.perf_counter() - t) * 1000)
    local.close()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(index_root=root, port=port, poll_seconds=0)
    version = sv.wait_ready(sv.start(cfg), 300)
    base = f"http://127.0.0.1:{port}"
    http_loop(base, queries[-50:], 2, 10)             # warm up
    before, pp = router_stats(base), [core_pingpong_ns()]
    lat, took, secs, errors = http_loop(base, queries, a.clients, a.requests)
    spent, pp = per_request(before, router_stats(base)), pp + [core_pingpong_ns()]
    serve.shutdown()

    res = {"machine": machine(), "documents": len(titles), "version": version, "clients": a.clients,
           "requests": len(lat), "errors": errors, "k": 10, "fields": ["title", "text"],
           "http": {**percentiles(lat), "requests_per_s": round(len(lat) / secs, 1)},
           "router_took_ms": percentiles(took),   # inside the router: from request parsed to response built
           "router_per_request": spent,        # from GET /stats: where a request's time went, and batching
           "python_api_sequential": {**percentiles(lat_local), "requests": len(lat_local)},
           "core_pingpong_ns": pp, "loadavg_before": load_before, "loadavg_after": loadavg()}
    save("serve_http_latency", res)
    plot(res, lat, lat_local, os.path.join(os.path.dirname(__file__), "..", "results", "serve_http_latency.png"))
    print(res)


if __name__ == "__main__":
    main()
