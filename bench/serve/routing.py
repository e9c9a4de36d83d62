"""Hash against IVF routing, for S = 4 and 8 shards: shards touched per query, and queries/s.

The same corpus is built four times (hash and ivf sharding, 4 and 8 shards; same factory,
same trained quantizer settings). Each is searched through the router's Python API (one Ray
actor per shard) with the same queries, k and nprobe, in batches; the reference for the answers
is each build's monolithic index in process (its own trained index with every vector: builds
train their own quantizers, and k-means on several threads is not bit-reproducible). Writes
bench/results/serve_routing.json and .png.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/routing.py [--n 200000]
"""
from __future__ import annotations

import os

import numpy as np
from common import (
    built,
    core_pingpong_ns,
    corpus,
    corpus_args,
    loadavg,
    machine,
    monolithic,
    queries,
    same_topk,
    save,
    timed,
)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def measure(root: str, xq: np.ndarray, k: int, nprobe: int, batch: int, rounds: int) -> dict:
    from shards.search.router import Router

    r = Router(root)
    touched = np.concatenate([r.search_outcome(xq[i:i + batch], k, nprobe).touched
                              for i in range(0, len(xq), batch)])
    secs = []
    for _ in range(rounds):
        secs.append(timed(lambda: [r.search_vectors(xq[i:i + batch], k, nprobe) for i in range(0, len(xq), batch)]))
    _, I = r.search_vectors(xq[:1000], k, nprobe)
    r.close()
    return {"touched_mean": round(float(touched.mean()), 3), "touched_p99": float(np.percentile(touched, 99)),
            "touched_max": int(touched.max()), "qps": round(len(xq) / min(secs), 1),
            "runs_s": [round(s, 3) for s in secs], "I": I}


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5))
    labels = [f"S={c['shards']} {c['sharding']}\nnprobe {c['nprobe']}" for c in res["cases"]]
    colors = ["grey" if c["sharding"] == "hash" else "tab:blue" for c in res["cases"]]
    a1.bar(labels, [c["touched_mean"] for c in res["cases"]], color=colors)
    a1.set_ylabel("shards touched per query")
    a2.bar(labels, [c["qps"] for c in res["cases"]], color=colors)
    a2.set_ylabel("queries/s")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{res['n']:,} x {res['d']} {res['factory']}, tuned nprobe={res['nprobe']}, k={res['k']}, "
                 f"{res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = corpus_args(nq=10_000, rounds=2)
    ap.add_argument("--small-nprobe", type=int, default=4, help="also measured beside the tuned nprobe")
    a = ap.parse_args()
    load_before = loadavg()

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    src, ids, x = corpus(a.n, a.d)
    xq = queries(x, a.nq)
    from shards.storage.faissio import set_nprobe
    from shards.storage.manifest import current_version, load_manifest
    from shards.storage.store import Store

    cases, tuned = [], None
    for S in (4, 8):
        for sharding in ("hash", "ivf"):
            root = built(src, f"{sharding}-{a.factory.replace(',', '_')}-{a.n}-s{S}", factory=a.factory,
                         shards=S, sharding=sharding, metric="l2")
            tuned = tuned or load_manifest(Store(root), current_version(Store(root))).search.nprobe
            mono = monolithic(root, ids, x)[0]
            for nprobe in sorted({a.small_nprobe, tuned}):
                before = core_pingpong_ns()
                m = measure(root, xq, a.k, nprobe, a.batch, a.rounds)
                m["core_pingpong_ns"] = [before, core_pingpong_ns()]   # the L3 state: see throughput.py
                set_nprobe(mono, nprobe)
                m["same_topk_as_monolithic"] = same_topk(m.pop("I"), mono.search(xq[:1000], a.k)[1])
                cases.append({"shards": S, "sharding": sharding, "nprobe": nprobe, **m})
                print(cases[-1], flush=True)
    nprobe = tuned
    res = {"machine": machine(), "n": a.n, "d": a.d, "factory": a.factory, "nprobe": nprobe, "k": a.k,
           "queries": a.nq, "batch": a.batch, "cases": cases, "loadavg_before": load_before,
           "loadavg_after": loadavg()}
    save("serve_routing", res)
    plot(res, os.path.join(os.path.dirname(__file__), "..", "results", "serve_routing.png"))


if __name__ == "__main__":
    main()
