"""Batch query throughput through the router's Python API against in-process faiss on the monolithic index.

Same queries, same k and nprobe, same run:
  faiss      one index holding every vector (the version's own trained index + all vectors),
             index.search in this process with every core (OpenMP): the baseline of the target
  hash, ivf  shards.search.router.Router over a published S-shard version: one Ray actor per shard
             (threads split by resources.plan_resources), the coarse quantizer run once in the
             driver, exact top-k merge in the driver; built with --sharding hash and --sharding ivf
             (--route all: every shard a query's lists live in is asked)
             (same factory, same corpus). The two builds train their own quantizers (k-means on
             several threads is not bit-reproducible), so each is compared with the monolithic index
             of its own trained index: faiss for hash, faiss_ivf for ivf.
  faiss_ordered  a reference, not the target: what the router does, in one process: the coarse
             search, the queries grouped by nearest list (the router's scan order), then
             search_preassigned on every core. It shows how much of the router's speed is that order.
Each round runs every one of them over all the queries, in batches of --batch, back to back
(its steady state), one after another with a 0.1 s pause between, the order rotating from round
to round. (Interleaving batch by batch was unfair to the router: after each search in the
main thread, faiss's OpenMP threads spin-wait ~8-10 ms of CPU, which landed in the next
system's time.) Prints queries/s of each and the ratios per round and over all rounds (target
>= 0.9), and checks that each answers the same top-k as its monolithic index.

The host may run this VM's two vCPUs on cores that share an L3 or not, and moves them
(bench/serve/pingpong.c tells which: a cache-line round trip of tens of ns, or of hundreds).
The ratios depend on it, so the round trip is taken (untimed) between batches, each batch is
put in the state found before and after it ('mixed' when they differ), and queries/s and
ratios are also given per state, over the batches run in it. Writes bench/results/serve_throughput.json and .png.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/throughput.py [--n 200000 --shards 2]

Hash shards split every IVF list in S pieces; on one small machine that alone costs scan
efficiency (S processes stream disjoint data through one shared cache), which is why both
sharding modes are measured.
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

NAMES = {"faiss": "faiss, one index (hash's quantizer)", "faiss_ordered": "the same, in the router's scan order",
         "hash": "router, {S} hash shards", "faiss_ivf": "faiss, one index (ivf's quantizer)",
         "ivf": "router, {S} ivf shards"}
BASE = {"hash": "faiss", "ivf": "faiss_ivf"}
PINGPONG_ROUNDS = 20_000   # a few ms, between batches   # each router against the monolithic index of its own quantizer


def ordered(index, k: int, nprobe: int):
    """search(xq) -> (D, I): coarse search, the router's scan order, search_preassigned on every core."""
    from shards.search.shard_selection import scan_order
    from shards.storage.faissio import coarse_search, ivf, search_preassigned

    iv = ivf(index)

    def search(xq):
        Dq, Iq = coarse_search(index, xq, nprobe)
        o = scan_order(Iq)
        iv.parallel_mode = 3  # faiss splits queries over threads inside search_preassigned only in this mode
        try:
            D, I = search_preassigned(index, xq[o], k, (Dq[o], Iq[o]))
        finally:
            iv.parallel_mode = 0
        Do, Io = np.empty_like(D), np.empty_like(I)
        Do[o], Io[o] = D, I
        return Do, Io
    return search


def one_round(searches: dict, xq: np.ndarray, batch: int, first: int) -> dict:
    """{name: [(seconds, L3 state meanwhile) per batch]}: each runs over all of xq alone, in batches,
    starting with the first-th. The L3 state is taken (untimed) around each batch: the host moves the vCPUs
    within seconds."""
    import time

    names = list(searches)
    names = names[first % len(names):] + names[:first % len(names)]
    out = {}
    for name in names:
        time.sleep(0.1)  # no one's spinning threads in the next one's time
        out[name], before = [], core_pingpong_ns(PINGPONG_ROUNDS)
        for i in range(0, len(xq), batch):
            t = timed(searches[name], xq[i:i + batch])
            after = core_pingpong_ns(PINGPONG_ROUNDS)
            out[name].append((t, l3_state(before, after)))
            before = after
    return {n: out[n] for n in searches}


def l3_state(before: int | None, after: int | None) -> str:
    """'shared' or 'separate' L3 when both round trips agree (below or above 200 ns), else 'mixed'."""
    if before is None or after is None:
        return "unknown"
    if before < 200 and after < 200:
        return "shared"
    return "separate" if before >= 200 and after >= 200 else "mixed"


def by_l3(batches: dict, per_batch: int) -> dict:
    """Per L3 state: each one's queries/s over its batches run in that state, and the routers' ratios."""
    out = {}
    for st in sorted({x for v in batches.values() for _, x in v}):
        n = {name: sum(1 for _, x in v if x == st) for name, v in batches.items()}
        qps = {name: round(per_batch * n[name] / sum(t for t, x in v if x == st), 1)
               for name, v in batches.items() if n[name]}
        out[st] = {"batches": n, "qps": qps,
                   "ratio": {mode: round(qps[mode] / qps[b], 3)
                             for mode, b in BASE.items() if mode in qps and b in qps}}
    return out


def plot(res: dict, path: str) -> None:
    """queries/s of each, over all batches and per L3 state (states seen in too few batches left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"all batches": res["qps"], **{f"{st} L3": v["qps"] for st, v in res["by_l3"].items()
                                            if st in ("shared", "separate") and len(v["ratio"]) == 2}}
    fig, ax = plt.subplots(figsize=(9, 3.6))
    names = list(NAMES)[::-1]
    h = 0.8 / len(groups)
    for g, (label, qps) in enumerate(groups.items()):
        ys = [i + (g - (len(groups) - 1) / 2) * h for i in range(len(names))]
        vals = [qps.get(n, 0) for n in names]
        ax.barh(ys, vals, height=h, label=label)
        for y, v in zip(ys, vals):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=6)
    ax.set_yticks(range(len(names)), [NAMES[n].format(S=res["shards"]) for n in names], fontsize=8)
    ax.set_xlim(0, max(max(q.values()) for q in groups.values()) * 1.15)
    ax.set_xlabel(f"queries/s (batches of {res['batch']}, k={res['k']}, nprobe={res['nprobe']})")
    by = "; ".join(f"{st} L3: hash {v['ratio']['hash']:.2f}, ivf {v['ratio']['ivf']:.2f}"
                   for st, v in res["by_l3"].items() if st in ("shared", "separate") and len(v["ratio"]) == 2)
    ax.set_title(f"{res['n']:,} x {res['d']} {res['factory']}, {res['machine']}\nrouter / faiss: hash "
                 f"{res['ratio']['hash']:.2f}, ivf {res['ratio']['ivf']:.2f} ({by})", fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = corpus_args(nq=20_000, rounds=8)
    ap.add_argument("--shards", type=int, default=2)
    a = ap.parse_args()
    load_before = loadavg()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from shards.search.router import Router
    from shards.storage.faissio import faiss

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    src, ids, x = corpus(a.n, a.d)
    # ivf: every probed shard asked (route "all"), so its answers equal the monolithic index's; ranked
    # routing, which leaves some out, is measured against hash by routing.py and routing_minilm.py
    roots = {mode: built(src, f"{mode}-{a.factory.replace(',', '_')}-{a.n}-s{a.shards}-all", factory=a.factory,
                         shards=a.shards, sharding=mode, metric="l2", route="all") for mode in BASE}
    monos = {mode: monolithic(root, ids, x) for mode, root in roots.items()}
    m = monos["hash"][1]
    nprobe = m.search.nprobe
    for index, _ in monos.values():
        faiss().extract_index_ivf(index).nprobe = nprobe
    faiss().omp_set_num_threads(os.cpu_count())
    routers = {mode: Router(root) for mode, root in roots.items()}
    xq = queries(x, a.nq)
    hash_index, ivf_index = monos["hash"][0], monos["ivf"][0]
    searches = {"faiss": lambda q: hash_index.search(q, a.k),
                "faiss_ordered": ordered(hash_index, a.k, nprobe),
                "hash": lambda q: routers["hash"].search_vectors(q, a.k, nprobe),
                "faiss_ivf": lambda q: ivf_index.search(q, a.k),
                "ivf": lambda q: routers["ivf"].search_vectors(q, a.k, nprobe)}
    got = {name: fn(xq[:2000])[1] for name, fn in searches.items()}   # warm all, and check they agree
    same = {"faiss_ordered": same_topk(got["faiss_ordered"], got["faiss"]),
            **{mode: same_topk(got[mode], got[b]) for mode, b in BASE.items()}}
    print("same top-k as the monolithic index:", same, flush=True)
    runs, batches = {name: [] for name in searches}, {name: [] for name in searches}
    for rnd in range(a.rounds):
        got = one_round(searches, xq, a.batch, rnd)
        secs = {name: sum(t for t, _ in v) for name, v in got.items()}
        for name, v in got.items():
            runs[name].append(round(secs[name], 3))
            batches[name] += v
        print(f"round {rnd}: " + ", ".join(f"{n} {a.nq / t:,.0f} q/s" for n, t in secs.items())
              + "; ratios " + ", ".join(f"{mode} {secs[b] / secs[mode]:.3f}" for mode, b in BASE.items())
              + f"  (load {loadavg()[0]})", flush=True)
    l3 = by_l3(batches, a.batch)
    print("by L3 state:", {st: v["ratio"] for st, v in l3.items()}, flush=True)
    per_shard = {mode: {"threads": r.threads, "cpus": r.shard_cpus} for mode, r in routers.items()}
    for r in routers.values():
        r.close()
    qps = {n: a.nq * a.rounds / sum(v) for n, v in runs.items()}
    res = {"machine": machine(), "n": a.n, "d": a.d, "factory": a.factory, "shards": a.shards, "nprobe": nprobe,
           "recall_at_10_of_nprobe": m.search.recall_at_10, "k": a.k, "queries": a.nq, "batch": a.batch,
           "rounds": a.rounds, "faiss_threads": os.cpu_count(), "per_shard": per_shard,
           "runs_s": runs, "qps": {n: round(v, 1) for n, v in qps.items()},
           "ratio": {mode: round(qps[mode] / qps[b], 3) for mode, b in BASE.items()},
           "ratio_per_round": {mode: [round(f / r, 3) for f, r in zip(runs[b], runs[mode])]
                               for mode, b in BASE.items()},
           "ratio_hash_to_faiss_ordered": round(qps["hash"] / qps["faiss_ordered"], 3),
           "by_l3": l3,
           "target": 0.9, "same_topk_fraction": same, "loadavg_before": load_before, "loadavg_after": loadavg()}
    save("serve_throughput", res)
    plot(res, os.path.join(os.path.dirname(__file__), "..", "results", "serve_throughput.png"))
    print(res)


if __name__ == "__main__":
    main()
