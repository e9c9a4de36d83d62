"""The router's coarse search at large nlist: the flat quantizer `--factory auto` gives (every query
against every centroid) against an HNSW one (a factory `IVF{nlist}_HNSW32,...`), one thread,
microseconds per query in a batch and one query at a time, and how many of the exact nprobe
nearest lists it finds (list recall).

Centroids: nlist vectors of faiss's SyntheticDataset (structured, not i.i.d.) in d dims, queries from
the same distribution. efSearch is set as shards/storage/faissio.coarse_ef sets it (ef per probe x
nprobe), and a few other factors for the curve. Writes bench/results/serve_coarse.json and .png.

    flock /tmp/shardex-bench.lock .venv/bin/python bench/serve/coarse.py [--nlist 65536] [--d 384]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from common import RESULTS, loadavg, machine, save

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def timed(search, xq: np.ndarray, single: int) -> tuple[float, float]:
    """(µs per query in one batch, µs per query one at a time over the first `single`)."""
    t = time.perf_counter()
    search(xq)
    batch = (time.perf_counter() - t) / len(xq) * 1e6
    t = time.perf_counter()
    for q in xq[:single]:
        search(q[None])
    return batch, (time.perf_counter() - t) / single * 1e6


def list_recall(I: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(I, ref)]))


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for p in res["nprobes"]:
        rows = [r for r in res["hnsw"] if r["nprobe"] == p]
        ax.plot([r["single_us"] for r in rows], [r["list_recall"] for r in rows], "o-", label=f"HNSW32, nprobe {p}")
        flat = res["flat"][str(p)]
        ax.plot([flat["single_us"]], [1.0], "s", label=f"flat, nprobe {p}")
    ax.set_xscale("log")
    ax.set_xlabel("µs per query, one at a time, 1 thread")
    ax.set_ylabel("recall of the nprobe nearest lists")
    ax.set_title(f"coarse search, nlist {res['nlist']:,}, d {res['d']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nlist", type=int, default=65_536)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--single", type=int, default=300)
    ap.add_argument("--nprobes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--ef-factors", type=float, nargs="+", default=[1, 2, 4])
    a = ap.parse_args()
    import faiss
    from faiss.contrib.datasets import SyntheticDataset

    from shards.storage.faissio import HNSW_EF_PER_PROBE, coarse_ef, coarse_search

    faiss.omp_set_num_threads(1)
    ds = SyntheticDataset(a.d, 0, a.nlist, a.queries, seed=5)
    c, xq = ds.get_database().astype(np.float32), ds.get_queries().astype(np.float32)
    res = {"machine": machine(), "nlist": a.nlist, "d": a.d, "queries": a.queries, "threads": 1,
           "nprobes": a.nprobes, "ef_per_probe_default": HNSW_EF_PER_PROBE, "loadavg_before": loadavg(),
           "flat": {}, "hnsw": []}
    flat_ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(a.d), a.d, a.nlist)
    flat_ivf.quantizer.add(c)
    flat_ivf.is_trained = True
    hnsw_q = faiss.IndexHNSWFlat(a.d, 32)
    t = time.perf_counter()
    faiss.omp_set_num_threads(os.cpu_count() or 1)   # the graph is built at train time, on every core
    hnsw_q.add(c)
    faiss.omp_set_num_threads(1)
    res["hnsw_build_s"] = round(time.perf_counter() - t, 2)
    hnsw_ivf = faiss.IndexIVFFlat(hnsw_q, a.d, a.nlist)
    hnsw_ivf.is_trained = True
    for p in a.nprobes:
        ref = coarse_search(flat_ivf, xq, p)[1]
        b, s = timed(lambda q, p=p: coarse_search(flat_ivf, q, p), xq, a.single)
        res["flat"][str(p)] = {"batch_us": round(b, 1), "single_us": round(s, 1)}
        print(f"flat  nprobe {p}: {b:.0f} µs/query batched, {s:.0f} one at a time", flush=True)
        for f in a.ef_factors:
            ef = coarse_ef(p, f)
            I = coarse_search(hnsw_ivf, xq, p, ef_per_probe=f)[1]
            b, s = timed(lambda q, p=p, f=f: coarse_search(hnsw_ivf, q, p, ef_per_probe=f), xq, a.single)
            r, x = list_recall(I, ref), res["flat"][str(p)]["single_us"] / s
            res["hnsw"].append({"nprobe": p, "ef": ef, "batch_us": round(b, 1), "single_us": round(s, 1),
                                "list_recall": round(r, 4), "speedup_single": round(x, 1)})
            print(f"HNSW32 nprobe {p} ef {ef}: {b:.0f} µs batched, {s:.0f} single, list recall {r:.4f}, "
                  f"{x:.1f}x faster one at a time", flush=True)
    res["loadavg_after"] = loadavg()
    save("serve_coarse", res)
    plot(res, os.path.join(RESULTS, "serve_coarse.png"))


if __name__ == "__main__":
    main()
