"""What the serving benchmarks share: a seeded clustered corpus, cached builds, the machine and its load."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "out", "serve")
RESULTS = os.path.join(HERE, "..", "results")
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))  # the tests' corpus writers (helpers.py)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def core_pingpong_ns(rounds: int = 200_000) -> int | None:
    """Cache-line round trip between CPU 0 and CPU 1 (pingpong.c): tens of ns when the host runs this
    VM's two vCPUs on cores sharing an L3, hundreds when not. None without a C compiler or 2 CPUs."""
    import shutil
    import subprocess

    exe = os.path.join(OUT, "pingpong")
    if (os.cpu_count() or 1) < 2:
        return None
    if not os.path.exists(exe):
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            return None
        os.makedirs(OUT, exist_ok=True)
        subprocess.run([cc, "-O2", "-pthread", os.path.join(HERE, "pingpong.c"), "-o", exe], check=True)
    return int(subprocess.run([exe, str(rounds)], capture_output=True, text=True, check=True).stdout)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, CPU only"


def corpus(n: int, d: int, seed: int = 0) -> tuple[str, np.ndarray, np.ndarray]:
    """(source dir, ids, vectors) of n clustered vectors in 4 Parquet files, written once."""
    from helpers import clustered, write_vector_corpus

    src = os.path.join(OUT, f"corpus-{n}x{d}-{seed}")
    if not os.path.exists(os.path.join(src, "part-3.parquet")):
        write_vector_corpus(src, n=n, d=d, files=4, seed=seed, row_group=10_000)
    return src, np.arange(n, dtype=np.int64) * 3 + 1, clustered(n, d, seed)


def built(src: str, name: str, **kw) -> str:
    """An index root built from src with these options (built once, reused by later runs)."""
    from index_builder.config import BuildConfig
    from index_builder.pipeline import build

    root = os.path.join(OUT, name)
    if not os.path.exists(os.path.join(root, "CURRENT")):
        build(BuildConfig(source=src, index_root=root, vector_column="vector", part_rows=50_000, **kw))
    return root


def monolithic(root: str, ids: np.ndarray, x: np.ndarray):
    """(one index holding every vector, manifest): the version's own trained index with all of x added,
    so that it probes the same lists as the version's shards."""
    from shards.storage.faissio import read_index
    from shards.storage.manifest import current_version, load_manifest, vdir
    from shards.storage.store import Store

    store = Store(root)
    m = load_manifest(store, current_version(store))
    index = read_index(store, f"{vdir(m.version)}/{m.trained.file}")
    index.add_with_ids(x, ids)
    return index, m


def same_topk(I: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of queries whose top-k id sets are equal (ties may order equal distances differently)."""
    return float(np.mean([set(p) == set(q) for p, q in zip(I, ref)]))


def queries(x: np.ndarray, nq: int, seed: int = 1) -> np.ndarray:
    """Database vectors plus small noise: queries that land where the data is."""
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), nq, replace=False)]
    return (q + rng.normal(0, 0.01, q.shape)).astype(np.float32)


def save(name: str, res: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    return path


def timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def corpus_args(nq: int, rounds: int) -> argparse.ArgumentParser:
    """The options the corpus-and-batch benchmarks share (their defaults: 200k x 64, IVF1024,Flat)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--factory", default="IVF1024,Flat")
    ap.add_argument("--nq", type=int, default=nq)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap
