"""segments: a shard as a base plus delta segments and a dead set, and the one faiss index that searches them.

A reindex that keeps the quantizer does not rebuild a shard: it writes the codes of its new and
changed vectors as a delta segment, one file per shard, and the keys of entries that are no longer
live (replaced or deleted) as the shard's dead set. A version's shard is then

  base       shard-s.index (+ .ivfdata): the faiss index a build merged, ids as its entries' keys
  deltas     shard-s.delta-F.seg: magic b"SHXSEG01" | uint64 header length | header (JSON) |
             int32 lists[n] | int64 ids[n] | uint8 codes[n, c], rows sorted by list
  dead       shard-s.dead.npy: sorted int64 keys of entries that no longer count

A delta's entry r is keyed -(2 + F + r) (F: its `first`, the number of delta entries the shard's
deltas held before it), never an id (ids are >= 0) nor faiss's -1. So one key names one entry, and
an id replaced twice has three entries with three keys: the dead set says exactly which of them is
gone, and one IDSelector over keys serves every segment at once.

Search (SegmentedIndex): without a filter, an IVF-PQ shard searches its base with faiss and its
live delta entries in the same lists with DeltaScan (numpy, the distances faiss computes), and the
searcher merges them. Otherwise `index`: a shell of the base (its quantizer and codebooks, no
lists) whose inverted lists are faiss's HStackInvertedLists over the base's lists and every
delta's, so each probed list is scanned once with one distance table. Results' negative keys are
mapped back to ids. The answer is the one a fresh build with the same trained index gives over
the live vectors, ties aside.
"""
from __future__ import annotations

import io
import json
import struct
from functools import cached_property

import numpy as np

from shards.errors import IntegrityError
from shards.storage.faissio import faiss, index_ids, ivf, set_ntotal

MAGIC = b"SHXSEG01"


def keys(first: int, n: int) -> np.ndarray:
    """The keys of a delta's n entries."""
    return -(2 + first + np.arange(n, dtype=np.int64))


def to_bytes(fp: str, nlist: int, first: int, lists: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> bytes:
    """A delta segment's file: rows sorted by list (stable, so rows keep their order within a list)."""
    o = np.argsort(lists, kind="stable")
    head = json.dumps({"fingerprint": fp, "code_size": int(codes.shape[1]), "n": len(ids), "nlist": int(nlist),
                       "first": int(first)}).encode()
    head += b" " * (-(len(head) + 16) % 8)
    return b"".join([MAGIC, struct.pack("<Q", len(head)), head, lists[o].astype("<i4").tobytes(),
                     ids[o].astype("<i8").tobytes(), np.ascontiguousarray(codes[o]).tobytes()])


def from_bytes(data: bytes, where: str) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(header, lists, ids, codes) of a delta segment's bytes; where names it in errors."""
    if data[:8] != MAGIC:
        raise IntegrityError(f"{where}: not a shardex delta segment")
    (hl,) = struct.unpack("<Q", data[8:16])
    h = json.loads(data[16:16 + hl])
    n, c, a = h["n"], h["code_size"], 16 + hl
    if len(data) != a + n * (12 + c):
        raise IntegrityError(f"{where}: {len(data)} bytes; a segment of {n} entries of {c} bytes "
                             f"has {a + n * (12 + c)}")
    lists = np.frombuffer(data, "<i4", n, a)
    ids = np.frombuffer(data, "<i8", n, a + 4 * n)
    codes = np.frombuffer(data, np.uint8, n * c, a + 12 * n).reshape(n, c)
    return h, lists, ids, codes


def dead_bytes(dead: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.unique(np.asarray(dead, np.int64)))
    return buf.getvalue()


def dead_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data)).astype(np.int64)


def invlists(nlist: int, c: int, first: int, lists: np.ndarray, codes: np.ndarray):
    """A delta's entries as faiss ArrayInvertedLists, keyed by keys(first, n); rows sorted by list."""
    f = faiss()
    il = f.ArrayInvertedLists(nlist, c)
    k = keys(first, len(lists))
    b = np.searchsorted(lists, np.arange(nlist + 1))
    for l in np.flatnonzero(np.diff(b)):
        a, z = int(b[l]), int(b[l + 1])
        kk, cc = np.ascontiguousarray(k[a:z]), np.ascontiguousarray(codes[a:z])
        il.add_entries(int(l), z - a, f.swig_ptr(kk), f.swig_ptr(cc))
    return il


class DeltaScan:
    """The live delta entries of an IVF-PQ shard (8-bit codes), scanned beside its base in numpy rather
    than through a stack of lists (which copies each probed list per query: 13% of a shard's QPS at
    IVF1024,PQ32, bench/README.md). An entry's distance is the one faiss computes, by the same
    decomposition: for L2 over residuals ||x - c||^2 + (||r||^2 + 2<c, r>) - 2<x, r>, where the
    middle term is the entry's own (kept, one float) and <x, r> sums one table per query (M x 256
    inner products) over the entry's codes; for inner product <x, c> + <x, r>. So a delta entry costs
    M lookups, and no probed list costs a table."""

    def __init__(self, iv, lists: np.ndarray, keys: np.ndarray, codes: np.ndarray):
        f = faiss()
        o = np.argsort(lists, kind="stable")
        self.keys, self.codes = keys[o], np.ascontiguousarray(codes[o])
        self.codesT = np.ascontiguousarray(self.codes.T)  # by subquantizer: a scan gathers M times
        self.off = np.searchsorted(lists[o], np.arange(iv.nlist + 1))
        pq = iv.pq
        self.M, self.ip, self.residual = pq.M, iv.metric_type == f.METRIC_INNER_PRODUCT, bool(iv.by_residual)
        self.C = f.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        r = pq.decode(self.codes) if len(o) else np.empty((0, pq.d), np.float32)
        c = iv.quantizer.reconstruct_batch(lists[o]) if self.residual and len(o) else np.zeros_like(r)
        self.const = (r * r).sum(1) + 2 * (c * r).sum(1)  # L2's term of the entry alone

    @classmethod
    def of(cls, iv, lists, keys, codes):
        """A DeltaScan for an IVF-PQ index with 8-bit codes, else None (the stack serves)."""
        f = faiss()
        iv = f.downcast_index(iv)
        if not isinstance(iv, f.IndexIVFPQ) or isinstance(iv, f.IndexIVFPQFastScan) or iv.pq.nbits != 8:
            return None
        return cls(iv, lists, keys, codes)

    def search(self, xt: np.ndarray, Dq: np.ndarray, Iq: np.ndarray, k: int, bound: np.ndarray | None = None,
               chunk: int = 256):
        """(D, keys) [nq, k] of the best delta entries in each query's probed lists (xt: queries as the
        IVF sees them, Dq, Iq: their coarse search); -1 keys where fewer. bound [nq]: only entries
        better than it count (the base's k-th result: nothing worse can make the merged top-k)."""
        nq = len(xt)
        D = np.full((nq, k), -np.inf if self.ip else np.inf, np.float32)
        I = np.full((nq, k), -1, np.int64)
        if bound is None:
            bound = D[:, 0]
        for a in range(0, nq, chunk):
            z = slice(a, a + chunk)
            self._chunk(xt[z], Dq[z], Iq[z], bound[z], D[z], I[z])
        return D, I

    def _chunk(self, xt, Dq, Iq, bound, D, I):
        n, k, ks = len(xt), D.shape[1], self.C.shape[1]
        L = np.maximum(Iq, 0)
        cnt = np.where(Iq >= 0, self.off[L + 1] - self.off[L], 0).ravel()
        P = int(cnt.sum())
        if not P:
            return
        q = np.repeat(np.repeat(np.arange(n), Iq.shape[1]), cnt)  # the (query, entry) pairs, by query
        e = np.repeat(self.off[L].ravel() - (np.cumsum(cnt) - cnt), cnt) + np.arange(P)
        # T[m, q, j] = <x_q's m-th part, centroid j of m>: one small matmul per m; then <x, r> by M gathers
        T = np.matmul(xt.reshape(n, self.M, -1).transpose(1, 0, 2), self.C.transpose(0, 2, 1))
        qk, xr = q * ks, np.zeros(P, np.float32)
        for m in range(self.M):
            xr += T[m].ravel()[qk + self.codesT[m][e]]
        dis0 = np.repeat(Dq.ravel(), cnt) if self.residual else (0 if self.ip else (xt * xt).sum(1)[q])
        d = (dis0 + xr) if self.ip else (dis0 + self.const[e] - 2 * xr)
        ok = np.flatnonzero(d > bound[q] if self.ip else d < bound[q])
        q, d, e = q[ok], d[ok], e[ok]
        o = np.lexsort((-d if self.ip else d, q))
        q, d, e = q[o], d[o], e[o]
        rank = np.arange(len(q)) - np.searchsorted(q, q)
        keep = rank < k
        D[q[keep], rank[keep]], I[q[keep], rank[keep]] = d[keep], self.keys[e[keep]]


class SegmentedIndex:
    """A base index, delta segments and a dead set, searched as one faiss index (`index`) through
    the selector `alive`; `ids()` maps result keys back to ids. Holds every object faiss points to.
    `scan`: the live delta entries for searches without a filter (DeltaScan; None when the index
    is not IVF-PQ, or there are no deltas), beside the base searched alone."""

    def __init__(self, base, deltas: list[tuple[dict, np.ndarray, np.ndarray, np.ndarray]], dead: np.ndarray):
        f, bi = faiss(), ivf(base)
        if bi is None:
            raise IntegrityError("delta segments need an IVF index; this shard's base has no inverted lists")
        self.base, self.dead = base, np.unique(dead.astype(np.int64))
        self.first = min((h["first"] for h, *_ in deltas), default=0)
        self.delta_ids = np.concatenate([i for _, _, i, _ in deltas]) if deltas else np.empty(0, np.int64)
        self._deltas = deltas
        self._dead_sel = f.IDSelectorBatch(len(self.dead), f.swig_ptr(self.dead)) if len(self.dead) else None
        self.alive = f.IDSelectorNot(self._dead_sel) if self._dead_sel is not None else None
        self.scan = None
        if deltas:
            k = np.concatenate([keys(h["first"], h["n"]) for h, *_ in deltas])
            ok = ~np.isin(k, self.dead)
            L, C = np.concatenate([d[1] for d in deltas]), np.concatenate([d[3] for d in deltas])
            self.scan = DeltaScan.of(bi, L[ok].astype(np.int64), k[ok], C[ok])

    @cached_property
    def index(self):
        """The base with every delta's lists stacked on its own: one faiss index over all entries (built
        on first use: searches with a filter, or an index DeltaScan does not serve). A dead set alone:
        the base itself."""
        if not self._deltas:
            return self.base
        f, bi = faiss(), ivf(self.base)
        self.lists = [invlists(bi.nlist, bi.code_size, h["first"], L, C) for h, L, _, C in self._deltas]
        index = shell(self.base)
        self._vec = f.InvertedListsPtrVector()
        for il in [bi.invlists, *self.lists]:
            self._vec.push_back(il)
        self._stack = f.HStackInvertedLists(self._vec.size(), self._vec.data())
        ivf(index).replace_invlists(self._stack, False)  # the stack's objects stay alive here, as self's
        ivf(index).parallel_mode = ivf(self.base).parallel_mode
        set_ntotal(index, int(self.base.ntotal) + len(self.delta_ids))
        return index

    def __len__(self) -> int:
        return int(self.base.ntotal) + len(self.delta_ids) - len(self.dead)

    def ids(self, I: np.ndarray) -> np.ndarray:
        """Result keys -> ids (-1 stays -1)."""
        neg = I < -1
        if not neg.any():
            return I
        out = I.copy()
        out[neg] = self.delta_ids[-I[neg] - 2 - self.first]
        return out

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, ids) of every live entry, sorted by id."""
        k = np.concatenate([index_ids(self.base), keys(self.first, len(self.delta_ids))])
        i = np.concatenate([k[:len(k) - len(self.delta_ids)], self.delta_ids])
        ok = ~np.isin(k, self.dead)
        o = np.argsort(i[ok], kind="stable")
        return k[ok][o], i[ok][o]


def shell(index):
    """A copy of index without its inverted lists (quantizer, codebooks, transforms: what a scan
    needs besides the codes), made by serializing it with empty lists swapped in for a moment."""
    f, iv = faiss(), ivf(index)
    own, real = iv.own_invlists, iv.invlists
    empty = f.ArrayInvertedLists(iv.nlist, iv.code_size)
    iv.own_invlists = False
    iv.replace_invlists(empty, False)
    try:
        data = f.serialize_index(index)
    finally:
        iv.replace_invlists(real, own)
    return f.deserialize_index(data)


def read_checked(store, m, info) -> bytes:
    """A segment file's bytes once they match the manifest (hashed as read: these files are small)."""
    from shards.storage.integrity import check_bytes

    rel = m.path(info.file)
    return check_bytes(store.uri(rel), store.read_bytes(rel), info.sha256, info.bytes)


def read_delta(store, m, info) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(header, lists, ids, codes) of the delta segment m names by info, checked."""
    return from_bytes(read_checked(store, m, info), store.uri(m.path(info.file)))


def read_dead(store, m, shard) -> np.ndarray:
    """The dead keys of a shard of m (none when it has no dead set), checked."""
    return dead_from_bytes(read_checked(store, m, shard.dead)) if shard.dead else np.empty(0, np.int64)


def load(store, m, shard, base, read=read_delta) -> SegmentedIndex:
    """Shard `shard` of manifest m (a ShardInfo with deltas or a dead set) over its loaded base;
    read(store, m, info): a delta's parsed file (a serving replica passes one that keeps them)."""
    seg = SegmentedIndex(base, [read(store, m, d) for d in shard.deltas], read_dead(store, m, shard))
    if len(seg) != shard.live:
        raise IntegrityError(f"{store.uri(m.path(shard.file))}: its segments hold {len(seg)} live vectors, "
                             f"the manifest says {shard.live}")
    return seg
