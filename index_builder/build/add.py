"""add: one Ray task per add unit, encoding its vectors with the trained index into one payload file.

An add unit is a bounded number of vectors (--add-rows) cut from consecutive embeddings parts
(shard_math.add_units), however small or large the parts are. Its task reads the trained index
once, encodes the unit's vectors (IVF list and codes, build/payload.py) and writes them, sorted by
serving shard and list, to work/<run>/add/<unit>/payload.bin: no copy of the trained index is
written per unit or per shard. With IVF lists it records the list of every row of its pieces
(build/rowlists.py), where a reindex finds the lists of the entries it marks dead. --sharding ivf
records the unit's list sizes too (sizes.npy), which tasks sum into the list ranges of the shards
(sum_sizes).

done.json (the commit, written last) holds the vector count, per shard the count and a digest of
the ids (hash sharding; ivf only knows its shards once the ranges are cut), the digest of all ids,
and the trained index's fingerprint, which the merge checks every payload against.
Memory: one unit's vectors and codes. Every path is the WorkDir's (index_builder/workdir.py).
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
import ray

from index_builder.build import payload, rowlists
from index_builder.encode.parts import read_origin, read_vectors
from index_builder.encode.reuse import KEPT
from index_builder.eval.measures import part_topk
from index_builder.shard_math import hash_shard, ids_digest
from index_builder.workdir import WorkDir
from shards.raytools import TASK_RETRIES
from shards.storage.faissio import faiss, from_bytes, nlist, no_search_flags
from shards.storage.store import Store

SUM_FANIN = 64  # units' list sizes summed per task


def part_ground_truth(store: Store, wd: WorkDir, unit: str, ids: np.ndarray, x: np.ndarray, metric: str,
                      k: int) -> None:
    """Exact top-(k+1) of tune's queries among this unit's vectors, while they are in memory: tune
    merges the units' answers instead of reading the whole corpus again."""
    if not store.exists(wd.queries):
        return
    q = np.load(io.BytesIO(store.read_bytes(wd.queries)))
    D, I = part_topk(q["xq"], ids, x, k + 1, metric)
    buf = io.BytesIO()
    np.savez(buf, D=D, I=I)
    store.write_bytes(wd.unit_gt(unit), buf.getvalue())


def read_unit(store: Store, pieces: list, changed_only: bool = False) -> list[tuple]:
    """(ids, x, rows to add) of each of a unit's pieces: (embeddings part, first row, stop row) each.
    changed_only (a reindex's delta): only the rows whose origin is new or changed are added."""
    got = [read_vectors(store, rel, a, b) for rel, a, b in pieces]
    if changed_only:
        return [(i, x, read_origin(store, rel, a, b) != KEPT) for (i, x), (rel, a, b) in zip(got, pieces)]
    return [(i, x, np.ones(len(i), bool)) for i, x in got]


def write_rowlists(store: Store, trained, tfp: str, pieces: list, got: list, lists: np.ndarray) -> None:
    """Each piece's record of the list of every row (build/rowlists.py): the added rows' from their
    encoding, the kept rows' (a reindex's) assigned now with the same quantizer."""
    at = 0
    for (rel, a, _), (_, x, k) in zip(pieces, got):
        L = np.empty(len(k), np.int32)
        L[k] = lists[at:at + int(k.sum())]
        if not k.all():
            L[~k] = payload.lists_of(trained, x[~k])
        at += int(k.sum())
        rowlists.write(store, rel, tfp, a, L)


@ray.remote(**TASK_RETRIES)
def add_task(store: Store, wd: WorkDir, unit: str, pieces: list, *, shards: int, sharding: str, metric: str,
             k: int, changed_only: bool = False) -> dict:
    """Encodes the unit's pieces with wd's trained index into its payload; k: tune's k, for gt.npz.
    changed_only: a reindex's delta, of the rows it encoded or found new."""
    if store.exists(wd.unit_done(unit)):
        return {**json.loads(store.read_text(wd.unit_done(unit))), "reused": True}
    faiss().omp_set_num_threads(1)
    t0 = time.time()
    raw = store.read_bytes(wd.trained)
    fp, trained = payload.fingerprint(raw), from_bytes(raw, no_search_flags())
    del raw
    got = read_unit(store, pieces, changed_only)
    ids, x = np.concatenate([i[k] for i, _, k in got]), np.concatenate([x[k] for _, x, k in got])
    part_ground_truth(store, wd, unit, ids, x, metric, k)
    lists, codes = payload.encode(trained, x)
    del x
    nl = nlist(trained) or 1
    if nlist(trained):
        write_rowlists(store, trained, fp, pieces, got, lists)
    del got
    done = {"unit": unit, "vectors": len(ids), "digest": list(ids_digest(ids)), "fingerprint": fp,
            "code_size": int(codes.shape[1])}
    if sharding == "ivf":
        sh, S = np.zeros(len(ids), np.int64), 1
        buf = io.BytesIO()
        np.save(buf, np.bincount(lists, minlength=nl).astype(np.int64))
        store.write_bytes(wd.unit_sizes(unit), buf.getvalue())
    else:
        sh, S = hash_shard(ids, shards), shards
        done["counts"] = np.bincount(sh, minlength=S).tolist()
        done["digests"] = [list(ids_digest(ids[sh == s])) for s in range(S)]
    done["bytes"] = payload.write(store, wd.unit_payload(unit), fp, nl, sh, S, lists, ids, codes)
    done["seconds"] = time.time() - t0
    store.write_text(wd.unit_done(unit), json.dumps(done))
    return {**done, "reused": False}


@ray.remote(**TASK_RETRIES)
def sum_sizes_task(store: Store, rels: list[str]) -> np.ndarray:
    """The list sizes of several units, summed: the driver never holds one array per unit."""
    total = None
    for rel in rels:
        n = np.load(io.BytesIO(store.read_bytes(rel)))
        total = n if total is None else total + n
    return total


def sum_sizes(store: Store, wd: WorkDir, units: list[str]) -> np.ndarray:
    """Every unit's list sizes summed by tasks of SUM_FANIN units each."""
    rels = [wd.unit_sizes(u) for u in units]
    refs = [sum_sizes_task.options(num_cpus=0.5).remote(store, rels[a:a + SUM_FANIN])
            for a in range(0, len(rels), SUM_FANIN)]
    total = None
    for r in refs:  # one partial sum in memory at a time
        n = ray.get(r)
        total = n if total is None else total + n
    return total
