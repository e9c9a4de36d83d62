"""fields: the stored fields of each serving shard's documents, shuffled out of encode's docs parts; and,
the same way, its refine store (its vectors at full precision, shards/storage/refine.py) out of the
embeddings parts.

Two kinds of Ray task (layout and reader: shards/storage/fields.py):
  scatter, one per docs part: the part's rows with the shard of each (hash: of the id; ivf: of the list
    its vector is in, from the add's list records, build/rowlists.py), written sorted by (shard, id) to
    work/<run>/fields-<g>/<part>.parquet, each shard's rows in row groups of their own;
  gather, one per shard: the row groups of its rows in every scattered part, read by their statistics,
    cut into id ranges of about FILE_BYTES (from the row groups' id ranges), each sorted and written as
    one file of versions/<v>/, recorded in work/<run>/fields-<g>/shard-<s>.json (a rerun skips it).
A refine shuffle scatters the embeddings parts' (id, vector) in row groups of refine.ROW_GROUP_BYTES and
gathers a shard's ranges, in id order, into one refine file. A range reads only the row groups that
overlap it, so each row is read about once. The driver holds the file names and one record per
written file: O(P + S) small records. A compaction gathers a shard's
own generations instead, its newest row of each id that is still live.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from index_builder import progress
from index_builder.build import rowlists
from index_builder.build.compact import live_ids as compact_ids
from index_builder.encode.parts import part_rel
from index_builder.shard_math import hash_shard
from shards.errors import IntegrityError
from shards.raytools import TASK_RETRIES
from shards.storage import fields as layout
from shards.storage import refine as refine_layout
from shards.storage.manifest import FieldsInfo, Manifest, vdir
from shards.storage.store import Store

SHARD = "_shard"
CUT_STEPS = 8  # points per row group when cutting id ranges


def shards_of(store: Store, ids: np.ndarray, emb: str, spec: dict) -> np.ndarray:
    """The shard of each id (sorted docs ids) of embeddings part emb. spec: {"mode", "shards", and for
    ivf "starts" (each shard's first list) and "tfp" (the trained index's sha256)}."""
    if spec["mode"] != "ivf":
        return hash_shard(ids, spec["shards"])
    e = store.read_table(emb, columns=["id"]).column("id").to_numpy()
    lists = rowlists.read(store, emb, spec["tfp"], len(e))
    if lists is None:
        raise IntegrityError(f"{store.uri(emb)}: no list record of its rows under the trained index; rerun the build")
    o = np.argsort(e, kind="stable")
    at = np.searchsorted(e[o], ids)
    if len(ids) and (at.max() >= len(e) or (e[o][at] != ids).any()):
        raise IntegrityError(f"{store.uri(emb)}: its ids differ from its docs part's")
    return np.searchsorted(np.asarray(spec["starts"]), lists[o][at], "right") - 1


@ray.remote(**TASK_RETRIES)
def scatter_task(store: Store, docs: str, emb: str, out: str, spec: dict, refine: str | None = None) -> str:
    """Docs part `docs` sorted by (shard, id) into out, one run of row groups per shard; refine (a
    refine store's dtype): embeddings part emb's ids and vectors instead."""
    if store.exists(out):
        return out
    t = store.read_table(emb, columns=["id", "vector"]) if refine else store.read_table(docs)  # sorted by id
    sh = shards_of(store, t.column("id").to_numpy(), emb, spec)
    o = np.argsort(sh, kind="stable")
    t = t.take(pa.array(o)).add_column(0, SHARD, pa.array(sh[o], pa.int32()))
    buf, bounds = io.BytesIO(), np.searchsorted(sh[o], np.arange(spec["shards"] + 1))
    with pq.ParquetWriter(buf, t.schema) as w:
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                part = t.slice(a, b - a)
                w.write_table(part, row_group_size=layout.row_group_rows(
                    part, refine_layout.ROW_GROUP_BYTES if refine else layout.ROW_GROUP_BYTES))
    store.write_bytes(out, buf.getvalue())
    return out


def _groups(store: Store, srcs: list[tuple[str, int]], s: int | None) -> list[tuple]:
    """(path, generation, row group, min id, max id, rows, bytes) of the row groups of srcs (path,
    generation) holding shard s's rows (s None: every row group)."""
    out = []
    for path, gen in srcs:
        with store.open(path) as f:
            md = pq.ParquetFile(f).metadata
        names = [md.schema.column(i).name for i in range(md.num_columns)]
        ci, cs = names.index("id"), names.index(SHARD) if SHARD in names else None
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            if s is not None and cs is not None and rg.column(cs).statistics.min != s:
                continue
            st = rg.column(ci).statistics
            out.append((path, gen, g, st.min, st.max, rg.num_rows, rg.total_byte_size))
    return out


def cuts(groups: list[tuple], n: int) -> list[int]:
    """Up to n - 1 ids splitting the rows of groups into n ranges of about equal rows (a group's rows
    taken as spread evenly over its ids, in CUT_STEPS steps: O(groups) whatever the ids)."""
    if n <= 1 or not groups:
        return []
    lo = np.array([g[3] for g in groups], np.float64)
    span = np.array([g[4] for g in groups], np.float64) - lo + 1
    step = np.arange(1, CUT_STEPS + 1) / CUT_STEPS
    ends = (lo[:, None] + span[:, None] * step[None, :]).ravel()  # each step's rows counted at its end
    mass = np.repeat(np.array([g[5] for g in groups], np.float64) / CUT_STEPS, CUT_STEPS)
    o = np.argsort(ends, kind="stable")
    x, cdf = np.concatenate([[lo.min()], ends[o]]), np.concatenate([[0.0], np.cumsum(mass[o])])
    at = np.interp(cdf[-1] * np.arange(1, n) / n, cdf, x)
    top = max(g[4] for g in groups)
    return sorted({c for c in np.rint(at).astype(np.int64).tolist() if lo.min() < c <= top})


def _range(store: Store, groups: list[tuple], s: int | None, lo: float, hi: float, live) -> pa.Table | None:
    """The rows of ids in [lo, hi) of those groups, shard s's only, the newest generation's of each id,
    those in live (sorted ids) only when given; sorted by id, without the shard column."""
    parts, by = [], {}
    for g in groups:
        if g[4] >= lo and g[3] < hi:
            by.setdefault(g[0], []).append(g)
    for path, mine in by.items():
        with store.open(path) as f:
            t = pq.ParquetFile(f).read_row_groups([g[2] for g in mine])
        ids = t.column("id").to_numpy()
        keep = (ids >= lo) & (ids < hi)
        if SHARD in t.column_names:
            keep &= t.column(SHARD).to_numpy() == s
            t = t.drop_columns([SHARD])
        t = t.filter(pa.array(keep))
        parts.append(t.append_column("_gen", pa.array(np.full(t.num_rows, mine[0][1], np.int64))))
    if not parts:
        return None
    t = pa.concat_tables(parts, promote_options="permissive")
    o = np.lexsort((-t.column("_gen").to_numpy(), t.column("id").to_numpy()))
    ids = t.column("id").to_numpy()[o]
    first = np.ones(len(o), bool)
    first[1:] = ids[1:] != ids[:-1]
    o = o[first]
    if live is not None:
        o = o[np.isin(t.column("id").to_numpy()[o], live)]
    return t.take(pa.array(o)).drop_columns(["_gen"]) if len(o) else None


@ray.remote(**TASK_RETRIES)
def gather_task(store: Store, srcs: list[tuple[str, int]], s: int | None, shard: int, version: str, gen: int,
                record: str, live_of: Manifest | None = None, refine: str | None = None) -> list[dict]:
    """Shard `shard`'s fields files of generation gen in version, from srcs (path, generation): scattered
    parts (their rows of shard s), or the shard's own files (s None) of live_of, its live ids' rows only.
    refine: its refine files instead, of that dtype."""
    if store.exists(record):
        return json.loads(store.read_text(record))
    live = compact_ids(store, live_of, shard) if live_of is not None else None
    groups = _groups(store, srcs, s)
    n = max(1, math.ceil(sum(g[6] for g in groups) / (refine_layout.FILE_BYTES if refine else layout.FILE_BYTES)))
    edges = [-math.inf, *cuts(groups, n), math.inf]
    ranges = (_range(store, groups, s, lo, hi, live) for lo, hi in zip(edges[:-1], edges[1:]))
    if refine:  # one file, each range appended as it is sorted
        f = refine_layout.write_ranges(store, refine_layout.rel(vdir(version), shard, gen),
                                       (t for t in ranges if t is not None), gen, refine)
        out = [f.model_dump()] if f else []
    else:
        out = [layout.write(store, layout.rel(vdir(version), shard, gen, b), t, gen).model_dump()
               for b, t in enumerate(t for t in ranges if t is not None)]
    store.write_text(record, json.dumps(out))
    return out


def spec_of(mode: str, shards: int, ranges: list | None, tfp: str) -> dict:
    return {"mode": mode, "shards": shards, "starts": [r[0] for r in ranges] if ranges else None, "tfp": tfp}


def shuffle(store: Store, root: str, fp: str, parts: list, spec: dict, version: str, gen: int,
            stored: list[str], id_kind: str, refine: str | None = None) -> list[list[FieldsInfo]]:
    """Per shard, its fields files of generation gen in version, from the docs of `parts` (encode's
    PartResults under embeddings/<fp>/); root: the run's work dir. None are written when there is
    nothing to look up (no stored fields and int ids: a hit is its id). refine (a dtype): the shards'
    refine files instead, from the parts' vectors."""
    if not refine and not stored and id_kind != "str":
        return [[] for _ in range(spec["shards"])]
    what = "refine" if refine else "fields"
    work = f"{root}/{what}-{gen}"
    refs = [scatter_task.options(num_cpus=0.5).remote(
        store, part_rel(fp, p.name, "docs"), part_rel(fp, p.name), f"{work}/part-{p.name}.parquet", spec, refine)
        for p in parts]
    srcs = [(r, gen) for r in progress.gather(refs, what, "parts")]
    S = spec["shards"]
    got = progress.gather([gather_task.options(num_cpus=0.5).remote(
        store, srcs, s, s, version, gen, f"{work}/shard-{s}.json", refine=refine) for s in range(S)], what, "shards")
    return [[FieldsInfo(**d) for d in g] for g in got]


def compact(store: Store, root: str, m: Manifest, due: list[int], version: str) -> dict[int, list[FieldsInfo]]:
    """The fields of m's shards in due, each rewritten as one new generation of version (its live rows).
    A compacted shard keeps referring to its refine files: a lookup by a live id finds its newest vector."""
    refs = {}
    for s in due:
        sh = m.shards[s]
        gen = max((f.gen for f in sh.fields), default=-1) + 1
        refs[s] = gather_task.options(num_cpus=0.5).remote(store, [(m.path(f.file), f.gen) for f in sh.fields], None,
                                                           s, version, gen, f"{root}/fields-compact-{s}.json", m)
    return {s: [FieldsInfo(**d) for d in ray.get(r)] for s, r in refs.items()}
