"""payload: what an add unit writes, its vectors' codes without any copy of the trained index.

One file per add unit, its rows sorted by (serving shard, IVF list):

  magic b"SHXPAY01" | uint64 header length | header (JSON) | int32 lists[n] | int64 ids[n] | uint8 codes[n, c]

The header holds the fingerprint of the trained index the codes were made with (sha256 of its
bytes), the code size, n, nlist, and the row offsets of each shard's section (S + 1 of them).
--sharding hash puts each vector in its id's shard; --sharding ivf cannot know the list ranges yet,
so every row is in section 0, sorted by list, and a shard is a list range of it. So a merge reads
with ranged reads only its shard's rows of its list range, and nothing per unit is O(P x S) files
or trained indexes. A flat (non-IVF) index has one list, 0. Codes are what faiss stores per vector
(encode_vectors for IVF, sa_encode otherwise); fast-scan lists are packed into blocks at the merge.
"""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from shards.errors import IntegrityError
from shards.storage.faissio import faiss, ivf, pretransform
from shards.storage.store import Store

MAGIC = b"SHXPAY01"
CHUNK = 1 << 16  # vectors per encode call: bounds the temporary buffers


def fingerprint(trained_bytes: bytes) -> str:
    """What identifies a trained index: codes made with another one are never merged with its."""
    return hashlib.sha256(trained_bytes).hexdigest()


def code_size(index) -> int:
    iv = ivf(index)
    if iv is not None:
        return int(iv.code_size)
    return int(faiss().downcast_index(index).index.sa_code_size())


def encode(index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IVF list int32 [n], codes uint8 [n, c]) of x under a trained index, as add_with_ids would
    store them; a flat index's vectors are all in list 0."""
    f, iv = faiss(), ivf(index)
    n, c = len(x), code_size(index)
    L, C = np.zeros(n, np.int32), np.empty((n, c), np.uint8)
    for a in range(0, n, CHUNK):
        xc = np.ascontiguousarray(x[a:a + CHUNK], dtype=np.float32)
        if iv is None:
            C[a:a + len(xc)] = f.downcast_index(index).index.sa_encode(xc)
            continue
        xt = np.ascontiguousarray(pretransform(index, xc), dtype=np.float32)
        _, I = iv.quantizer.search(xt, 1)
        li = np.ascontiguousarray(I[:, 0])
        out = np.empty((len(xt), c), np.uint8)
        iv.encode_vectors(len(xt), f.swig_ptr(xt), f.swig_ptr(li), f.swig_ptr(out), False)
        L[a:a + len(xt)], C[a:a + len(xt)] = li, out
    return L, C


def lists_of(index, x: np.ndarray) -> np.ndarray:
    """The IVF list int32 [n] of each row of x, as encode() gives it, without encoding the codes."""
    iv, L = ivf(index), np.zeros(len(x), np.int32)
    for a in range(0, len(x), CHUNK):
        xt = np.ascontiguousarray(pretransform(index, np.ascontiguousarray(x[a:a + CHUNK], np.float32)), np.float32)
        L[a:a + len(xt)] = iv.quantizer.search(xt, 1)[1][:, 0]
    return L


def write(store: Store, rel: str, fp: str, nlist: int, shard: np.ndarray, S: int, lists: np.ndarray,
          ids: np.ndarray, codes: np.ndarray) -> int:
    """Sort the rows by (shard, list) and write them; returns the file's bytes."""
    o = np.lexsort((lists, shard))
    offsets = np.searchsorted(shard[o], np.arange(S + 1)).tolist()
    head = json.dumps({"fingerprint": fp, "code_size": int(codes.shape[1]), "n": len(ids), "nlist": nlist,
                       "offsets": offsets}).encode()
    head += b" " * (-(len(head) + 16) % 8)  # the arrays start 8-aligned
    data = b"".join([MAGIC, struct.pack("<Q", len(head)), head, lists[o].astype("<i4").tobytes(),
                     ids[o].astype("<i8").tobytes(), np.ascontiguousarray(codes[o]).tobytes()])
    store.write_bytes(rel, data)
    return len(data)


class Payload:
    """One unit's payload file, read by ranges: its header first, then only the rows asked for."""

    def __init__(self, store: Store, rel: str):
        self.store, self.rel, self.path = store, rel, store.path(rel)
        raw = self._read(0, 16)
        if raw[:8] != MAGIC:
            raise IntegrityError(f"{store.uri(rel)}: not a shardex add payload; delete its unit and rebuild")
        (hl,) = struct.unpack("<Q", raw[8:16])
        self.head = json.loads(self._read(16, 16 + hl))
        self.n, self.c, self.nlist = self.head["n"], self.head["code_size"], self.head["nlist"]
        self.offsets = self.head["offsets"]
        self.base = 16 + hl

    def _read(self, a: int, b: int) -> bytes:
        if b <= a:
            return b""
        data = self.store.fs.cat_file(self.path, start=a, end=b)
        if len(data) != b - a:
            raise IntegrityError(f"{self.store.uri(self.rel)}: truncated ({len(data)} of {b - a} bytes at {a}); "
                                 f"delete its unit and rebuild")
        return data

    def check(self, fp: str) -> None:
        if self.head["fingerprint"] != fp:
            raise IntegrityError(f"{self.store.uri(self.rel)}: encoded with another trained index than this "
                                 f"build's; delete {self.store.uri(self.rel.rsplit('/', 1)[0])} and rebuild")

    def section(self, s: int) -> tuple[int, int]:
        """The rows [r0, r1) of shard s's section."""
        return self.offsets[s], self.offsets[s + 1]

    def lists(self, r0: int, r1: int) -> np.ndarray:
        return np.frombuffer(self._read(self.base + 4 * r0, self.base + 4 * r1), "<i4")

    def rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, codes [r1 - r0, c]) of rows [r0, r1)."""
        ib, cb = self.base + 4 * self.n, self.base + 12 * self.n
        ids = np.frombuffer(self._read(ib + 8 * r0, ib + 8 * r1), "<i8")
        codes = np.frombuffer(self._read(cb + self.c * r0, cb + self.c * r1), np.uint8).reshape(-1, self.c)
        return ids, codes
