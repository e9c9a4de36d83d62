"""Shard math as pure functions: which serving shard holds an id."""
from __future__ import annotations

import numpy as np

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
