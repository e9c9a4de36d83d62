"""merge: the part sub-indexes of one serving shard into that shard, checked.

In RAM when the shard fits --merge-ram-budget: the trained index, then each part's
sub-index merged into it (one part in memory at a time besides the shard).

On disk otherwise, as faiss's merge_ondisk does it: every part's sub-index is opened
with IO_FLAG_MMAP (its lists stay in the file, read through the page cache), and
OnDiskInvertedLists.merge_from_multiple writes the shard's lists into one .ivfdata
file, sized exactly once and filled list by list; so RAM holds one list at a time,
not the shard. The shard is then shard-s.index (quantizer, codebooks and list offsets)
plus shard-s.ivfdata, served by mmap.

Every merge checks that each part was trained from the same quantizer, and that the
merged shard holds exactly the ids that were added to it (count and id digest).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid

import ray

from index_builder.shard_math import ids_digest, sum_digests
from index_builder.workdir import WorkDir, shard_name
from shards.errors import IntegrityError
from shards.storage.faissio import (
    faiss,
    faiss_quiet,
    ivf,
    no_search_flags,
    open_shard_file,
    quantizer_bytes,
    read_index,
    set_ntotal,
    write_index,
)
from shards.storage.manifest import FileInfo
from shards.storage.store import Store


class MemoryWatch:
    """Peak anonymous and file-backed resident memory of this process while a merge runs, sampled
    from /proc/self/status (Linux; elsewhere nothing is recorded). Anonymous memory is what a merge
    holds; file-backed pages (the mmapped parts and .ivfdata) are page cache the kernel can drop."""

    PERIOD_S = 0.02

    def __enter__(self):
        self.peak = {"anon": 0, "file": 0}
        self.start = self._read()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _read(self) -> dict:
        try:
            with open("/proc/self/status") as f:
                kv = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
        except OSError:
            return {}
        return {"anon": int(kv["RssAnon"].split()[0]) << 10, "file": int(kv["RssFile"].split()[0]) << 10}

    def _run(self):
        while not self._stop.is_set():
            for k, v in self._read().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.PERIOD_S)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def record(self) -> dict:
        if not self.start:
            return {}
        mib = 2**20
        return {"rss_anon_start_mib": round(self.start["anon"] / mib, 1),
                "rss_anon_peak_mib": round(self.peak["anon"] / mib, 1),
                "rss_file_peak_mib": round(self.peak["file"] / mib, 1)}


def shard_info(store: Store, wd: WorkDir, s: int) -> FileInfo:
    """The merged shard's FileInfo (file names as published), from its commit record."""
    done = json.loads(store.read_text(wd.shard_record(s)))
    return FileInfo(**{k: done[k] for k in FileInfo.model_fields if k in done})


def index_digest(index) -> tuple[int, int, int]:
    """ids_digest of every id in an index, one inverted list at a time (lists may be mmapped)."""
    f, iv = faiss(), ivf(index)
    if iv is None:
        return ids_digest(f.vector_to_array(f.downcast_index(index).id_map))
    inv, ds = iv.invlists, []
    for l in range(inv.nlist):
        n = inv.list_size(l)
        if n:
            p = inv.get_ids(l)
            try:
                ds.append(ids_digest(f.rev_swig_ptr(p, n)))
            finally:
                inv.release_ids(l, p)
    return sum_digests(ds)


def _mismatch(store: Store, rel: str, wd: WorkDir) -> IntegrityError:
    return IntegrityError(f"{store.uri(rel)}: trained with a different quantizer than {wd.trained}; "
                          f"delete {store.uri(wd.root)} and rebuild")


def merge_in_ram(store: Store, wd: WorkDir, rels: list[str]):
    index = read_index(store, wd.trained, no_search_flags())
    q = quantizer_bytes(index)
    for rel in rels:
        sub = read_index(store, rel, no_search_flags())
        if quantizer_bytes(sub) != q:
            raise _mismatch(store, rel, wd)
        index.merge_from(sub, 0)  # add_id=0: keep the ids the part was added with
    return index


def open_mmapped(path: str):
    """(emptied index, its inverted lists): the lists stay mmapped in the file; the index,
    with empty lists in their place, is what the quantizer check compares."""
    f = faiss()
    index = f.read_index(path, f.IO_FLAG_MMAP | no_search_flags())
    iv = ivf(index)
    lists = iv.invlists
    iv.own_invlists = False
    lists.this.acquire()  # Python owns the mmapped lists now: freed (and unmapped) with them
    empty = f.ArrayInvertedLists(iv.nlist, iv.code_size)
    iv.replace_invlists(empty, True)
    empty.this.disown()
    set_ntotal(index, 0)
    iv.ntotal = 0
    return index, lists


def merge_on_disk(store: Store, wd: WorkDir, rels: list[str], local_dir: str, name: str):
    """The shard as local_dir/<name>.index + local_dir/<name>.ivfdata; returns the index."""
    f = faiss()
    index = read_index(store, wd.trained, no_search_flags())
    q = quantizer_bytes(index)
    fetched = os.path.join(local_dir, "parts")
    os.makedirs(fetched, exist_ok=True)
    parts = []
    for i, rel in enumerate(rels):
        path = store.path(rel) if store.local else os.path.join(fetched, f"{i:06d}.index")
        if not store.local:
            store.fs.get_file(store.path(rel), path)
        sub, lists = open_mmapped(path)
        if quantizer_bytes(sub) != q:
            raise _mismatch(store, rel, wd)
        parts.append(lists)
    iv = ivf(index)
    ondisk = f.OnDiskInvertedLists(iv.nlist, iv.code_size, os.path.join(local_dir, f"{name}.ivfdata"))
    vec = f.InvertedListsPtrVector()
    for lists in parts:
        vec.push_back(lists)
    with faiss_quiet():
        n = ondisk.merge_from_multiple(vec.data(), vec.size(), False, False)
    iv.replace_invlists(ondisk, True)
    ondisk.this.disown()
    iv.ntotal = n
    set_ntotal(index, n)
    del parts, vec
    shutil.rmtree(fetched, ignore_errors=True)
    return index


def ram_budget_exceeded(in_bytes: int, budget: int) -> bool:
    """A shard goes on disk when the sub-indexes it is merged from add up to more than the budget."""
    return in_bytes > budget


def merge_shard(store: Store, wd: WorkDir, parts: list[int], s: int, expected: list[int], ondisk: bool) -> dict:
    """Shard s from add/part-N/shard-s.index for N in parts, checked against expected: the digest
    (count, sum, sum) of the ids the parts added to it. Commits shards/shard-s.index.json."""
    out = wd.shard(s)
    if store.exists(wd.shard_record(s)):
        return {**json.loads(store.read_text(wd.shard_record(s))), "reused": True}
    t0 = time.time()
    rels = [wd.part_shard(p, s) for p in parts]
    with MemoryWatch() as mem:
        data = _merge_on_disk(store, wd, rels, s, expected) if ondisk else _merge_in_ram(store, wd, rels, s, expected)
    info = FileInfo(file=f"{shard_name(s)}.index", sha256=store.sha256(out), bytes=store.size(out),
                    ntotal=int(expected[0]), **data)
    done = {**info.model_dump(), "seconds": time.time() - t0, "ondisk": ondisk, **mem.record()}
    store.write_text(wd.shard_record(s), json.dumps(done))
    return {**done, "reused": False}


def _merge_in_ram(store: Store, wd: WorkDir, rels: list[str], s: int, expected) -> dict:
    """Writes shards/shard-s.index; nothing more to record."""
    index = merge_in_ram(store, wd, rels)
    _check(index, expected, s, store, wd)
    write_index(store, wd.shard(s), index)
    return {}


def _merge_on_disk(store: Store, wd: WorkDir, rels: list[str], s: int, expected) -> dict:
    """Writes shards/shard-s.index and .ivfdata; returns the .ivfdata's FileInfo fields."""
    out, data_rel, name = wd.shard(s), wd.shard_data(s), shard_name(s)
    # Local store: build in a scratch dir beside the output, then rename (same filesystem).
    tmp = (os.path.join(os.path.dirname(store.path(out)), f"tmp-{uuid.uuid4().hex[:8]}") if store.local
           else tempfile.mkdtemp(prefix="shardex-merge-"))
    os.makedirs(tmp, exist_ok=True)
    try:
        index = merge_on_disk(store, wd, rels, tmp, name)
        _check(index, expected, s, store, wd)
        with faiss_quiet():
            faiss().write_index(index, os.path.join(tmp, f"{name}.index"))
        del index
        _move(store, os.path.join(tmp, f"{name}.ivfdata"), data_rel)
        _move(store, os.path.join(tmp, f"{name}.index"), out)  # last: the .index names its .ivfdata
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"ivfdata": f"{name}.ivfdata", "ivfdata_sha256": store.sha256(data_rel),
            "ivfdata_bytes": store.size(data_rel)}


merge_task = ray.remote(max_retries=3)(merge_shard)


def _move(store: Store, local_path: str, rel: str) -> None:
    """A finished local file into the store: renamed on a local store (same filesystem), uploaded to S3."""
    if store.local:
        os.replace(local_path, store.path(rel))
    else:
        store.put_file(local_path, rel)


def _check(index, expected, s: int, store: Store, wd: WorkDir) -> None:
    """ntotal and the id digest of the merged shard against what its parts added."""
    got = index_digest(index)
    if index.ntotal != expected[0] or got != tuple(expected):
        what = "other ids than" if index.ntotal == expected[0] == got[0] else f"{index.ntotal} vectors, not"
        raise IntegrityError(f"shard {s}: merged {what} the {expected[0]} its parts added; the part indexes "
                             f"under {store.uri(wd.root)} are stale or damaged: delete them and rebuild")


def open_merged(store: Store, wd: WorkDir, s: int, local_dir: str | None = None):
    """A merged shard in the work dir, for tune: in RAM, or mmapped when merged on disk."""
    return open_shard_file(store, wd.shards, shard_info(store, wd, s), local_dir)


def expected_digest(added: list[dict], s: int) -> list[int]:
    return list(sum_digests(a["digests"][s] for a in added))
