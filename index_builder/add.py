"""add: one Ray task per embeddings part; each writes one sub-index per serving shard.

work/<run>/add/part-N/shard-s.index for each s, then done.json (the commit)
with the vector count per shard.
"""
from __future__ import annotations

import json
import time

import numpy as np
import ray

from shards.faissio import faiss, read_index, write_index
from shards.store import Store

from .encode import read_vectors
from .shard_math import hash_shard


def part_dir(work: str, part: int) -> str:
    return f"{work}/add/part-{part:05d}"


@ray.remote(max_retries=3)
def add_task(store: Store, trained_rel: str, emb_rel: str, part: int, S: int, work: str) -> dict:
    out = part_dir(work, part)
    if store.exists(f"{out}/done.json"):
        return {**json.loads(store.read_text(f"{out}/done.json")), "reused": True}
    faiss().omp_set_num_threads(1)
    t0 = time.time()
    trained = read_index(store, trained_rel)
    ids, x = read_vectors(store, emb_rel)
    sh = hash_shard(ids, S)
    counts = []
    for s in range(S):
        m = sh == s
        index = faiss().clone_index(trained)
        index.add_with_ids(x[m], ids[m])
        write_index(store, f"{out}/shard-{s}.index", index)
        counts.append(int(m.sum()))
    done = {"part": part, "counts": counts, "seconds": time.time() - t0}
    store.write_text(f"{out}/done.json", json.dumps(done))
    return {**done, "reused": False}
