"""The refine store of a serving shard: its vectors at full precision (fp32, or fp16 when asked), sorted by
id and read by row through mmap, so the shard reranks its candidates by exact distance without holding
the vectors in RAM (the codes are what RAM holds).

Layout, in versions/<v>/: shard-<s>.refine-<g>-<b>.vec, g the generation (0: the build's; each delta
reindex writes the next with the vectors it re-read; a compaction writes the live ones as one new
generation), b numbering a generation's files, each about FILE_BYTES. One file:

  magic b"SHXREF01" | uint64 header length | header (JSON: n, d, dtype) | int64 ids[n], sorted | vecs[n, d]

The arrays start 64-aligned. The manifest lists each file (a FieldsInfo: sha256, bytes, ids lo..hi and
generation, as for stored fields). A lookup finds the file by its id range, the row by binary search of
the file's ids, newest generation first: a changed document's new vector stands over its old one. On S3
each file is fetched into the node's cache (shards/storage/cache.py), checked once, and mmapped from
there. Written by index_builder/build/refine.py.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pyarrow as pa

from shards.errors import IntegrityError
from shards.storage.manifest import FieldsInfo
from shards.storage.store import Store

MAGIC = b"SHXREF01"
FILE_BYTES = 256 << 20        # vector bytes per file: what one gather task holds in memory
ROW_GROUP_BYTES = 4 << 20     # the scattered work parts' row groups (read whole by the gather)
BLOCK_BYTES = 16 << 20        # candidate vectors a rerank gathers at once
DTYPES = {"fp32": np.float32, "fp16": np.float16}


def rel(version_dir: str, s: int, gen: int, b: int) -> str:
    return f"{version_dir}/shard-{s}.refine-{gen}-{b:05d}.vec"


def to_bytes(ids: np.ndarray, x: np.ndarray, dtype: str) -> bytes:
    """One refine file of ids (sorted) and their vectors x [n, d], stored as dtype."""
    n, d = x.shape
    head = json.dumps({"n": int(n), "d": int(d), "dtype": dtype}).encode()
    head += b" " * (-(len(head) + 16) % 64)
    return b"".join([MAGIC, struct.pack("<Q", len(head)), head, np.asarray(ids, "<i8").tobytes(),
                     np.ascontiguousarray(x, DTYPES[dtype]).tobytes()])


def write(store: Store, path: str, t: pa.Table, gen: int, dtype: str) -> FieldsInfo:
    """t (id, vector; sorted by id, at least one row) as one refine file; its FieldsInfo, named by path."""
    ids, x = vectors_of(t)
    w = store.write_bytes(path, to_bytes(ids, x, dtype))
    return FieldsInfo(file=path, sha256=w.sha256, bytes=w.bytes, ntotal=len(ids), lo=int(ids[0]), hi=int(ids[-1]),
                      gen=gen)


def vectors_of(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, x float32 [n, d]) of a table's id and vector (fixed-size list) columns."""
    vec = t.column("vector").combine_chunks()
    x = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, vec.type.list_size)  # flatten: respects a slice
    return t.column("id").to_numpy(), np.ascontiguousarray(x, dtype=np.float32)


def open_file(path: str, uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a local refine file, both mmapped."""
    with open(path, "rb") as f:
        raw = f.read(16)
        if raw[:8] != MAGIC:
            raise IntegrityError(f"{uri}: not a shardex refine file; the version is damaged")
        (hl,) = struct.unpack("<Q", raw[8:])
        h = json.loads(f.read(hl))
    n, d, at = h["n"], h["d"], 16 + hl
    if os.path.getsize(path) != at + n * (8 + d * np.dtype(DTYPES[h["dtype"]]).itemsize):
        raise IntegrityError(f"{uri}: its size is not that of {n} vectors of {d} {h['dtype']}; the version is damaged")
    ids = np.memmap(path, "<i8", "r", at, (n,)) if n else np.empty(0, np.int64)
    x = np.memmap(path, DTYPES[h["dtype"]], "r", at + 8 * n, (n, d)) if n else np.empty((0, d), np.float32)
    return ids, x


class RefineStore:
    """The refine files of one shard, checked against their manifest entries, read by id."""

    def __init__(self, store: Store, files: list[tuple[str, FieldsInfo]], name: str, cache_dir: str | None = None):
        """files: (path under the root, its entry); name: the shard, for errors."""
        self.name, self.segs = name, []
        for g in sorted({f.gen for _, f in files}, reverse=True):  # newest first
            mine = sorted(((p, f) for p, f in files if f.gen == g), key=lambda pf: pf[1].lo)
            opened = [open_file(_local(store, p, f, cache_dir), store.uri(p)) for p, f in mine]
            self.segs.append((np.array([f.lo for _, f in mine], np.int64), opened))
        self.d = next((x.shape[1] for _, op in self.segs for _, x in op), 0)
        self.bytes = sum(f.bytes for _, f in files)

    @classmethod
    def of(cls, store: Store, m, shard, cache_dir: str | None = None) -> RefineStore | None:
        """The refine store of a published shard (m's ShardInfo), or None when it has none."""
        if not getattr(shard, "refine", None):
            return None
        return cls(store, [(m.path(f.file), f) for f in shard.refine], shard.file, cache_dir)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, d], the stored vector of each of ids (>= 0, in any order, repeats allowed); every one
        must be held."""
        x, found = np.zeros((len(ids), self.d), np.float32), np.zeros(len(ids), bool)
        for starts, opened in self.segs:
            todo = np.flatnonzero(~found)
            if not len(todo):
                break
            fi = np.searchsorted(starts, ids[todo], "right") - 1
            for b in np.unique(fi[fi >= 0]):
                j = todo[fi == b]
                fid, fx = opened[b]
                pos = np.minimum(np.searchsorted(fid, ids[j]), len(fid) - 1)
                hit = fid[pos] == ids[j]
                x[j[hit]], found[j[hit]] = fx[pos[hit]], True
        if not found.all():
            raise IntegrityError(f"{self.name}: its refine store holds no vector for id {int(ids[~found][0])}; "
                                 f"the version is damaged")
        return x

    def rerank(self, xq: np.ndarray, I: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """The k best of each query's candidates I (ids, -1 pads) by exact distance: (D, I) [nq, k], -1
        and the worst distance padding where a query has fewer; l2 distances are squared, as faiss's.
        A block of queries' candidate vectors is gathered once from the mmapped files, then one batched
        product gives their distances."""
        ip = metric == "ip"
        worst = -np.finfo(np.float32).max if ip else np.finfo(np.float32).max  # what faiss pads with
        nq, c = I.shape
        D = np.empty((nq, c), np.float32)
        step = max(1, BLOCK_BYTES // max(1, 4 * c * self.d))
        for a in range(0, nq, step):
            Ib, q = I[a:a + step], xq[a:a + step]
            ok = Ib >= 0
            X = np.zeros((*Ib.shape, self.d), np.float32)
            X[ok] = self.vectors(Ib[ok])
            if ip:
                D[a:a + step] = np.matmul(X, q[:, :, None])[..., 0]
            else:  # the difference itself: |x|^2 - 2 x.q + |q|^2 loses the digits of near neighbours
                X -= q[:, None, :]
                D[a:a + step] = np.einsum("bcd,bcd->bc", X, X)
        D[I < 0] = worst
        o = np.argsort(-D if ip else D, axis=1, kind="stable")[:, :k]
        D, I = np.take_along_axis(D, o, 1), np.take_along_axis(I, o, 1)
        if D.shape[1] < k:
            pad = ((0, 0), (0, k - D.shape[1]))
            D, I = np.pad(D, pad, constant_values=worst), np.pad(I, pad, constant_values=-1)
        return D, I


def _local(store: Store, path: str, f: FieldsInfo, cache_dir: str | None) -> str:
    """A local path of refine file `path`, checked against its entry: in place on a local store, a
    verified copy in the node's cache when on S3."""
    from shards.storage.cache import evict, local_dir
    from shards.storage.integrity import check_path, fetch_checked

    if store.local:
        check_path(store.path(path), store.uri(path), f.sha256, f.bytes)
        return store.path(path)
    d, name = local_dir(store, path.rsplit("/", 1)[0], cache_dir), path.rsplit("/", 1)[1]
    fetch_checked(store, path, f.sha256, f.bytes, os.path.join(d, name))
    evict(cache_dir)
    return os.path.join(d, name)
