"""compact: a shard's segments (base, deltas, dead set) rewritten into one new base, without re-encoding.

The live entries of every segment (the base's lists, each delta's rows, less the dead keys) keep
their codes: they are written as one add unit's payload (work/<run>/add/compact-s/), in section s,
and the build's own merge (build/merge.py: in RAM or on disk by --merge-ram-budget) turns it into
versions/<v>/shard-s.index, checked against the ids' digest. So a compacted shard is byte for byte
the kind of shard a build merges, and its search equals the segmented one's (tests/test_segments.py).
"""
from __future__ import annotations

import json

import numpy as np
import ray

from index_builder.build import payload
from index_builder.build.merge import merge_shard
from index_builder.shard_math import ids_digest
from index_builder.workdir import WorkDir
from shards.errors import IntegrityError
from shards.raytools import TASK_RETRIES
from shards.storage import segments
from shards.storage.faissio import faiss, index_ids, ivf, load_shard
from shards.storage.manifest import Manifest, ShardInfo
from shards.storage.store import Store


def unit_name(s: int) -> str:
    return f"compact-{s:05d}"


def due(sh: ShardInfo, max_share: float, max_deltas: int) -> str | None:
    """Why shard sh is compacted now (its deltas hold more than max_share of its base's live entries,
    or it has more than max_deltas of them), or None."""
    if not sh.deltas:
        return None
    n = sum(d.ntotal or 0 for d in sh.deltas)
    base = max(1, (sh.ntotal or 0))
    if len(sh.deltas) > max_deltas:
        return f"{len(sh.deltas)} delta segments (more than {max_deltas})"
    if n > max_share * base:
        return f"its deltas hold {n:,} vectors, {n / base:.1%} of its base (more than {max_share:.0%})"
    return None


def base_entries(index, dead: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lists, ids, codes) of a base's entries whose id is not dead, list by list (lists may be mmapped)."""
    f, iv = faiss(), ivf(index)
    inv, c, out = iv.invlists, iv.code_size, []
    for l in range(iv.nlist):
        n = inv.list_size(l)
        if not n:
            continue
        pi, pc = inv.get_ids(l), inv.get_codes(l)
        try:
            ids = f.rev_swig_ptr(pi, n).copy()
            codes = f.rev_swig_ptr(pc, n * c).copy().reshape(n, c)
        finally:
            inv.release_ids(l, pi)
            inv.release_codes(l, pc)
        keep = ~np.isin(ids, dead)
        out.append((np.full(int(keep.sum()), l, np.int32), ids[keep], codes[keep]))
    if not out:
        return np.empty(0, np.int32), np.empty(0, np.int64), np.empty((0, c), np.uint8)
    return tuple(np.concatenate(a) for a in zip(*out))


def live_entries(store: Store, m: Manifest, s: int, base) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lists, ids, codes) of every live entry of shard s of m: its base's, then its deltas'."""
    sh = m.shards[s]
    dead = segments.read_dead(store, m, sh)
    parts = [base_entries(base, dead[dead >= 0])]
    for d in sh.deltas:
        h, L, ids, codes = segments.read_delta(store, m, d)
        keep = ~np.isin(segments.keys(h["first"], h["n"]), dead)
        parts.append((L[keep], ids[keep], codes[keep]))
    return tuple(np.concatenate(a) for a in zip(*parts))


def live_ids(store: Store, m: Manifest, s: int) -> np.ndarray:
    """The ids of shard s's live entries in m, sorted (its base's ids not dead, its deltas' live ones)."""
    sh = m.shards[s]
    dead = segments.read_dead(store, m, sh)
    ids = index_ids(load_shard(store, m, sh))
    parts = [ids[~np.isin(ids, dead[dead >= 0])]]
    for d in sh.deltas:
        h, _, di, _ = segments.read_delta(store, m, d)
        parts.append(di[~np.isin(segments.keys(h["first"], h["n"]), dead)])
    return np.sort(np.concatenate(parts))


@ray.remote(**TASK_RETRIES)
def compact_task(store: Store, wd: WorkDir, m: Manifest, s: int, ondisk: bool) -> dict:
    """Shard s of m as one new base in wd's version; the merge's record (FileInfo fields, digest)."""
    if store.exists(wd.shard_record(s)):
        return {**json.loads(store.read_text(wd.shard_record(s))), "reused": True}
    sh = m.shards[s]
    unit = unit_name(s)
    if not store.exists(wd.unit_done(unit)):
        base = load_shard(store, m, sh)
        L, ids, codes = live_entries(store, m, s, base)
        del base
        if len(ids) != sh.live:
            raise IntegrityError(f"{store.uri(m.path(sh.file))}: {len(ids)} live entries in its segments, "
                                 f"the manifest says {sh.live}")
        fp, S = payload.fingerprint(store.read_bytes(wd.trained)), len(m.shards)
        payload.write(store, wd.unit_payload(unit), fp, m.index.nlist, np.full(len(ids), s, np.int64), S, L, ids,
                      codes)
        store.write_text(wd.unit_done(unit), json.dumps({"unit": unit, "vectors": len(ids), "fingerprint": fp,
                                                         "digest": list(ids_digest(ids))}))
    done = json.loads(store.read_text(wd.unit_done(unit)))
    return merge_shard(store, wd, [unit], s, s, (0, m.index.nlist), done["digest"], ondisk)

