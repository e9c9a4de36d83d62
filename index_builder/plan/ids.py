"""plan: ids. Their int64 form (string ids hashed, integers faiss cannot hold refused), and the
corpus-wide id check, in memory bounded per task, never O(N) in the driver.

Phase 1 (`scan`, per batch of files): read the id column, report null and out-of-range rows, map
ids to int64 and partition (id, file index, row) into hash buckets of ids. Phase 2 (`repeats`, per
bucket): sort the bucket and name every repeat of an id with its first occurrence, first in (file,
row) order. A duplicate's two rows always share a bucket, so buckets are checked independently. On
Ray, phase-1 tasks hand their buckets to the phase-2 tasks as ObjectRefs: the driver holds
O(tasks x buckets) refs and O(bad rows) records, never an id. A small corpus runs both phases here,
as one bucket, so it fails in a second before Ray starts (corpus.on_ray decides, and gives the
reader of a file's id column: files are corpus.py's, which imports this module).
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import pyarrow as pa

from index_builder.config import BuildConfig
from index_builder.shard_math import mix64
from shards.errors import CorpusError
from shards.raytools import TASK_RETRIES, cluster_cpus, ensure_ray, ray_get

ID_MASK = (1 << 63) - 1  # string ids map to non-negative int64 (faiss uses -1 for "no result")
BUCKET_IDS = 16_000_000  # ids per bucket at most: its task sorts 24 bytes an id (id, file, row)
SCAN_ROWS = 1_000_000    # rows per phase-1 task: small files are batched up to it (a file is never split)
# (so a task's bucket holds about SCAN_ROWS / buckets x 24 bytes: well above Ray's 100 KB for returning
# an object inline to its owner, so the buckets stay in the object store and out of the driver)
_SALT = np.int64(0x5BD1E9955BD1E995)  # buckets independent of the hash shards (mix64(id) % shards)


def string_ids(values) -> np.ndarray:
    """Stable int64 ids for string ids: the first 8 bytes of blake2b, top bit cleared."""
    out = np.empty(len(values), dtype=np.int64)
    for i, s in enumerate(values):
        h = hashlib.blake2b(s.encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") & ID_MASK
    return out


def int_ids(col: pa.ChunkedArray | pa.Array, kind: str) -> np.ndarray:
    """The int64 ids of a column (nulls must be removed first)."""
    if kind == "str":
        return string_ids(col.to_pylist())
    return np.asarray(col.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def out_of_range(col: pa.ChunkedArray, kind: str) -> np.ndarray:
    """The rows whose integer id faiss cannot hold: negative (its -1 is "no result", so such a document
    would never be found) or above int64's range (uint64). False for nulls and string ids."""
    import pyarrow.compute as pc

    if kind != "int":
        return np.zeros(len(col), dtype=bool)
    t = col.type
    if pa.types.is_unsigned_integer(t):
        bad = pc.greater(col, pa.scalar(ID_MASK, t)) if t.bit_width == 64 else pc.less(col, pa.scalar(0, t))
    else:
        bad = pc.less(col, pa.scalar(0, t))
    return bad.fill_null(False).to_numpy(zero_copy_only=False)


@functools.cache
def remote(fn):
    """fn as a Ray task, made on first use: Ray is imported only by a plan that uses it."""
    import ray

    return ray.remote(**TASK_RETRIES)(fn)


def buckets_for(rows: int) -> int:
    return max(1, -(-rows // BUCKET_IDS))


def bucket_of(ids: np.ndarray, nb: int) -> np.ndarray:
    """The id bucket, in [0, nb), of each int64 id."""
    with np.errstate(over="ignore"):
        return (mix64(ids ^ _SALT) % np.uint64(nb)).astype(np.int64)


def batches(rows: list[int]) -> list[list[int]]:
    """File indexes in order, cut into runs of about SCAN_ROWS rows (at least one file each)."""
    out, cur, n = [], [], 0
    for fi, r in enumerate(rows):
        cur.append(fi)
        n += r
        if n >= SCAN_ROWS:
            out.append(cur)
            cur, n = [], 0
    return out + [cur] if cur else out


def range_why(value) -> str:
    return (f"id {value} out of range: integer ids must be 0 to 2**63-1 "
            "(faiss's -1 means no result); map them into that range or give string ids")


def scan(jobs: list[tuple], cfg: BuildConfig, kind: str, nb: int, first_only: bool, read) -> tuple:
    """Phase 1 over files [(file index, uri, row groups or None for all)]: (bad, *buckets). bad lists
    (file index, row, why) of the null and out-of-range rows in file and row order (only the first with
    first_only: it is the error); each of the nb buckets is an [n, 3] int64 array of (id, file index, row).
    read(uri, cfg, groups) gives the id column of those row groups (all: None) and the file rows of its
    values (None: 0, 1, ...)."""
    bad, ids, where = [], [], []
    for fi, uri, *g in jobs:
        groups = g[0] if g else None
        if groups == []:
            continue
        col, at = read(uri, cfg, groups)
        at = np.arange(len(col)) if at is None else at
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        out = out_of_range(col, kind)
        bad += [(fi, int(at[r]), "null id") for r in np.flatnonzero(~valid)]
        bad += [(fi, int(at[r]), range_why(col[int(r)].as_py())) for r in np.flatnonzero(out)]
        if first_only and bad:
            return (bad[:1], *[np.empty((0, 3), np.int64)] * nb)
        valid &= ~out
        ids.append(int_ids(col.filter(pa.array(valid)), kind))
        where.append(np.stack([np.full(int(valid.sum()), fi), at[valid]], axis=1))
    rec = np.empty((sum(len(i) for i in ids), 3), np.int64)
    if len(rec):
        rec[:, 0] = np.concatenate(ids)
        rec[:, 1:] = np.concatenate(where)
    b = bucket_of(rec[:, 0], nb)
    order = np.argsort(b, kind="stable")
    return (bad, *np.split(rec[order], np.searchsorted(b[order], np.arange(1, nb))))


def repeats(first_only: bool, *parts: np.ndarray) -> np.ndarray:
    """Phase 2 over one bucket's parts: an [k, 5] int64 array of (id, file, row, file0, row0) for each
    repeat of an id, (file0, row0) its first occurrence in (file, row) order; sorted by (id, file,
    row). With first_only, only the first row: the repeat of the smallest id, the one reported."""
    a = np.concatenate(parts) if parts else np.empty((0, 3), np.int64)
    a = a[np.lexsort((a[:, 2], a[:, 1], a[:, 0]))]
    new = np.r_[True, a[1:, 0] != a[:-1, 0]]
    rep = np.flatnonzero(~new)
    if first_only:
        rep = rep[:1]
    starts = np.flatnonzero(new)
    first = starts[np.searchsorted(starts, rep, side="right") - 1]
    return np.concatenate([a[rep], a[first, 1:]], axis=1)


def check_ids(files: list[str], rows: list[int], cfg: BuildConfig, kind: str, read, ray: bool,
              groups: dict[int, list[int]] | None = None) -> dict:
    """Null, out-of-range and duplicate ids. Raise naming file and row (the first bad row in file
    order; else the repeat of the smallest duplicate id, naming its first occurrence), or with
    --bad-rows skip return {uri: [(row, why)]}: per file its null and out-of-range rows, then its
    repeats in id order. read(uri, cfg, groups): see scan; ray: run in tasks. groups: the only row
    groups to read of some files (a reindex's unchanged files, plan/known.py), whose rows says how
    many rows that reads."""
    first_only = cfg.bad_rows == "error"
    groups = groups or {}
    jobs = [[(fi, files[fi], groups.get(fi)) for fi in b] for b in batches(rows)]
    nb = 1
    if ray:
        ensure_ray()
        nb = max(buckets_for(sum(rows)), min(cluster_cpus(), len(jobs)))  # every CPU sorts a bucket
        task = remote(scan).options(num_cpus=1, num_returns=nb + 1)
        outs = [task.remote(j, cfg, kind, nb, first_only, read) for j in jobs]
        bad = ray_get([o[0] for o in outs])  # small: the bad rows (one a batch when they are an error)
    else:
        outs = []
        for j in jobs:  # stop at the first batch with a bad row, as the error needs nothing after it
            outs.append(scan(j, cfg, kind, nb, first_only, read))
            if first_only and outs[-1][0]:
                break
        bad = [o[0] for o in outs]
    drops: dict[str, list[tuple[int, str]]] = {}
    for fi, r, why in (x for b in bad for x in b):
        _reject(cfg, drops, files[fi], r, why)
    if ray:
        task = remote(repeats).options(num_cpus=1)
        reps = ray_get([task.remote(first_only, *[o[k + 1] for o in outs]) for k in range(nb)])
    else:
        reps = [repeats(first_only, *[o[1] for o in outs])]
    del outs  # the buckets' refs: their objects are freed
    rep = np.concatenate(reps)
    rep = rep[np.lexsort((rep[:, 2], rep[:, 1], rep[:, 0]))]
    what = "duplicate id" if kind == "int" else "duplicate id (or a hash collision of two string ids)"
    for x, fi, r, f0, r0 in rep.tolist():
        _reject(cfg, drops, files[fi], r, f"{what} {x}, first at {files[f0]} row {r0}")
    return drops


def _reject(cfg: BuildConfig, drops: dict, uri: str, row: int, why: str) -> None:
    if cfg.bad_rows == "error":
        raise CorpusError(f"{uri} row {row}: {why} (column {cfg.id_column!r}); "
                          "fix the row, or pass --bad-rows skip to quarantine it")
    drops.setdefault(uri, []).append((row, why))
