"""What the bench/build scripts share: cached datasets as Parquet parts (and .npy for autofaiss),
ground truth, recall/QPS sweeps of a faiss index or a shardex version, machine facts, results.

Datasets live under bench/out/build/ (git-ignored) and are made once:
  synth-<N>/   faiss SyntheticDataset(d=128): corpus/part-*.parquet (id, vector), npy/, queries.npy, gt.npy
  minilm-<N>/  all-MiniLM-L6-v2 vectors of real text (minilm.py), the same layout
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "bench", "out", "build")
RESULTS = os.path.join(ROOT, "bench", "results")
NQ, K = 1000, 10
PART_ROWS = 100_000          # rows per Parquet file of a dataset (and per npy file)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "ram_gib": round(mem / 2**30, 1),
            "python": platform.python_version()}


def write_parts(path: str, x: np.ndarray, ids: np.ndarray) -> None:
    """corpus/part-*.parquet (id, vector) for shardex and npy/part-*.npy (vectors only) for autofaiss."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(f"{path}/corpus", exist_ok=True)
    os.makedirs(f"{path}/npy", exist_ok=True)
    for p, a in enumerate(range(0, len(x), PART_ROWS)):
        xs, i = x[a:a + PART_ROWS], ids[a:a + PART_ROWS]
        vec = pa.FixedSizeListArray.from_arrays(pa.array(xs.ravel()), xs.shape[1])
        pq.write_table(pa.table({"id": i, "vector": vec}), f"{path}/corpus/part-{p:04d}.parquet",
                       row_group_size=20_000)
        np.save(f"{path}/npy/part-{p:04d}.npy", xs)


def synthetic(n: int, d: int = 128) -> str:
    """faiss's SyntheticDataset (structured, so PQ recall means something): N database vectors,
    NQ held-out queries and their exact top-K; made once."""
    path = f"{OUT}/synth-{n}"
    if os.path.exists(f"{path}/gt.npy"):
        return path
    from faiss.contrib.datasets import SyntheticDataset

    ds = SyntheticDataset(d, 0, n, NQ, seed=1338)
    xb = ds.get_database().astype(np.float32)
    write_parts(path, xb, np.arange(n, dtype=np.int64))
    np.save(f"{path}/queries.npy", ds.get_queries().astype(np.float32))
    np.save(f"{path}/gt.npy", ground_truth(xb, ds.get_queries(), "l2"))
    return path


def ground_truth(xb: np.ndarray, xq: np.ndarray, metric: str, k: int = K) -> np.ndarray:
    """The exact top-k ids, by the brute force tune and eval take theirs with."""
    from index_builder.eval.measures import exact_knn

    return exact_knn(xq, xb, k, metric)[1]


def load_vectors(path: str) -> np.ndarray:
    return np.concatenate([np.load(f"{path}/npy/{f}") for f in sorted(os.listdir(f"{path}/npy"))])


def sweep(search, xq: np.ndarray, gt: np.ndarray, nprobes: list[int], reps: int = 2) -> list[dict]:
    """search(xq, k, nprobe) -> (D, I); recall@K and the best-of-reps QPS of the whole batch per nprobe:
    the measures' sweep, with the benchmarks' K and repetitions."""
    from index_builder.eval import measures

    return measures.sweep(search, xq, gt, K, nprobes, reps=reps)


def faiss_search(index):
    import faiss

    ps = faiss.ParameterSpace()

    def search(xq, k, nprobe):
        ps.set_index_parameter(index, "nprobe", nprobe)
        return index.search(xq, k)
    return search


def shardex_search(root: str):
    """The published version's shards in this process, merged exactly (what the router answers); with a
    refine store, each shard reranks at the version's tuned factor."""
    from index_builder.eval.measures import merged_search
    from shards.search.searcher import ShardSearcher
    from shards.storage.faissio import load_shard
    from shards.storage.manifest import current_version, load_manifest
    from shards.storage.store import Store

    store = Store(root)
    m = load_manifest(store, current_version(store))
    shards = [ShardSearcher(store, m, f) if m.index.refine else load_shard(store, m.version, f) for f in m.shards]
    return merged_search(shards, m.index.metric), m


def run_cli(args: list[str], env: dict | None = None) -> tuple[float, str, str]:
    """A shardex command as a user runs it; (wall seconds, stdout, stderr)."""
    t0 = time.time()
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "shardex"), *args], capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    secs = time.time() - t0
    if p.returncode:
        raise RuntimeError(f"shardex {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return secs, p.stdout, p.stderr


def save(name: str, res: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = f"{RESULTS}/{name}.json"
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    return path


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
