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

Search (SegmentedIndex): a shell of the base (its quantizer and codebooks, no lists) whose inverted
lists are faiss's HStackInvertedLists over the base's lists and every delta's, so each probed list
is scanned once with one distance table; results' negative keys are mapped back to ids. The answer
is the one a fresh build with the same trained index gives over the live vectors, ties aside.
"""
from __future__ import annotations

import io
import json
import struct

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


class SegmentedIndex:
    """A base index, delta segments and a dead set, searched as one faiss index (`index`) through
    the selector `alive`; `ids()` maps result keys back to ids. Holds every object faiss points to."""

    def __init__(self, base, deltas: list[tuple[dict, np.ndarray, np.ndarray, np.ndarray]], dead: np.ndarray):
        f, bi = faiss(), ivf(base)
        if bi is None:
            raise IntegrityError("delta segments need an IVF index; this shard's base has no inverted lists")
        self.base, self.dead = base, np.unique(dead.astype(np.int64))
        self.first = min((h["first"] for h, *_ in deltas), default=0)
        self.delta_ids = np.concatenate([i for _, _, i, _ in deltas]) if deltas else np.empty(0, np.int64)
        self.lists = [invlists(bi.nlist, bi.code_size, h["first"], L, C) for h, L, _, C in deltas]
        self.index = shell(base)
        si = ivf(self.index)
        self._vec = f.InvertedListsPtrVector()
        for il in [bi.invlists, *self.lists]:
            self._vec.push_back(il)
        self._stack = f.HStackInvertedLists(self._vec.size(), self._vec.data())
        si.replace_invlists(self._stack, False)  # the stack's objects stay alive here, as self's
        set_ntotal(self.index, int(base.ntotal) + len(self.delta_ids))
        self._dead_sel = f.IDSelectorBatch(len(self.dead), f.swig_ptr(self.dead)) if len(self.dead) else None
        self.alive = f.IDSelectorNot(self._dead_sel) if self._dead_sel is not None else None

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
