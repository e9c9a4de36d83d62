"""One shard across versions, as a serving replica holds it: the swap to a version that shares segments
with one it holds reads only what is new.

A version's shard is a base, delta segments and a dead set (shards/storage/segments.py). The files
are immutable and named with their sha256 in the manifest, so (path, sha256) names one content: a
base or a delta already loaded for one version is the same object for the next. Loading a version
then reads its new deltas, its dead set and, when filters are served, the docs files it does not
share with the version held before (ShardSearcher.load_attributes with prev).

The last `keep` versions asked for are held (the one served and the one it replaced, whose last
requests may still run); a version asked for again after that is loaded again, from what is held.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from shards.search.searcher import ShardSearcher
from shards.storage import segments
from shards.storage.faissio import load_shard
from shards.storage.manifest import load_manifest
from shards.storage.store import Store

KEEP = 2


def read_bytes() -> int | None:
    """Bytes this process has read so far (read() and pread(), the page cache included: what a load
    asked storage for, whether or not the disk served it); None where /proc does not say."""
    try:
        with open("/proc/self/io") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return None


class HeldShard:
    """Shard s of each version asked for, built from segments kept by (path, sha256)."""

    def __init__(self, store: Store, s: int, kinds: dict[str, str] | None, threads: int | None,
                 keep: int = KEEP):
        self.store, self.s, self.kinds, self.threads, self.keep = store, s, kinds or {}, threads, keep
        self.versions: OrderedDict[str, ShardSearcher] = OrderedDict()
        self.bases: dict[tuple, object] = {}
        self.deltas: dict[tuple, tuple] = {}
        self.loads: dict[str, dict] = {}       # version -> how its last load went (see _load)
        self._lock = threading.Lock()          # one load at a time; searches of held versions go on

    def get(self, version: str) -> ShardSearcher:
        """This shard of `version`, loaded first if it is not held."""
        sr = self.versions.get(version)
        if sr is None:
            with self._lock:
                return self.versions.get(version) or self._load(version)
        try:
            self.versions.move_to_end(version)
        except KeyError:  # a load let it go meanwhile; this request still holds it
            pass
        return sr

    def _load(self, version: str) -> ShardSearcher:
        t, r = time.perf_counter(), read_bytes()
        self._reused = 0
        m = load_manifest(self.store, version)
        before = next(reversed(self.versions), None)
        prev = self.versions.get(before)
        sr = ShardSearcher(self.store, m, m.shards[self.s], self.threads, held=self)
        if self.kinds:
            sr.load_attributes(self.store, m, self.kinds, prev)
        sr.keys = self._keys(m)
        self.versions[version] = sr
        while len(self.versions) > self.keep:
            self.versions.popitem(last=False)
        self._forget()
        r2 = read_bytes()
        self.loads[version] = {"seconds": round(time.perf_counter() - t, 4), "segments_reused": self._reused,
                               "docs_files_read": getattr(sr, "docs_read", 0),
                               "bytes_read": r2 - r if r is not None and r2 is not None else None,
                               "from": before}
        return sr

    def _keys(self, m) -> set:
        sh = m.shards[self.s]
        return {(m.path(sh.file), sh.sha256), *((m.path(d.file), d.sha256) for d in getattr(sh, "deltas", []))}

    def _forget(self) -> None:
        """Let go of segments no held version uses."""
        used = set().union(*(sr.keys for sr in self.versions.values()))
        self.bases = {k: v for k, v in self.bases.items() if k in used}
        self.deltas = {k: v for k, v in self.deltas.items() if k in used}

    # ShardSearcher's `held`: the base and the deltas, each read once while a version uses it
    def base(self, store: Store, m, shard):
        k = (m.path(shard.file), shard.sha256)
        self._reused += k in self.bases
        if k not in self.bases:
            self.bases[k] = load_shard(store, m, shard)
        return self.bases[k]

    def delta(self, store: Store, m, info):
        k = (m.path(info.file), info.sha256)
        self._reused += k in self.deltas
        if k not in self.deltas:
            self.deltas[k] = segments.read_delta(store, m, info)
        return self.deltas[k]
