"""Balanced IVF lists (--list-cap) on real embeddings: imbalance, largest list, recall@10 and latency at
equal nprobe, with k-means' lists (--list-cap 0) and capped ones.

Corpus: bench/build/minilm.py's dataset (all-MiniLM-L6-v2; queries are man-page summaries held out of
the corpus). Each cap is one build of the same factory, 1 shard; `shardex eval` (its Python API)
measures it with the dataset's queries: recall against exact search, QPS over the batch, and p50/p99
of queries timed one at a time. Writes bench/results/serve_lists.json and .png.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/lists.py [--n 200000] [--caps 0,4,2]
"""
from __future__ import annotations

import argparse
import os
import sys

from common import OUT, built, loadavg, machine, save

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

NPROBES = [8, 16, 32, 64, 128]


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for c in res["cases"]:
        lab = f"cap {c['cap']:g}" if c["cap"] else "k-means (no cap)"
        lab += f", imbalance {c['lists']['imbalance']:.2f}"
        rows = c["results"]
        a1.plot([r["recall"] for r in rows], [r["latency_ms"]["p99"] for r in rows], "o-", label=lab)
        a2.plot([r["nprobe"] for r in rows], [r["recall"] for r in rows], "o-", label=lab)
    a1.set_xlabel("recall@10")
    a1.set_ylabel("p99 latency, ms (one query at a time)")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("nprobe")
    a2.set_ylabel("recall@10")
    for ax in (a1, a2):
        ax.legend(fontsize=8)
    fig.suptitle(f"MiniLM {res['n']:,}, {res['factory']}, {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--factory", default="IVF1024,Flat")
    ap.add_argument("--caps", default="0,4,2")
    ap.add_argument("--latency-queries", type=int, default=1000)
    a = ap.parse_args()
    data = os.path.join(os.path.dirname(OUT), "build", f"minilm-{a.n}")
    if not os.path.exists(os.path.join(data, "gt.npy")):
        sys.exit(f"{data}: no dataset; make it with: .venv/bin/python bench/build/minilm.py --n {a.n}")
    load_before = loadavg()

    import ray

    from index_builder.config import EvalConfig
    from index_builder.eval.evaluate import evaluate
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    cases = []
    for cap in [float(c) for c in a.caps.split(",")]:
        root = built(os.path.join(data, "corpus"), f"minilm{a.n}-cap{cap:g}-{a.factory.replace(',', '_')}",
                     factory=a.factory, metric="ip", list_cap=cap)
        rep = evaluate(EvalConfig(index_root=root, queries=os.path.join(data, "queries.npy"), nprobe=NPROBES,
                                  latency_queries=a.latency_queries))
        cases.append({"cap": cap, "lists": rep["lists"], "results": rep["results"]})
        li = rep["lists"]
        print(f"cap {cap:g}: imbalance {li['imbalance']:.3f}, largest {li['largest']:,} "
              f"({li['largest'] / li['mean']:.1f}x the mean), {li['split']} split", flush=True)
        for r in rep["results"]:
            print(f"  nprobe {r['nprobe']:4d} recall {r['recall']:.4f} p50 {r['latency_ms']['p50']:.2f} ms "
                  f"p99 {r['latency_ms']['p99']:.2f} ms QPS {r['qps']:.0f}", flush=True)
    res = {"machine": machine(), "n": a.n, "factory": a.factory, "queries": "queries.npy of the dataset",
           "cases": cases, "loadavg_before": load_before, "loadavg_after": loadavg()}
    save("serve_lists", res)
    plot(res, os.path.join(os.path.dirname(__file__), "..", "results", "serve_lists.png"))


if __name__ == "__main__":
    main()
