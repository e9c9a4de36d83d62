"""The node's cache of S3 files (shards/storage/cache.py): ranged fetches, one hash per cached copy, LRU eviction."""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest

from shards.storage import cache, integrity
from shards.storage.faissio import faiss, read_verified, to_bytes
from shards.storage.manifest import FileInfo
from shards.storage.store import Store


@pytest.mark.parametrize("size,step,want", [
    (0, 4, []),
    (3, 4, [(0, 3)]),
    (8, 4, [(0, 4), (4, 8)]),
    (9, 4, [(0, 4), (4, 8), (8, 9)]),
])
def test_ranges(size, step, want):
    assert cache.ranges(size, step) == want


@pytest.fixture
def store(s3, tmp_path):
    return Store(f"s3://indexes/cache-{tmp_path.name}", s3)


def test_ranged_download_is_the_object(store, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "RANGE_BYTES", 1000)
    monkeypatch.setattr(cache, "WINDOW", 3)        # 11 ranges: four windows, the last one short
    data = np.random.default_rng(0).bytes(10_500)
    store.write_bytes("v/blob", data)
    h, dst = hashlib.sha256(), str(tmp_path / "blob")
    assert cache.download(store, "v/blob", dst, h) == len(data)
    assert open(dst, "rb").read() == data and h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_an_s3_index_is_hashed_once_per_cached_copy(store, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "RANGE_BYTES", 4096)
    index = faiss().IndexFlatL2(8)
    index.add(np.random.default_rng(1).random((100, 8), dtype=np.float32))
    w = store.write_bytes("v/flat.index", to_bytes(index))
    info = FileInfo(file="flat.index", sha256=w.sha256, bytes=w.bytes, ntotal=100)
    root = str(tmp_path / "cache")
    before = dict(integrity.HASHED)
    assert read_verified(store, "v", info, cache_dir=root).ntotal == 100
    assert integrity.HASHED["files"] == before["files"] + 1      # hashed as it was fetched
    integrity._known.clear()                                      # as a new process on the node would start
    assert read_verified(store, "v", info, cache_dir=root).ntotal == 100
    assert integrity.HASHED["files"] == before["files"] + 1      # the marker vouches for the copy


def test_a_changed_cached_copy_is_fetched_and_checked_again(store, tmp_path):
    data = b"x" * 5000
    w = store.write_bytes("v/blob", data)
    d = cache.local_dir(store, "v", str(tmp_path))
    dst = os.path.join(d, "blob")
    integrity.fetch_checked(store, "v/blob", w.sha256, w.bytes, dst)
    with open(dst, "r+b") as f:                                   # the copy damaged on the node's disk
        f.write(b"y")
    integrity.fetch_checked(store, "v/blob", w.sha256, w.bytes, dst)
    assert open(dst, "rb").read() == data


def _filled(root, name: str, nbytes: int, used: float) -> str:
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "f"), "wb") as f:
        f.write(b"\0" * nbytes)
    open(os.path.join(d, cache.USED), "w").close()
    os.utime(os.path.join(d, cache.USED), (used, used))
    return d


def test_eviction_takes_the_least_recently_used_first(tmp_path):
    now = time.time()
    old, mid, new = (_filled(str(tmp_path), n, 1000, now - age) for n, age in
                     [("old", 3000), ("mid", 2000), ("new", 1000)])
    assert cache.evict(str(tmp_path), limit=1500, keep_s=0) == [old, mid]
    assert os.path.exists(new)


def test_eviction_spares_a_directory_in_use(tmp_path, monkeypatch):
    now = time.time()
    busy = _filled(str(tmp_path), "busy", 1000, now)             # a replica fetching into it right now
    idle = _filled(str(tmp_path), "idle", 1000, now - 7200)
    assert cache.evict(str(tmp_path), limit=0, keep_s=600) == [idle]
    assert os.path.exists(busy)
    monkeypatch.setenv("SHARDEX_CACHE_BYTES", "1M")                # the budget from the environment
    assert cache.budget(str(tmp_path)) == 1 << 20
