"""add: one Ray task per embeddings part, adding its vectors to copies of the trained index.

--sharding hash: the part's vectors go to one sub-index per serving shard, by id hash:
  work/<run>/add/part-N/shard-s.index
--sharding ivf: the shard of a vector depends on its IVF list and on ranges that need every
  part's list sizes, so the part goes to one index (all.index) and its list assignments are
  recorded (lists.parquet: id, list); split_task cuts it by range once the ranges are known.

done.json (the commit, written last) holds per shard the vector count, the bytes of the
sub-index and a digest of the ids that went in, which merge checks the merged shard against.
Memory: one part's vectors plus its sub-indexes; vectors are added in chunks of CHUNK.
Every path is the WorkDir's (index_builder/workdir.py).
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pyarrow as pa
import ray

from index_builder.encode.parts import read_vectors
from index_builder.eval.measures import part_topk
from index_builder.shard_math import hash_shard, ids_digest, range_shard
from index_builder.workdir import WorkDir
from shards.errors import IntegrityError
from shards.storage.faissio import faiss, ivf, nlist, no_search_flags, pretransform, read_index, set_ntotal, to_bytes
from shards.storage.store import Store

CHUNK = 1 << 16  # vectors per faiss add call: bounds the add's temporary buffers


def add_assigned(index, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """add_with_ids in chunks, returning the IVF list of every vector. The assignment is
    computed here (pre-transform, then the quantizer, as IndexIVF.add_with_ids does) and given
    to add_core, so the record of which list each id went to does not come from the lists."""
    f, iv = faiss(), ivf(index)
    lists = np.empty(len(x), dtype=np.int64)
    for a in range(0, len(x), CHUNK):
        xt = np.ascontiguousarray(pretransform(index, x[a:a + CHUNK]))
        xi = np.ascontiguousarray(ids[a:a + CHUNK], dtype=np.int64)
        _, L = iv.quantizer.search(xt, 1)
        lists[a:a + len(xt)] = L[:, 0]
        iv.add_core(len(xt), f.swig_ptr(xt), f.swig_ptr(xi), f.swig_ptr(np.ascontiguousarray(L[:, 0])))
    set_ntotal(index, iv.ntotal)
    return lists


def add_chunked(index, x: np.ndarray, ids: np.ndarray) -> None:
    for a in range(0, len(x), CHUNK):
        index.add_with_ids(x[a:a + CHUNK], ids[a:a + CHUNK])


def _write(store: Store, rel: str, index) -> int:
    data = to_bytes(index)
    store.write_bytes(rel, data)
    return len(data)


def part_ground_truth(store: Store, wd: WorkDir, part: int, ids: np.ndarray, x: np.ndarray, metric: str,
                      k: int) -> None:
    """Exact top-(k+1) of tune's queries among this part's vectors, while they are in memory: tune
    merges the parts' answers instead of reading the whole corpus again."""
    if not store.exists(wd.queries):
        return
    q = np.load(io.BytesIO(store.read_bytes(wd.queries)))
    D, I = part_topk(q["xq"], ids, x, k + 1, metric)
    buf = io.BytesIO()
    np.savez(buf, D=D, I=I)
    store.write_bytes(wd.part_gt(part), buf.getvalue())


@ray.remote(max_retries=3)
def add_task(store: Store, wd: WorkDir, emb_rel: str, part: int, *, shards: int, sharding: str, metric: str,
             k: int) -> dict:
    """Adds embeddings part `part` (emb_rel) to copies of wd's trained index; k: tune's k, for gt.npz."""
    if store.exists(wd.part_done(part)):
        return {**json.loads(store.read_text(wd.part_done(part))), "reused": True}
    faiss().omp_set_num_threads(1)
    t0 = time.time()
    trained = read_index(store, wd.trained, no_search_flags())
    ids, x = read_vectors(store, emb_rel)
    done = {"part": part, "vectors": len(ids), "digest": list(ids_digest(ids))}
    part_ground_truth(store, wd, part, ids, x, metric, k)
    if sharding == "ivf":
        done.update(_add_whole(store, wd, part, trained, ids, x))
    else:
        done.update(_add_by_hash(store, wd, part, trained, ids, x, shards))
    done["seconds"] = time.time() - t0
    store.write_text(wd.part_done(part), json.dumps(done))
    return {**done, "reused": False}


def _add_whole(store: Store, wd: WorkDir, part: int, trained, ids: np.ndarray, x: np.ndarray) -> dict:
    """--sharding ivf: all.index and the record of lists, for split_task to cut once the ranges are known."""
    index = faiss().clone_index(trained)
    lists = add_assigned(index, x, ids)
    store.write_table(wd.part_lists(part), pa.table({"id": ids, "list": lists.astype(np.int32)}))
    return {"list_sizes": np.bincount(lists, minlength=nlist(trained)).tolist(),
            "bytes_all": _write(store, wd.part_all(part), index)}


def _add_by_hash(store: Store, wd: WorkDir, part: int, trained, ids: np.ndarray, x: np.ndarray, S: int) -> dict:
    sh = hash_shard(ids, S)
    counts, sizes, digests = [], [], []
    for s in range(S):
        m = sh == s
        index = faiss().clone_index(trained)
        add_chunked(index, x[m], ids[m])
        sizes.append(_write(store, wd.part_shard(part, s), index))
        counts.append(int(m.sum()))
        digests.append(list(ids_digest(ids[m])))
    return {"counts": counts, "bytes": sizes, "digests": digests}


@ray.remote(max_retries=3)
def split_task(store: Store, wd: WorkDir, part: int, ranges: list[list[int]]) -> dict:
    """--sharding ivf: cut a part's all.index into one sub-index per list range. The digest of
    each shard's ids comes from the add's record of lists, not from the index being cut."""
    marker = wd.part_split(part)
    if store.exists(marker):
        done = json.loads(store.read_text(marker))
        if done["ranges"] == ranges:
            return {**done, "reused": True}
    faiss().omp_set_num_threads(1)
    t0 = time.time()
    trained = read_index(store, wd.trained, no_search_flags())
    whole = read_index(store, wd.part_all(part), no_search_flags())
    rec = store.read_table(wd.part_lists(part))
    ids, sh = rec.column("id").to_numpy(), range_shard(rec.column("list").to_numpy(), ranges)
    counts, sizes, digests = [], [], []
    for s, (a, b) in enumerate(ranges):
        sub = faiss().clone_index(trained)
        ivf(whole).copy_subset_to(ivf(sub), faiss().InvertedLists.SUBSET_TYPE_INVLIST, a, b)
        set_ntotal(sub, ivf(sub).ntotal)
        sizes.append(_write(store, wd.part_shard(part, s), sub))
        counts.append(int(sub.ntotal))
        digests.append(list(ids_digest(ids[sh == s])))
    want = [d[0] for d in digests]
    if counts != want or sum(counts) != whole.ntotal:
        raise IntegrityError(f"{store.uri(wd.part_all(part))}: cut by list range into {counts} vectors, its record "
                             f"of lists says {want}; delete {store.uri(wd.part(part))} and rebuild")
    done = {"part": part, "ranges": ranges, "counts": counts, "bytes": sizes, "digests": digests,
            "seconds": time.time() - t0}
    store.write_text(marker, json.dumps(done))
    return {**done, "reused": False}
