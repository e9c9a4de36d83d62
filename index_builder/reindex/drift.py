"""Is the trained quantizer still good for the corpus? Measured at build, checked at reindex.

Two measures, both in the quantizer's own terms:
- quantization error: the mean squared distance of a vector to what the index stores for it
  ("codec": decode(encode(x)) for lossy codes such as PQ; "coarse": the assigned IVF centroid,
  for IVF,Flat whose codes are exact). New vectors that land far from every centroid raise it.
- list imbalance: nlist * sum(n_l^2) / N^2 over the IVF list sizes n_l (1 when even). New
  vectors piling into a few lists raise it, and with it the cost of every query that probes them.

At build, the baseline is the error over a sample of the indexed vectors and the imbalance of the
published lists (their sizes go into the version as lists.npy). A reindex measures the error of
the new and changed vectors, and the imbalance the lists would have after it (live sizes, minus
the deleted and replaced vectors, plus the new ones), and retrains when either ratio passes its
threshold. decide() is the pure rule.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import ray

from index_builder.build import rowlists
from index_builder.build.merge import open_merged
from index_builder.encode.parts import read_vectors
from index_builder.workdir import WorkDir
from shards.raytools import TASK_RETRIES
from shards.storage.faissio import faiss, ivf, pretransform, read_index, untransform
from shards.storage.manifest import ListsInfo
from shards.storage.store import Store

BASELINE_SAMPLE = 20_000   # vectors the build's error baseline is measured on, and a reindex's new vectors at most
LOSSLESS = 1e-7            # codec error under this fraction of the mean squared norm: the codes are exact


def ivf_input(index, x: np.ndarray) -> np.ndarray:
    """x as the IVF sees it: through the index's pre-transforms (OPQ rotation, PCA), if any."""
    f = faiss()
    top = f.downcast_index(index)
    if isinstance(top, f.IndexPreTransform):
        for i in range(top.chain.size()):
            x = f.downcast_VectorTransform(top.chain.at(i)).apply(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def assign(index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IVF list of each vector, its squared distance to that list's centroid)."""
    iv = ivf(index)
    y = ivf_input(index, x)
    _, I = iv.quantizer.search(y, 1)
    a = I[:, 0]
    c = iv.quantizer.reconstruct_n(0, iv.nlist)
    return a, ((y - c[a]) ** 2).sum(1)


def codec_error(index, x: np.ndarray) -> np.ndarray | None:
    """||x - decode(encode(x))||^2 per vector; None for an index without standalone codes."""
    f, iv = faiss(), ivf(index)
    if iv is not None and isinstance(f.downcast_index(iv), f.IndexIVFPQFastScan):
        return fast_scan_error(index, f.downcast_index(iv), x)
    try:
        y = index.sa_decode(index.sa_encode(x))
    except RuntimeError:
        return None
    return ((x - y) ** 2).sum(1)


def fast_scan_error(index, iv, x: np.ndarray) -> np.ndarray:
    """codec_error of an IVF fast-scan PQ index, from its quantizer and PQ: sa_decode of one read
    from a file crashes (faiss 1.15.1), and the build's baseline reads the trained index. The
    codes are the PQ's of the residuals to the nearest centroid; the decoded vector goes back
    through the pre-transforms as sa_decode's would."""
    xt = pretransform(index, x)
    _, I = iv.quantizer.search(xt, 1)
    c = iv.quantizer.reconstruct_batch(I[:, 0]) if iv.by_residual else np.zeros_like(xt)
    y = c + iv.pq.decode(iv.pq.compute_codes(np.ascontiguousarray(xt - c)))
    return ((x - untransform(index, y)) ** 2).sum(1)


def error_kind(index, x: np.ndarray) -> tuple[str | None, np.ndarray | None]:
    """Which error means something for this index, and that error of each row of x: codec for lossy
    codes, coarse for exact codes behind an IVF, None when there is nothing trained to drift (Flat,
    or no standalone codes)."""
    e = codec_error(index, x)
    if e is not None and float(e.mean()) > LOSSLESS * float((x ** 2).sum(1).mean()):
        return "codec", e   # measured once: encoding the sample is most of the baseline's time
    kind = "coarse" if ivf(index) is not None else None
    return kind, errors(index, x, kind)


def errors(index, x: np.ndarray, kind: str | None) -> np.ndarray | None:
    if kind == "codec":
        return codec_error(index, x)
    if kind == "coarse":
        return assign(index, x)[1]
    return None


def imbalance(sizes: np.ndarray) -> float | None:
    """nlist * sum(n_l^2) / N^2: 1 when every list holds N/nlist vectors, nlist when one holds all."""
    sizes = np.asarray(sizes, dtype=np.float64)
    n = sizes.sum()
    return float(len(sizes) * (sizes ** 2).sum() / n ** 2) if n > 0 else None


def lists_info(sizes: np.ndarray, cap: float | None, split: int) -> ListsInfo:
    """The manifest's account of a version's list sizes (cap, split: how its quantizer was trained)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return ListsInfo(imbalance=imbalance(sizes), largest=int(sizes.max()) if len(sizes) else 0,
                     mean=round(float(sizes.mean()), 1) if len(sizes) else 0.0, cap=cap, split=split)


def list_sizes(index) -> np.ndarray | None:
    iv = ivf(index)
    if iv is None:
        return None
    inv = iv.invlists
    return np.array([inv.list_size(l) for l in range(iv.nlist)], dtype=np.int64)


def save_npy(store: Store, rel: str, a: np.ndarray):
    """a as a .npy file at rel; the Written (sha256, bytes) of it."""
    buf = io.BytesIO()
    np.save(buf, a)
    return store.write_bytes(rel, buf.getvalue())


def load_npy(store: Store, rel: str) -> np.ndarray:
    return np.load(io.BytesIO(store.read_bytes(rel)))


def _sample(store: Store, parts: list[tuple[str, int]], n: int, seed: int) -> np.ndarray:
    """Up to n vectors from parts picked at random, reading only as many parts as that takes."""
    rng = np.random.default_rng(seed)
    xs, got = [], 0
    for i in rng.permutation(len(parts)):
        if got >= n:
            break
        _, x = read_vectors(store, parts[i][0])
        xs.append(x)
        got += len(x)
    if not xs:
        return np.empty((0, 0), np.float32)
    x = np.concatenate(xs)
    return x[np.sort(rng.choice(len(x), size=min(n, len(x)), replace=False))]


@ray.remote(**TASK_RETRIES)
def baseline_task(store: Store, wd: WorkDir, parts: list[tuple[str, int]], *, shards: int, seed: int,
                  threads: int) -> dict:
    """The build's baseline: error over a sample of the indexed vectors (parts: (rel, rows) of the
    embeddings parts), list sizes of wd's merged shards (saved as wd.lists)."""
    faiss().omp_set_num_threads(threads)
    index = read_index(store, wd.trained)
    x = _sample(store, parts, BASELINE_SAMPLE, seed)
    kind, e = error_kind(index, x) if len(x) else (None, None)
    out = {"error_kind": kind, "error": float(e.mean()) if e is not None else None,
           "sample": len(x) if e is not None else 0, "imbalance": None, "lists": None}
    if ivf(index) is None:
        return out
    sizes = np.zeros(ivf(index).nlist, dtype=np.int64)
    for s in range(shards):  # from the merge's record; a run merged before it had one loads the shard
        rel = wd.shard_sizes(s)
        sizes += load_npy(store, rel) if store.exists(rel) else list_sizes(open_merged(store, wd, s))
    save_npy(store, wd.lists, sizes)
    out.update(imbalance=imbalance(sizes), lists=wd.lists, largest=int(sizes.max()), mean=float(sizes.mean()))
    return out


@ray.remote(**TASK_RETRIES)
def delta_task(store: Store, trained_rel: str, rel: str, ids: list[int] | None, kind: str | None,
               sample: int | None = None) -> dict:
    """The list counts and error sum of some vectors of one embeddings part: ids=None takes the rows a
    reindex encoded (origin new or changed), else the rows with these ids (the live vectors it drops).
    sample: the error is measured on at most this many of them, drawn at random (n says how many);
    the counts are over all of them (assigning a vector is cheap, encoding it is not)."""
    faiss().omp_set_num_threads(1)
    index = read_index(store, trained_rel)
    t = store.read_table(rel)
    pid = t.column("id").to_numpy()
    if ids is None:
        rows = np.flatnonzero(t.column("origin").to_numpy() != 0)
    else:
        rows = np.flatnonzero(np.isin(pid, np.asarray(ids, dtype=np.int64)))
    vec = t.column("vector").combine_chunks()
    x = np.ascontiguousarray(vec.values.to_numpy(zero_copy_only=False).reshape(-1, vec.type.list_size)[rows],
                             dtype=np.float32)
    out = {"n": len(rows), "error_sum": 0.0, "counts": None}
    if not len(rows):
        return out
    pick = np.arange(len(rows))
    if sample is not None and sample < len(rows):
        pick = np.sort(np.random.default_rng(len(rows)).choice(len(rows), sample, replace=False))
        out["n"] = len(pick)
    e = errors(index, x[pick], kind)
    out["error_sum"] = float(e.sum()) if e is not None else 0.0
    if ivf(index) is not None:
        out["counts"] = np.bincount(assign(index, x)[0], minlength=ivf(index).nlist).astype(np.int64)
    return out


@dataclass
class Decision:
    retrain: bool
    reason: str | None
    ratios: dict = field(default_factory=dict)


def decide(baseline_error: float | None, new_error: float | None, baseline_imbalance: float | None,
           projected_imbalance: float | None, max_error: float, max_imbalance: float) -> Decision:
    """Retrain when the new vectors' mean error, or the lists' imbalance after the reindex, exceeds
    its threshold times the baseline. A measure with no baseline or no new value is not checked."""
    ratios, reasons = {}, []
    if baseline_error and new_error is not None:
        ratios["error"] = round(new_error / baseline_error, 4)
        if ratios["error"] > max_error:
            reasons.append(f"quantization error of the new vectors is {ratios['error']:.2f}x the baseline "
                           f"(threshold {max_error})")
    if baseline_imbalance and projected_imbalance is not None:
        ratios["imbalance"] = round(projected_imbalance / baseline_imbalance, 4)
        if ratios["imbalance"] > max_imbalance:
            reasons.append(f"list imbalance would be {ratios['imbalance']:.2f}x the baseline "
                           f"(threshold {max_imbalance})")
    return Decision(bool(reasons), "; ".join(reasons) or None, ratios)


@ray.remote(**TASK_RETRIES)
def lists_task(store: Store, trained_rel: str, tfp: str, rel: str, ids: list[int]) -> tuple:
    """(ids, IVF list, from the record) of the rows of one embeddings part with these ids: the lists the
    live index holds their vectors in. From the part's list record (build/rowlists.py, tfp: the trained
    index's sha256) where the add wrote one, else by assigning their vectors again with the same quantizer."""
    pid = store.read_table(rel, columns=["id"]).column("id").to_numpy().astype(np.int64)
    rows = np.flatnonzero(np.isin(pid, np.asarray(ids, dtype=np.int64)))
    if not len(rows):
        return np.empty(0, np.int64), np.empty(0, np.int64), True
    rec = rowlists.read(store, rel, tfp, len(pid))
    if rec is not None:
        return pid[rows], rec[rows], True
    faiss().omp_set_num_threads(1)
    _, x = read_vectors(store, rel)
    return pid[rows], assign(read_index(store, trained_rel), x[rows])[0].astype(np.int64), False
