"""IVF routing on real embeddings, S shards: hash against ivf in k-means' list order against ivf with
grouped lists (index_builder/train/groups.py), the latter asking every shard a query probes and with
ranked routing (shard_selection.gap_mask) as the build tuned it, and at the (nprobe, gap) that reaches
the target on these queries ("-fit": fitted to the very queries measured; shown as the frontier).

Corpus: bench/build/minilm.py's dataset (all-MiniLM-L6-v2 vectors of documentation passages; its
queries are man-page one-line summaries held out of the corpus, gt.npy their exact top-10). Each
build is searched through the router's Python API (one Ray actor per shard, as served) at nprobe
8..512 in batches; per build the nprobe reported is the smallest reaching recall@10 0.95 (exact
merge: ivf routing probes the same lists as hash). There: shards touched per query, QPS, and QPS per
CPU second of the whole machine (every process: the router and the shard actors; nothing else runs).
The rounds alternate between builds, so the machine's drift over minutes falls on all of them.
Writes bench/results/serve_routing_minilm.json and .png.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/routing_minilm.py [--n 200000] [--shards 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from common import OUT, built, loadavg, machine, save

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

NPROBES = (8, 16, 32, 64, 128, 256, 512)
GAP_FACTORS = (0.5, 1.0, 1.5, 2.0, 3.0)   # times the built gap, for the frontier on these queries
BUILDS = (("hash", {"sharding": "hash"}), ("ivf-kmeans", {"sharding": "ivf", "ivf_order": "kmeans", "route": "all"}),
          ("ivf-grouped", {"sharding": "ivf", "ivf_order": "grouped"}))


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat: not idle, not iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def recall(I: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / gt.shape[1] for a, b in zip(I, gt)]))


def run_batches(r, xq: np.ndarray, k: int, nprobe: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    outs = [r.search_outcome(xq[i:i + batch], k, nprobe) for i in range(0, len(xq), batch)]
    return np.concatenate([o.I for o in outs]), np.concatenate([o.touched for o in outs])


def measure(r, xq, gt, k: int, batch: int, nprobe: int | None) -> dict:
    I, touched = run_batches(r, xq, k, nprobe, batch)
    return {"nprobe": nprobe, "recall": round(recall(I, gt), 4), "touched_mean": round(float(touched.mean()), 3)}


def pick_nprobe(r, xq, gt, k: int, batch: int, target: float) -> tuple[int, list[dict]]:
    """The smallest nprobe of NPROBES reaching target recall@k, and the sweep up to it."""
    rows = []
    for p in NPROBES:
        rows.append(measure(r, xq, gt, k, batch, p))
        print(rows[-1], flush=True)
        if rows[-1]["recall"] >= target:
            return p, rows
    return NPROBES[-1], rows


def frontier(r, xq, gt, k: int, batch: int, target: float) -> list[dict]:
    """Ranked routing at other (nprobe, gap) than the build tuned (on held-out corpus vectors): per
    nprobe, the smallest of GAP_FACTORS x the built gap reaching the target on these queries."""
    built_p, built_g = r.view.ranked
    rows = []
    for p in NPROBES[NPROBES.index(min(NPROBES, key=lambda n: abs(n - built_p))):][:3]:
        for f in GAP_FACTORS:
            r.view.ranked = (p, built_g * f)
            rows.append({**measure(r, xq, gt, k, batch, p), "gap": built_g * f})
            print("ranked", rows[-1], flush=True)
            if rows[-1]["recall"] >= target:
                break
    r.view.ranked = (built_p, built_g)
    return rows


def timed_round(r, xq, k: int, nprobe: int, batch: int) -> tuple[float, float]:
    """(QPS, QPS per busy CPU second) of one pass over the queries."""
    t, c = time.perf_counter(), busy_seconds()
    run_batches(r, xq, k, nprobe, batch)
    wall, cpu = time.perf_counter() - t, busy_seconds() - c
    return len(xq) / wall, len(xq) / max(cpu, 1e-9)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = res["cases"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for c in cs[:3]:
        a1.plot([r["nprobe"] for r in c["sweep"]], [r["touched_mean"] for r in c["sweep"]], "o-", label=c["name"])
    a1.set_xscale("log", base=2)
    a1.axhline(2.5, color="grey", ls=":", lw=1)
    a1.set_xlabel("nprobe")
    a1.set_ylabel(f"shards touched per query (of {res['shards']})")
    a1.legend(fontsize=8)
    a2.bar([c["name"].replace("ivf-", "") for c in cs], [c["qps_per_cpu_s"] for c in cs])
    a2.tick_params(axis="x", labelsize=7)
    a2.set_ylabel("queries per CPU second, at recall@10 0.95")
    fig.suptitle(f"MiniLM {res['n']:,} x {res['d']}, {res['factory']}, S={res['shards']}, batch {res['batch']}, "
                 f"{res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--factory", default="IVF1024,Flat")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-k", type=int, default=10)
    a = ap.parse_args()
    data = os.path.join(os.path.dirname(OUT), "build", f"minilm-{a.n}")
    if not os.path.exists(os.path.join(data, "gt.npy")):
        sys.exit(f"{data}: no dataset; make it with: .venv/bin/python bench/build/minilm.py --n {a.n}")
    xq, gt = np.load(os.path.join(data, "queries.npy")), np.load(os.path.join(data, "gt.npy"))[:, :a.k]
    load_before = loadavg()

    import ray

    from shards.search.router import Router
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    routers, cases = {}, []
    roots = {name: built(os.path.join(data, "corpus"), f"minilm{a.n}-{name}-{a.factory.replace(',', '_')}-s{a.shards}",
                         factory=a.factory, shards=a.shards, metric="ip", **kw)
             for name, kw in BUILDS}   # every build first: a router's shard actors hold the CPUs a build needs
    for name, _ in BUILDS:
        routers[name] = r = Router(roots[name], cpus=0.05)  # all stay open: each asks 0.4 CPU, not 0.8
        if name == "ivf-grouped":
            ranked, r.view.ranked = r.view.ranked, None      # first: every shard a query probes
        p, sweep = pick_nprobe(r, xq, gt, a.k, a.batch, a.target)
        cases.append({"name": name if name != "ivf-grouped" else "ivf-grouped-all", "build": name, "nprobe": p,
                      "ranked": None, **{x: sweep[-1][x] for x in ("recall", "touched_mean")}, "sweep": sweep})
        if name == "ivf-grouped" and ranked is not None:
            r.view.ranked = ranked
            s = r.manifest.search
            d = measure(r, xq, gt, a.k, a.batch, None)
            cases.append({"name": "ivf-grouped-ranked", "build": name, "nprobe": ranked[0], "ranked": list(ranked),
                          "tuned": {"recall": s.recall_at_10, "touched": s.touched, "exact_touched": s.exact_touched},
                          **{x: d[x] for x in ("recall", "touched_mean")}, "sweep": [d]})
            print("ranked as built", cases[-1], flush=True)
            rows = frontier(r, xq, gt, a.k, a.batch, a.target)
            ok = [x for x in rows if x["recall"] >= a.target]
            if ok:
                b = min(ok, key=lambda x: (x["touched_mean"], x["nprobe"]))
                cases.append({"name": "ivf-grouped-ranked-fit", "build": name, "nprobe": b["nprobe"],
                              "ranked": [b["nprobe"], b["gap"]], "recall": b["recall"],
                              "touched_mean": b["touched_mean"], "sweep": rows})
    for _ in range(a.rounds):
        for c in cases:
            r = routers[c["build"]]
            r.view.ranked = tuple(c["ranked"]) if c["ranked"] else None
            q, qc = timed_round(r, xq, a.k, c["nprobe"], a.batch)
            c["qps_runs"] = c.get("qps_runs", []) + [round(q, 1)]
            c["per_cpu_runs"] = c.get("per_cpu_runs", []) + [round(qc, 1)]
    for c in cases:
        c["qps"], c["qps_per_cpu_s"] = float(np.median(c["qps_runs"])), float(np.median(c["per_cpu_runs"]))
    for r in routers.values():
        r.close()
    base = cases[0]
    for c in cases:
        c["qps_per_cpu_s_vs_hash"] = round(c["qps_per_cpu_s"] / base["qps_per_cpu_s"], 3)
        c["qps_vs_hash"] = round(c["qps"] / base["qps"], 3)
        print(f"{c['name']:12s} nprobe {c['nprobe']:4d} recall {c['recall']:.4f} shards {c['touched_mean']:.2f}"
              f" QPS {c['qps']:.0f} ({c['qps_vs_hash']:.2f}x hash) per CPU s {c['qps_per_cpu_s']:.0f}"
              f" ({c['qps_per_cpu_s_vs_hash']:.2f}x hash)", flush=True)
    res = {"machine": machine(), "n": a.n, "d": int(xq.shape[1]), "factory": a.factory, "shards": a.shards,
           "k": a.k, "queries": len(xq), "batch": a.batch, "target_recall": a.target, "cases": cases,
           "loadavg_before": load_before, "loadavg_after": loadavg()}
    save("serve_routing_minilm", res)
    plot(res, os.path.join(os.path.dirname(__file__), "..", "results", "serve_routing_minilm.png"))


if __name__ == "__main__":
    main()
