"""The refine store of a serving shard: its vectors at full precision (fp32, or fp16 when asked), sorted by
id and read by row through mmap, so the shard reranks its candidates by exact distance without holding
the vectors in RAM (the codes are what RAM holds).

Layout, in versions/<v>/: shard-<s>.refine-<g>.vec, g the generation (0: the build's; each delta reindex
writes the next with the vectors it re-read). One file:

  magic b"SHXREF02" | uint64 header length | header (JSON: n, d, dtype), padded to HEAD bytes
  | vecs[n, d] (dtype) | int64 ids[n], sorted

Vectors come first so that a gather task appends them range by range as it sorts them (write_ranges),
the ids after them. The manifest lists each file (a FieldsInfo: sha256, bytes, ids lo..hi, generation,
as for stored fields). A lookup finds the row by binary search of the ids, newest generation first: a
changed document's new vector stands over its old one. fp32 distances are taken by faiss's
fvec_*_by_idx straight from the mmapped rows, so a rerank copies no vector. On S3 each file is fetched
into the node's cache (shards/storage/cache.py), checked once, and mmapped from there. Written by
index_builder/build/fields.py.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile

import numpy as np
import pyarrow as pa

from shards.errors import IntegrityError
from shards.storage.integrity import file_sha256
from shards.storage.manifest import FieldsInfo
from shards.storage.store import Store

MAGIC = b"SHXREF02"
HEAD = 128                    # bytes before the vectors: magic, length and JSON header, padded
FILE_BYTES = 256 << 20        # vector bytes a gather task sorts in memory at once (one range of ids)
ROW_GROUP_BYTES = 4 << 20     # the scattered work parts' row groups (read whole by the gather)
BLOCK_BYTES = 16 << 20        # fp16 candidate vectors a rerank converts at once
DTYPES = {"fp32": np.float32, "fp16": np.float16}


def rel(version_dir: str, s: int, gen: int) -> str:
    return f"{version_dir}/shard-{s}.refine-{gen}.vec"


def header(n: int, d: int, dtype: str) -> bytes:
    head = json.dumps({"n": int(n), "d": int(d), "dtype": dtype}).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + b" " * (HEAD - 16 - len(head))


def to_bytes(ids: np.ndarray, x: np.ndarray, dtype: str) -> bytes:
    """One refine file of ids (sorted) and their vectors x [n, d], stored as dtype."""
    return b"".join([header(*x.shape, dtype), np.ascontiguousarray(x, DTYPES[dtype]).tobytes(),
                     np.asarray(ids, "<i8").tobytes()])


def vectors_of(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, x float32 [n, d]) of a table's id and vector (fixed-size list) columns."""
    vec = t.column("vector").combine_chunks()
    x = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, vec.type.list_size)  # flatten: respects a slice
    return t.column("id").to_numpy(), np.ascontiguousarray(x, dtype=np.float32)


def write_ranges(store: Store, path: str, tables, gen: int, dtype: str) -> FieldsInfo | None:
    """The tables (id, vector; each sorted by id, each range after the one before) as one refine file at
    path, written through a local temporary file as they come: memory holds one range. None without rows."""
    local = os.path.dirname(store.path(path)) if store.local else None
    if local:
        os.makedirs(local, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".refine-", dir=local)
    n, d, lo, hi = 0, 0, None, None
    try:
        with os.fdopen(fd, "wb") as f, tempfile.TemporaryFile(dir=local) as idf:
            f.write(b"\0" * HEAD)
            for t in tables:
                ids, x = vectors_of(t)
                f.write(np.ascontiguousarray(x, DTYPES[dtype]).tobytes())
                idf.write(np.asarray(ids, "<i8").tobytes())
                n, d, lo, hi = n + len(ids), x.shape[1], ids[0] if lo is None else lo, ids[-1]
            idf.seek(0)
            while chunk := idf.read(8 << 20):
                f.write(chunk)
            f.seek(0)
            f.write(header(n, d, dtype))
        if not n:
            return None
        sha, size = file_sha256(tmp), os.path.getsize(tmp)
        store.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return FieldsInfo(file=path, sha256=sha, bytes=size, ntotal=n, lo=int(lo), hi=int(hi), gen=gen)


def open_file(path: str, uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a local refine file, both mmapped."""
    with open(path, "rb") as f:
        raw = f.read(HEAD)
    if raw[:8] != MAGIC:
        raise IntegrityError(f"{uri}: not a shardex refine file; the version is damaged")
    (hl,) = struct.unpack("<Q", raw[8:16])
    h = json.loads(raw[16:16 + hl])
    n, d, dt = h["n"], h["d"], np.dtype(DTYPES[h["dtype"]])
    if os.path.getsize(path) != HEAD + n * (8 + d * dt.itemsize):
        raise IntegrityError(f"{uri}: its size is not that of {n} vectors of {d} {h['dtype']}; the version is damaged")
    return np.memmap(path, "<i8", "r", HEAD + n * d * dt.itemsize, (n,)), np.memmap(path, dt, "r", HEAD, (n, d))


class RefineStore:
    """The refine files of one shard (one a generation), checked against their manifest entries, read by id."""

    def __init__(self, store: Store, files: list[tuple[str, FieldsInfo]], name: str, cache_dir: str | None = None,
                 checked: bool = True):
        """files: (path under the root, its entry); name: the shard, for errors. checked=False: a local
        store's files are taken as their writer hashed them (the build's tune, right after writing them)."""
        self.name = name
        mine = sorted(files, key=lambda pf: -pf[1].gen)  # newest first
        self.segs = [open_file(_local(store, p, f, cache_dir, checked), store.uri(p)) for p, f in mine]
        self.d = self.segs[0][1].shape[1] if self.segs else 0
        self.bytes = sum(f.bytes for _, f in files)

    @classmethod
    def of(cls, store: Store, m, shard, cache_dir: str | None = None) -> RefineStore | None:
        """The refine store of a published shard (m's ShardInfo), or None when it has none."""
        if not getattr(shard, "refine", None):
            return None
        return cls(store, [(m.path(f.file), f) for f in shard.refine], shard.file, cache_dir)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(generation index into segs, row) of each of ids (any shape; -1 pads get -1, -1); every other
        id must be held."""
        seg, row = np.full(ids.shape, -1, np.int64), np.full(ids.shape, -1, np.int64)
        todo = ids >= 0
        for g, (fid, _) in enumerate(self.segs):
            if not todo.any():
                break
            want = ids[todo]
            pos = np.minimum(_find(fid, want), len(fid) - 1)
            hit = fid[pos] == want
            at = tuple(a[hit] for a in np.nonzero(todo))
            seg[at], row[at] = g, pos[hit]
            todo[at] = False
        if todo.any():
            raise IntegrityError(f"{self.name}: its refine store holds no vector for id {int(ids[todo][0])}; "
                                 f"the version is damaged")
        return seg, row

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, d], the stored vector of each of ids (>= 0, any order, repeats allowed)."""
        seg, row = self.locate(np.asarray(ids, np.int64))
        x = np.empty((len(row), self.d), np.float32)
        for g, (_, fx) in enumerate(self.segs):
            m = seg == g
            x[m] = fx[row[m]]
        return x

    def distances(self, xq: np.ndarray, I: np.ndarray, metric: str) -> np.ndarray:
        """[nq, c] exact distance of each query to each of its candidates I (ids; -1: the worst distance,
        as faiss pads); l2 distances are squared, as faiss's."""
        ip = metric == "ip"
        worst = -np.finfo(np.float32).max if ip else np.finfo(np.float32).max
        xq, I = np.ascontiguousarray(xq, np.float32), np.ascontiguousarray(I, np.int64)
        if len(self.segs) == 1:  # one generation: its rows straight to the kernel, which pads -1 itself
            D = _by_rows(xq, self.segs[0][1], self.locate(I)[1], ip)
            D[I < 0] = worst
            return D
        seg, row = self.locate(I)
        D = np.full(I.shape, worst, np.float32)
        for g, (_, fx) in enumerate(self.segs):
            mine = np.where(seg == g, row, -1)
            if (mine >= 0).any():
                Dg = _by_rows(xq, fx, mine, ip)
                D = np.where(mine >= 0, Dg, D)
        return D

    def rerank(self, xq: np.ndarray, I: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """The k best of each query's candidates I (ids, -1 pads) by exact distance: (D, I) [nq, k], -1 and
        the worst distance padding where a query has fewer."""
        ip = metric == "ip"
        D = self.distances(xq, I, metric)
        o = np.argsort(-D if ip else D, axis=1, kind="stable")[:, :k]
        D, I = np.take_along_axis(D, o, 1), np.take_along_axis(I, o, 1)
        if D.shape[1] < k:
            pad = ((0, 0), (0, k - D.shape[1]))
            worst = -np.finfo(np.float32).max if ip else np.finfo(np.float32).max
            D, I = np.pad(D, pad, constant_values=worst), np.pad(I, pad, constant_values=-1)
        return D, I


def _find(fid: np.ndarray, want: np.ndarray) -> np.ndarray:
    """np.searchsorted(fid, want), searched in sorted order: consecutive searches then share their path
    through fid, which more than pays for the sort (1M ids, 160k wanted: 15 ms against 32)."""
    o = np.argsort(want)
    pos = np.empty(len(want), np.int64)
    pos[o] = np.searchsorted(fid, want[o])
    return pos


def _by_rows(xq: np.ndarray, fx: np.ndarray, rows: np.ndarray, ip: bool) -> np.ndarray:
    """[nq, c] inner products (ip) or squared L2 distances of each query to the rows of fx it names (-1:
    none). fp32: faiss reads the mmapped rows in place; fp16: converted a block of queries at a time."""
    from shards.storage.faissio import faiss

    nq, c = rows.shape
    D = np.empty((nq, c), np.float32)
    if fx.dtype == np.float32:
        f = faiss()
        kernel = f.fvec_inner_products_by_idx if ip else f.fvec_L2sqr_by_idx
        kernel(f.swig_ptr(D), f.swig_ptr(xq), f.swig_ptr(fx), f.swig_ptr(rows), xq.shape[1], nq, c)
        return D
    step = max(1, BLOCK_BYTES // max(1, 4 * c * fx.shape[1]))
    for a in range(0, nq, step):
        X = fx[np.maximum(rows[a:a + step], 0)].astype(np.float32)
        q = xq[a:a + step, None, :]
        D[a:a + step] = (X * q).sum(2) if ip else ((X - q) ** 2).sum(2)
    return D


def _local(store: Store, path: str, f: FieldsInfo, cache_dir: str | None, checked: bool = True) -> str:
    """A local path of refine file `path`, checked against its entry (unless not `checked`): in place on a
    local store, a verified copy in the node's cache when on S3 (hashed as it is fetched)."""
    from shards.storage.cache import evict, local_dir
    from shards.storage.integrity import check_path, fetch_checked

    if store.local:
        if checked:
            check_path(store.path(path), store.uri(path), f.sha256, f.bytes)
        return store.path(path)
    d, name = local_dir(store, path.rsplit("/", 1)[0], cache_dir), path.rsplit("/", 1)[1]
    fetch_checked(store, path, f.sha256, f.bytes, os.path.join(d, name))
    evict(cache_dir)
    return os.path.join(d, name)
