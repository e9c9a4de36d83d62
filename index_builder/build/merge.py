"""merge: one serving shard from the add units' payloads, each list allocated once, checked.

A shard is a section of every unit's payload (hash sharding) or a range of IVF lists of it (ivf
sharding). The merge reads each unit's list numbers for its rows once, sums the list sizes, then
fills the lists a batch of lists at a time (ranged reads of only those rows, BATCH_BYTES at most in
memory besides the shard): every list receives all its entries in one call, so it is allocated
once at its final size.

In RAM when the shard's payload fits --merge-ram-budget: the trained index's own lists are
filled (fast-scan lists packed into blocks here). On disk otherwise: an OnDiskInvertedLists file
sized exactly from the summed sizes, each list written at its offset, so RAM holds one batch,
not the shard. The shard is then shard-s.index (quantizer, codebooks and list offsets) plus
shard-s.ivfdata, served by mmap.

Every payload must carry the fingerprint of this build's trained index, and the merged shard
must hold exactly the ids its payloads hold (count, and the id digest the add recorded).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid

import numpy as np
import ray

from index_builder.build import payload
from index_builder.build.memwatch import MemoryWatch
from index_builder.shard_math import ids_digest, sum_digests
from index_builder.workdir import WorkDir, shard_name
from shards.errors import IntegrityError
from shards.raytools import TASK_RETRIES
from shards.storage.faissio import (
    faiss,
    faiss_quiet,
    from_bytes,
    ivf,
    no_search_flags,
    open_shard_file,
    set_ntotal,
    to_bytes,
    write_index,
)
from shards.storage.integrity import file_sha256
from shards.storage.manifest import FileInfo
from shards.storage.store import Store

BATCH_BYTES = 256 << 20  # payload bytes of one batch of lists in memory at once


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


def ram_budget_exceeded(in_bytes: int, budget: int) -> bool:
    """A shard goes on disk when its payload (ids and codes) is more than the budget."""
    return in_bytes > budget


class Sources:
    """The rows of shard s in lists [a, b) of every unit's payload: their sizes per list, and
    batches of them read by ranged reads."""

    def __init__(self, pays: list[payload.Payload], section: int, a: int, b: int):
        self.pays, self.a, self.b = pays, a, b
        self.spans, self.sizes = [], np.zeros(b - a, np.int64)
        for p in pays:
            r0, r1 = p.section(section)
            L = p.lists(r0, r1)
            lo, hi = np.searchsorted(L, [a, b])
            self.spans.append((r0 + int(lo), L[lo:hi]))
            self.sizes += np.bincount(L[lo:hi] - a, minlength=b - a)

    def batches(self, c: int) -> list[tuple[int, int]]:
        """List ranges of about BATCH_BYTES of payload each (a list is never cut)."""
        rows = max(1, BATCH_BYTES // (c + 8))
        cum = np.concatenate([[0], np.cumsum(self.sizes)])
        cuts, at = [self.a], 0
        while at < len(self.sizes):
            nxt = max(at + 1, int(np.searchsorted(cum, cum[at] + rows, side="right")) - 1)
            cuts.append(self.a + nxt)
            at = nxt
        return list(zip(cuts[:-1], cuts[1:]))

    def read(self, la: int, lb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lists, ids, codes) of lists [la, lb) from every unit, sorted by list (stable: unit order)."""
        Ls, Is, Cs = [], [], []
        for p, (r0, L) in zip(self.pays, self.spans):
            i, j = np.searchsorted(L, [la, lb])
            if j > i:
                ids, codes = p.rows(r0 + int(i), r0 + int(j))
                Ls.append(L[i:j]), Is.append(ids), Cs.append(codes)
        if not Ls:
            return np.empty(0, np.int32), np.empty(0, np.int64), np.empty((0, 0), np.uint8)
        L, I, C = np.concatenate(Ls), np.concatenate(Is), np.concatenate(Cs)
        o = np.argsort(L, kind="stable")
        return L[o], I[o], C[o]


def _pack(iv, codes: np.ndarray) -> np.ndarray:
    """A list's codes as its inverted lists store them: fast-scan packs them into blocks of nvec."""
    f, p = faiss(), iv.get_CodePacker()
    try:
        if p.nvec == 1:
            return np.ascontiguousarray(codes)
        nb = -(-len(codes) // p.nvec)
        flat = np.zeros((nb * p.nvec, codes.shape[1]), np.uint8)
        flat[:len(codes)] = codes
        out = np.zeros(nb * p.block_size, np.uint8)
        for j in range(nb):
            blk, dst = flat[j * p.nvec:], out[j * p.block_size:]
            p.pack_all(f.swig_ptr(blk), f.swig_ptr(dst))
        return out
    finally:
        del p


def fill(index, src: Sources, ondisk_path: str | None = None) -> int:
    """Fill index's lists [a, b) from src, each list once; on disk: an exactly sized .ivfdata. Returns n."""
    f, iv = faiss(), ivf(index)
    if iv is None:  # a flat index: one list of codes behind an IDMap
        for la, lb in src.batches(payload_code_size(src)):
            _, I, C = src.read(la, lb)
            if len(I):
                index.add_sa_codes(np.ascontiguousarray(C), np.ascontiguousarray(I))
        return int(index.ntotal)
    inv = ondisk_lists(iv, full_sizes(iv, src), ondisk_path) if ondisk_path else iv.invlists
    n = 0
    for la, lb in src.batches(int(iv.code_size)):
        L, I, C = src.read(la, lb)
        bounds = np.searchsorted(L, np.arange(la, lb + 1))
        for l in np.flatnonzero(np.diff(bounds)):
            i, j = int(bounds[l]), int(bounds[l + 1])
            ids, codes = np.ascontiguousarray(I[i:j]), C[i:j]
            if ondisk_path:
                codes = np.ascontiguousarray(codes)
                inv.update_entries(la + int(l), 0, j - i, f.swig_ptr(ids), f.swig_ptr(codes))
            else:
                codes = _pack(iv, codes)
                inv.add_entries(la + int(l), j - i, f.swig_ptr(ids), f.swig_ptr(codes))
        n += len(I)
    if ondisk_path:
        install(index, inv)
    iv.ntotal = n
    set_ntotal(index, n)
    return n


def full_sizes(iv, src: Sources) -> np.ndarray:
    sizes = np.zeros(iv.nlist, np.int64)
    sizes[src.a:src.b] = src.sizes
    return sizes


def ondisk_lists(iv, sizes: np.ndarray, path: str):
    """An OnDiskInvertedLists at path laid out exactly for sizes: list l at the sum of the lists before
    it, each holding its codes then its ids, no free space (merge_ranges writes the same layout)."""
    f = faiss()
    inv = f.OnDiskInvertedLists(iv.nlist, iv.code_size, path)
    sz = np.ascontiguousarray(sizes, dtype=np.uint64)
    inv.set_all_lists_sizes(f.swig_ptr(sz))
    total = max(int(sz.sum()) * (iv.code_size + 8), 1)
    with faiss_quiet():
        inv.update_totsize(total)
    inv.allocate_slot(total)  # the free slot update_totsize left: the lists own the whole file
    return inv


def install(index, inv) -> None:
    """index's lists replaced by inv, which the index then owns."""
    iv = ivf(index)
    iv.replace_invlists(inv, True)
    inv.this.disown()


def payload_code_size(src: Sources) -> int:
    return src.pays[0].c if src.pays else 1


def merge_shard(store: Store, wd: WorkDir, units: list[str], s: int, section: int, lists: tuple[int, int],
                expected: list[int] | None, ondisk: bool) -> dict:
    """Shard s from section `section`, lists [a, b), of every unit's payload; checked against expected,
    the digest (count, sum, sum) of the ids the add put in it (None: ivf, where the driver checks
    that the shards' digests add up to the units'). Commits shards/shard-s.index.json."""
    if store.exists(wd.shard_record(s)):
        return {**json.loads(store.read_text(wd.shard_record(s))), "reused": True}
    t0 = time.time()
    with MemoryWatch() as mem:
        index, pays = open_sources(store, wd, units)
        src = Sources(pays, section, *lists)
        ondisk = ondisk and ivf(index) is not None and ivf(index).get_CodePacker().nvec == 1
        n = int(src.sizes.sum())
        if ivf(index) is not None:
            save_sizes(store, wd, s, full_sizes(ivf(index), src))
        check = lambda ix: checked(ix, n, expected, s, store, wd)  # noqa: E731
        if ondisk:
            files, got = write_on_disk(store, wd, index, s, lambda ix, path: fill(ix, src, path), check)
        else:
            fill(index, src)
            got = check(index)
            sha, size = _write_hashed(store, wd.shard(s), index)
            files = {"sha256": sha, "bytes": size}
    return commit(store, wd, s, files, got, {"seconds": time.time() - t0, "ondisk": ondisk, **mem.record()})


merge_task = ray.remote(**TASK_RETRIES)(merge_shard)


def open_sources(store: Store, wd: WorkDir, units: list[str]):
    """(the trained index, every unit's payload), each payload checked to carry its fingerprint."""
    raw = store.read_bytes(wd.trained)
    fp, index = payload.fingerprint(raw), from_bytes(raw, no_search_flags())
    del raw
    pays = [payload.Payload(store, wd.unit_payload(u)) for u in units]
    for p in pays:
        p.check(fp)
    return index, pays


def save_sizes(store: Store, wd: WorkDir, s: int, sizes: np.ndarray) -> None:
    """Shard s's list sizes beside its record, so the list imbalance needs no shard loaded."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(sizes, np.int64))
    store.write_bytes(wd.shard_sizes(s), buf.getvalue())


def commit(store: Store, wd: WorkDir, s: int, files: dict, got, extra: dict) -> dict:
    """The merge's commit record of shard s (its FileInfo, digest and costs), written last."""
    info = FileInfo(file=f"{shard_name(s)}.index", ntotal=int(got[0]), **files)
    done = {**info.model_dump(), "digest": list(got), **extra}
    store.write_text(wd.shard_record(s), json.dumps(done))
    return {**done, "reused": False}


def _write_hashed(store: Store, rel: str, index) -> tuple[str, int]:
    """Write an index and return (sha256, bytes) of what was written, without reading it back from S3."""
    if store.local:
        write_index(store, rel, index)
        return store.sha256(rel), store.size(rel)
    data = to_bytes(index)
    store.write_bytes(rel, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def write_on_disk(store: Store, wd: WorkDir, index, s: int, filler, check) -> tuple[dict, tuple]:
    """filler(index, path) fills the shard into path as its .ivfdata; check(index) verifies it, before
    shard-s.index and .ivfdata are moved into place. Returns (both files' FileInfo fields, digest)."""
    out, data_rel, name = wd.shard(s), wd.shard_data(s), shard_name(s)
    # Local store: build in a scratch dir beside the output, then rename (same filesystem).
    tmp = (os.path.join(os.path.dirname(store.path(out)), f"tmp-{uuid.uuid4().hex[:8]}") if store.local
           else tempfile.mkdtemp(prefix="shardex-merge-"))
    os.makedirs(tmp, exist_ok=True)
    try:
        data_path, index_path = os.path.join(tmp, f"{name}.ivfdata"), os.path.join(tmp, f"{name}.index")
        filler(index, data_path)
        got = check(index)
        with faiss_quiet():
            faiss().write_index(index, index_path)
        files = {"sha256": file_sha256(index_path), "bytes": os.path.getsize(index_path),
                 "ivfdata": f"{name}.ivfdata", "ivfdata_sha256": file_sha256(data_path),
                 "ivfdata_bytes": os.path.getsize(data_path)}
        _move(store, data_path, data_rel)
        _move(store, index_path, out)  # last: the .index names its .ivfdata
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files, got


def _move(store: Store, local_path: str, rel: str) -> None:
    """A finished local file into the store: renamed on a local store (same filesystem), uploaded to S3."""
    if store.local:
        os.makedirs(os.path.dirname(store.path(rel)), exist_ok=True)
        os.replace(local_path, store.path(rel))
    else:
        store.put_file(local_path, rel)


def checked(index, n: int, expected, s: int, store: Store, wd: WorkDir) -> tuple[int, int, int]:
    """The merged shard's id digest, checked against the n rows its payloads hold and, with hash
    sharding, the digest of what the add put in it."""
    got = index_digest(index)
    want = n if expected is None else expected[0]
    if got[0] != want or got[0] != n:
        what = f"{got[0]} vectors, not"
    elif expected is not None and tuple(got) != tuple(expected):
        what = "other ids than"
    else:
        return got
    raise IntegrityError(f"shard {s}: merged {what} the {want} the add put in it; the add units under "
                         f"{store.uri(wd.root)}/add are stale or damaged: delete them and rebuild")


def open_merged(store: Store, wd: WorkDir, s: int, local_dir: str | None = None):
    """A merged shard in the work dir, for tune: in RAM, or mmapped when merged on disk."""
    return open_shard_file(store, wd.shards, shard_info(store, wd, s), local_dir)
