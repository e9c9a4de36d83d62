"""merge: the part sub-indexes of one serving shard into that shard, checked.

Every merge checks that each part was trained from the same quantizer, and
that the merged shard holds exactly the ids that were added to it.
"""
from __future__ import annotations

import json
import time

import numpy as np
import ray

from shards.errors import IntegrityError
from shards.faissio import faiss, index_ids, quantizer_bytes, read_index, write_index
from shards.manifest import FileInfo
from shards.store import Store

from .add import part_dir
from .shard_math import hash_shard


def shard_rel(work: str, s: int) -> str:
    return f"{work}/shards/shard-{s}.index"


def expected_ids(store: Store, emb_rels: list[str], s: int, S: int) -> np.ndarray:
    ids = np.concatenate([store.read_table(r, columns=["id"]).column("id").to_numpy() for r in emb_rels])
    return np.sort(ids[hash_shard(ids, S) == s])


@ray.remote(max_retries=3)
def merge_task(store: Store, trained_rel: str, work: str, parts: list[int], emb_rels: list[str],
               s: int, S: int) -> dict:
    out = shard_rel(work, s)
    if store.exists(out + ".json"):
        return {**json.loads(store.read_text(out + ".json")), "reused": True}
    t0 = time.time()
    index = read_index(store, trained_rel)
    q = quantizer_bytes(index)
    for p in parts:
        rel = f"{part_dir(work, p)}/shard-{s}.index"
        sub = read_index(store, rel)
        if quantizer_bytes(sub) != q:
            raise IntegrityError(f"{store.uri(rel)}: trained with a different quantizer than {trained_rel}; "
                                 f"delete {store.uri(work)} and rebuild")
        index.merge_from(sub, 0)  # add_id=0: keep the ids the part was added with
    want = expected_ids(store, emb_rels, s, S)
    got = np.sort(index_ids(index))
    if index.ntotal != len(want) or not np.array_equal(got, want):
        raise IntegrityError(f"shard {s}: merged {index.ntotal} vectors, expected {len(want)} "
                             f"with the ids of its parts; the part indexes under {store.uri(work)} are stale")
    write_index(store, out, index)
    info = FileInfo(file=f"shard-{s}.index", sha256=store.sha256(out), bytes=store.size(out),
                    ntotal=int(index.ntotal))
    done = {**info.model_dump(), "seconds": time.time() - t0}
    store.write_text(out + ".json", json.dumps(done))
    return {**done, "reused": False}
