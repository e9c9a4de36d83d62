"""train: one trained (empty) index from a sample drawn across all parts in proportion to their sizes.

The sample is drawn by one small task per part, in parallel across the cluster, each returning
only its rows; the corpus is never loaded whole, nor read by one task. The IVF k-means, the
expensive step, runs where it is fastest:
- "faiss-gpu": faiss's own k-means with a GPU flat index assigning points, when faiss-gpu
  is installed and sees a GPU;
- "cuda-torch": k-means in torch on CUDA (kmeans.py), its centroids placed into the faiss
  quantizer, when torch sees a GPU but faiss is the CPU build;
- "cpu": faiss on the CPU otherwise.
Everything else (OPQ/PCA pre-transforms, PQ codebooks) is trained by faiss on the CPU; it
subsamples to 65k points, so it is cheap next to k-means. A GPU that runs out of memory
falls back to the next device down, with a log line, rather than failing the build.
"""
from __future__ import annotations

import glob
import io
import json
import sys
import time

import numpy as np
import ray

from index_builder.encode.parts import read_vectors
from index_builder.workdir import WorkDir
from shards.errors import ConfigError
from shards.raytools import log
from shards.storage.faissio import faiss, ivf, metric_type, nlist, read_index, write_index
from shards.storage.store import Store

DEVICES = ("faiss-gpu", "cuda-torch", "cpu")


def make_index(factory: str, d: int, metric: str):
    """index_factory, wrapped in an IDMap when the index has no IVF (so add_with_ids works), with
    polysemous training off."""
    f = faiss()
    index = skip_polysemous(f.index_factory(d, factory, metric_type(metric)))
    try:
        f.extract_index_ivf(index)
    except RuntimeError:
        if not isinstance(index, (f.IndexIDMap, f.IndexIDMap2)):
            index = f.IndexIDMap2(index)
    return index


SUPPORTED = ("an IVF index (IVF{nlist},Flat|PQ{M}|SQ8, optionally under OPQ/PCA, e.g. IVF1024_HNSW32,PQ32), "
             "Flat, PQ{M} or SQ8")


def check_factory(factory: str, d: int, metric: str, sharding: str) -> None:
    """Refuse, before any work, a --factory that faiss cannot build for d, or that the add, merge and
    split stages cannot handle: they merge part indexes into shards (IndexIVF.merge_from, or the
    flat codes of an IDMap), and --sharding ivf cuts inverted lists by range. Building the empty
    index is cheap: nothing is trained."""
    f = faiss()
    try:
        index = make_index(factory, d, metric)
    except RuntimeError as e:
        raise ConfigError(f"factory: faiss cannot build {factory!r} for d={d} ({_faiss_reason(e)}); "
                          f"give {SUPPORTED}, or --factory auto") from None
    top = f.downcast_index(index)
    if isinstance(top, f.IndexPreTransform):
        top = f.downcast_index(top.index)
    iv = ivf(index)
    if iv is None:
        try:
            index.check_compatible_for_merge(make_index(factory, d, metric))
        except RuntimeError:
            raise ConfigError(f"factory: {factory!r} ({type(f.downcast_index(top.index)).__name__}) cannot be "
                              f"merged from part indexes, which every build does; give {SUPPORTED}") from None
        if sharding == "ivf":
            raise ConfigError(f"factory: --sharding ivf needs an IVF index and {factory!r} has no IVF lists; "
                              f"give --sharding hash, or an IVF factory like IVF1024,{factory}")
        return
    if not isinstance(top, f.IndexIVF):  # e.g. a refine stage over the IVF: merge_from is not implemented
        raise ConfigError(f"factory: {factory!r} wraps its IVF index in {type(top).__name__}, which cannot be "
                          f"merged from part indexes; drop the wrapper (e.g. ,RFlat) and give {SUPPORTED}")
    if sharding == "ivf" and isinstance(top, f.IndexIVFFastScan):
        # the split cuts ArrayInvertedLists by range; fast-scan's block lists are laid out differently
        raise ConfigError(f"factory: --sharding ivf cannot cut the fast-scan lists of {factory!r}; give "
                          f"--sharding hash, or PQ{{M}} without fs")


def _faiss_reason(e: RuntimeError) -> str:
    """The part of a faiss C++ error a user can act on: its message, not the source location."""
    text = " ".join(str(e).split())
    for cut in ("' failed: ", "Error: ", ": "):
        if cut in text:
            text = text.rsplit(cut, 1)[1]
            break
    return text[:160]


def skip_polysemous(index):
    """index_factory turns on polysemous training for every 8-bit PQ ("PQ48" unless written "PQ48np").
    It only reorders the PQ centroids so that Hamming distances between codes approximate real ones,
    which matters to polysemous search (polysemous_ht), and shardex never searches that way: the
    codebooks, the codes' distances and so the results are the same without it. It is most of the
    training time of a PQ index (33 of 39 s for IVF1024,PQ48 on 50k x 384, 2 cores)."""
    f = faiss()
    inner = f.downcast_index(index)
    while True:
        if hasattr(inner, "do_polysemous_training"):
            inner.do_polysemous_training = False
        nxt = getattr(inner, "index", None)
        if nxt is None:
            return index
        inner = f.downcast_index(nxt)


def quotas(sizes: list[int], size: int) -> np.ndarray:
    """How many of `size` to take from each part, in proportion to its rows (remainder to the biggest)."""
    total = sum(sizes)
    quota = np.floor(np.array(sizes) * size / max(total, 1)).astype(int)
    quota[np.argsort([-n for n in sizes])[: size - quota.sum()]] += 1
    return np.minimum(quota, sizes)


def sample(store: Store, parts: list[tuple[str, int]], size: int, seed: int, queries: int = 0):
    """`size` training vectors taken from each part in proportion to its row count, one part in
    memory at a time. With queries > 0, also that many (query vectors, ids) drawn the same way
    while the parts are read anyway: tune's held-out queries. Returns xt, or (xt, xq, qids).
    In this process; sample_parallel draws the same rows in one Ray task per part."""
    return joined([draw(store, *job) for job in draw_jobs(parts, size, seed, queries)], queries)


def sample_parallel(store: Store, parts: list[tuple[str, int]], size: int, seed: int, queries: int) -> list:
    """The rows sample() draws, read by one task per part across the cluster: at a billion vectors
    one task reading every part in turn would take hours. Returns the tasks' refs (for joined)."""
    return [draw_task.options(num_cpus=1).remote(store, *job) for job in draw_jobs(parts, size, seed, queries)]


def draw_jobs(parts: list[tuple[str, int]], size: int, seed: int, queries: int) -> list[tuple]:
    """(part, training rows, query rows, seed) for every part that gives any: the one plan both samplers run."""
    qt, qq = quotas([n for _, n in parts], size), quotas([n for _, n in parts], queries)
    rows = zip(parts, qt, qq, strict=True)
    return [(rel, int(a), int(b), (seed, i)) for i, ((rel, _), a, b) in enumerate(rows) if a or b]


def draw(store: Store, rel: str, a: int, b: int, seed: tuple[int, int]):
    """a training rows and b query rows (with their ids) of one part, at random (seeded by part)."""
    rng = np.random.default_rng(seed)
    ids, x = read_vectors(store, rel)
    take = rng.choice(len(x), size=min(b, len(x)), replace=False)
    return x[rng.choice(len(x), size=min(a, len(x)), replace=False)], x[take], ids[take]


draw_task = ray.remote(max_retries=3)(draw)


def joined(drawn: list, queries: int):
    xt = np.concatenate([t for t, _, _ in drawn])
    if not queries:
        return xt
    return xt, np.concatenate([q for _, q, _ in drawn]), np.concatenate([i for _, _, i in drawn])


def best_device() -> str:
    """The fastest place for k-means on this worker: faiss-gpu, else torch on CUDA, else the CPU."""
    f = faiss()
    if hasattr(f, "StandardGpuResources") and f.get_num_gpus() > 0:
        return "faiss-gpu"
    if sys.platform.startswith("linux") and not glob.glob("/dev/nvidia*"):
        return "cpu"  # no NVIDIA device at all: spare the worker torch's import (seconds of the train stage)
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda-torch"
    except ImportError:
        pass
    return "cpu"


def train_chain(index, xt: np.ndarray) -> np.ndarray:
    """Train the OPQ/PCA pre-transforms on xt; return xt as the IVF index under them sees it."""
    f = faiss()
    index = f.downcast_index(index)
    while isinstance(index, f.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            if not vt.is_trained:
                vt.train(xt)
            xt = vt.apply(xt)
        index = f.downcast_index(index.index)
    return np.ascontiguousarray(xt, dtype=np.float32)


def train_index(index, xt: np.ndarray, device: str, seed: int = 1234) -> str:
    """Train `index` on xt with its IVF k-means on `device` ("faiss-gpu", "cuda-torch", "cpu-torch" for
    torch on the CPU, or "cpu"). Returns the device that did the k-means (after any fallback)."""
    iv = ivf(index)
    if iv is None or device == "cpu":
        index.train(xt)
        return "cpu"
    iv.cp.seed = seed
    try:
        if device == "faiss-gpu":
            _faiss_gpu_train(index, iv, xt)
        else:
            _torch_train(index, iv, xt, "cuda" if device == "cuda-torch" else "cpu", seed)
        return device
    except (RuntimeError, MemoryError) as e:
        if "memory" not in str(e).lower() and "cuda" not in str(e).lower():
            raise
        fallback = DEVICES[DEVICES.index(device) + 1] if device in DEVICES[:-1] else "cpu"
        log(f"train: k-means on {device} failed ({str(e).splitlines()[0][:120]}); retrying on {fallback}")
        _untrain(iv)
        return train_index(index, xt, fallback, seed)


def _faiss_gpu_train(index, iv, xt: np.ndarray) -> None:
    """faiss's k-means with a GPU index doing the assignments (the centroids come back to the CPU quantizer)."""
    f = faiss()
    iv.clustering_index = f.index_cpu_to_all_gpus(f.IndexFlat(iv.d, iv.metric_type))
    try:
        index.train(xt)
    finally:
        iv.clustering_index = None


def _torch_train(index, iv, xt: np.ndarray, device: str, seed: int) -> None:
    """torch k-means in the IVF's input space, centroids added to the quantizer; then faiss trains
    the rest (it skips a quantizer that already holds nlist centroids)."""
    from index_builder.train.kmeans import kmeans

    xq = train_chain(index, xt)
    metric = "ip" if iv.metric_type == faiss().METRIC_INNER_PRODUCT else "l2"
    res = kmeans(xq, int(iv.nlist), niter=int(iv.cp.niter), metric=metric, spherical=bool(iv.cp.spherical),
                 seed=seed, device=device)
    iv.quantizer.reset()
    iv.quantizer.add(res.centroids)
    index.train(xt)


def _untrain(iv) -> None:
    iv.quantizer.reset()
    iv.is_trained = False


ZERO_NORM = 1e-6  # a norm this small next to the sample's median (or under 1e-12) is a zero vector


def near_zero(x: np.ndarray) -> int:
    """How many rows of x have a norm of ~0 (relative to the median norm, so any scale works)."""
    if not len(x):
        return 0
    nrm = np.linalg.norm(x, axis=1)
    return int((nrm <= max(ZERO_NORM * float(np.median(nrm)), 1e-12)).sum())


def zero_norm_warning(tr: dict, metric: str) -> str | None:
    """Under ip a zero vector scores 0 against every query: it never ranks, and an index of them
    answers all-zero scores. tr: train_task's record (older ones lack the count)."""
    z, t = tr.get("zero_norm", 0), tr.get("train_vectors", 0)
    if metric != "ip" or not z or not t:
        return None
    return (f"vectors: {z:,} of {t:,} training vectors ({z / t:.0%}) have a norm of ~0 under --metric ip, so "
            f"they score 0 against every query; check the vector column or the encoder, or give --metric l2")


@ray.remote
def train_task(store: Store, wd: WorkDir, drawn: list, *, factory: str, d: int, metric: str, seed: int,
               threads: int, keep: bool = False, t0: float | None = None) -> dict:
    """Writes wd.trained (the trained index), wd.queries (tune's queries), and wd.train_record (how
    it was trained) last. drawn: sample_parallel's refs (training rows and tune queries).
    keep: take wd.trained as it is (a reindex put the live quantizer there, not drifted); the
    tune queries are still drawn. t0: when the driver started the sampling."""
    if store.exists(wd.train_record):
        return {**json.loads(store.read_text(wd.train_record)), "reused": True}
    faiss().omp_set_num_threads(threads)
    t0 = t0 or time.time()
    xt, xq, qids = joined(ray.get(drawn), 1)
    buf = io.BytesIO()
    np.savez(buf, xq=xq, ids=qids)
    store.write_bytes(wd.queries, buf.getvalue())
    t1 = time.time()
    if keep:
        index, device = read_index(store, wd.trained), "reused"
    else:
        index = make_index(factory, d, metric)
        device = train_index(index, xt, best_device(), seed)
        write_index(store, wd.trained, index)
    done = {"train_vectors": len(xt), "seconds": time.time() - t0, "sample_seconds": t1 - t0,
            "device": device, "nlist": nlist(index), "zero_norm": near_zero(xt)}
    store.write_text(wd.train_record, json.dumps(done))
    return {**done, "reused": False}
