"""train: one trained (empty) index from a sample drawn across all parts in proportion to their sizes."""
from __future__ import annotations

import time

import numpy as np
import ray

from shards.faissio import faiss, metric_type, nlist, read_index, write_index
from shards.store import Store

from .encode import read_vectors


def make_index(factory: str, d: int, metric: str):
    """index_factory, wrapped in an IDMap when the index has no IVF (so add_with_ids works)."""
    f = faiss()
    index = f.index_factory(d, factory, metric_type(metric))
    try:
        f.extract_index_ivf(index)
    except RuntimeError:
        if not isinstance(index, (f.IndexIDMap, f.IndexIDMap2)):
            index = f.IndexIDMap2(index)
    return index


def sample(store: Store, parts: list[tuple[str, int]], size: int, seed: int) -> np.ndarray:
    """`size` vectors, taken from each part in proportion to its row count; one part in memory at a time."""
    rng = np.random.default_rng(seed)
    total = sum(n for _, n in parts)
    quota = np.floor(np.array([n for _, n in parts]) * size / max(total, 1)).astype(int)
    quota[np.argsort([-n for _, n in parts])[: size - quota.sum()]] += 1  # the remainder, biggest parts first
    xs = []
    for (rel, n), q in zip(parts, quota):
        if q > 0:
            _, x = read_vectors(store, rel)
            xs.append(x[rng.choice(len(x), size=min(q, len(x)), replace=False)])
    return np.concatenate(xs)


@ray.remote
def train_task(store: Store, parts: list[tuple[str, int]], factory: str, d: int, metric: str,
               size: int, seed: int, out_rel: str, threads: int) -> dict:
    if store.exists(out_rel):
        return {"train_vectors": None, "seconds": 0.0, "nlist": nlist(read_index(store, out_rel)),
                "reused": True}
    faiss().omp_set_num_threads(threads)
    t0 = time.time()
    xt = sample(store, parts, size, seed)
    index = make_index(factory, d, metric)
    index.train(xt)
    write_index(store, out_rel, index)
    return {"train_vectors": len(xt), "seconds": time.time() - t0, "nlist": nlist(index), "reused": False}
