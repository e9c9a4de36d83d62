"""Batch query throughput through the router's Python API against in-process faiss on the monolithic index.

Same queries, same k and nprobe, same run, alternating rounds (best of each kept):
  faiss   one index holding every vector (the version's trained index + all vectors),
          searched in this process with every core (OpenMP)
  router  shards.router.Router over the published S-shard version: one Ray actor per shard
          (threads split by resources.plan_resources), exact top-k merge in the driver
Both get the queries in batches of --batch, interleaved batch by batch (faiss, router, faiss, ...)
so that both see the same load from the rest of the machine. Prints queries/s of each and the
ratio per round and over all rounds (target >= 0.9), and checks that the two answers are the same. Writes bench/results/serve_throughput.json and .png.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/throughput.py [--n 200000 --shards 2]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from common import built, corpus, loadavg, machine, queries, save, timed  # noqa: I001


def monolithic(root: str, ids: np.ndarray, x: np.ndarray):
    from shards.faissio import read_index
    from shards.manifest import current_version, load_manifest, vdir
    from shards.store import Store

    store = Store(root)
    m = load_manifest(store, current_version(store))
    index = read_index(store, f"{vdir(m.version)}/trained.index")
    index.add_with_ids(x, ids)
    return index, m


def interleaved(searches: dict, xq: np.ndarray, batch: int) -> dict:
    """Seconds each search took over all of xq, alternating between them batch by batch."""
    secs = dict.fromkeys(searches, 0.0)
    for i in range(0, len(xq), batch):
        for name, fn in searches.items():
            secs[name] += timed(fn, xq[i:i + batch])
    return secs


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.2))
    names = ["faiss, one index, in process", f"router, {res['shards']} shard actors"]
    vals = [res["faiss_qps"], res["router_qps"]]
    ax.barh(names, vals, color=["grey", "tab:blue"])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xlabel(f"queries/s (batches of {res['batch']}, k={res['k']}, nprobe={res['nprobe']})")
    ax.set_title(f"{res['n']:,} x {res['d']} {res['factory']}, {res['machine']}: ratio {res['ratio']:.3f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--factory", default="IVF1024,Flat")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--nq", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    load_before = loadavg()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from shards.faissio import faiss
    from shards.router import Router

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    src, ids, x = corpus(a.n, a.d)
    root = built(src, f"hash-{a.factory.replace(',', '_')}-{a.n}-s{a.shards}", factory=a.factory,
                 shards=a.shards, metric="l2")
    index, m = monolithic(root, ids, x)
    nprobe = m.search.nprobe
    faiss().extract_index_ivf(index).nprobe = nprobe
    faiss().omp_set_num_threads(os.cpu_count())
    router = Router(root)
    xq = queries(x, a.nq)

    Df, If = index.search(xq[:2000], a.k)            # warm both, and check they agree
    Dr, Ir = router.search_vectors(xq[:2000], a.k, nprobe)
    same = float(np.mean([set(p) == set(q) for p, q in zip(If, Ir)]))
    runs = {"faiss": [], "router": []}
    searches = {"faiss": lambda q: index.search(q, a.k), "router": lambda q: router.search_vectors(q, a.k, nprobe)}
    for r in range(a.rounds):
        secs = interleaved(searches, xq, a.batch)
        for name in runs:
            runs[name].append(round(secs[name], 3))
        print(f"round {r}: faiss {a.nq / secs['faiss']:,.0f} q/s, router {a.nq / secs['router']:,.0f} q/s, "
              f"ratio {secs['faiss'] / secs['router']:.3f}  (load {loadavg()[0]})", flush=True)
    router.close()
    fq, rq = a.nq * a.rounds / sum(runs["faiss"]), a.nq * a.rounds / sum(runs["router"])
    per_round = [round(f / r, 3) for f, r in zip(runs["faiss"], runs["router"])]
    res = {"machine": machine(), "n": a.n, "d": a.d, "factory": a.factory, "shards": a.shards, "nprobe": nprobe,
           "recall_at_10_of_nprobe": m.search.recall_at_10, "k": a.k, "queries": a.nq, "batch": a.batch,
           "runs_s": runs, "faiss_qps": round(fq, 1), "router_qps": round(rq, 1), "ratio": round(rq / fq, 3),
           "ratio_per_round": per_round,
           "target": 0.9, "same_topk_fraction": same, "loadavg_before": load_before, "loadavg_after": loadavg()}
    save("serve_throughput", res)
    plot(res, os.path.join(os.path.dirname(__file__), "..", "results", "serve_throughput.png"))
    print(res)


if __name__ == "__main__":
    main()
