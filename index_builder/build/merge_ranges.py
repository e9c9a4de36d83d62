"""merge_ranges: a big on-disk shard merged by several tasks, each one range of its lists.

An on-disk shard's .ivfdata is its lists one after another in list order, each its codes then its
ids, with no free space (merge.ondisk_lists). So lists [la, lb) are one stretch of the file whose
bytes depend only on those lists' entries. One task per range writes that stretch as a file
(work/<run>/merge/shard-s/range-k.bin), reading only its lists' rows of every unit; the shard's
last task lays the stretches end to end into the .ivfdata, opens it as the shard's lists, checks
the shard as merge_shard does, and commits it the same way. A retried range or a resumed build
reuses every stretch already written (each has a record beside it).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
import ray

from index_builder.build.memwatch import MemoryWatch
from index_builder.build.merge import (
    Sources,
    checked,
    commit,
    install,
    ondisk_lists,
    open_sources,
    save_sizes,
    write_on_disk,
)
from index_builder.shard_math import ids_digest, ivf_ranges, sum_digests
from index_builder.workdir import WorkDir
from shards.raytools import TASK_RETRIES
from shards.storage.faissio import ivf, set_ntotal
from shards.storage.store import Store


def cut(sizes: np.ndarray, a: int, entry: int, target: int) -> list[tuple[int, int]]:
    """Lists [a, a + len(sizes)) cut into ranges of about `target` bytes each (entry bytes a vector),
    at list boundaries; one range when the whole is under target."""
    k = max(1, min(len(sizes), -(-int(sizes.sum()) * entry // max(1, target))))
    return [(a + x, a + y) for x, y in ivf_ranges(sizes, k)]


def range_rel(wd: WorkDir, s: int, k: int) -> str:
    return f"{wd.root}/merge/shard-{s}/range-{k:05d}.bin"


@ray.remote(**TASK_RETRIES)
def sizes_task(store: Store, wd: WorkDir, units: list[str], section: int, lists: tuple[int, int]) -> np.ndarray:
    """The list sizes of lists [a, b) of section `section` over every unit: what the ranges are cut from."""
    _, pays = open_sources(store, wd, units)
    return Sources(pays, section, *lists).sizes


@ray.remote(**TASK_RETRIES)
def range_task(store: Store, wd: WorkDir, units: list[str], s: int, section: int, k: int,
               lists: tuple[int, int]) -> dict:
    """Writes the .ivfdata stretch of lists [la, lb) of shard s; returns its record (bytes, id digest)."""
    rel = range_rel(wd, s, k)
    if store.exists(f"{rel}.json"):
        return json.loads(store.read_text(f"{rel}.json"))
    t0 = time.time()
    index, pays = open_sources(store, wd, units)
    src, c = Sources(pays, section, *lists), int(ivf(index).code_size)
    fd, path = tempfile.mkstemp(prefix="shardex-range-")
    digests = []
    try:
        with os.fdopen(fd, "wb") as out:
            for la, lb in src.batches(c):
                L, I, C = src.read(la, lb)
                bounds = np.searchsorted(L, np.arange(la, lb + 1))
                for l in np.flatnonzero(np.diff(bounds)):
                    i, j = int(bounds[l]), int(bounds[l + 1])
                    out.write(np.ascontiguousarray(C[i:j]).tobytes())
                    out.write(I[i:j].astype("<i8").tobytes())
                digests.append(ids_digest(I))
        store.put_file(path, rel)
    finally:
        if os.path.exists(path):
            os.remove(path)
    done = {"k": k, "lists": list(lists), "bytes": store.size(rel), "digest": list(sum_digests(digests)),
            "seconds": time.time() - t0}
    store.write_text(f"{rel}.json", json.dumps(done))
    return done


@ray.remote(**TASK_RETRIES)
def assemble_task(store: Store, wd: WorkDir, units: list[str], s: int, sizes: np.ndarray,
                  expected: list[int] | None, *ranges: dict) -> dict:
    """Shard s from its range stretches (ranges: range_task's records, in list order); sizes: the
    shard's size of every list (nlist of them). Commits shards/shard-s.index.json like merge_shard."""
    if store.exists(wd.shard_record(s)):
        return {**json.loads(store.read_text(wd.shard_record(s))), "reused": True}
    t0 = time.time()
    with MemoryWatch() as mem:
        index, _ = open_sources(store, wd, [])
        n = int(np.asarray(sizes).sum())
        save_sizes(store, wd, s, sizes)

        def filler(ix, path):
            iv = ivf(ix)
            inv = ondisk_lists(iv, sizes, path)  # the file at its final size, then filled stretch by stretch
            with open(path, "r+b") as out:
                for r in ranges:
                    with store.open(range_rel(wd, s, r["k"])) as f:
                        shutil.copyfileobj(f, out, 8 << 20)
            install(ix, inv)
            iv.ntotal = n
            set_ntotal(ix, n)

        files, got = write_on_disk(store, wd, index, s, filler, lambda ix: checked(ix, n, expected, s, store, wd))
    done = commit(store, wd, s, files, got, {"seconds": time.time() - t0, "ondisk": True, "ranges": len(ranges),
                                             **mem.record()})
    store.rm(f"{wd.root}/merge/shard-{s}", recursive=True)  # the stretches are in the .ivfdata now
    return done


def submit(store: Store, wd: WorkDir, units: list[str], s: int, section: int, lists: tuple[int, int],
           expected: list[int] | None, sizes: np.ndarray | None, nlist: int, entry: int, target: int):
    """The ref of shard s merged on disk by one task per range of about `target` bytes, then assembled.
    sizes: the sizes of lists [a, b) when the driver knows them (ivf sharding), else a task sums them."""
    a, b = lists
    if sizes is None:
        sizes = ray.get(sizes_task.options(num_cpus=1).remote(store, wd, units, section, lists))
    full = np.zeros(nlist, np.int64)
    full[a:b] = sizes
    refs = [range_task.options(num_cpus=1).remote(store, wd, units, s, section, k, r)
            for k, r in enumerate(cut(np.asarray(sizes), a, entry, target))]
    return assemble_task.options(num_cpus=1).remote(store, wd, units, s, full, expected, *refs)
