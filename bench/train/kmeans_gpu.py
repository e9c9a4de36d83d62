"""The torch k-means on CUDA (index_builder/train/kmeans.py) against faiss's CPU k-means, same sample.

Runs on a GPU machine without Ray (the lent ones have torch with CUDA; faiss-cpu is carried as a
wheel). Reports, per size: each side's seconds, its objective (sum of squared distances to the
nearest centroid), their ratio (target: within 1%) and the speedup. Then the out-of-memory halving:
the same run with torch allowed only a sliver of the device, so the first block, sized to the free
memory mem_get_info reports, does not fit; the run must finish with a smaller block. Writes
kmeans_gpu.json to --out.

    python bench/train/kmeans_gpu.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np
import torch

from index_builder.train.kmeans import _block_size, kmeans

SIZES = [(256_000, 128, 1024), (1_048_576, 128, 4096)]  # (points, d, k): 256 points a centroid, as faiss keeps


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((256, d)).astype(np.float32) * 4
    return (c[rng.integers(0, 256, n)] + rng.standard_normal((n, d)).astype(np.float32)).astype(np.float32)


def faiss_cpu(x: np.ndarray, k: int) -> tuple[float, float]:
    km = faiss.Kmeans(x.shape[1], k, niter=10, seed=1234, max_points_per_centroid=256)
    t0 = time.time()
    km.train(x)
    return time.time() - t0, float(km.obj[-1])


def torch_cuda(x: np.ndarray, k: int) -> tuple[float, float, int]:
    kmeans(x[:k * 4], k, niter=1, device="cuda")  # warm-up: CUDA context, kernels
    torch.cuda.synchronize()
    t0 = time.time()
    r = kmeans(x, k, niter=10, device="cuda")
    torch.cuda.synchronize()
    return time.time() - t0, r.objective, r.block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "faiss": faiss.__version__,
           "cpu_threads": faiss.omp_get_max_threads(), "runs": []}
    for n, d, k in SIZES:
        x = clustered(n, d)
        tf, of = faiss_cpu(x, k)
        tt, ot, block = torch_cuda(x, k)
        run = {"points": n, "d": d, "k": k, "faiss_cpu_s": round(tf, 2), "torch_cuda_s": round(tt, 2),
               "speedup": round(tf / tt, 2), "objective_faiss": of, "objective_torch": ot,
               "objective_ratio": round(ot / of, 5), "within_1pct": abs(ot / of - 1) <= 0.01, "block": block}
        res["runs"].append(run)
        print(json.dumps(run), flush=True)
    n, d, k = SIZES[-1]
    x = clustered(n, d)
    free, total = torch.cuda.mem_get_info()
    first = _block_size(torch, torch.device("cuda"), k, d, True)
    torch.cuda.set_per_process_memory_fraction((x.nbytes * 1.5 + first * k * 2) / total)  # half a block's room
    r = kmeans(x, k, niter=2, device="cuda")
    torch.cuda.set_per_process_memory_fraction(1.0)
    res["oom_halving"] = {"first_block": first, "last_block": r.block, "halved": r.block < first,
                          "objective": r.objective}
    print(json.dumps(res["oom_halving"]), flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kmeans_gpu.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
