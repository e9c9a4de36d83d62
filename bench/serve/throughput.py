"""Batch query throughput through the router's Python API against in-process faiss on the monolithic index.

Same queries, same k and nprobe, same run, alternating rounds (best of each kept):
  faiss   one index holding every vector (the version's trained index + all vectors),
          searched in this process with every core (OpenMP)
  router  shards.router.Router over a published S-shard version: one Ray actor per shard
          (threads split by resources.plan_resources), the coarse quantizer run once in the
          driver, exact top-k merge in the driver; once with --sharding hash and once with
          --sharding ivf (same factory, same corpus)
All get the queries in batches of --batch, interleaved batch by batch (faiss, hash, ivf, faiss, ...)
so that all see the same load from the rest of the machine. Prints queries/s of each and the
ratios per round and over all rounds (target >= 0.9), and checks that the answers are the same. Writes bench/results/serve_throughput.json and .png.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/throughput.py [--n 200000 --shards 2]

Hash shards split every IVF list in S pieces; on one small machine that alone costs scan
efficiency (shorter contiguous runs), which is why both sharding modes are measured.
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

    fig, ax = plt.subplots(figsize=(6, 2.4))
    names = ["faiss, one index, in process", f"router, {res['shards']} hash shards", f"router, {res['shards']} ivf shards"]
    vals = [res["qps"]["faiss"], res["qps"]["hash"], res["qps"]["ivf"]]
    ax.barh(names, vals, color=["grey", "tab:blue", "tab:green"])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xlabel(f"queries/s (batches of {res['batch']}, k={res['k']}, nprobe={res['nprobe']})")
    ax.set_title(f"{res['n']:,} x {res['d']} {res['factory']}, {res['machine']}: ratios hash "
                 f"{res['ratio']['hash']:.3f}, ivf {res['ratio']['ivf']:.3f}", fontsize=9)
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
    roots = {mode: built(src, f"{mode}-{a.factory.replace(',', '_')}-{a.n}-s{a.shards}", factory=a.factory,
                         shards=a.shards, sharding=mode, metric="l2") for mode in ("hash", "ivf")}
    index, m = monolithic(roots["hash"], ids, x)   # both versions train the same quantizer (same seed)
    nprobe = m.search.nprobe
    faiss().extract_index_ivf(index).nprobe = nprobe
    faiss().omp_set_num_threads(os.cpu_count())
    routers = {mode: Router(root) for mode, root in roots.items()}
    xq = queries(x, a.nq)

    _, If = index.search(xq[:2000], a.k)            # warm all, and check they agree
    same = {}
    for mode, r in routers.items():
        _, Ir = r.search_vectors(xq[:2000], a.k, nprobe)
        same[mode] = float(np.mean([set(p) == set(q) for p, q in zip(If, Ir)]))
    searches = {"faiss": lambda q: index.search(q, a.k),
                **{mode: (lambda q, r=r: r.search_vectors(q, a.k, nprobe)) for mode, r in routers.items()}}
    runs = {name: [] for name in searches}
    for rnd in range(a.rounds):
        secs = interleaved(searches, xq, a.batch)
        for name in runs:
            runs[name].append(round(secs[name], 3))
        print(f"round {rnd}: " + ", ".join(f"{n} {a.nq / secs[n]:,.0f} q/s" for n in secs)
              + f"; ratios hash {secs['faiss'] / secs['hash']:.3f}, ivf {secs['faiss'] / secs['ivf']:.3f}"
              f"  (load {loadavg()[0]})", flush=True)
    for r in routers.values():
        r.close()
    qps = {n: a.nq * a.rounds / sum(v) for n, v in runs.items()}
    res = {"machine": machine(), "n": a.n, "d": a.d, "factory": a.factory, "shards": a.shards, "nprobe": nprobe,
           "recall_at_10_of_nprobe": m.search.recall_at_10, "k": a.k, "queries": a.nq, "batch": a.batch,
           "runs_s": runs, "qps": {n: round(v, 1) for n, v in qps.items()},
           "ratio": {mode: round(qps[mode] / qps["faiss"], 3) for mode in routers},
           "ratio_per_round": {mode: [round(f / r, 3) for f, r in zip(runs["faiss"], runs[mode])] for mode in routers},
           "target": 0.9, "same_topk_fraction": same, "loadavg_before": load_before, "loadavg_after": loadavg()}
    save("serve_throughput", res)
    plot(res, os.path.join(os.path.dirname(__file__), "..", "results", "serve_throughput.png"))
    print(res)


if __name__ == "__main__":
    main()
