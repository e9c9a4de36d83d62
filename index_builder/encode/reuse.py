"""What a reindex reuses: the live version's vectors for documents whose encoded column is unchanged.

Every embeddings part a build writes holds (id, vector, hash): hash is a 64-bit hash of the
value that was encoded (blake2b of the text, vector_hashes of the vector's float32 bytes). A
reindex hashes the new corpus the same way; an id whose hash matches keeps its stored vector, any other is encoded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from index_builder.shard_math import mix64
from shards.errors import IntegrityError
from shards.storage.store import Store

HASH = "hash"      # column of an embeddings part
ORIGIN = "origin"  # column of a reindexed part: where each vector came from
KEPT, NEW, CHANGED = 0, 1, 2


def _h64(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little", signed=True)


def text_hashes(texts: list[str]) -> np.ndarray:
    return np.fromiter((_h64(t.encode()) for t in texts), np.int64, len(texts))


def vector_hashes(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """A 64-bit hash of each row's float32 bytes: the sum of mix64(word ^ key of its position) over the
    row's 64-bit words. mix64 is a bijection, so rows that differ in one word never collide. In numpy, not a
    blake2b call per row, which was a large share of the time of copying a vector corpus."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1] % 2:
        x = np.pad(x, ((0, 0), (0, 1)))
    w = x.view(np.uint64)
    keys = mix64(np.arange(1, w.shape[1] + 1, dtype=np.uint64))
    out = np.empty(len(w), np.uint64)
    for a in range(0, len(w), chunk):  # bounds the temporaries at chunk x d words
        out[a:a + chunk] = mix64(w[a:a + chunk] ^ keys).sum(axis=1, dtype=np.uint64)
    return out.view(np.int64)


@dataclass(frozen=True)
class Reuse:
    """The live embeddings parts that hold some of one input shard's ids (relative to the root).
    encode_all: classify the rows against them, but take no vector from them (another encoder)."""

    parts: tuple[str, ...]
    encode_all: bool = False


@dataclass
class Match:
    origin: np.ndarray             # KEPT / NEW / CHANGED per row
    x: np.ndarray | None           # [n, d] with the live vectors in reused rows (None when none is)
    reused: np.ndarray             # rows whose vector is the live one


def match(store: Store, reuse: Reuse, ids: np.ndarray, h: np.ndarray) -> Match:
    """For each (id, hash): KEPT with its live vector when the live part has the same hash,
    CHANGED when the id is live with another hash, NEW when it is not live."""
    origin = np.full(len(ids), NEW, dtype=np.int8)
    x = None
    for rel in reuse.parts:
        t = store.read_table(rel, columns=["id", HASH])
        oid, oh = t.column("id").to_numpy(), t.column(HASH).to_numpy()
        if len(oid) == 0:
            continue
        order = np.argsort(oid, kind="stable")
        pos = np.minimum(np.searchsorted(oid, ids, sorter=order), len(oid) - 1)
        j = order[pos]
        hit = oid[j] == ids
        same = hit & (oh[j] == h)
        origin[hit & ~same] = CHANGED
        origin[same] = KEPT
        if same.any() and not reuse.encode_all:
            vec = store.read_table(rel, columns=["vector"]).column("vector").combine_chunks()
            d = vec.type.list_size
            old = vec.values.to_numpy(zero_copy_only=False).reshape(-1, d)
            if x is None:
                x = np.zeros((len(ids), d), dtype=np.float32)
            x[same] = old[j[same]]
    return Match(origin, x, (origin == KEPT) & (not reuse.encode_all))


def fill(m: Match, texts: list[str], encode) -> np.ndarray:
    """The part's vectors: the kept ones as they were, the others encoded now (only those)."""
    todo = np.flatnonzero(~m.reused)
    if len(todo) == 0:
        return m.x
    xe = encode([texts[i] for i in todo])
    x = m.x if m.x is not None else np.zeros((len(texts), xe.shape[1]), dtype=np.float32)
    if x.shape[1] != xe.shape[1]:
        raise IntegrityError(f"encoder dim {xe.shape[1]} differs from the live vectors' {x.shape[1]}")
    x[todo] = xe
    return x


def origin_column(origin: np.ndarray) -> dict:
    return {ORIGIN: pa.array(origin, pa.int8())}
