"""train: one trained (empty) index from a sample drawn across all parts in proportion to their sizes.

The sample is whole row groups (about a MiB each) picked across the corpus in proportion to the
parts' rows, read by one small task per part that holds any, in parallel across the cluster: a
build reads about the sample's bytes, never the corpus, and never in one task. The IVF k-means, the
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
from dataclasses import dataclass

import numpy as np
import ray

from index_builder.encode.parts import group_bounds, group_bytes, open_part, read_groups
from index_builder.train.balance import balance_lists
from index_builder.train.groups import group_lists
from index_builder.workdir import WorkDir
from shards.errors import ConfigError
from shards.raytools import TASK_RETRIES, log
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
        inner = f.downcast_index(top.index)  # under the IDMap (and any pre-transform)
        if isinstance(inner, f.IndexPreTransform):
            inner = f.downcast_index(inner.index)
        if not isinstance(inner, f.IndexFlatCodes):  # the merge appends codes (add_sa_codes)
            raise ConfigError(f"factory: {factory!r} ({type(inner).__name__}) cannot be merged from the add "
                              f"units' codes, which every build does; give {SUPPORTED}")
        if sharding == "ivf":
            raise ConfigError(f"factory: --sharding ivf needs an IVF index and {factory!r} has no IVF lists; "
                              f"give --sharding hash, or an IVF factory like IVF1024,{factory}")
        return
    if not isinstance(top, f.IndexIVF):  # e.g. a refine stage over the IVF: merge_from is not implemented
        raise ConfigError(f"factory: {factory!r} wraps its IVF index in {type(top).__name__}, which cannot be "
                          f"merged from part indexes; drop the wrapper (e.g. ,RFlat) and give {SUPPORTED}")


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


MIN_GROUPS = 16   # row groups a sample reads at least: fewer would make it a few runs of neighbouring rows
OVERDRAW = 9 / 8  # read this much more than the sample: partial row groups hold fewer rows; the excess is cut


@dataclass
class Drawn:
    """The draw tasks' results (Ray refs from sample_parallel, or draw()'s own in sample) and what
    joined cuts from them: `size` training rows and `queries` tune queries, seeded."""

    size: int
    queries: int
    seed: int
    parts: list


@dataclass
class Sample:
    xt: np.ndarray        # training vectors
    xq: np.ndarray        # tune's held-out queries
    qids: np.ndarray      # their ids
    bytes_read: int       # compressed bytes of the row groups read (from the Parquet footers)


def sample(store: Store, parts: list[tuple[str, int]], size: int, seed: int, queries: int = 0) -> Sample:
    """`size` training vectors (and `queries` query vectors with their ids: tune's held-out queries)
    from whole row groups picked across all parts in proportion to their rows, reading about the
    sample's bytes, not the corpus's. In this process; sample_parallel reads the same groups in one
    Ray task per part."""
    jobs = draw_jobs(store, parts, max(size, queries), seed)
    return joined(Drawn(size, queries, seed, [draw(store, *job) for job in jobs]))


def sample_parallel(store: Store, parts: list[tuple[str, int]], size: int, seed: int, queries: int) -> Drawn:
    """What sample() reads, read by parallel tasks across the cluster (at a billion vectors one task
    reading in turn would take hours), each reading DRAW_GROUPS row groups or DRAW_PARTS whole parts:
    a task per part costs more to start than a small part costs to read. Returns the tasks' refs
    (for joined)."""
    batches, load = [], 1.0
    for rel, rows in draw_jobs(store, parts, max(size, queries), seed):
        w = len(rows) / DRAW_GROUPS if rows is not None else 1 / DRAW_PARTS
        if load + w > 1:
            batches.append([])
            load = 0.0
        batches[-1].append((rel, rows))
        load += w
    return Drawn(size, queries, seed, [draw_many.options(num_cpus=1).remote(store, b) for b in batches])


def draw_jobs(store: Store, parts: list[tuple[str, int]], want: int, seed: int) -> list[tuple]:
    """(part, rows or None for all) for every part to read: the one plan both samplers run. Cluster
    sampling: each of m strata of the corpus's rows (all parts end to end) gives one point, and the
    row group holding it is read whole. Points lie more than a group apart (the jitter spans a
    stratum less a group), so each hits its own group; m groups hold about `want` rows. The driver
    holds O(parts + m) numbers, m ~ want / group rows. A corpus not much bigger than that is read whole."""
    n = np.array([r for _, r in parts], dtype=np.int64)
    total = int(n.sum())
    if not want or not total:
        return []
    g = _group_rows(store, parts)
    m = max(MIN_GROUPS, -(-int(want * OVERDRAW) // g))
    if want >= total or 2 * m * g >= total:
        return [(rel, None) for rel, r in parts if r]
    step = total / m
    points = (np.arange(m) * step + np.random.default_rng(seed).random(m) * (step - g)).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(n)])
    part = np.searchsorted(start, points, "right") - 1
    return [(parts[p][0], (points[part == p] - start[p]).tolist()) for p in np.unique(part)]


def _group_rows(store: Store, parts: list[tuple[str, int]]) -> int:
    """Rows of the first part's first row group: the corpus's group size (its parts are written alike).
    One footer read by the driver."""
    import pyarrow.parquet as pq

    rel = next(rel for rel, r in parts if r)
    with open_part(store, rel) as fh:
        md = pq.ParquetFile(fh).metadata
    return max(1, md.row_group(0).num_rows if md.num_row_groups else 1)


def draw(store: Store, rel: str, rows: list[int] | None):
    """(ids, x, bytes read) of the row groups of one part that hold `rows` (all of it for None)."""
    import pyarrow.parquet as pq

    with open_part(store, rel) as fh:
        f = pq.ParquetFile(fh)
        b = group_bounds(f.metadata)
        groups = (range(len(b) - 1) if rows is None else
                  sorted({int(g) for g in np.searchsorted(b, rows, "right") - 1}))
        ids, x = read_groups(f, groups)
        return ids, x, group_bytes(f.metadata, groups)


DRAW_GROUPS = 64  # row groups (about a MiB each) a sampling task reads
DRAW_PARTS = 8    # whole parts a sampling task reads (a corpus not much bigger than the sample)


@ray.remote(**TASK_RETRIES)
def draw_many(store: Store, jobs: list[tuple]):
    """draw() of several parts, joined: (ids, x, bytes read)."""
    got = [draw(store, *job) for job in jobs]
    return (np.concatenate([i for i, _, _ in got]), np.concatenate([x for _, x, _ in got]),
            sum(b for _, _, b in got))


def train_args(drawn: Drawn | list) -> tuple:
    """train_task's (drawn, *parts): the draw tasks' refs out of the Drawn, each an argument."""
    return (Drawn(drawn.size, drawn.queries, drawn.seed, []), *drawn.parts) if drawn else (drawn,)


def joined(d: Drawn) -> Sample:
    """The sample from the rows read: `size` of them at random when more were read (in their order),
    and `queries` rows at random among all, seeded: the same for the same seed."""
    got = ray.get(d.parts) if d.parts and isinstance(d.parts[0], ray.ObjectRef) else d.parts
    if not got:
        return Sample(np.empty((0, 0), np.float32), np.empty((0, 0), np.float32), np.empty(0, np.int64), 0)
    ids, x = np.concatenate([i for i, _, _ in got]), np.concatenate([v for _, v, _ in got])
    rng = np.random.default_rng((d.seed, len(x)))
    keep = np.sort(rng.choice(len(x), size=d.size, replace=False)) if len(x) > d.size else slice(None)
    q = np.sort(rng.choice(len(x), size=min(d.queries, len(x)), replace=False))
    return Sample(x[keep], x[q], ids[q], sum(n for _, _, n in got))


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


@ray.remote(**TASK_RETRIES)
def train_task(store: Store, wd: WorkDir, drawn: Drawn | list, *parts, factory: str, d: int, metric: str,
               seed: int, threads: int, keep: bool = False, t0: float | None = None, groups: int = 0,
               list_cap: float = 0) -> dict:
    """Writes wd.trained (the trained index), wd.queries (tune's queries), and wd.train_record (how
    it was trained) last. drawn: sample_parallel's (training rows and tune queries; [] when the
    record exists). The record holds sample_bytes (the sample's float32) beside sample_bytes_read
    (what reading it cost).
    keep: take wd.trained as it is (a reindex put the live quantizer there, not drifted); the
    tune queries are still drawn. t0: when the driver started the sampling.
    parts: the draw tasks' refs, given as arguments of their own (train_args) so that Ray has them all
    before the task starts, rebuilding any a lost node held; fetched inside the task instead, a lost
    one is rebuilt by a draw task that may find no CPU free while this one waits.
    groups: --sharding ivf with grouped lists, the shard count: the lists are renumbered into that many
    compact regions (train/groups.py) and the record holds each one's list range.
    list_cap: no list above this many times the mean, by the sample (train/balance.py); 0: k-means' lists."""
    if store.exists(wd.train_record):
        return {**json.loads(store.read_text(wd.train_record)), "reused": True}
    faiss().omp_set_num_threads(threads)
    t0 = t0 or time.time()
    s = joined(Drawn(drawn.size, drawn.queries, drawn.seed, list(parts)) if drawn else drawn)
    xt = s.xt
    buf = io.BytesIO()
    np.savez(buf, xq=s.xq, ids=s.qids)
    store.write_bytes(wd.queries, buf.getvalue())
    t1 = time.time()
    if keep:
        index, device = read_index(store, wd.trained), "reused"
    else:
        index = make_index(factory, d, metric)
        device = train_index(index, xt, best_device(), seed)
        balanced = balance_lists(index, xt, list_cap, seed)
        ranges = group_lists(index, xt, groups, seed) if groups else None
        write_index(store, wd.trained, index)
    done = {**({"ranges": ranges} if not keep and groups else {}), **({"balance": balanced} if not keep else {}),
            "train_vectors": len(xt), "seconds": time.time() - t0, "sample_seconds": t1 - t0,
            "device": device, "nlist": nlist(index), "zero_norm": near_zero(xt),
            "sample_bytes": int(xt.nbytes), "sample_bytes_read": s.bytes_read}
    store.write_text(wd.train_record, json.dumps(done))
    return {**done, "reused": False}
