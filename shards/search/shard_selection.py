"""Which serving shards a query needs, under --sharding ivf: pure functions, no faiss.

With ivf sharding, shard s owns the contiguous IVF lists [ranges[s][0], ranges[s][1]).
A query that probes lists L only needs the shards owning some list in L: the others
hold nothing it could find. faissio.probed_lists gives L from the version's trained index.
"""
from __future__ import annotations

import numpy as np


def list_owner(lists: np.ndarray, ranges: list[list[int]]) -> np.ndarray:
    """The shard owning each list number (same shape as lists); -1 for -1 (no list)."""
    lists = np.asarray(lists, dtype=np.int64)
    starts = np.array([r[0] for r in ranges], dtype=np.int64)
    nl = ranges[-1][1]
    if ((lists < -1) | (lists >= nl)).any():
        raise ValueError(f"list numbers must be in [0, {nl}) (or -1 for none)")
    owner = np.searchsorted(starts, lists, side="right") - 1
    return np.where(lists < 0, -1, owner)


def shard_mask(lists: np.ndarray, ranges: list[list[int]]) -> np.ndarray:
    """lists [nq, nprobe] -> bool [nq, S]: the shards each query must ask (shards_for_lists, as one
    array: a loop over queries in Python was a measurable share of the router's time)."""
    owner = list_owner(np.atleast_2d(lists), ranges)
    mask = np.zeros((owner.shape[0], len(ranges) + 1), dtype=bool)  # the last column takes -1 (no list)
    mask[np.arange(owner.shape[0])[:, None], owner] = True
    return mask[:, :-1]


def shard_gaps(Dq: np.ndarray, lists: np.ndarray, ranges: list[list[int]], ip: bool) -> np.ndarray:
    """float [nq, S]: how much worse each shard's nearest probed list is than the query's nearest
    (lists [nq, nprobe], coarse distances Dq); inf for a shard the probe does not reach."""
    owner = list_owner(np.atleast_2d(lists), ranges)
    nq, S = owner.shape[0], len(ranges)
    d = np.where(owner < 0, -np.inf if ip else np.inf, np.asarray(Dq, dtype=np.float64))
    best = np.full((nq, S + 1), -np.inf if ip else np.inf)     # the last column takes -1 (no list)
    (np.maximum if ip else np.minimum).at(best, (np.arange(nq)[:, None], owner), d)
    best = best[:, :-1]
    top = best.max(1, keepdims=True) if ip else best.min(1, keepdims=True)
    return top - best if ip else best - top


def gap_mask(Dq: np.ndarray, lists: np.ndarray, ranges: list[list[int]], gap: float, ip: bool) -> np.ndarray:
    """Ranked routing: bool [nq, S], shard s asked for a query when it owns one of the query's probed lists
    no more than gap worse than the query's nearest list (shard_gaps). A query's nearest lists lie in
    one region of the space, and with grouped lists in one or two shards: the far shards a probe reaches
    hold little of its answer (the build tunes gap to the recall target)."""
    g = shard_gaps(Dq, lists, ranges, ip)
    return np.isfinite(g) & (g <= gap)


def scanned(lists: np.ndarray, mask: np.ndarray, ranges: list[list[int]]) -> np.ndarray:
    """lists [nq, nprobe] with -1 where the list's shard is not asked (mask [nq, S]): what the shards
    asked scan together, as one index would scan it."""
    owner = list_owner(np.atleast_2d(lists), ranges)
    keep = np.take_along_axis(np.c_[mask, np.zeros(len(mask), bool)], np.where(owner < 0, mask.shape[1], owner), 1)
    return np.where(keep, lists, -1)


def shards_for_lists(lists: np.ndarray, ranges: list[list[int]]) -> list[set[int]]:
    """lists [nq, nprobe] (from probed_lists) -> for each query, the set of shard numbers to ask."""
    owner = list_owner(np.atleast_2d(lists), ranges)
    return [{int(s) for s in np.unique(row) if s >= 0} for row in owner]


def scan_order(lists: np.ndarray) -> np.ndarray:
    """The order in which to scan a batch of queries, given the lists [nq, nprobe] each probes:
    grouped by nearest list (stable), so that queries probing the same lists come one after another."""
    return np.argsort(np.asarray(lists)[:, 0], kind="stable")
