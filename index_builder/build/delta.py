"""delta: one serving shard's delta segment from a reindex's add units (shards/storage/segments.py).

A reindex that keeps the quantizer adds only its new and changed vectors; their add units'
payloads hold them by (shard, list) as a build's do. This task reads shard s's rows of every unit
(its section with hash sharding, its list range with ivf), checks each payload's fingerprint
against the kept trained index, and writes them as one segment file in the version, numbered
from `first`. Its record (work/<run>/shards/shard-s.delta.json, the commit) holds the FileInfo
fields, the vectors per list, and the ids' digest.
"""
from __future__ import annotations

import json

import numpy as np
import ray

from index_builder.build.merge import Sources
from index_builder.build.payload import Payload
from index_builder.shard_math import ids_digest
from index_builder.workdir import WorkDir, shard_name
from shards.errors import IntegrityError
from shards.raytools import TASK_RETRIES
from shards.storage import segments
from shards.storage.store import Store


def delta_record(wd: WorkDir, s: int) -> str:
    return f"{wd.legacy_shards}/{shard_name(s)}.delta.json"


def delta_name(s: int, first: int) -> str:
    return f"{shard_name(s)}.delta-{first}.seg"


@ray.remote(**TASK_RETRIES)
def delta_task(store: Store, wd: WorkDir, units: list[str], s: int, section: int, lists: tuple[int, int] | None,
               fp: str, first: int, nlist: int) -> dict:
    """Shard s's delta segment in wd's version, entries numbered from first; its record."""
    rec = delta_record(wd, s)
    if store.exists(rec):
        return {**json.loads(store.read_text(rec)), "reused": True}
    pays = [Payload(store, wd.unit_payload(u)) for u in units]
    for p in pays:
        p.check(fp)
    a, b = lists if lists is not None else (0, nlist)  # ivf: the shard's list range of section 0
    L, ids, codes = Sources(pays, section, a, b).read(a, b)  # the merge's reader: rows by list
    L, ids = L.astype(np.int32), ids.astype(np.int64)
    if (ids < 0).any():
        raise IntegrityError(f"{store.uri(wd.root)}: a delta of shard {s} holds a negative id")
    name = f"{wd.shards}/{delta_name(s, first)}"
    w = store.write_bytes(name, segments.to_bytes(fp, nlist, first, L, ids, codes))
    out = {"file": name, "sha256": w.sha256, "bytes": w.bytes, "ntotal": len(ids), "first": first,
           "counts": np.bincount(L, minlength=nlist).tolist(), "digest": list(ids_digest(ids))}
    store.write_text(rec, json.dumps(out))
    return {**out, "reused": False}
