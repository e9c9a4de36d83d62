"""diff: what a reindex found (new, changed, deleted, unchanged), in tasks over hash buckets of ids.

The ids to compare are those of the files that changed or went: the live version's parts of them
(`old`) and the parts this run wrote for them (`new`, with their origin column). Parts of unchanged
files hold the same documents as before and are not read. One task per part reads its ids and
splits them into hash buckets (plan/ids.py's); one task per bucket finds the ids deleted (in old,
not in new) and changed (origin CHANGED). The driver receives counts, and the ids that are gone
(changed or deleted) grouped by the old part that holds them: what the dead sets and the drift
check need, O(what changed), never the ids of every document.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import ray

from index_builder.encode.reuse import CHANGED, NEW, ORIGIN
from index_builder.plan.ids import bucket_of, buckets_for
from shards.raytools import TASK_RETRIES, cluster_cpus, ray_get
from shards.storage.store import Store


@dataclass
class Old:
    """Where the live ids of the changed and removed files are: `sources`, files with an id column
    (the live embeddings parts of those files, or every docs file when the live vectors are gone:
    `missing` says why), and `parts`, the live parts whose vectors a reindex may reuse."""

    sources: list[str]
    parts: list[str]
    missing: str | None = None


@dataclass
class Diff:
    new: int
    changed: int
    deleted: int
    unchanged: int
    gone: dict[int, np.ndarray] = field(default_factory=dict)  # old source -> its ids changed or deleted

    @property
    def gone_ids(self) -> np.ndarray:
        return np.concatenate(list(self.gone.values())) if self.gone else np.empty(0, np.int64)


@ray.remote(**TASK_RETRIES)
def split_task(store: Store, rel: str, src: int, nb: int) -> tuple:
    """nb buckets of [n, 2] int64 rows of part rel: (id, src) for an old source (src >= 0: its number),
    (id, origin) for a part this run wrote (src < 0)."""
    t = store.read_table(rel, columns=["id", ORIGIN] if src < 0 else ["id"])
    ids = t.column("id").to_numpy().astype(np.int64)
    tag = t.column(ORIGIN).to_numpy().astype(np.int64) if src < 0 else np.full(len(ids), src, np.int64)
    rec = np.stack([ids, tag], axis=1) if len(ids) else np.empty((0, 2), np.int64)
    b = bucket_of(rec[:, 0], nb)
    o = np.argsort(b, kind="stable")
    out = tuple(np.split(rec[o], np.searchsorted(b[o], np.arange(1, nb))))
    return out if nb > 1 else out[0]


@ray.remote(**TASK_RETRIES)
def bucket_task(n_old: int, *pieces: np.ndarray) -> dict:
    """One bucket: pieces are the old parts' (id, src), then the new parts' (id, origin)."""
    empty = np.empty((0, 2), np.int64)
    old = np.concatenate(pieces[:n_old]) if n_old else empty
    new = np.concatenate(pieces[n_old:]) if len(pieces) > n_old else empty
    changed = np.isin(old[:, 0], new[new[:, 1] == CHANGED, 0])
    deleted = ~np.isin(old[:, 0], new[:, 0])
    return {"new": int((new[:, 1] == NEW).sum()), "changed": int((new[:, 1] == CHANGED).sum()),
            "deleted": int(deleted.sum()), "gone": old[changed | deleted]}


def diff(store: Store, old: Old, emb: list[str], total: int) -> Diff:
    """What the reindex found (see above); emb: the parts this run wrote (every part when the live vectors
    are gone), total: the rows of every part of the new corpus."""
    jobs = [(rel, i) for i, rel in enumerate(old.sources)] + [(rel, -1) for rel in emb]
    if not jobs:
        return Diff(0, 0, 0, total)
    nb = max(buckets_for(sum(_rows(store, rel) for rel, _ in jobs)), min(cluster_cpus(), len(jobs)))
    split = split_task.options(num_cpus=1, num_returns=nb)
    refs = [split.remote(store, rel, src, nb) for rel, src in jobs]
    refs = [[r] if nb == 1 else r for r in refs]
    task = bucket_task.options(num_cpus=1)
    got = ray_get([task.remote(len(old.sources), *[r[b] for r in refs]) for b in range(nb)])
    del refs
    gone = np.concatenate([g["gone"] for g in got])
    by = {int(s): np.sort(gone[gone[:, 1] == s, 0]) for s in np.unique(gone[:, 1])}
    n, c = sum(g["new"] for g in got), sum(g["changed"] for g in got)
    return Diff(new=n, changed=c, deleted=sum(g["deleted"] for g in got), unchanged=total - n - c, gone=by)


def _rows(store: Store, rel: str) -> int:
    """A Parquet file's rows, from its footer."""
    import pyarrow.parquet as pq

    with store.open(rel) as f:
        return pq.ParquetFile(f).metadata.num_rows
