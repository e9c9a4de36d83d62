"""Shard math as pure functions: which serving shard holds an id (hash), or a range of IVF lists (ivf)."""
from __future__ import annotations

import numpy as np

from shards.errors import ConfigError

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: sequential ids spread evenly over any shard count."""
    z = ids.astype(np.uint64) + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_shard(ids: np.ndarray, shards: int) -> np.ndarray:
    """--sharding hash: the serving shard of each id, in [0, shards)."""
    with np.errstate(over="ignore"):
        return (mix64(np.asarray(ids, dtype=np.int64)) % np.uint64(shards)).astype(np.int64)


def ivf_ranges(list_sizes, shards: int) -> list[list[int]]:
    """--sharding ivf: cut lists 0..nlist into `shards` contiguous ranges [a, b) holding about
    the same number of vectors (not lists). Each cut is at the list boundary nearest its ideal
    vector count, so a shard is off its share by at most about one list; every range has at
    least one list. With no vectors at all, the lists themselves are split evenly."""
    sizes = np.asarray(list_sizes, dtype=np.int64)
    nl = len(sizes)
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if shards > nl:
        raise ConfigError(f"shards: {shards} shards cannot each own an IVF list of {nl}; "
                          f"give --shards <= {nl} or a larger nlist")
    if (sizes < 0).any():
        raise ValueError("list sizes must be >= 0")
    prefix = np.concatenate([[0], np.cumsum(sizes)]) if sizes.sum() else np.arange(nl + 1)
    cuts = [0]
    for s in range(1, shards):
        t = prefix[-1] * s / shards
        i = int(np.searchsorted(prefix, t))          # first boundary with prefix >= t
        if i > 0 and t - prefix[i - 1] <= prefix[i] - t:
            i -= 1                                   # the boundary just before is nearer
        cuts.append(min(max(i, cuts[-1] + 1), nl - (shards - s)))
    cuts.append(nl)
    return [[a, b] for a, b in zip(cuts[:-1], cuts[1:])]


def range_shard(lists: np.ndarray, ranges: list[list[int]]) -> np.ndarray:
    """--sharding ivf: the serving shard of each vector, from the IVF list it was assigned to."""
    from shards.search.shard_selection import list_owner

    return list_owner(lists, ranges)


_SALT = np.int64(0x5DEECE66D)


def ids_digest(ids: np.ndarray) -> tuple[int, int, int]:
    """An order-free fingerprint of a multiset of ids: (count, two 64-bit sums of hashed ids).
    Digests add up (sum_digests), so a shard's expected digest is the sum of what each part
    added to it, and checking a merged shard needs no sorted id arrays in memory. A lost,
    duplicated or altered id changes both sums except with negligible (2**-64-ish) odds."""
    ids = np.asarray(ids, dtype=np.int64)
    with np.errstate(over="ignore"):
        return (len(ids), int(mix64(ids).sum(dtype=np.uint64)), int(mix64(ids ^ _SALT).sum(dtype=np.uint64)))


def sum_digests(digests) -> tuple[int, int, int]:
    c, a, b = 0, 0, 0
    for d in digests:
        c, a, b = c + d[0], (a + d[1]) % 2**64, (b + d[2]) % 2**64
    return (c, a, b)


def add_units(parts: list[tuple[str, int]], rows: int) -> list[list[tuple[str, int, int]]]:
    """The add stage's units: consecutive row ranges (part, start, stop) of the embeddings parts, cut so
    that each unit holds `rows` vectors at most and all but the last hold about that many: small
    parts are grouped, large ones split. A unit's task reads, encodes and writes only its rows."""
    if rows < 1:
        raise ValueError(f"rows per add unit must be at least 1, got {rows}")
    units, cur, room = [], [], rows
    for rel, n in parts:
        at = 0
        while at < n:
            take = min(room, n - at)
            cur.append((rel, at, at + take))
            at, room = at + take, room - take
            if room == 0:
                units.append(cur)
                cur, room = [], rows
    return units + ([cur] if cur else [])


UNIT_BYTES = 3 << 30  # float32 vector bytes per add unit: about 1M vectors at d=768


def add_rows(d: int, n: int, cpus: int, asked: int | None = None) -> int:
    """Vectors per add unit: --add-rows, else UNIT_BYTES of vectors, but small enough that a build
    of n vectors gives every CPU of the cluster a unit to work on."""
    if asked:
        return asked
    return max(1, min(UNIT_BYTES // (4 * d), -(-n // max(1, cpus))))
