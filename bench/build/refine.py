"""Two-tier search: compressed codes in RAM pick candidates, each shard reranks them from its refine store.

shardex builds the dataset with `shardex build --factory F --refine fp32 --tune-queries Q` (the tune
measures on the first half of the dataset's real queries); every measure below is on the other half.
In this process, one thread, the same shard index is searched:
  - by shardex's ShardSearcher, rerank factor 0 (codes alone) and each of FACTORS, at each nprobe;
  - by faiss IndexRefineFlat over the same codes, the full vectors in RAM (the in-memory upper bound),
    with the same k_factor: QPS compared at equal recall (interpolated on its curve);
and shardex's tuned (nprobe, factor) is reported against the codes alone at their best recall. The
ratio to IndexRefineFlat is timed in pairs, back to back at each (factor, nprobe), best of 3 rounds.
With the LanceDB venv (bench/.venv-lancedb, see bench/README.md), LanceDB's IVF_PQ on the same vectors
and code size, with its refine_factor chosen by hand, is swept as well (bench/build/lancedb_run.py),
one query at a time and in batches.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/build/refine.py --dataset minilm-50000 \\
        --factory IVF1024,PQ96x4fs --metric ip
    flock /tmp/shardex-bench.lock .venv/bin/python bench/build/refine.py --dataset synth-1000000 \\
        --factory IVF4096,PQ16 --metric l2 --factors 10
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, ROOT, load_vectors, loadavg, machine, run_cli, save, synthetic

LANCE_PY = os.path.join(ROOT, "bench", ".venv-lancedb", "bin", "python")
NPROBES = (16, 32, 64, 128, 256, 512)
FACTORS = (2, 4, 10, 20)
LATENCY_QUERIES = 200


def build(path: str, work: str, factory: str, metric: str, tune: str) -> dict:
    wall, out, _ = run_cli(["build", f"{path}/corpus", f"{work}/index", "--vector-column", "vector", "--factory",
                            factory, "--refine", "fp32", "--metric", metric, "--tune-queries", tune, "--json"],
                           env={"RAY_AUTH_MODE": "disabled"})
    s = json.loads(out)
    return {"wall": round(wall, 2), "stages": s["seconds"], "factory": s["factory"], "nprobe": s["nprobe"],
            "refine_factor": s["refine_factor"], "tuned_recall": s["recall_at_10"], "ram_bytes": s["index_bytes"],
            "refine_bytes": s["refine_bytes"]}


def curve(search, xq, gt, nprobes, latency: bool = True) -> list[dict]:
    """Per nprobe: recall@10 and QPS of the batch (measures.sweep), and the p50 of one query at a time."""
    from index_builder.eval.measures import sweep

    return sweep(search, xq, gt, 10, list(nprobes), reps=2, latency_queries=LATENCY_QUERIES if latency else 0)


def shardex_search(root: str) -> tuple[object, object]:
    """(R -> search(q, k, nprobe), the manifest): the version's shards searched as served, one thread."""
    from index_builder.eval.measures import merged_search
    from shards.search.searcher import ShardSearcher
    from shards.storage.manifest import current_version, load_manifest
    from shards.storage.store import Store

    store = Store(root)
    m = load_manifest(store, current_version(store))
    shards = [ShardSearcher(store, m, sh, threads=1) for sh in m.shards]
    return (lambda R: merged_search(shards, m.index.metric, R)), m


def refine_flat(root: str, m, xb: np.ndarray):
    """R -> search(q, k, nprobe) of faiss IndexRefineFlat: the one shard's codes as its base, every vector
    in an IndexFlat in RAM."""
    import faiss

    from shards.storage.faissio import load_shard
    from shards.storage.store import Store

    base = load_shard(Store(root), m, m.shards[0])
    flat = faiss.IndexFlatIP(xb.shape[1]) if m.index.metric == "ip" else faiss.IndexFlatL2(xb.shape[1])
    flat.add(xb)  # row i is id i: the dataset's ids are 0..N-1
    rf = faiss.IndexRefine(base, flat)

    def search(R):
        def s(q, k, p):
            params = faiss.IndexRefineSearchParameters(k_factor=R, base_index_params=faiss.SearchParametersIVF(
                nprobe=p))
            return rf.search(q, k, params=params)
        return s
    return search


def paired(mine, theirs, xq, gt, nprobes, factors, rounds: int = 3) -> dict:
    """shardex against IndexRefineFlat at each (factor, nprobe): the same codes and candidates, so the same
    recall (checked). Timed back to back, `rounds` times in turn, each side's best QPS kept, so the
    machine's drift over minutes falls on both."""
    from index_builder.eval.measures import recall_hits, timed

    out = {}
    for R in factors:
        rows = []
        for p in nprobes:
            qps = {"shardex": [], "refine_flat": []}
            for _ in range(rounds):
                for name, f in (("shardex", mine(R)), ("refine_flat", theirs(R))):
                    (_, I), runs, secs = timed(lambda f=f, p=p: f(xq, 10, p))
                    qps[name].append(round(len(xq) * runs / secs, 1))
                    rec = round(float(recall_hits(I, gt, 10).mean()), 4)
                    qps.setdefault(f"recall_{name}", rec)
            a, b = max(qps["shardex"]), max(qps["refine_flat"])
            rows.append({"nprobe": p, "recall": qps["recall_shardex"], "recall_refine_flat": qps["recall_refine_flat"],
                         "shardex": a, "refine_flat": b, "ratio": round(a / b, 3), "runs": qps})
        out[str(R)] = rows
    return out


def lancedb(path: str, work: str, xq_file: str, gt_file: str, metric: str, partitions: int, sub: int) -> dict | None:
    if not os.path.exists(LANCE_PY):
        return None
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lancedb_run.py")
    args = [f"{path}/npy", xq_file, gt_file, f"{work}/lance", metric, str(partitions), str(sub)]
    p = subprocess.run(["taskset", "-c", "0", LANCE_PY, script, *args], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def vs_lancedb(res: dict) -> dict | None:
    """At each LanceDB point (any refine factor, chosen by hand), the best recall shardex's tuned factor
    reaches at that QPS or more (batched) and at that p50 latency or less (one at a time)."""
    L = res.get("lancedb")
    if not L:
        return None
    mine = res["curves"][str(res["shardex"]["refine_factor"] or 0)]

    def best(ok):
        got = [r["recall"] for r in mine if ok(r)]
        return max(got) if got else None

    out = {"batched": [], "single": []}
    for R, c in L["batched"].items():
        for r in c:
            b = best(lambda x, r=r: x["qps"] >= r["qps"])
            out["batched"].append({"refine": int(R), "nprobe": r["nprobe"], "qps": r["qps"], "lancedb": r["recall"],
                                   "shardex": b, "shardex_higher_or_equal": b is not None and b >= r["recall"]})
    for R, c in L["single"].items():
        for r in c:
            b = best(lambda x, r=r: x["latency_ms"]["p50"] <= r["p50_ms"])
            out["single"].append({"refine": int(R), "nprobe": r["nprobe"], "p50_ms": r["p50_ms"],
                                  "lancedb": r["recall"], "shardex": b,
                                  "shardex_higher_or_equal": b is not None and b >= r["recall"]})
    out["every_point"] = all(x["shardex_higher_or_equal"] for k in ("batched", "single") for x in out[k])
    return out


def run(a) -> dict:
    import faiss

    path = synthetic(int(a.dataset.split("-")[1])) if a.dataset.startswith("synth-") else f"{OUT}/{a.dataset}"
    work = f"{OUT}/refine-{a.dataset}"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    xq_all, gt_all = np.load(f"{path}/queries.npy"), np.load(f"{path}/gt.npy")
    o = np.random.default_rng(0).permutation(len(xq_all))   # the file is in man-page order: split at random
    h = len(xq_all) // 2
    np.save(f"{work}/tune.npy", xq_all[o[:h]])          # the tune's real queries; the rest measure
    xq, gt = xq_all[o[h:]], gt_all[o[h:]]
    np.save(f"{work}/eval.npy", xq)
    np.save(f"{work}/eval-gt.npy", gt)
    load = [loadavg()]
    sx = build(path, work, a.factory, a.metric, f"{work}/tune.npy")
    load.append(loadavg())
    faiss.omp_set_num_threads(1)
    factors = tuple(a.factors)
    if sx["refine_factor"] and sx["refine_factor"] not in factors:
        factors = tuple(sorted({*factors, sx["refine_factor"]}))
    mine, m = shardex_search(f"{work}/index")
    curves = {R: curve(mine(R), xq, gt, a.nprobes) for R in (0, *factors)}
    res = {"dataset": a.dataset, "vectors": m.ntotal, "dim": m.encoder.dim, "metric": a.metric,
           "queries": {"tune": h, "measured": len(xq)}, "threads": 1, "shardex": sx,
           "ram_bytes_per_vector": round(sx["ram_bytes"] / m.ntotal, 1),
           # codes and ids (fast-scan lists padded to blocks of 32), without the centroids each shard holds
           "codes_ids_bytes_per_vector": round((sx["ram_bytes"] - len(m.shards) * m.trained.bytes) / m.ntotal, 1),
           "curves": {str(R): c for R, c in curves.items()}}
    best0 = max(curves[0], key=lambda r: (r["recall"], r["qps"]))
    tuned = next((r for r in curves.get(sx["refine_factor"] or 0, []) if r["nprobe"] == sx["nprobe"]), None)
    res["codes_alone_best"], res["tuned_measured"] = best0, tuned
    if tuned:
        res["tuned_qps_over_codes_best"] = round(tuned["qps"] / best0["qps"], 3)
    if not a.no_refine_flat:
        theirs = refine_flat(f"{work}/index", m, load_vectors(path))
        res["refine_flat"] = {str(R): curve(theirs(R), xq, gt, a.nprobes) for R in factors}
        res["qps_over_refine_flat_at_equal_recall"] = pv = paired(mine, theirs, xq, gt, a.nprobes, factors)
        rows = [r for c in pv.values() for r in c]
        res["refine_flat_points_at_or_over_0_8x"] = [sum(r["ratio"] >= 0.8 for r in rows), len(rows)]
    prev = a.reuse_lancedb
    if a.reuse_lancedb and os.path.exists(prev):  # the same vectors and query split: its numbers stand
        res["lancedb"] = json.load(open(prev)).get("lancedb")
    elif a.lancedb:
        res["lancedb"] = lancedb(path, work, f"{work}/eval.npy", f"{work}/eval-gt.npy", a.metric, a.lance_partitions,
                                 a.lance_sub_vectors)
    res["vs_lancedb"] = vs_lancedb(res)
    load.append(loadavg())
    res.update(machine=machine(), loadavg=load, when=time.strftime("%Y-%m-%d %H:%M"))
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    for R, c in res["curves"].items():
        lab = f"shardex refine x{R}" + (" (tuned)" if int(R) == (res["shardex"]["refine_factor"] or 0) else "") \
            if int(R) else "shardex codes alone"
        ax.plot([r["qps"] for r in c], [r["recall"] for r in c], "o-", ms=3, label=lab)
    for R, c in (res.get("refine_flat") or {}).items():
        ax.plot([r["qps"] for r in c], [r["recall"] for r in c], "x--", ms=4, lw=0.8, label=f"IndexRefineFlat x{R}")
    for R, c in ((res.get("lancedb") or {}).get("batched") or {}).items():
        ax.plot([r["qps"] for r in c], [r["recall"] for r in c], "s:", ms=3, lw=0.8, label=f"LanceDB refine {R}")
    ax.set_xscale("log")
    ax.set_xlabel("queries per second (1 thread, batched)")
    ax.set_ylabel("recall@10 (real queries, not the tune's)")
    ax.set_title(f"{res['dataset']}: {res['shardex']['factory']}, {res['codes_ids_bytes_per_vector']} B/vector of "
                 f"codes and ids in RAM",
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="minilm-50000")
    ap.add_argument("--factory", default="IVF1024,PQ96x4fs")
    ap.add_argument("--metric", default="ip", choices=["ip", "l2"])
    ap.add_argument("--factors", type=int, nargs="+", default=list(FACTORS))
    ap.add_argument("--nprobes", type=int, nargs="+", default=list(NPROBES))
    ap.add_argument("--no-refine-flat", action="store_true")
    ap.add_argument("--lancedb", action="store_true")
    ap.add_argument("--reuse-lancedb", help="a results file of this dataset to take LanceDB's numbers from "
                    "(the same vectors and query split)")
    ap.add_argument("--lance-partitions", type=int, default=1024)
    ap.add_argument("--lance-sub-vectors", type=int, default=48)
    a = ap.parse_args()
    res = run(a)
    path = save(f"build_refine-{a.dataset}-{a.factory.replace(',', '_')}", res)
    plot(res, path[:-5] + ".png")
    print(path)
    keys = ("shardex", "codes_ids_bytes_per_vector", "codes_alone_best", "tuned_measured", "tuned_qps_over_codes_best")
    print(json.dumps({k: res.get(k) for k in keys}, indent=1))


if __name__ == "__main__":
    main()
