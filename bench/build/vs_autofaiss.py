"""shardex build --factory auto against autofaiss build_index: same vectors, same memory budget, same cores.

autofaiss pins numpy<2, so it runs in its own venv, bench/.venv-autofaiss (made by
`make bench-autofaiss-venv`, see bench/README.md), on the dataset's .npy files; shardex runs
`shardex build --vector-column vector --factory auto --memory-budget B` on its Parquet files.
Both are whole commands timed from outside. Then each index answers the dataset's held-out
queries at nprobe 1, 2, 4, ... (with an HNSW coarse quantizer, efSearch = 2 x nprobe), giving
a recall@10 / QPS curve per index, same threads, in this process; recall is compared at
matched QPS by interpolating each curve in log(QPS).

    flock /tmp/shardex-bench.lock .venv/bin/python bench/build/vs_autofaiss.py --dataset synth-1000000 \\
        --budget 64M --metric l2
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
from common import OUT, ROOT, loadavg, machine, run_cli, save, shardex_search, sweep

AF_PY = os.path.join(ROOT, "bench", ".venv-autofaiss", "bin", "python")


def autofaiss(npy: str, out: str, budget: str, metric: str, cores: int) -> dict:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "autofaiss_build.py")
    t0 = time.time()
    p = subprocess.run([AF_PY, script, npy, out, budget, metric, str(cores)], capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return {"wall": round(wall, 2), **json.loads(p.stdout.strip().splitlines()[-1])}


def autofaiss_search(index):
    import faiss

    ps = faiss.ParameterSpace()
    ivf = faiss.extract_index_ivf(index)
    hnsw = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)

    def search(xq, k, nprobe):
        ps.set_index_parameter(index, "nprobe", nprobe)
        if hnsw:
            ps.set_index_parameter(index, "quantizer_efSearch", max(16, 2 * nprobe))
        return index.search(xq, k)
    return search


def recall_at_qps(curve: list[dict], qps: float) -> float | None:
    """Recall interpolated at a QPS (log scale) on a curve of falling QPS; None outside it."""
    q = np.log([r["qps"] for r in curve])[::-1]
    rc = np.array([r["recall"] for r in curve])[::-1]
    x = np.log(qps)
    if x < q.min() or x > q.max():
        return None
    return round(float(np.interp(x, q, rc)), 4)


def run(dataset: str, budget: str, metric: str, top_nprobe: int, af_metric: str) -> dict:
    import faiss

    path = f"{OUT}/{dataset}"
    work = f"{OUT}/vs_autofaiss-{dataset}"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cores = os.cpu_count()
    load = [loadavg()]
    af = autofaiss(f"{path}/npy", f"{work}/autofaiss.index", budget, af_metric, cores)
    load.append(loadavg())
    wall, out, _ = run_cli(["build", f"{path}/corpus", f"{work}/index", "--vector-column", "vector", "--factory",
                            "auto", "--memory-budget", budget, "--metric", metric, "--json"],
                           env={"RAY_AUTH_MODE": "disabled"})
    load.append(loadavg())
    s = json.loads(out)
    sx = {"wall": round(wall, 2), "stages": s["seconds"], "factory": s["factory"], "nprobe": s["nprobe"],
          "index_bytes": s["index_bytes"]}
    xq, gt = np.load(f"{path}/queries.npy"), np.load(f"{path}/gt.npy")
    faiss.omp_set_num_threads(cores)
    nprobes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p <= top_nprobe]
    afi = faiss.read_index(f"{work}/autofaiss.index")
    curve_af = sweep(autofaiss_search(afi), xq, gt, nprobes)
    search, m = shardex_search(f"{work}/index")
    curve_sx = sweep(search, xq, gt, nprobes)
    qps_points = sorted({r["qps"] for r in curve_sx})
    matched = [{"qps": q, "shardex": recall_at_qps(curve_sx, q), "autofaiss": recall_at_qps(curve_af, q)}
               for q in qps_points]
    return {"dataset": dataset, "vectors": m.ntotal, "dim": m.encoder.dim, "budget": budget, "metric": metric,
            "autofaiss_metric": af_metric,
            "cores": cores, "shardex": sx,
            "autofaiss": {**af, "index_bytes": os.path.getsize(f"{work}/autofaiss.index")},
            "ratio_wall_shardex_over_autofaiss": round(sx["wall"] / af["wall"], 3),
            "recall_shardex": curve_sx, "recall_autofaiss": curve_af, "recall_at_matched_qps": matched,
            "machine": machine(), "loadavg": load}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 4.2))
    for key, label in (("recall_shardex", f"shardex {res['shardex']['factory']} ({res['shardex']['wall']:.0f} s)"),
                       ("recall_autofaiss", f"autofaiss {res['autofaiss']['infos'].get('index_key')} "
                                            f"({res['autofaiss']['wall']:.0f} s)")):
        ax.plot([r["qps"] for r in res[key]], [r["recall"] for r in res[key]], "o-", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"queries per second ({res['cores']} threads, batch of 1000)")
    ax.set_ylabel("recall@10 (held-out queries)")
    ax.set_title(f"{res['dataset']}, memory budget {res['budget']}; build time in the legend", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="synth-1000000")
    ap.add_argument("--budget", default="64M")
    ap.add_argument("--metric", default="l2", choices=["l2", "ip"])
    ap.add_argument("--top-nprobe", type=int, default=512)
    # autofaiss 2.18 builds OPQ for inner product with a keyword call faiss 1.15 refuses; on normalized
    # vectors (MiniLM's) L2 ranks exactly as inner product does, so it can be given l2 there
    ap.add_argument("--autofaiss-metric", choices=["l2", "ip"], default=None)
    a = ap.parse_args()
    if not os.path.exists(AF_PY):
        raise SystemExit(f"{AF_PY}: missing; see bench/README.md for the autofaiss venv")
    res = run(a.dataset, a.budget, a.metric, a.top_nprobe, a.autofaiss_metric or a.metric)
    name = f"build_vs_autofaiss-{a.dataset}"
    path = save(name, res)
    plot(res, path[:-5] + ".png")
    print(path)
    print(f"{a.dataset}: shardex {res['shardex']['factory']} {res['shardex']['wall']} s, autofaiss "
          f"{res['autofaiss']['infos'].get('index_key')} {res['autofaiss']['wall']} s; recall at matched QPS "
          f"{res['recall_at_matched_qps']}; load {res['loadavg']}")


if __name__ == "__main__":
    main()
